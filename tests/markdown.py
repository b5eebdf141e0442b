"""A GitHub-flavoured-markdown table check shared by the tests: every table parses, and renders as a table."""

from __future__ import annotations

import re


def cells(line: str) -> list[str]:
    """The cells of a table line, split on unescaped pipes (GFM: leading and trailing pipes are optional)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def tables(text: str) -> list[list[list[str]]]:
    """Every table in `text` as rows of cells; asserts header, separator and rows agree in their cell count and
    that a CommonMark+GFM-tables renderer (markdown-it-py) renders exactly as many tables."""
    from markdown_it import MarkdownIt

    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|?(\s*:?-{3,}:?\s*\|)+\s*:?(-{3,})?:?\s*", lines[i + 1]):
            header = cells(line)
            sep = [c for c in cells(lines[i + 1])]
            rows = []
            for x in lines[i + 2:]:
                if not x.startswith("|"):
                    break
                rows.append(cells(x))
            assert len(sep) == len(header), f"separator has {len(sep)} cells, header {len(header)}: {line}"
            for r in rows:
                assert len(r) == len(header), f"row has {len(r)} cells, header {len(header)}: {r}"
            found.append([header, *rows])
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert html.count("<table>") == len(found), (html.count("<table>"), len(found))
    return found

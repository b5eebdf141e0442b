"""Numbers as a reader sees them: three significant figures, intervals, units, GitHub-flavoured tables."""

from __future__ import annotations

import math


def sig(x: float, n: int = 3) -> str:
    """`n` significant figures, thousands separated, never scientific notation: 0.00123, 1.23, 1,230, 12,300."""
    if x is None or x != x:
        return ""
    if x == 0:
        return "0"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    digits = n - 1 - math.floor(math.log10(abs(x)))
    v = round(x, digits)
    if v and math.floor(math.log10(abs(v))) > math.floor(math.log10(abs(x))):  # 9.996 → 10.0: one digit fewer
        digits -= 1
        v = round(x, digits)
    return f"{v:,.{max(digits, 0)}f}"


def ci(value: float, low: float, high: float, scale: float = 1.0, suffix: str = "") -> str:
    """'1.23 (1.20–1.26)'; the interval omitted when there is none (one repeat)."""
    if value != value:
        return ""
    text = f"{sig(value * scale)}{suffix}"
    if low == low and high == high and (low != value or high != value):
        text += f" ({sig(low * scale)}–{sig(high * scale)})"
    return text


def mib(x: float) -> str:
    return sig(x / 2**20) if x == x else ""


def ms(x: float) -> str:
    return sig(x * 1e3) if x == x else ""


def size(x: float) -> str:
    if x != x:
        return ""
    if x >= 2**30:
        return f"{sig(x / 2**30)} GiB"
    return f"{sig(x / 2**20)} MiB" if x >= 2**20 else f"{sig(x / 2**10)} KiB"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table: header, separator and every row have the same number of cells."""
    clean = [[str(c).replace("|", "/").replace("\n", " ") for c in row] for row in rows]
    if any(len(r) != len(header) for r in clean):
        raise ValueError("a table row does not have one cell per column")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in clean]

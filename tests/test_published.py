"""What the project publishes: committed summaries and the README render as tables, and the README's results
section is exactly what `peft-bench report results/default --readme README.md` generates from the CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_bench.report import summary as report

from .markdown import tables

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("results/*/summary.md")))
def test_every_committed_summary_table_renders(path):
    assert tables((ROOT / path).read_text())


def test_readme_tables_render():
    assert len(tables((ROOT / "README.md").read_text())) >= 4


def test_readme_results_section_is_generated_from_results_default(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (ROOT / "README.md").read_text()
    i, j = text.index(report.README_BEGIN), text.index(report.README_END) + len(report.README_END)
    assert text[i:j] == report.readme_block(Path("results/default")), \
        "README results section is stale: run `peft-bench report results/default --readme README.md`"


def test_readme_accuracy_section_is_generated_from_results_accuracy(monkeypatch):
    monkeypatch.chdir(ROOT)
    if not (ROOT / "results" / "accuracy" / "metrics.csv").exists():
        pytest.skip("no committed accuracy results")
    text = (ROOT / "README.md").read_text()
    i, j = text.index(report.ACCURACY_BEGIN), text.index(report.ACCURACY_END) + len(report.ACCURACY_END)
    assert text[i:j] == report.accuracy_readme_block(Path("results/accuracy")), \
        "README accuracy section is stale: run `peft-bench report results/accuracy --readme README.md`"


def test_readme_methods_section_is_the_capability_table_peft_bench_list_prints():
    from peft_bench.methods import capabilities

    text = (ROOT / "README.md").read_text()
    i = text.index(capabilities.README_BEGIN)
    j = text.index(capabilities.README_END) + len(capabilities.README_END)
    assert text[i:j] == capabilities.readme_block(), \
        "README methods section is stale: run `peft-bench list --readme README.md`"


def test_readme_serving_figures_are_the_committed_summarys():
    """Every ratio in the README's serving table, and the headline figures beside it, appear in
    results/inference/summary.md (regenerated from serving.csv by `peft-bench report results/inference`)."""
    readme = (ROOT / "README.md").read_text()
    summary = (ROOT / "results" / "inference" / "summary.md").read_text()
    part = readme[readme.index("### Serving adapters"):readme.index("## The tutorial's experiments")]
    ratios = [c.strip() for line in part.splitlines() if line.startswith("| LoRA") or line.startswith("| IA3")
              for c in line.strip("|").split("|")[1:]]
    assert len(ratios) == 9 and all(r in summary for r in ratios)
    for figure in ("0.389× (0.325–0.467)", "1.76 MiB (= closed form)", "6.28 MiB (= closed form)",
                   "7.16 MiB (= closed form)", "30.3 (28.9–31.7)", "0 (a tie)"):
        assert figure in summary


def _rows(text: str, first: str) -> dict[str, list[str]]:
    """The table rows of `text` whose first cell starts with `first`, keyed by the method cell."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first):
            out[cells[0]] = cells
    return out


def test_readme_planner_figures_are_the_committed_files():
    """The README's planned-versus-published table is results/plan/published.md's (planned, published as quoted,
    error), and its largest-length lines those the 8B plan printed into results/plan/llama-3.1-8b-seq-len.md."""
    readme = (ROOT / "README.md").read_text()
    published = _rows((ROOT / "results" / "plan" / "published.md").read_text(), "`")
    block = readme[readme.index("| experiment | planned GiB |"):]
    shown = _rows(block[:block.index("\n\n")], "`")
    assert shown
    for method, cells in shown.items():
        (match,) = [p for p in published.values() if p[1] == method]
        assert cells[1:4] == match[3:6], (method, cells, match)
    litgpt = _rows((ROOT / "results" / "plan" / "published.md").read_text().split("## litgpt")[1], "`")
    block = readme[readme.index("| config (litgpt) |"):]
    shown = _rows(block[:block.index("\n\n")], "`")
    assert len(shown) == len(litgpt) == 6
    for config, cells in shown.items():
        assert cells[1:3] + cells[3:] == litgpt[config][1:2] + litgpt[config][3:4] + litgpt[config][5:], cells
    fitted = (ROOT / "results" / "plan" / "process-peak.md").read_text()
    para = readme[readme.index("How far to trust it on the CPU."):readme.index("The attention column says")]
    for figure in ("153 ", "93 %", "13.1%", "15.5%", "23.3 MiB", "0.622", "0.128", "78 %"):
        assert figure.replace("%", " %").replace("  ", " ") in para.replace("−", "-") and figure in fitted, figure
    lines = [x for x in (ROOT / "results" / "plan" / "llama-3.1-8b-seq-len.md").read_text().splitlines()
             if x.startswith("- ")]
    assert lines and all(x in readme for x in lines)


def _intervals(text: str) -> list[str]:
    """Every "x (a–b" interval the text quotes (a figure with its 95 % interval)."""
    import re

    return [f"{m[0]} ({m[1]}–{m[2]}" for m in re.findall(r"(\d[\d.,]*\d|\d) \((\d[\d.,]*\d|\d)–(\d[\d.,]*\d|\d)", text)]


@pytest.mark.parametrize("section,source", [("### Beyond one process", "results/distributed/summary.md"),
                                            ("### All twenty methods", "results/methods/summary.md")])
def test_readme_intervals_are_the_committed_summarys(section, source):
    """Each figure the README quotes with its interval in this section is printed so in the committed summary."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(section)
    text = readme[start:readme.index("\n### ", start + 4)]
    summary = (ROOT / source).read_text()
    missing = [x for x in _intervals(text) if x not in summary]
    assert _intervals(text) and not missing, missing


def test_readme_capacity_figures_are_the_committed_run():
    """The capacity example's batches are those `results/capacity/summary.md` reports."""
    readme = (ROOT / "README.md").read_text()
    found = {}
    for line in (ROOT / "results" / "capacity" / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| gpt-neo-tiny"):
            found[cells[1]] = cells[2]
    assert len(found) == 2 and f"batch {found['full']} (full) and {found['lora']} (LoRA) confirmed" in readme


def test_readme_scaling_figures_are_the_committed_depth_summary():
    """"How cost grows" quotes the published-formula witness as results/scaling/depth/summary.md prints it."""
    import re

    readme = (ROOT / "README.md").read_text()
    part = readme[readme.index("### How cost grows"):readme.index("### Beyond one process")]
    summary = (ROOT / "results" / "scaling" / "depth" / "summary.md").read_text()
    published, tracked = re.search(r"on gpt-neo-125m-arch ([\d,]+) against the tracker's ([\d,]+) bytes", part).groups()
    assert f"{published} bytes per token per layer" in summary and f"the tracker's fitted {tracked}" in summary


def test_readme_fsdp_plan_figures_are_the_committed_plan():
    """The README's per-rank FSDP figures are the committed plan's, whose peaks torch's FSDP tracker read alike."""
    import re

    readme = (ROOT / "README.md").read_text()
    full, lora = re.search(r"([\d.]+) GiB a rank for full fine-tuning,\n([\d.]+) GiB for LoRA", readme).groups()
    text = (ROOT / "results" / "plan" / "llama-3.1-8b-fsdp-4.md").read_text().split("| rank's weights")[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| llama")]
    peaks = {c[1]: (c[5], c[6]) for c in cells}
    assert peaks == {"full": (full, full), "lora": (lora, lora)}

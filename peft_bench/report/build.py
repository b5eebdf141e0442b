"""The report of a results folder, rebuilt from its rows alone: which kind of run it holds (a learning-rate sweep, a
torchrun suite, an accuracy-only run, a sweep, or a suite of cells) decides which summary and plots are written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..measure.repeats import of_run
from ..results import atomic_write_text, read_environment, read_rows, read_samples, read_serving
from . import distributed as dist_report
from . import fits as sweep
from . import html, plots, serving
from .summary import accuracy_only, accuracy_summary, across_seeds, cells, first_seed, load_frame, made_by, summary
from .tune import choose
from .tune import summary as tune_summary


def build(out: Path, arch: Callable[..., dict] | None = None) -> None:
    """Rebuild plots, summary.md and report.html from metrics.csv and repeats.csv (and environment.json).

    `arch(workload, width, depth)`: the engine's description of a model a sweep built (layers, width, heads), for the
    per-layer activation lines of a sweep; without it those lines are left out."""
    df = load_frame(out)  # refuses bad values before anything is written
    env = read_environment(out)
    served = _served(out, env)  # read once: the summary and the page both show them
    _summary(out, df, env, arch, served)
    write_html(out, df, env, served)


def write_html(out: Path, df=None, env: dict | None = None, served: list[dict] | None = None) -> Path:
    """DIR/report.html from the folder's rows (and its serving rows), beside the plots already there."""
    df = load_frame(out) if df is None else df
    env = read_environment(out) if env is None else env
    served = _served(out, env) if served is None else served
    return html.write(out, df, env, serving.sections(served) if served else None)


def _served(out: Path, env: dict) -> list[dict]:
    """This run's serving rows (a disturbed repeat's, measured again, keep used=False: the report times without
    them and keeps their exact checks)."""
    return of_run(read_serving(out / "serving.csv"), env.get("run_id"))


def _summary(out: Path, df, env: dict, arch, served: list[dict]) -> None:
    """summary.md and the plots of whichever kind of run the folder holds."""
    samples = of_run(read_samples(out / "repeats.csv"), env.get("run_id"))  # this run's repeats, as metrics.csv's
    seeds = across_seeds(df)
    if len(seeds):
        seeds.to_csv(out / "summary_seeds.csv", index=False)
    else:
        (out / "summary_seeds.csv").unlink(missing_ok=True)
    if "split" in df.columns and (df.split == "validation").any():  # a learning-rate sweep
        text = tune_summary(out)
        atomic_write_text(out / "chosen.json", json.dumps(choose(read_rows(out / "metrics.csv")), indent=1,
                                                          sort_keys=True) + "\n")
        atomic_write_text(out / "summary.md", text)
        return
    if dist_report.is_distributed(df):  # under torchrun: communication, scaling and memory per rank
        text = dist_report.summary(df, env)
        dist_report.plot(df, out / "distributed.png")
        atomic_write_text(out / "summary.md", text)
        return
    if not (df.status == "ok").any():  # nothing measured: say why each cell failed, no plots of nothing
        atomic_write_text(out / "summary.md", failures_summary(df, env))
        return
    if served:  # suite inference: the serving tables and plot
        has_plot = serving.plot(served, out / "serving.png")
        atomic_write_text(out / "summary.md", serving_summary(env, served, has_plot))
        return
    if accuracy_only(df):
        plots.accuracy_across_seeds(seeds, out / "accuracy_seeds.png")
        atomic_write_text(out / "summary.md", accuracy_summary(df, env, seeds))
        return
    if sweep.is_sweep(df):  # fits, crossovers and the log-log plot; the per-cell tables name each point
        lines = sweep.write(df, out, arch)
        text = summary(sweep.labelled(df), env, samples, per_method=False)
        head, sep, rest = text.partition("\n## ")
        atomic_write_text(out / "summary.md", head + "\n".join(lines) + "\n" + sep.lstrip("\n") + rest)
        return
    text = summary(df, env, samples)  # computed before any file is replaced
    plots.make_all(first_seed(cells(df)), out)
    atomic_write_text(out / "summary.md", text)


def serving_summary(env: dict, rows: list[dict], has_plot: bool) -> str:
    lines = ["# Serving: generation with a KV cache, merged and unmerged, many adapters", "", *made_by(env),
             *serving.sections(rows)]
    if has_plot:
        lines += ["![decode latency per token vs adapters loaded](serving.png)", ""]
    return "\n".join(lines)


def failures_summary(df, env: dict) -> str:
    """summary.md of a run where no cell finished: what each cell was and why it ended."""
    from .format import table

    rows = [[str(r.get("method", "")), str(r.get("workload", "")), str(r.get("status", "")),
             str(r.get("reason", "") or "")] for r in df.to_dict("records")]
    return "\n".join(["# peft-bench: no cell finished", "", *made_by(env),
                      *table(["method", "workload", "status", "reason"], rows), ""])

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
from . import plots, serving
from .summary import accuracy_only, accuracy_summary, across_seeds, cells, first_seed, load_frame, made_by, summary
from .tune import choose
from .tune import summary as tune_summary


def build(out: Path, arch: Callable[..., dict] | None = None) -> None:
    """Rebuild plots and summary.md from metrics.csv and repeats.csv (and environment.json when present).

    `arch(workload, width, depth)`: the engine's description of a model a sweep built (layers, width, heads), for the
    per-layer activation lines of a sweep; without it those lines are left out."""
    df = load_frame(out)  # refuses bad values before anything is written
    env = read_environment(out)
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
    served = [r for r in of_run(read_serving(out / "serving.csv"), env.get("run_id"))
              if str(r.get("used")).lower() != "false"]  # a disturbed repeat measured again: the new one counts
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

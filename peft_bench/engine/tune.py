"""`peft-bench tune`: a learning rate per (method, workload), chosen on a validation split, never on the test split.

    peft-bench tune                                   # the pretrained workloads, each method's grid, results/tune/
    peft-bench tune --workloads minilm-sentiment --methods lora --lr 1e-4,3e-4,1e-3

Each (method, workload, rate) cell trains for the accuracy suite's budget on the training split minus a stratified
validation split (`Workload.validation_data`), then scores that validation split; no other probe runs. The rate with
the highest validation accuracy is chosen (the lower rate on a tie). Methods with `tunes_like` (the same
parametrisation as another method) are not swept; they take that method's rate. `summary.md` lists every rate
tried with its Wilson interval, and `chosen.json` the choice, which `suites.TUNED` copies (a test keeps them equal);
those two are the report's (`peft_bench.report.tune`), written when the CLI builds the report after the run.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..methods import method_class
from ..workloads import get_workload
from .runner import Outcome, run_suite
from .suites import get_suite, lr_grid

SUITE = "accuracy"  # the budgets the chosen rates are for


def default_workloads() -> list[str]:
    return [w for w in get_suite(SUITE).workloads if get_workload(w).pretrained]


def default_methods() -> list[str]:
    from .suites import ALL

    return [m for m in ALL if method_class(m).tunes_like is None]


def run(asked: RunConfig, argv: list[str] | None = None) -> Outcome:
    """Each method's grid of rates (or the rates asked) on the validation split, at the accuracy suite's budget."""
    methods = asked.methods or default_methods()
    for m in methods:
        method_class(m)
    grids = {m: tuple(asked.lrs) if asked.lrs else lr_grid(m) for m in methods}
    cfg = RunConfig(suite=SUITE, methods=tuple(methods), workloads=tuple(asked.workloads or default_workloads()),
                    out=asked.out or Path("results/tune"), resume=asked.resume, seeds=(0,), lrs=grids,
                    split="validation", probes="accuracy", train_steps=asked.train_steps, repeats=1,
                    allow_busy=True)  # accuracy only: other processes cannot change it
    return run_suite(cfg, argv)

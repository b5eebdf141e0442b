"""One benchmark per (method × workload) cell of the selected suite: correctness first, then timing."""

from __future__ import annotations

import dataclasses
import math

import pytest

from peft_bench.engine.cell import training_step
from peft_bench.engine.launch import run_isolated as _run_isolated


def test_cell(cell_id, cell, results, benchmark, request):
    cell = dataclasses.replace(cell, matmul_peak_flops=results.peak)
    row = _run_isolated(cell, request.config.getoption("--cell-timeout"))
    row.update(cell_key=cell.key(), suite=request.config.getoption("--suite"))
    results.add(row)
    if row["status"] == "unsupported":
        pytest.skip(row["reason"])
    assert row["status"] == "ok", row["reason"]
    # Correctness before timing: counts match their closed form, static memory matches it too.
    assert row["trainable_params"] == row["closed_form_trainable_params"]
    assert row["static_matches_closed_form"] is True

    step, _, _ = training_step(cell)
    benchmark.group = row["workload"]
    benchmark.extra_info.update({k: v for k, v in row.items()
                                 if isinstance(v, (int, float, bool)) and not (isinstance(v, float) and math.isnan(v))})
    benchmark.extra_info.update(method=cell.method, workload=row["workload"], device=cell.device)
    loss = benchmark.pedantic(step, rounds=cell.timed_steps, warmup_rounds=cell.warmup_steps, iterations=1)
    assert math.isfinite(float(loss))

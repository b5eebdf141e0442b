"""The runner's rounds with a stand-in for the cell process (no model is built): runs that never mix, rounds added
until --target-ci is met or the time budget is spent, a disturbed repeat re-measured as a pair in a new round, the
guard over the timed steps alone, and the canary against the idle machine's."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time

import pandas as pd
import pytest

from peft_bench.cli import main
from peft_bench.config import RunConfig
from peft_bench.engine import launch, runner
from peft_bench.engine.loop import Hooks, Window, run_steps
from peft_bench.measure import repeats as rep

IDLE = 1e11
pytestmark = pytest.mark.xdist_group("repeats")  # its burners load the machine, like test_repeats.py's


class FakeCells:
    """Rows as a cell process would write them: lora runs at 0.5 × full; each process lands with `noise` (log σ);
    `busy` names (method, call number) pairs whose timed steps saw a neighbour."""

    def __init__(self, noise: float = 0.0, busy: tuple = ()):
        self.rng, self.noise, self.busy, self.calls = random.Random(0), noise, set(busy), []

    def __call__(self, spec, timeout):
        self.calls.append((spec.method, spec.replica))
        t = (1.0 if spec.method == "full" else 0.5) * pow(2.718281828, self.rng.gauss(0, self.noise))
        busy = (spec.method, len(self.calls)) in self.busy
        return {"method": spec.method, "workload": spec.workload, "status": "ok", "step_time_s": t,
                "step_time_split_s": t, "forward_s": t / 2, "backward_s": t / 2, "optimizer_s": 0.0,
                "other_cpu_pct": 60.0 if busy else 1.0, "cpu_steal_pct": 0.0, "load_avg_1m": 0.1,
                "interference_repeats": int(busy), "canary_flops_per_s": IDLE, "replica": spec.replica,
                "samples_per_s": 1 / t, "batch_size": 1}


@pytest.fixture
def fake(monkeypatch):
    cells = FakeCells()
    monkeypatch.setattr(launch, "run_isolated", lambda spec, timeout: cells(spec, timeout))
    monkeypatch.setattr(launch, "matmul_peak_in_child", lambda device, dtype: IDLE)
    return cells


def _cfg(out, **kw) -> RunConfig:
    base = dict(suite="smoke", methods=("full", "lora"), workloads=("mlp-mnist-tiny",), out=out, repeats=2,
                allow_busy=True)
    return RunConfig(**{**base, **kw})


def _samples(out) -> pd.DataFrame:
    return pd.read_csv(out / "repeats.csv")


def test_a_used_out_is_refused_and_overwrite_or_resume_never_mix_runs(fake, tmp_path, capsys):
    out = tmp_path / "run"
    assert runner.run_suite(_cfg(out)).code == 0
    first = json.loads((out / "environment.json").read_text())["run_id"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(Exception, match="already holds a run"):
        runner.run_suite(_cfg(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused before anything was written
    assert runner.run_suite(_cfg(out, repeats=3, overwrite=True)).code == 0
    s = _samples(out)
    second = json.loads((out / "environment.json").read_text())["run_id"]
    assert second != first and set(s.run_id) == {second}
    assert runner.run_suite(_cfg(out, repeats=3, resume=True)).code == 0
    assert json.loads((out / "environment.json").read_text())["run_id"] == second
    m = pd.read_csv(out / "metrics.csv")
    assert set(m.run_id) == {second} and (m.repeats == 3).all()
    with pytest.raises(Exception, match="not both"):
        runner.run_suite(_cfg(out, resume=True, overwrite=True))


def test_the_cli_refuses_a_used_out_in_one_line(fake, tmp_path, capsys):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "metrics.csv").write_text("method,workload,status,cell_key\nlora,t5-tiny,ok,k1\n")
    code = main(["run", "--methods", "lora", "--workloads", "mlp-mnist-tiny", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]


def test_rounds_are_added_until_the_target_is_met(monkeypatch, tmp_path):
    cells = FakeCells(noise=0.03)
    monkeypatch.setattr(launch, "run_isolated", cells)
    monkeypatch.setattr(launch, "matmul_peak_in_child", lambda device, dtype: IDLE)
    out = tmp_path / "run"
    runner.run_suite(_cfg(out, target_ci=5.0, time_budget=600.0))
    m = pd.read_csv(out / "metrics.csv")
    assert (m.repeats_stopped == "target met").all() and (m.ci_half_width_pct <= 5).all()
    assert m.repeats.max() > 2  # two processes could not reach ±5 %


def test_no_budget_means_no_added_rounds_and_each_row_says_so(monkeypatch, tmp_path):
    cells = FakeCells(noise=0.03)
    monkeypatch.setattr(launch, "run_isolated", cells)
    monkeypatch.setattr(launch, "matmul_peak_in_child", lambda device, dtype: IDLE)
    out = tmp_path / "run"
    runner.run_suite(_cfg(out, target_ci=0.001))
    m = pd.read_csv(out / "metrics.csv")
    assert (m.repeats == 2).all() and set(m.repeats_stopped) == {"no time budget"}


@pytest.mark.parametrize("budget", [600.0, None])  # with no budget the target adds no rounds; re-measures still run
def test_a_disturbed_repeat_is_measured_again_as_a_pair_in_a_new_round(budget, monkeypatch, tmp_path):
    cells = FakeCells(busy={("lora", 5)})  # round 2's lora (calls: full, lora, A/A, full, lora, A/A)
    monkeypatch.setattr(launch, "run_isolated", cells)
    monkeypatch.setattr(launch, "matmul_peak_in_child", lambda device, dtype: IDLE)
    out = tmp_path / "run"
    runner.run_suite(_cfg(out, target_ci=1000.0, time_budget=budget))
    s = _samples(out)
    extra = s[s.repeat == 2]
    assert sorted(extra.method) == ["full", "lora"]  # lora and its reference, together, in a new round
    disturbed = s[(s.method == "lora") & (s.replica == 0) & (s.repeat == 1)].iloc[0]
    assert not disturbed.used and bool(extra[extra.method == "lora"].remeasured.iloc[0])
    m = pd.read_csv(out / "metrics.csv").set_index(["method", "replica"])
    assert m.loc[("lora", 0), "remeasured"] == 1 and m.loc[("lora", 0), "interference_repeats"] == 0
    assert m.loc[("lora", 0), "step_time_vs_full"] == pytest.approx(0.5)  # paired over rounds 1 and 3 alone


def test_a_run_slow_throughout_is_flagged_against_the_idle_machine():
    """Every repeat at 0.6× the idle canary: against the run's own median nothing stands out; against the idle
    machine's reading (environment.json) the whole run is flagged, every repeat counted as disturbed."""
    key = json.dumps({"method": "lora", "workload": "w"})
    samples = [{"status": "ok", "canary_flops_per_s": 0.6 * IDLE, "used": True, "busy": False, "repeat": r,
                "cell_key": key, "remeasured": False, "step_time_s": 1.0, "other_cpu_pct": 0, "cpu_steal_pct": 0,
                "load_avg_1m": 0, **{c: 1.0 for c in rep.TIMES}} for r in range(3)]
    assert not any(rep.disturbed(s, rep.speeds(samples)) for s in samples) and not rep.to_remeasure(samples)
    (row,) = rep.aggregate([{"status": "ok", "cell_key": key, "step_time_s": 1.0}], samples, reference=IDLE)
    assert row["run_machine_speed"] == pytest.approx(0.6) and row["interference_repeats"] == 3
    (quiet,) = rep.aggregate([{"status": "ok", "cell_key": key, "step_time_s": 1.0}], samples, reference=0.7 * IDLE)
    assert quiet["interference_repeats"] == 0


class _Steps:
    """A stand-in trainer whose step is 10 ms of this process's own CPU."""

    device = "cpu"

    def step(self, batch):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.01:
            pass
        return time.perf_counter() - t0, [0.0, 0.0, 0.0]


def test_the_guard_sees_a_neighbour_busy_during_the_timed_steps_alone():
    """CPU burners start at the first timed step and stop after the last: the guard, watching the timed steps alone
    (1.2 s of a 2.2 s loop, not the quiet warm-up a whole-cell window would dilute them with), sees them."""
    burners: list = []
    start = lambda: burners.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"])  # noqa: E731
                                   for _ in range(os.cpu_count() or 1))
    stop = lambda: [p.kill() for p in burners]  # noqa: E731
    timed = run_steps(_Steps(), itertools.repeat({"labels": [0]}), Window(100, 220, 220), lambda b: 1,
                      Hooks(on_start=start, on_end=stop))
    assert timed.load["interference_repeats"] == 1 and timed.load["other_cpu_pct"] > 30, timed.load
    assert 1.1 < timed.load["interference_window_s"] < 2.0  # the 120 timed steps of 10 ms, not the whole loop

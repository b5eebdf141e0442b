"""Repeats, confidence intervals, the noise floor, the busy-machine guard and `peft-bench compare`."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import pandas as pd
import pytest

from peft_bench.cli import main
from peft_bench.measure import interference, stats, timing
from peft_bench.measure.repeats import aggregate, sample
from peft_bench.report import summary as report

from .markdown import tables

# One xdist worker (`pytest -n 2 --dist loadgroup`, the README's test command): its tests share the session's run
# with repeats with test_report.py (once, not once per worker), and two load the whole machine on purpose.
pytestmark = pytest.mark.xdist_group("repeats")


# -- statistics against closed forms ------------------------------------------------------------------------------
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}  # Student-t 97.5 % quantiles, from the printed tables (not scipy)


def test_log_t_is_the_geometric_mean_with_the_t_interval_of_the_logs():
    xs = [1.0, 1.1, 1.3]
    logs = [math.log(x) for x in xs]
    m, sd = sum(logs) / 3, math.sqrt(sum((v - sum(logs) / 3) ** 2 for v in logs) / 2)
    est = stats.log_t(xs)
    assert est.value == pytest.approx((1.0 * 1.1 * 1.3) ** (1 / 3)) and est.n == 3 and est.level == 0.95
    assert est.low == pytest.approx(math.exp(m - T975[2] * sd / math.sqrt(3)), rel=1e-4)
    assert est.high == pytest.approx(math.exp(m + T975[2] * sd / math.sqrt(3)), rel=1e-4)
    two = stats.log_t([1.0, 1.2])  # one degree of freedom: wide, as it must be
    assert two.high / two.value == pytest.approx(math.exp(T975[1] * abs(math.log(1.2)) / 2), rel=1e-4)


def test_one_observation_has_no_interval_not_a_zero_width_one():
    one = stats.log_t([2.0])
    assert one.value == 2.0 and one.n == 1 and not one.has_interval and math.isnan(one.low)
    assert stats.verdict(one, floor=0.05) == "not ranked (one repeat)"
    assert report.ci(one.value, one.low, one.high) == "2.00"


def test_paired_ratio_cancels_drift_that_hits_a_round_alike():
    """Round 2 is twice as slow for everyone: paired by round, the ratio is exactly 0.5 with no spread."""
    full = {0: 2.0, 1: 4.0, 2: 2.2}
    lora = {0: 1.0, 1: 2.0, 2: 1.1}
    est = stats.paired_ratio(lora, full)
    assert est.value == pytest.approx(0.5) and est.low == pytest.approx(0.5) and est.high == pytest.approx(0.5)
    unpaired = stats.log_t([a / b for a in lora.values() for b in full.values()])
    assert unpaired.high - unpaired.low > 0.2  # what pairing saves


def test_verdicts_never_rank_inside_the_noise():
    E = stats.Estimate
    assert stats.verdict(E(0.97, 0.93, 1.02, 3)) == "no measurable difference"  # CI includes 1
    assert stats.verdict(E(0.97, 0.96, 0.98, 3), floor=0.05) == "no measurable difference"  # inside the floor
    assert stats.verdict(E(0.5, 0.45, 0.55, 3), floor=0.05) == "faster"
    assert stats.verdict(E(1.5, 1.4, 1.6, 3), floor=0.05) == "slower"
    assert stats.noise_floor(E(1.01, 0.96, 1.03, 3)) == pytest.approx(0.04)


@pytest.mark.parametrize("x, text", [(0.0012345, "0.00123"), (1.2345, "1.23"), (12.345, "12.3"), (1234.5, "1,230"),
                                     (12345, "12,300"), (9.996, "10.0"), (999.6, "1,000"), (0.5, "0.500"),
                                     (100, "100"), (float("nan"), "")])
def test_three_significant_figures_without_scientific_notation(x, text):
    assert report.sig(x) == text


def test_ratio_with_ci_formats_as_a_paper_prints_it():
    assert report.ci(0.4812, 0.4523, 0.5099, suffix="×") == "0.481× (0.452–0.510)"
    assert report.ci(0.004812, 0.004, 0.005, scale=1e3) == "4.81 (4.00–5.00)"
    assert report.ci(2.0, 2.0, 2.0) == "2.00"  # one repeat: no interval


def test_step_clock_parts_add_up_to_the_whole_step_on_cpu():
    clock = timing.StepClock("cpu")
    clock.start()
    time.sleep(0.01)
    clock.mark()
    time.sleep(0.02)
    wall, parts = clock.stop()
    assert len(parts) == 2 and parts[0] >= 0.01 and parts[1] >= 0.02
    assert sum(parts) <= wall < sum(parts) + 0.005


# -- aggregation ------------------------------------------------------------------------------------------------
def _key(method: str, replica: int = 0) -> str:
    return json.dumps({"method": method, "workload": "w", "method_options": {}, "replica": replica, "lr": 0.1,
                       "seed": 0}, sort_keys=True)


def _row(method: str, replica: int = 0, t: float = 1.0) -> dict:
    return {"method": method, "workload": "w", "status": "ok", "cell_key": _key(method, replica), "replica": replica,
            "step_time_s": t, "samples_per_s": 10 / t, "batch_size": 10}


def _samples(method: str, times: list[float], replica: int = 0) -> list[dict]:
    return [sample({"step_time_s": t, "step_time_split_s": t, "forward_s": t / 2, "backward_s": t / 2,
                    "optimizer_s": 0.0, "other_cpu_pct": 1.0, "cpu_steal_pct": 0.0, "load_avg_1m": 0.5, "status": "ok",
                    "replica": replica}, _key(method, replica), r) for r, t in enumerate(times)]


def _log_t(xs: list[float], t: float) -> tuple[float, float, float]:
    logs = [math.log(x) for x in xs]
    m = statistics.fmean(logs)
    half = t * statistics.stdev(logs) / math.sqrt(len(xs))
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def test_aggregate_geometric_means_intervals_ratios_and_the_aa_ratio():
    rows = [_row("full", t=2.0), _row("lora", t=1.0), _row("lora", replica=1, t=1.0)]
    samples = _samples("full", [2.0, 2.4, 2.2]) + _samples("lora", [1.0, 1.3, 1.1]) + \
        _samples("lora", [1.1, 1.2, 1.1], replica=1)
    out = {(r["method"], r["replica"]): r for r in aggregate(rows, samples)}
    lora, full, aa = out["lora", 0], out["full", 0], out["lora", 1]
    want = _log_t([2.0, 2.4, 2.2], T975[2])
    got = (full["step_time_s"], full["step_time_ci_low_s"], full["step_time_ci_high_s"])
    assert got == pytest.approx(want, rel=1e-4)
    assert lora["repeats"] == 3 and math.isnan(full["step_time_vs_full"])  # full is the reference, not a ratio
    ratios = [1.0 / 2.0, 1.3 / 2.4, 1.1 / 2.2]  # paired by round
    want = _log_t(ratios, T975[2])
    got = (lora["step_time_vs_full"], lora["step_time_vs_full_ci_low"], lora["step_time_vs_full_ci_high"])
    assert got == pytest.approx(want, rel=1e-4)
    assert lora["ci_half_width_pct"] == pytest.approx(100 * (want[2] - want[1]) / 2 / want[0], rel=1e-4)
    assert lora["samples_per_s"] == pytest.approx(10 / lora["step_time_s"])  # throughput follows the step time
    assert aa["aa_ratio"] == pytest.approx(_log_t([1.1, 1.2 / 1.3, 1.0], T975[2])[0])
    assert full["interference_repeats"] == 0
    again = {(r["method"], r["replica"]): r for r in aggregate(list(out.values()), samples)}
    assert again["lora", 0]["samples_per_s"] == pytest.approx(lora["samples_per_s"])  # aggregating twice: same rows


def test_the_repeats_of_an_earlier_run_never_leak_into_a_new_one():
    """The issue's example: an old run's 5 × 2.0 s beside a new run's 3 × 1.0 s gave repeats = 5, CI [1.0, 2.0]."""
    rows = [_row("lora")]
    old = [dict(s, run_id="old") for s in _samples("lora", [2.0] * 5)]
    new = [dict(s, run_id="new") for s in _samples("lora", [1.0] * 3)]
    (row,) = aggregate(rows, old + new, run_id="new")
    assert row["repeats"] == 3 and (row["step_time_s"], row["step_time_ci_low_s"], row["step_time_ci_high_s"]) == \
        pytest.approx((1.0, 1.0, 1.0))


def test_a_remeasured_repeat_replaces_the_disturbed_one():
    rows = [_row("lora")]
    samples = _samples("lora", [1.0, 5.0, 1.1])
    samples[1].update(busy=True, used=False)
    samples.append(sample({"step_time_s": 1.05, "step_time_split_s": 1.05, "forward_s": 0.5, "backward_s": 0.5,
                           "optimizer_s": 0.05, "other_cpu_pct": 0.5, "cpu_steal_pct": 0, "load_avg_1m": 0.1, "status": "ok"},
                          _key("lora"), 3, remeasured=True))
    (row,) = aggregate(rows, samples)
    assert row["step_time_s"] == pytest.approx(_log_t([1.0, 1.1, 1.05], T975[2])[0]) and row["remeasured"] == 1
    assert row["repeats"] == 3 and row["interference_repeats"] == 0


# -- interference -----------------------------------------------------------------------------------------------
def _burners(n: int):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_interference_window_sees_other_processes_and_not_itself():
    with interference.Window() as own:  # this process busy: not interference
        end = time.perf_counter() + 0.6
        while time.perf_counter() < end:
            pass
    procs = _burners(os.cpu_count() or 1)
    try:
        time.sleep(0.2)
        load = interference.machine_load(1.0)
    finally:
        for p in procs:
            p.kill()
    assert own.load.other_cpu_pct < load.other_cpu_pct
    assert load.busy and load.other_cpu_pct > 50


def test_a_run_on_a_busy_machine_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PEFT_BENCH_ALLOW_BUSY", raising=False)
    out = tmp_path / "busy"
    procs = _burners(os.cpu_count() or 1)
    try:
        time.sleep(0.2)
        code = main(["run", "--suite", "smoke", "--methods", "lora", "--workloads", "mlp-mnist-tiny", "--out", str(out)])
    finally:
        for p in procs:
            p.kill()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "machine is busy" in err[0] and "--allow-busy" in err[0]


# -- a real run with repeats --------------------------------------------------------------------------------------
# `repeated`: the session's run with repeats (tests/conftest.py), shared with test_report.py


def test_repeats_run_round_robin_with_an_aa_copy(repeated):
    with open(repeated / "repeats.csv", newline="") as f:
        samples = list(csv.DictReader(f))
    order = [(s["method"], s["replica"], s["repeat"]) for s in samples if s["remeasured"] == "False"]
    # A B A' per round (prefix is unsupported on an MLP: never repeated), round after round
    assert order[:6] == [("full", "0", "0"), ("lora", "0", "0"), ("full", "1", "0"),
                         ("full", "0", "1"), ("lora", "0", "1"), ("full", "1", "1")]
    df = pd.read_csv(repeated / "metrics.csv")
    ok = df[(df.status == "ok") & (df.replica == 0)]
    assert (ok.repeats == 2).all()
    assert ((ok.step_time_ci_low_s <= ok.step_time_s) & (ok.step_time_s <= ok.step_time_ci_high_s)).all()
    rounds = pd.read_csv(repeated / "repeats.csv")
    rounds = rounds[rounds.used & (rounds.replica == 0)].pivot(index="repeat", columns="method", values="step_time_s")
    ratios = (rounds["lora"] / rounds["full"]).dropna()
    lora = ok[ok.method == "lora"].iloc[0]
    assert lora.step_time_vs_full == pytest.approx(math.exp(ratios.map(math.log).mean()))  # paired by round
    assert lora.step_time_vs_full_ci_low <= lora.step_time_vs_full <= lora.step_time_vs_full_ci_high
    aa = df[df.replica == 1].iloc[0]
    assert aa.method == "full" and aa.aa_ratio_ci_low <= aa.aa_ratio <= aa.aa_ratio_ci_high
    assert df.other_cpu_pct.notna().sum() >= 2 and "unsplit" not in df.columns
    assert (ok.step_time_split_s > 0).all() and (ok.canary_flops_per_s > 0).all()
    assert ((ok.machine_speed > 0.3) & (ok.machine_speed < 3)).all()


def test_summary_states_the_noise_floor_and_renders(repeated):
    text = (repeated / "summary.md").read_text()
    assert "Noise floor (A/A)" in text and "round-robin" in text
    found = tables(text)
    assert len(found) >= 3
    main_table = found[0]
    assert "options" in main_table[0] and any("r=8" in c for row in main_table for c in row)
    assert any(c == "n/a: random weights" for row in main_table for c in row)  # no accuracy on random weights


def test_compare_same_results_is_zero_and_a_slower_method_is_named(repeated, tmp_path, capsys):
    assert main(["compare", str(repeated), str(repeated)]) == 0
    tables(capsys.readouterr().out)
    from .test_compare import doctor

    # as if both were measured on a quiet machine (the other test worker runs beside this one): no interference, and
    # an A/A copy within ±5 % (two 2-ms cells on a loaded machine once read an A/A floor of ±186,000 %, over 1000×)
    calm = doctor(repeated, tmp_path / "calm", lambda k: True, factor=1.0, interference_repeats=0)
    quiet = doctor(calm, tmp_path / "quiet", lambda k: bool(k.get("replica")), 1.0, aa_ratio=1.0, aa_ratio_ci_low=0.95,
                   aa_ratio_ci_high=1.05)
    slower = doctor(quiet, tmp_path / "slower", lambda k: k["method"] == "lora" and not k.get("replica"), 1000.0)
    capsys.readouterr()
    assert main(["compare", str(quiet), str(slower)]) == 1
    err = capsys.readouterr().err
    assert "worse: lora × mlp-mnist-tiny: step_time_s" in err and "full" not in err


def test_compare_flags_a_changed_exact_quantity_and_speaks_csv_and_json(repeated, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(repeated, changed)
    df = pd.read_csv(changed / "metrics.csv")
    df.loc[(df.method == "lora") & (df.replica == 0), "trainable_params"] += 1
    df.to_csv(changed / "metrics.csv", index=False)
    assert main(["compare", str(repeated), str(changed), "--exact-only", "--format", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    worse = [x for x in out["lines"] if x["verdict"] == "worse"]
    assert [(x["cell"], x["metric"]) for x in worse] == [("lora × mlp-mnist-tiny", "trainable_params")]
    assert main(["compare", str(repeated), str(repeated), "--format", "csv"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    # a cell measured while the other test worker ran is not comparable for time, and says so; all else is the same
    assert rows and all(r["verdict"] == "same" or r["why"].startswith("measured under interference") for r in rows)


def test_compare_shows_other_options_as_not_comparable(repeated, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(repeated, other)
    df = pd.read_csv(other / "metrics.csv")

    def more_steps(key: str) -> str:
        d = json.loads(key)
        d["train_steps"] = 99
        return json.dumps(d, sort_keys=True)

    df["cell_key"] = df.cell_key.map(more_steps)
    df.to_csv(other / "metrics.csv", index=False)
    assert main(["compare", str(repeated), str(other)]) == 0
    text = capsys.readouterr().out
    assert "not comparable" in text and "train_steps 4 → 99" in text


@pytest.mark.parametrize("args", [["/nonexistent/a", "/nonexistent/b"], [".", "."], ["--format", "xml", ".", "."]])
def test_compare_bad_input_is_one_line_and_exit_2(args, capsys):
    assert main(["compare", *args]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_repeats_must_be_a_positive_integer(value, tmp_path, capsys):
    assert main(["run", "--suite", "smoke", "--repeats", value, "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists() and "--repeats" in capsys.readouterr().err


def test_a_repeat_on_a_slow_machine_is_flagged_by_its_canary():
    """No process list shows a noisy neighbour on the host; the matmul canary does."""
    from peft_bench.measure.repeats import disturbed, speeds, to_remeasure

    rows = [_row("lora")]
    samples = _samples("lora", [1.0, 1.6, 1.05])
    for s, c in zip(samples, (150e9, 75e9, 155e9)):  # a neighbour holding one of two cores: half speed
        s["canary_flops_per_s"] = c
    speed = speeds(samples)
    assert [disturbed(s, speed) for s in samples] == [False, True, False]
    assert [(s["repeat"], why) for s, why in to_remeasure(samples)] == [(1, "machine at 0.50× its usual speed")]
    (row,) = aggregate(rows, samples)
    assert row["interference_repeats"] == 1 and row["machine_speed"] == pytest.approx(75 / 150)
    samples[1]["canary_flops_per_s"] = 130e9  # 0.87×: within the canary's own scatter on an idle machine
    assert not any(disturbed(s, speeds(samples)) for s in samples)


def test_canary_is_two_n_cubed_over_the_median_matmul_time(monkeypatch):
    """The FLOP count of an n×n matmul is 2n³; the canary divides it by the median of its timed repeats."""
    times = iter([(None, 9.0), (None, 0.5), (None, 0.25), (None, 1.0)])  # warm-up, then 3 timed: median 0.5 s
    monkeypatch.setattr(timing, "timed", lambda fn, device: next(times))
    assert timing.canary_flops("cpu", n=256, reps=3) == 2 * 256**3 / 0.5


def test_wilson_interval_matches_its_closed_form():
    lo, hi = stats.wilson(8, 10)  # the textbook example: 8 of 10, 95 %: 0.4902–0.9433
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert stats.wilson(0, 10)[0] == 0 and round(stats.wilson(0, 10)[1], 4) == 0.2775
    assert stats.wilson(10, 10)[1] == 1


def test_accuracy_is_shown_with_its_interval_only_on_pretrained_bases_and_never_for_a_cell_that_did_not_learn():
    base = {"method": "lora", "accuracy": 0.75, "base_accuracy": 0.5, "test_examples": 600, "final_loss": 0.4,
            "first_losses": "[0.7, 0.69, 0.68]", "pretrained": "True"}
    row = pd.Series(base)
    assert report._accuracy_cell(row) == "0.750 (0.714–0.783), n=600; base 0.500"
    assert report._accuracy_cell(pd.Series({**base, "pretrained": "False"})) == "n/a: random weights"
    stuck = pd.Series({**base, "final_loss": 0.71})
    assert report._accuracy_cell(stuck).startswith("did not learn: ") and "not ranked" in report._notes(stuck)

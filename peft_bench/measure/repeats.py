"""Repeats of a cell and what they add up to.

Each repeat is a fresh process; its timing lands in `repeats.csv` as one *sample* (one row per cell × repeat).
`aggregate` turns the samples into the per-cell columns of `metrics.csv`: the geometric mean of the repeats' medians
with its t-interval on logs, the ratio to full fine-tuning paired by round with its paired t-interval, the A/A ratio
of the noise-floor replica, and what interference the used repeats saw (`peft_bench.measure.stats`). Only the
samples of one run count (`run_id`): a second run into the same folder can never mix its repeats with the first's.
Everything here is recomputed from the two CSVs (and the idle canary of environment.json) alone, so aggregating
aggregated rows again gives the same rows.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

from ..config import VARY
from .stats import Estimate, log_t, noise_floor, paired_ratio

TIMES = ("step_time_s", "step_time_split_s", "forward_s", "backward_s", "optimizer_s")
SAMPLE_COLUMNS = ["run_id", "cell_key", "method", "workload", "replica", "repeat", "status", "used", "remeasured",
                  *TIMES, "step_time_iqr_s", "timed_steps", "other_cpu_pct", "cpu_steal_pct", "load_avg_1m", "busy",
                  "interference_window_s",
                  "canary_flops_per_s", "cell_seconds"]
# The canary read inside a cell on an idle machine scatters: 69 readings of the default suite ran 0.61–1.20× their
# median (sd 14 %), and that median sat at 0.89× the idle machine's reading taken in a fresh process. A repeat is
# flagged when its canary ran below SLOW × the run's median — a neighbour holding one of two cores halves it — and
# the whole run when its median canary ran below RUN_SLOW × the idle machine's, read at the start of the run (a
# slowdown lasting the whole run, invisible to the first). Both are coarse: they catch a lost core, not 10 %.
SLOW = 0.55
RUN_SLOW = 0.7


def sample(row: dict, key: str, repeat: int, remeasured: bool = False, run_id: str = "") -> dict:
    """One repeat's timing, from a cell row (full or timing-only)."""
    s = {c: row.get(c, "") for c in SAMPLE_COLUMNS}
    busy = _int0(row.get("interference_repeats")) > 0  # the runner's verdict (`interference.Load.busy`)
    s.update(cell_key=key, repeat=repeat, used=True, remeasured=remeasured, busy=busy, replica=row.get("replica", 0),
             run_id=run_id)
    return s


def of_run(samples: list[dict], run_id: str | None) -> list[dict]:
    """The samples of one run (all of them when `run_id` is None: a folder from before run ids)."""
    return samples if run_id is None else [s for s in samples if str(s.get("run_id") or "") == run_id]


def number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _int0(x) -> int:
    v = number(x)
    return int(v) if v == v else 0


def _true(x) -> bool:
    return str(x).lower() == "true"


def _canaries(samples: list[dict]) -> list[dict]:
    return [s for s in samples if str(s.get("status")) == "ok" and number(s.get("canary_flops_per_s")) > 0]


def speeds(samples: list[dict]) -> dict[int, float]:
    """id(sample) → its canary ÷ the median canary of the run's ok samples (1.0 = the run's usual speed)."""
    ok = _canaries(samples)
    if not ok:
        return {}
    mid = statistics.median(number(s["canary_flops_per_s"]) for s in ok)
    return {id(s): number(s["canary_flops_per_s"]) / mid for s in ok}


def run_speed(samples: list[dict], reference: float | None) -> float:
    """The run's median canary ÷ the idle machine's at its start (NaN without a reference)."""
    ok = _canaries(samples)
    if not ok or not reference or reference != reference:
        return float("nan")
    return statistics.median(number(s["canary_flops_per_s"]) for s in ok) / reference


def disturbed(s: dict, speed: dict[int, float]) -> bool:
    """Other processes or steal above the threshold, or the machine itself ran slow (canary)."""
    return _true(s.get("busy")) or speed.get(id(s), 1.0) < SLOW


def to_remeasure(samples: list[dict]) -> list[tuple[dict, str]]:
    """The samples that count but were disturbed and not yet measured again, each with why."""
    speed = speeds(samples)
    return [(s, "other processes" if _true(s.get("busy")) else
             f"machine at {speed.get(id(s), float('nan')):.2f}× its usual speed")
            for s in samples if str(s.get("status")) == "ok" and _true(s.get("used")) and disturbed(s, speed)
            and not _true(s.get("remeasured"))]


def used(samples: list[dict]) -> dict[str, dict[int, dict]]:
    """cell_key → repeat → the sample that counts (the re-measurement replaces a flagged one)."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for s in samples:
        if str(s.get("status")) == "ok" and _true(s.get("used")):
            out[s["cell_key"]][int(s["repeat"])] = s
    return out


def times_by_round(samples: dict[int, dict], col: str = "step_time_s") -> dict[int, float]:
    return {r: number(s[col]) for r, s in samples.items()}


def peer_key(key: str, **changes) -> str:
    d = json.loads(key)
    d.update(changes)
    return json.dumps(d, sort_keys=True)


def full_key(key: str) -> str:
    """The key of full fine-tuning on the same workload with the same budget and inputs (no method options). In a
    sweep over a method option (rank, virtual tokens) full fine-tuning ran once, without a value."""
    d = json.loads(peer_key(key, method="full", method_options={}, replica=0, lr=None))
    if VARY.get(d.get("vary", ""), ("",))[0] == "option":
        d.pop("vary_value", None)
    return json.dumps(d, sort_keys=True)


def _match_full(key: str, keys: list[str]) -> str | None:
    want = json.loads(full_key(key))
    for k in keys:
        d = json.loads(k)
        d["lr"] = None
        if d == want:
            return k
    return None


def _single_process(key: str, keys: list[str]) -> str | None:
    """The key of the same distributed cell on one process (same mode, threads per rank, per-rank batch)."""
    d = json.loads(key)
    if not d.get("parallel"):
        return None
    want = {k: v for k, v in {**d, "nproc": 1, "replica": 0}.items() if k not in ("nnodes", "rdzv_endpoint")}
    return next((k for k in keys if json.loads(k) == want), None)


def references(key: str, keys: list[str]) -> list[str]:
    """The cells `key` is paired with: full fine-tuning on its workload, one process for a distributed cell, the
    original for the A/A copy — measured again beside it, in the same new round, so that pairs never cross rounds."""
    out = [_match_full(key, keys), _single_process(key, keys)]
    if _int0(json.loads(key).get("replica")) == 1:
        out.append(peer_key(key, replica=0))
    return [k for k in out if k and k != key and k in keys]


def aggregate(rows: list[dict], samples: list[dict], run_id: str | None = None,
              reference: float | None = None) -> list[dict]:
    """metrics.csv rows with their repeat-level columns filled from the samples of run `run_id`."""
    samples = of_run(samples, run_id)
    by_key, speed, whole = used(samples), speeds(samples), run_speed(samples, reference)
    keys = [r["cell_key"] for r in rows]
    out = []
    for row in rows:
        row, got = dict(row), by_key.get(row["cell_key"], {})
        if row.get("status") == "ok" and got:
            _times(row, got)
            _ratios(row, got, by_key, keys)
            _interference(row, got, speed, whole)
        out.append(row)
    return out


def _times(row: dict, got: dict[int, dict]) -> None:
    """The step time over processes, its interval, and the throughputs rescaled from the process they came from."""
    est = log_t([number(s["step_time_s"]) for s in got.values()])
    before = number(row.get("step_time_s"))  # the value the throughputs were computed (or last rescaled) for
    for col in TIMES:
        row[col] = statistics.median(number(s[col]) for s in got.values())
    row.update(step_time_s=est.value, repeats=len(got), step_time_ci_low_s=est.low, step_time_ci_high_s=est.high)
    if before == before and est.value:
        scale = before / est.value
        for col in ("samples_per_s", "tokens_per_s", "padded_tokens_per_s", "achieved_flops_per_s",
                    "pct_of_matmul_peak"):
            if col in row and row[col] not in ("", None):
                row[col] = number(row[col]) * scale
        if row.get("fastest_rank_step_time_s") not in ("", None):  # a time: the inverse scale
            row["fastest_rank_step_time_s"] = number(row["fastest_rank_step_time_s"]) / scale
    row["ci_half_width_pct"] = est.half_width_pct


def _ratios(row: dict, got: dict[int, dict], by_key: dict, keys: list[str]) -> None:
    """Paired by round: to full fine-tuning, to one process (weak scaling), and the A/A copy to its original. The
    interval --target-ci judges is the last of these the row has (else its own step time's)."""
    ratio = Estimate.missing()
    ref = _match_full(row["cell_key"], keys)
    if ref and ref in by_key and ref != row["cell_key"]:
        ratio = paired_ratio(times_by_round(got), times_by_round(by_key[ref]))
        row["ci_half_width_pct"] = ratio.half_width_pct
    row.update(step_time_vs_full=ratio.value, step_time_vs_full_ci_low=ratio.low,
               step_time_vs_full_ci_high=ratio.high)
    if _int0(row.get("world_size")) > 1:  # weak scaling vs one process
        one = _single_process(row["cell_key"], keys)
        eff = paired_ratio(times_by_round(by_key[one]), times_by_round(got)) if one in by_key else Estimate.missing()
        row.update(scaling_efficiency=eff.value, scaling_efficiency_ci_low=eff.low,
                   scaling_efficiency_ci_high=eff.high)
    if _int0(row.get("replica")) == 1:
        aa = paired_ratio(times_by_round(got), times_by_round(by_key.get(peer_key(row["cell_key"], replica=0), {})))
        row.update(aa_ratio=aa.value, aa_ratio_ci_low=aa.low, aa_ratio_ci_high=aa.high,
                   ci_half_width_pct=aa.half_width_pct)


def _interference(row: dict, got: dict[int, dict], speed: dict[int, float], whole: float) -> None:
    """What the used repeats saw; a run whose machine ran slow throughout counts every repeat as disturbed."""
    slow_run = whole < RUN_SLOW
    row.update(run_machine_speed=whole, interference_repeats=len(got) if slow_run else
               sum(disturbed(s, speed) for s in got.values()))
    row.update(other_cpu_pct=max(number(s["other_cpu_pct"]) for s in got.values()),
               cpu_steal_pct=max(number(s["cpu_steal_pct"]) for s in got.values()),
               load_avg_1m=max(number(s["load_avg_1m"]) for s in got.values()),
               machine_speed=min(speed.get(id(s), float("nan")) for s in got.values()),
               remeasured=sum(_true(s["remeasured"]) for s in got.values()))


def floor_of(rows) -> tuple[float, Estimate | None]:
    """The run's noise floor from its A/A replica rows (largest over workloads), and the A/A estimate."""
    best, est = 0.0, None
    for r in rows:
        if _int0(r.get("replica")) == 1 and number(r.get("aa_ratio")) == number(r.get("aa_ratio")):
            e = Estimate(number(r["aa_ratio"]), number(r["aa_ratio_ci_low"]), number(r["aa_ratio_ci_high"]),
                         _int0(r.get("repeats")))
            if noise_floor(e) >= best:
                best, est = noise_floor(e), e
    return best, est

"""Repeats of a cell and what they add up to.

Each repeat is a fresh process; its timing lands in `repeats.csv` as one *sample* (one row per cell × repeat).
`aggregate` turns the samples into the per-cell columns of `metrics.csv`: the median of the repeats' medians with a
bootstrap CI, the ratio to full fine-tuning paired by round with its CI, the A/A ratio of the noise-floor replica,
and what interference the used repeats saw. Everything here is recomputed from the two CSVs alone.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

from ..config import VARY
from .stats import Estimate, bootstrap, noise_floor, paired_ratio

TIMES = ("step_time_s", "step_time_split_s", "forward_s", "backward_s", "optimizer_s")
SAMPLE_COLUMNS = ["cell_key", "method", "workload", "replica", "repeat", "status", "used", "remeasured",
                  *TIMES, "step_time_iqr_s", "timed_steps", "other_cpu_pct", "cpu_steal_pct", "load_avg_1m", "busy",
                  "canary_flops_per_s", "cell_seconds"]
SLOW = 0.85  # a repeat whose canary ran below this share of the run's median canary is flagged


def sample(row: dict, key: str, repeat: int, remeasured: bool = False) -> dict:
    """One repeat's timing, from a cell row (full or timing-only)."""
    s = {c: row.get(c, "") for c in SAMPLE_COLUMNS}
    busy = _int0(row.get("interference_repeats")) > 0  # the runner's verdict (`interference.Load.busy`)
    s.update(cell_key=key, repeat=repeat, used=True, remeasured=remeasured, busy=busy, replica=row.get("replica", 0))
    return s


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _int0(x) -> int:
    v = _f(x)
    return int(v) if v == v else 0


def _true(x) -> bool:
    return str(x).lower() == "true"


def speeds(samples: list[dict]) -> dict[int, float]:
    """id(sample) → its canary ÷ the median canary of every ok sample of the run (1.0 = usual speed)."""
    ok = [s for s in samples if str(s.get("status")) == "ok" and _f(s.get("canary_flops_per_s")) > 0]
    if not ok:
        return {}
    mid = statistics.median(_f(s["canary_flops_per_s"]) for s in ok)
    return {id(s): _f(s["canary_flops_per_s"]) / mid for s in ok}


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
    return {r: _f(s[col]) for r, s in samples.items()}


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


def aggregate(rows: list[dict], samples: list[dict]) -> list[dict]:
    """metrics.csv rows with their repeat-level columns filled from the samples."""
    by_key = used(samples)
    speed = speeds(samples)
    original = {s["cell_key"]: _f(s["step_time_s"]) for s in samples
                if str(s.get("status")) == "ok" and int(s["repeat"]) == 0 and not _true(s.get("remeasured"))}
    keys = [r["cell_key"] for r in rows]
    out = []
    for row in rows:
        row = dict(row)
        got = by_key.get(row["cell_key"], {})
        if row.get("status") != "ok" or not got:
            out.append(row)
            continue
        own_step = original.get(row["cell_key"], float("nan"))  # the process whose throughputs the row holds
        est = bootstrap([_f(s["step_time_s"]) for s in got.values()])
        for col in TIMES:
            row[col] = statistics.median(_f(s[col]) for s in got.values())
        row["step_time_s"] = est.value
        row.update(repeats=len(got), step_time_ci_low_s=est.low, step_time_ci_high_s=est.high)
        if own_step == own_step and est.value:
            scale = own_step / est.value
            for col in ("samples_per_s", "tokens_per_s", "padded_tokens_per_s", "achieved_flops_per_s",
                        "pct_of_matmul_peak"):
                if col in row and row[col] not in ("", None):
                    row[col] = _f(row[col]) * scale
            if row.get("fastest_rank_step_time_s") not in ("", None):  # a time: the inverse scale
                row["fastest_rank_step_time_s"] = _f(row["fastest_rank_step_time_s"]) / scale
        ratio = Estimate.missing()
        ref = _match_full(row["cell_key"], keys)
        if ref and ref in by_key:
            ratio = paired_ratio(times_by_round(got), times_by_round(by_key[ref]))
        row.update(step_time_vs_full=ratio.value, step_time_vs_full_ci_low=ratio.low,
                   step_time_vs_full_ci_high=ratio.high)
        if _int0(row.get("world_size")) > 1:  # weak scaling vs one process
            one = _single_process(row["cell_key"], keys)
            eff = paired_ratio(times_by_round(by_key[one]), times_by_round(got)) if one in by_key else \
                Estimate.missing()
            row.update(scaling_efficiency=eff.value, scaling_efficiency_ci_low=eff.low,
                       scaling_efficiency_ci_high=eff.high)
        if _int0(row.get("replica")) == 1:
            orig = peer_key(row["cell_key"], replica=0)
            aa = paired_ratio(times_by_round(got), times_by_round(by_key.get(orig, {})))
            row.update(aa_ratio=aa.value, aa_ratio_ci_low=aa.low, aa_ratio_ci_high=aa.high)
        row.update(other_cpu_pct=max(_f(s["other_cpu_pct"]) for s in got.values()),
                   cpu_steal_pct=max(_f(s["cpu_steal_pct"]) for s in got.values()),
                   load_avg_1m=max(_f(s["load_avg_1m"]) for s in got.values()),
                   interference_repeats=sum(disturbed(s, speed) for s in got.values()),
                   machine_speed=min(speed.get(id(s), float("nan")) for s in got.values()),
                   remeasured=sum(_true(s["remeasured"]) for s in got.values()))
        out.append(row)
    return out


def floor_of(rows) -> tuple[float, Estimate | None]:
    """The run's noise floor from its A/A replica rows (largest over workloads), and the A/A estimate."""
    best, est = 0.0, None
    for r in rows:
        if _int0(r.get("replica")) == 1 and _f(r.get("aa_ratio")) == _f(r.get("aa_ratio")):
            e = Estimate(_f(r["aa_ratio"]), _f(r["aa_ratio_ci_low"]), _f(r["aa_ratio_ci_high"]),
                         _int0(r.get("repeats")))
            if noise_floor(e) >= best:
                best, est = noise_floor(e), e
    return best, est

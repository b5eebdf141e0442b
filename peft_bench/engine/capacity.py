"""`peft-bench capacity`: the largest batch or context each method trains within a memory cap.

    peft-bench capacity --workloads gpt-neo-125m-arch --methods full,lora --memory-cap 4GiB --vary batch_size

For each method, the planner first (`peft-bench plan`'s fake steps, seconds each): the largest value whose planned
tensor peak fits the cap. Then fresh-process probes (a warm-up step and two more training steps, nothing else), at
most three: half that value (it fits with room), then where the memory the cap is held against (the probe's cap
cgroup charge where it has one, else its peak RSS), scaled in proportion to the planned tensor peak, reaches the cap,
then where the line through the two measured points reaches it. A step that cannot be planned (an operator whose
output shape depends on values) is searched with real probes alone: doubling until a probe does not fit, then
bisection between the last value that fits and the first that does not.
"Fits" means that the steps ran with the cap enforced on the probe process: on CUDA by
`set_per_process_memory_fraction` (an allocation beyond it is a real CUDA out-of-memory; the CUDA context is outside
the fraction); on CPU by a memory cgroup of its own (the kernel's OOM killer ends it beyond the cap; it is charged for
what the cell allocates, not the libraries its fork server loaded) or, where no cgroup can be made, RLIMIT_AS over the
process's address space before the model (`peft_bench.measure.cap`). Each probe's row names the mechanism.
A probe that fails for another reason (the data has fewer examples than the batch, the positions end) ends the search
at the last value that fitted, with that reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import VARY
from ..errors import UserError
from .predict import SEARCH, bisect

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--memory-cap takes a size such as 4GiB, 512MiB or 2.5GB; got {text!r}")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "").upper()])


def _probe_spec(workload: str, method: str, device: str, vary: str, cap: int):
    from ..config import RunConfig
    from .plan import plan

    (spec,) = [c for c in plan(RunConfig(suite="custom", methods=(method,), workloads=(workload,), device=device,
                                         train_steps=4)) if not c.replica]
    return dataclasses.replace(spec, probes="capacity", warmup_steps=1, timed_steps=2, train_steps=4,
                               memory_cap_bytes=cap, vary=vary, base_probe=False)


@dataclass(frozen=True)
class Search:
    """One method's search: the largest `vary` (batch_size or seq_len) of `workload` that trains within `cap` bytes."""

    workload: str
    method: str
    device: str
    vary: str
    cap: int
    timeout: float | None = None


def search(s: Search, log=print) -> list[dict]:
    """Every probe of one method's search, in order. From the planner's prediction when the step can be planned
    (`_from_plan`: at most `REAL_PROBES` real probes), else doubling then bisection on real probes."""
    base = _probe_spec(s.workload, s.method, s.device, s.vary, s.cap)
    planned = Planned(s, base.method_options)
    if planned.largest(s.cap, log) is not None:
        return _from_plan(s, base, planned, log)
    return _doubling(s, base, log)


def _doubling(s: Search, base, log) -> list[dict]:
    r = SEARCH[s.vary]
    rows: list[dict] = []
    lo, hi = None, None
    v = r.start
    while v <= r.ceiling:
        got = _probe(s, base, v, rows, log)
        if got is None:
            break
        if not got:
            hi = v
            break
        lo = v
        v *= 2
    if lo is not None and hi is not None:
        bisect(lo, hi, r.real, lambda mid: _probe(s, base, mid, rows, log))
    return rows


REAL_PROBES = 3


def _from_plan(s: Search, base, planned: Planned, log) -> list[dict]:
    """Three real probes: at half the planned largest value (it fits with room), then where the memory the cap is
    held against — scaled from that probe in proportion to the planned tensor peak — reaches the cap, then where the
    straight line through the two measured points (held memory against planned tensor peak) reaches it. The answer
    is the largest value that fitted; the rows say which probe went over."""
    r = SEARCH[s.vary]
    rows: list[dict] = []
    first = max(r.start, planned.largest(s.cap, log) // 2 // r.real * r.real)
    log(f"  {s.method} × {s.workload}: confirming with at most {REAL_PROBES} real probes")
    got = _probe(s, base, first, rows, log)
    if got is None:
        return rows
    if not got or not _held(rows[-1]):
        log("  half the planned value did not fit (or measured no peak): searching with real probes instead")
        return rows + _doubling(s, base, log)
    points = [(planned.peak(first, log), _held(rows[-1]))]
    for _ in range(REAL_PROBES - 1):
        v = planned.largest(_tensor_budget(points, s.cap), log)
        if v is None or any(r["value"] == v for r in rows):
            break
        got = _probe(s, base, v, rows, log)
        if not got or not _held(rows[-1]):
            break
        points.append((planned.peak(v, log), _held(rows[-1])))
    return rows


def _held(row: dict) -> float:
    """What the cap is held against in a probe: its cap cgroup's charge where it has one, else its peak RSS."""
    return float(row.get("charged_bytes") or row.get("peak_bytes") or 0)


def _tensor_budget(points: list[tuple[float, float]], cap: float) -> float:
    """The planned tensor peak at which the held memory reaches `cap`: in proportion from one measured point, along
    the line through the last two."""
    (p1, h1), (p2, h2) = points[0], points[-1]
    if len(points) == 1 or p2 == p1:
        return cap * p1 / h1
    slope = (h2 - h1) / (p2 - p1)
    return p2 + (cap - h2) / slope if slope > 0 else cap * p2 / h2


class Planned:
    """The planner's tensor peak at each value, on fake steps (seconds each), and the largest value under a cap."""

    def __init__(self, s: Search, options: dict) -> None:
        self.s, self.options, self.peaks = s, options, {}

    def peak(self, v: int, log) -> float:
        if v not in self.peaks:
            from .predict import _Asked, isolated

            try:
                row = isolated(self.s.method, self.s.workload, _Asked(**{VARY[self.s.vary][1]: v},
                                                                      device=self.s.device), self.options)
            except UserError as e:  # beyond the model's positions
                row = {"status": "limit", "reason": str(e)}
            self.peaks[v] = float(row["tensor_peak_bytes"]) if row.get("status") == "ok" else float("nan")
            log(f"  planned {self.s.method} × {self.s.workload}, {self.s.vary} {v}: "
                + (f"{self.peaks[v] / 2**20:,.0f} MiB" if self.peaks[v] == self.peaks[v] else row.get("reason", "")))
        return self.peaks[v]

    def largest(self, cap: float, log) -> int | None:
        """Doubling then bisection on planned peaks: the largest value whose tensor peak fits `cap` (None: not
        plannable, or not even the smallest value fits)."""
        r = SEARCH[self.s.vary]
        if not self.peak(r.start, log) <= cap:
            return None
        lo, hi = r.start, None
        while hi is None and lo * 2 <= r.ceiling:
            lo, hi = (lo * 2, None) if self.peak(lo * 2, log) <= cap else (lo, lo * 2)
        if hi is not None:
            lo, hi = bisect(lo, hi, r.real, lambda mid: self.peak(mid, log) <= cap)
        return lo


def _probe(s: Search, base, v: int, rows: list[dict], log) -> bool | None:
    """One fresh-process probe at value `v`, its row appended: True fits, False over the cap, None no memory answer
    (a length beyond the positions, another failure): the search stops there."""
    from . import launch

    spec = dataclasses.replace(base, **{VARY[s.vary][1]: v}, vary_value=v)
    head = {"method": s.method, "workload": s.workload, "vary": s.vary, "value": v}
    if s.vary == "seq_len":
        from ..workloads import get_workload
        from .setup import virtual_tokens

        try:
            get_workload(s.workload).with_options(max_length=v).sized(virtual_tokens(
                _method(s.method, spec.method_options)))
        except UserError as e:
            rows.append({**head, "status": "limit", "reason": str(e), "peak_bytes": None, "fits": None})
            return None
    from ..measure.cap import remove_left_caps

    row = launch.run_isolated(spec, s.timeout)
    remove_left_caps()
    peak = row.get("capacity_peak_bytes")
    ok = row.get("status") == "ok"
    fits = ok  # the steps ran with the cap enforced (a cgroup limit, RLIMIT_AS, or the CUDA memory fraction)
    reason = row.get("reason", "") if not ok else ""
    rows.append({**head, "status": row.get("status"), "reason": reason, "peak_bytes": peak, "fits": fits,
                 "charged_bytes": row.get("capacity_charged_bytes"), "mechanism": row.get("memory_cap_mechanism", "")})
    word = "fits" if fits else "over the cap" if ok or row.get("status") == "oom" else row.get("status")
    log(f"  {s.method} × {s.workload}, {s.vary} {v}: {word}"
        + (f" (peak {float(peak) / 2**20:,.0f} MiB)" if peak else f" — {reason}" if reason else ""))
    if not ok and row.get("status") != "oom":
        return None  # not a memory answer: stop here
    return fits


def _method(name: str, options: dict):
    from ..methods import get_method

    return get_method(name, **options)


def run(cfg) -> list[dict]:
    """Every probe of every (workload, method) search under `cfg.memory_cap`, growing `cfg.search`; `capacity.csv`
    rewritten after each; the CLI then writes the report (`peft_bench.report.capacity`)."""
    import pandas as pd

    from ..results import check_out_dir, prepare_out_dir
    from .runner import refuse_if_busy

    cap, vary, device = parse_bytes(cfg.memory_cap), cfg.search, cfg.device
    if vary not in SEARCH:
        raise UserError(f"--vary takes batch_size or seq_len for capacity, got {vary!r}")
    out = check_out_dir(cfg.out or Path("results") / "capacity")
    for w in cfg.workloads:  # every name checked before anything runs
        for m in cfg.methods:
            _probe_spec(w, m, device, vary, cap)
    if not cfg.allow_busy and not os.environ.get("PEFT_BENCH_ALLOW_BUSY"):  # as `run`: the flag or the environment
        refuse_if_busy(device)
    out = prepare_out_dir(out)
    rows: list[dict] = []
    for w in cfg.workloads:
        for m in cfg.methods:
            print(f"{m} × {w}: searching the largest {vary} within {cap / 2**30:.2f} GiB", file=sys.stderr)
            rows += search(Search(w, m, device, vary, cap, cfg.cell_timeout), log=lambda s: print(s, file=sys.stderr))
            pd.DataFrame(rows).to_csv(out / "capacity.csv", index=False)
    return rows

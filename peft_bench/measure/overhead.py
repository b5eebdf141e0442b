"""The process peak a CPU plan predicts: the tensor peak plus a runtime overhead fitted from this machine's cells.

A cell's `process_peak_bytes` is its resident-set high-water mark over the measured steps above the footprint before
the model was built (`measure.memory`); `runtime_overhead_bytes` = that − the tensor peak: freed memory glibc keeps
resident (every activation and temporary of the step is allocated and freed again), library code and kernels first
touched, thread stacks, Python objects. It is not a tensor, so fake tensors cannot count it; it is fitted instead:

    overhead = constant + per_saved × saved_activations_max_bytes + per_static × (weights + gradients + optimizer)

by non-negative least squares on the relative error of the process peak over every committed single-process CPU
cell (`peft-bench plan --fit-overhead`, `peft_bench/report/overhead.py`; the table, its leave-one-group-out errors and
the spread between identical steps in `results/plan/process-peak.md`). The constants below are that fit's; a test
refits from the committed cells and finds them again. On CUDA no overhead is predicted: the plan's blocks are already
rounded as the caching allocator rounds them; what the allocator reserves beyond them, and the CUDA context outside
torch's accounting, were not measured here (no GPU) — `results/plan/published.md` shows the reserved excess.
"""

from __future__ import annotations

import dataclasses

STATIC = ("weights_bytes", "gradients_bytes", "optimizer_bytes")


@dataclasses.dataclass(frozen=True)
class Fit:
    constant: float  # bytes
    per_saved: float  # per byte of the step's largest saved activations
    per_static: float  # per byte of weights + gradients + optimizer state at the peak
    cells: int  # the cells it was fitted on
    source: str  # where: the committed result directories, and the commit


CPU_FIT = Fit(constant=24_433_000, per_saved=0.6217, per_static=0.1284, cells=153,
              source="results/ at commit 08a1ba84c3 (2 cores, glibc malloc, torch 2.13 CPU)")


def features(row: dict) -> tuple[float, float, float]:
    """(1, saved activations, static bytes) of a planned or measured row."""
    return 1.0, float(row["saved_activations_max_bytes"]), float(sum(float(row[k]) for k in STATIC))


def predicted(row: dict, fit: Fit = CPU_FIT) -> int | None:
    """The process peak above the pre-model footprint a CPU cell of this plan would read, or None (not CPU, a rank of
    a distributed plan, or no tensor peak)."""
    if row.get("status") != "ok" or row.get("device") != "cpu" or row.get("tensor_peak_bytes") is None \
            or row.get("world_size"):  # fitted on single processes: a rank's runtime (gloo, threads) is not in it
        return None
    one, saved, static = features(row)
    return round(float(row["tensor_peak_bytes"]) + fit.constant * one + fit.per_saved * saved
                 + fit.per_static * static)

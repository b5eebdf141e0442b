"""Wall-clock measurement: synchronised timing of one call, medians with spread, a measured matmul peak."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Stats:
    median: float
    iqr: float

    @classmethod
    def of(cls, xs: list[float]) -> Stats:
        if not xs:
            return cls(float("nan"), float("nan"))
        if len(xs) < 2:
            return cls(xs[0], 0.0)
        q = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(statistics.median(xs), q[2] - q[0])


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """Call `fn` once between two device synchronisations; return (its result, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


class StepClock:
    """Wall time of a whole step with one synchronisation at its end, and its parts from marks in between.

    CPU: the marks are `perf_counter` readings. CUDA: they are CUDA events recorded on the stream, so splitting the
    step adds no synchronisation; their elapsed times are read after the final one."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self._marks: list = []
        self._t0 = 0.0

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        sync("cuda" if self.cuda else "cpu")
        self._t0 = time.perf_counter()
        self._marks = [self._mark()]

    def mark(self) -> None:
        self._marks.append(self._mark())

    def stop(self) -> tuple[float, list[float]]:
        """(whole step seconds, the parts between consecutive marks in seconds)."""
        self._marks.append(self._mark())
        sync("cuda" if self.cuda else "cpu")
        wall = time.perf_counter() - self._t0
        m = self._marks
        if self.cuda:
            parts = [a.elapsed_time(b) / 1e3 for a, b in zip(m, m[1:])]
        else:
            parts = [b - a for a, b in zip(m, m[1:])]
        return wall, parts


def canary_flops(device: str, n: int = 1024, reps: int = 15) -> float:
    """Median FLOP/s of `reps` float32 n×n matmuls: a fixed probe of how fast the machine runs right now. Read
    just before and after a cell's timed steps, it exposes slow periods that no process list shows (a noisy
    neighbour on the host, frequency changes) — compared against the idle machine's at the start of the run
    (`peft_bench.measure.repeats.speeds`). 15 repeats, not 5: on 2 idle cores one 5-repeat reading in twenty came
    out at 0.55× (a thread scheduled late), the slower of two readings below 0.85× a quarter of the time; with 15
    the slower of two stayed above 0.92× in 28 pairs."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    timed(lambda: a @ b, device)  # warm-up
    times = sorted(timed(lambda: a @ b, device)[1] for _ in range(reps))
    return 2 * n**3 / times[len(times) // 2]


def latency(fn: Callable[[], object], device: str, min_run_time: float) -> Stats:
    """Median and IQR of `fn`'s latency from `torch.utils.benchmark.Timer.blocked_autorange`, which picks a
    per-block repeat count, synchronises CUDA, and runs blocks until `min_run_time` seconds have passed."""
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first-call allocations and lazy initialisation
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return Stats(m.median, m.iqr)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matmul_peak_flops(device: str, dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048, 3072),
                      repeats: int = 3) -> float:
    """Best measured FLOP/s of square n×n matmuls in `dtype` over a few sizes (each warmed up once, then the best
    of `repeats`): the achievable matmul peak for that element type on this device, the denominator of MFU."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(DTYPES[dtype])
        b = torch.randn(n, n, device=device).to(DTYPES[dtype])
        seconds = min(timed(lambda a=a, b=b: a @ b, device)[1] for _ in range(repeats + 1))
        best = max(best, 2 * n**3 / seconds)
    return best


# Vendors' datasheet peaks, dense (no structured sparsity), FLOP/s — shown beside the measured matmul peak, labelled,
# never used as the MFU denominator. Matched by substring of torch.cuda.get_device_name(), most specific first.
DATASHEET_PEAK_FLOPS = (
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),  # H200 SXM datasheet
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),  # H100 SXM
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
)


def datasheet_peak_flops(gpu_name: str | None, dtype: str) -> float | None:
    """The datasheet's dense peak for this GPU and element type, or None when the GPU is not in the table."""
    for key, peaks in DATASHEET_PEAK_FLOPS:
        if gpu_name and key in gpu_name:
            return peaks.get(dtype)
    return None

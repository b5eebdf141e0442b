"""Measurement, kept apart from what is measured: memory trackers, step timing and a matmul peak.

CPU memory is the process's resident set: the peak (VmHWM) is reset through /proc/self/clear_refs just before
the measured region, so a fresh process per cell sees only its own training step. CUDA memory is
`torch.cuda.max_memory_allocated/reserved` after `reset_peak_memory_stats`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from ..methods.base import unique_named_parameters


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    peak_bytes: int = 0
    reserved_bytes: int = 0
    source: str = ""


@contextlib.contextmanager
def track_peak(device: str) -> Iterator[PeakMemory]:
    """reset peak → sync → yield → sync → read. CPU: VmHWM (or ru_maxrss); CUDA: max allocated/reserved."""
    out = PeakMemory()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.peak_bytes = torch.cuda.max_memory_allocated()
        out.reserved_bytes = torch.cuda.max_memory_reserved()
        out.source = "torch.cuda.max_memory_allocated"
        return
    reset_ok = reset_peak_rss()
    yield out
    hwm = _vm_hwm_bytes() if reset_ok else None
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.peak_bytes = max(hwm, rss_bytes())
    out.source = "VmHWM (peak RSS, reset before the step)" if reset_ok else "ru_maxrss (peak RSS since start)"


def memory_in_use(device: str) -> int:
    """What the process holds now: RSS on CPU, allocated bytes on CUDA."""
    return torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()


def check_gpu_is_free(limit_bytes: int = 2 << 30) -> None:
    """Refuse to measure on a GPU that other processes already fill (their memory would distort ours)."""
    from ..errors import UserError

    free, total = torch.cuda.mem_get_info()
    used = total - free - torch.cuda.memory_reserved()  # includes our CUDA context (~0.5 GiB)
    if used > limit_bytes:
        raise UserError(f"the GPU already holds {used / 2**30:.1f} GiB from other processes; free it first")


# -- static memory, exactly from the tensors -----------------------------------------------------------------
def unique_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in unique_named_parameters(model)]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


# -- timing -------------------------------------------------------------------------------------------------
@dataclass
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
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def repeat_time(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> Stats:
    for _ in range(warmup):
        fn()
    return Stats.of([timed(fn, device)[1] for _ in range(repeats)])


def matmul_peak_flops(device: str, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best measured FLOP/s of an n×n matmul: the machine's achievable peak for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(timed(lambda: a @ b, device)[1] for _ in range(repeats + 1))
    return 2 * n**3 / best


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs that one call of `step` executes (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())

"""What else used the machine while a cell was measured, and a guard against starting on a busy machine.

CPU: system-wide busy time from /proc/stat (psutil.cpu_times) minus this process's own CPU time (every thread),
over the same wall-clock window, as a share of the machine's capacity (wall × logical CPUs); CPU steal (time the
hypervisor gave to other guests) separately; the 1-minute load average at the end. GPU: other processes holding
memory on the device (nvidia-smi's compute-apps list through torch), when on CUDA.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

# A measurement is flagged when others took more than this share of the machine's CPU capacity (or steal did).
THRESHOLD_PCT = 10.0
TICK_S = 0.01  # the kernel counts CPU time in clock ticks (USER_HZ = 100): each reading is that coarse per CPU
_IDLE = ("idle", "iowait", "steal", "guest", "guest_nice")  # guest time is already counted in user


def _busy(t) -> float:
    return sum(v for k, v in t._asdict().items() if k not in _IDLE)


@dataclass(frozen=True)
class Load:
    other_cpu_pct: float
    steal_pct: float
    load_avg_1m: float
    wall_s: float

    @property
    def busy(self) -> bool:
        return self.other_cpu_pct > THRESHOLD_PCT or self.steal_pct > THRESHOLD_PCT

    def fields(self) -> dict:
        """The row's interference columns."""
        return dict(other_cpu_pct=self.other_cpu_pct, cpu_steal_pct=self.steal_pct, load_avg_1m=self.load_avg_1m,
                    interference_repeats=int(self.busy), interference_window_s=self.wall_s)


def own_cpu_s() -> float:
    """CPU seconds this process has used so far, every thread, user + system."""
    t = psutil.Process(os.getpid()).cpu_times()
    return t.user + t.system


class Window:
    """`with Window() as w: ...` then `w.load`: other processes' CPU share, steal and load over the block.

    Own CPU time is this process's, plus `w.also_own(seconds)` for a child measured inside the block (a cell's
    process reports its CPU time as it ends). The kernel counts CPU time in ticks (10 ms), so a block shorter than
    a second or so is too coarse to judge; cells are measured whole for that reason."""

    def __enter__(self) -> Window:
        self._t0, self._sys0, self._own0 = time.perf_counter(), psutil.cpu_times(), own_cpu_s()
        self._extra = 0.0
        return self

    def also_own(self, seconds: float) -> None:
        self._extra += seconds

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t0
        sys1, own = psutil.cpu_times(), own_cpu_s() - self._own0 + self._extra
        capacity = max(wall, 1e-9) * (psutil.cpu_count() or 1)
        slack = 2 * TICK_S * ((psutil.cpu_count() or 1) + 1)  # two readings' rounding, the machine's and ours
        others = max(0.0, _busy(sys1) - _busy(self._sys0) - own - slack)
        steal = max(0.0, getattr(sys1, "steal", 0.0) - getattr(self._sys0, "steal", 0.0))
        self.load = Load(100 * others / capacity, 100 * steal / capacity, psutil.getloadavg()[0], wall)


def machine_load(seconds: float = 1.0) -> Load:
    """Sample the machine for `seconds` while this process sleeps."""
    with Window() as w:
        time.sleep(seconds)
    return w.load


def gpu_other_processes() -> int:
    """Other processes with memory on the current CUDA device (0 when unknown)."""
    try:
        import torch

        listing = torch.cuda.list_gpu_processes()
    except Exception:
        return 0
    return sum(1 for line in listing.splitlines() if line.strip().startswith("process") and
               f" {os.getpid()} " not in line + " ")

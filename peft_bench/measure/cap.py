"""A memory cap the kernel enforces on this process (`peft-bench capacity` on CPU), so that "fits" means the steps ran
under the cap, not that a reading afterwards was small enough.

Where the machine allows it, a memory cgroup of its own: this process moves into a new child of its cgroup whose
limit is the cap (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`). A process moved into a cgroup is charged
for what it allocates from then on — the model, the data it reads, the optimizer state, every step — not for the
interpreter and libraries its fork server had loaded already (those pages stay charged where they were). Going
over the cap ends it by the kernel's out-of-memory killer (the row: `oom`). Elsewhere `RLIMIT_AS`: the address
space the process has now (its measured footprint, said so) plus the cap; an allocation beyond fails (`MemoryError`).
On CUDA the cap is `torch.cuda.set_per_process_memory_fraction` (the CUDA context is outside that fraction).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PREFIX = "peft-bench-cap-"


def own_memory_cgroup() -> tuple[Path, str] | None:
    """This process's memory cgroup directory and its limit file (v2 unified, else v1 memory controller)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (ROOT / "cgroup.controllers").exists():  # v2 mounted at the root
            return ROOT / path.lstrip("/"), "memory.max"
        if "memory" in controllers.split(","):
            return ROOT / "memory" / path.lstrip("/"), "memory.limit_in_bytes"
    return None


def enter_cap(cap_bytes: int) -> str:
    """Put this process under `cap_bytes`; return how the cap is held (a row says it)."""
    found = own_memory_cgroup()
    if found is not None:
        parent, limit = found
        child = parent / f"{PREFIX}{os.getpid()}"
        try:
            child.mkdir(exist_ok=True)
            (child / limit).write_text(str(cap_bytes))
            (child / "cgroup.procs").write_text(str(os.getpid()))
            return f"cgroup {limit} = cap (what the cell allocates after entering it)"
        except OSError:
            _remove(child)
    footprint = _address_space_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (footprint + cap_bytes, resource.RLIM_INFINITY))
    return f"RLIMIT_AS = the process's address space before the model ({footprint / 2**30:.2f} GiB) + cap"


def charged_peak_bytes() -> int | None:
    """The most this process's cap cgroup was charged (v2 `memory.peak`, v1 `memory.max_usage_in_bytes`): what the
    cap is held against — unlike peak RSS, without the libraries the fork server had loaded. None outside one."""
    found = own_memory_cgroup()
    if found is None or not found[0].name.startswith(PREFIX):
        return None
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        try:
            return int((found[0] / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None


def remove_left_caps() -> None:
    """Remove the cap cgroups of probe processes that have ended (the parent calls this after each probe)."""
    found = own_memory_cgroup()
    if found is None or not found[0].is_dir():
        return
    for child in found[0].glob(f"{PREFIX}*"):
        _remove(child)


def _remove(child: Path) -> None:
    try:
        if not (child / "cgroup.procs").read_text().strip():
            child.rmdir()
    except OSError:
        pass


def _address_space_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0

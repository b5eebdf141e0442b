"""Files on disk: their size, and reading them cold (evicted from the page cache) or warm.

A cold read is made honest by `fsync` then `posix_fadvise(POSIX_FADV_DONTNEED)` on every file, and checked with
`mincore(2)`: `resident_fraction` says how much of a file the page cache still holds (0.0 = truly cold).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path


def files_under(path: Path) -> list[Path]:
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


def evict(path: Path) -> None:
    """Drop `path`'s pages (a file or every file under a directory) from the page cache."""
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(path: Path) -> float:
    """Share of `path`'s pages (all files under it) in the page cache, by mincore(2); nan if it cannot be read."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return float("nan")
    page = mmap.PAGESIZE
    resident = total = 0
    for p in files_under(path):
        size = p.stat().st_size
        if size == 0:
            continue
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            addr = ctypes.c_void_p(_address(m))
            if libc.mincore(addr, ctypes.c_size_t(size), vec) != 0:
                return float("nan")
            resident += sum(v & 1 for v in vec)
            total += pages
    return resident / total if total else 0.0


def _address(m: mmap.mmap) -> int:
    """The start address of a read-only mmap (ctypes cannot take a buffer of a read-only mapping directly)."""
    import numpy as np

    view = np.frombuffer(m, dtype=np.uint8)
    try:
        return view.ctypes.data
    finally:
        del view

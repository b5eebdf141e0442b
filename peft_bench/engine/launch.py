"""Where a cell runs: a fresh process forked from a fork server that has imported torch, transformers and peft once
(`run_isolated`), or torchrun's ranks (`peft_bench.engine.torchrun.launch`). Both run the same worker
(`peft_bench.engine.cell`); a timeout, a kill or a crash becomes a row with its reason, never a lost cell."""

from __future__ import annotations

import dataclasses
import json
import signal
import tempfile
from pathlib import Path

from ..config import CellSpec
from ..measure import timing
from ..methods import get_method, method_class
from ..workloads import get_workload

_CONTEXT = None


def _context():
    """A fork server that has imported torch, transformers and peft once: each cell is a fresh process
    forked from it (no model, no allocations), so per-cell start-up costs milliseconds, not seconds."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "transformers", "peft", "peft_bench.engine.cell"])
    return _CONTEXT


def _peak_child(device: str, dtype: str, out_path: str) -> None:
    Path(out_path).write_text(repr(_speed(device, dtype)))


def _speed(device: str, dtype: str) -> float:
    """The matmul peak in `dtype`, or with dtype "canary" (or "canary:N", on N intra-op threads) the idle machine's
    canary."""
    if dtype.startswith("canary"):
        if ":" in dtype:
            import torch

            torch.set_num_threads(int(dtype.split(":")[1]))
        return _idle_canary(device)
    return timing.matmul_peak_flops(device, dtype)


def _idle_canary(device: str) -> float:
    """The idle machine's canary under sustained load, as cells read theirs (a fresh process's first reading runs
    ~25 % slow, before the threads and the clock are up): 0.5 s of matmuls, then the median of three readings (one
    reading alone scattered 98–190 GFLOP/s on idle cores)."""
    import statistics
    import time

    import torch

    a, t0 = torch.randn(1024, 1024, device=device), time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        a @ a
    return statistics.median(timing.canary_flops(device) for _ in range(3))


def canary_in_child(device: str, threads: int | None = None) -> float:
    """The matmul canary read on the idle machine at the start of a run, in a process forked like the cells': the
    speed every repeat's canary is compared with (`peft_bench.measure.repeats.speeds`). `threads`: read on as many
    intra-op threads as the cells' canaries (a torchrun rank's share of the cores) — a 2-thread reference made every
    1-thread rank look 0.47× slow."""
    return matmul_peak_in_child(device, f"canary:{threads}" if threads else "canary")


_PEAKS: dict[tuple[str, str], float] = {}  # measured once per fork server (the cells' conditions do not change)


def matmul_peak_in_child(device: str, dtype: str) -> float:
    """The matmul peak measured in a process forked from the same server as the cells, so that the MFU denominator
    is measured under the cells' own conditions (threads, allocator, nothing else loaded); once per server, device
    and dtype (a `peft-bench` command starts one server: once per run)."""
    if (device, dtype) in _PEAKS:  # emptied when the server stops
        return _PEAKS[device, dtype]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "peak")
        proc = _context().Process(target=_peak_child, args=(device, dtype, str(path)))
        proc.start()
        proc.join()
        _PEAKS[device, dtype] = float(path.read_text()) if path.exists() else _speed(device, dtype)
    return _PEAKS[device, dtype]


def run_isolated(spec: CellSpec, timeout: float | None) -> dict:
    """Run one cell in a fresh process (or under torchrun); translate timeouts and kills into rows."""
    base = {"method": spec.method, "workload": spec.workload or f"hub:{spec.model}", "device": spec.device,
            "options": json.dumps(spec.method_options, sort_keys=True), "seed": spec.seed}
    reason = method_class(spec.method).unsupported_reason(get_workload(spec.workload).family) if spec.workload else None
    if not reason and spec.parallel:
        reason = get_method(spec.method, **spec.method_options).unsupported_parallel(spec.parallel)
    if reason:  # known without building anything
        w = get_workload(spec.workload)
        return {**base, "family": w.family, "task": w.task, "pretrained": w.pretrained, "status": "unsupported",
                "reason": reason}
    return {**base, **(_run_torchrun(spec, timeout) if spec.parallel else _run_forked(spec, timeout))}


def _run_torchrun(spec: CellSpec, timeout: float | None) -> dict:
    """torchrun's ranks: their CPU time comes back through the waited-for children's usage."""
    import resource

    from ..measure.interference import Window
    from .torchrun import launch

    with Window() as window:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        row = launch(spec, timeout)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        window.also_own(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return _with_load(row, window.load)


def _run_forked(spec: CellSpec, timeout: float | None) -> dict:
    """A fresh process forked from the server; the row it wrote, or why it wrote none."""
    from ..measure.interference import Window
    from .cell import run_in_child

    row = None
    with tempfile.TemporaryDirectory() as tmp, Window() as window:
        row_path = Path(tmp, "row.json")
        proc = _context().Process(target=run_in_child, args=(dataclasses.asdict(spec), str(row_path)))
        try:
            proc.start()
            proc.join(timeout)
        except BaseException:  # Ctrl-C or SIGTERM (also while the process starts): the cell ends with the run
            if proc.pid is not None:
                proc.kill()
                proc.join()
            raise
        if proc.is_alive():
            proc.kill()
            proc.join()
            return {"status": "timeout", "reason": f"cell exceeded --cell-timeout {timeout:g}s"}
        if row_path.exists():
            row = json.loads(row_path.read_text())
            window.also_own(float(row.pop("cell_cpu_s", 0.0)))  # the cell's own CPU time is not interference
    if row is not None:
        return _with_load(row, window.load)
    if proc.exitcode is not None and proc.exitcode < 0:
        sig = signal.Signals(-proc.exitcode).name
        hint = " (likely the kernel's out-of-memory killer)" if sig == "SIGKILL" else ""
        return {"status": "oom" if sig == "SIGKILL" else "error", "reason": f"cell killed by {sig}{hint}"}
    return {"status": "error", "reason": f"cell process exited with status {proc.exitcode}"}


def _with_load(row: dict, load) -> dict:
    """An ok row keeps what its process saw during the timed steps; one without (torchrun's ranks, where each rank
    is another's "other process") gets what other processes did while the whole cell ran."""
    if row.get("status") == "ok":
        if "other_cpu_pct" not in row:
            row.update(load.fields())
        row["remeasured"] = 0
    return row


def stop_fork_server() -> None:
    """End the fork server (it would otherwise outlive an interrupted run)."""
    global _CONTEXT
    if _CONTEXT is not None:
        from multiprocessing import forkserver

        try:
            forkserver._forkserver._stop()
        except Exception:
            pass
        _CONTEXT = None
        _PEAKS.clear()

"""One benchmark cell (method × workload × device), the worker every launcher runs: a table from the cell's mode to
the probes it runs, in order (`PROBES`), walked by `run_cell`.

The runner runs each cell in a fresh process (forked from its fork server, or
`python -m peft_bench.engine.cell SPEC OUT`) so that process-level memory belongs to that cell alone; torchrun runs
the `rank` mode on every rank (`peft_bench.engine.torchrun`). Every mode starts the same way —

    data → process baseline → build base → base output → apply —

then, for the full mode (`all`): parameter counts → training: warm-up steps, timed steps (a matmul canary before
and after), one step under the FLOP counter, one under the tensor-memory tracker, the rest of the budget; the
process peak covers the timed steps alone (the reference output parked on disk) → checks (disabled = base, merge =
unmerged, unmerge restores) → accuracy → forgetting → latency unmerged / merged → checkpoint: save, restore on a
fresh base cold and warm, round-trip output, whole-model load cold and warm → the base rebuilt: its latency,
accuracy and general-text loss.

A further repeat (`timing`) runs the same process up to the training and stops after its last timed step, so every
repeat times its steps in the same state. The row is the union of the probes' records
(`peft_bench.measure.records`) plus the cell's identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..arch import describe
from ..config import CellSpec
from ..errors import UnsupportedError, UserError
from ..measure import memory, timing
from ..measure import records as R
from ..methods import counts, get_method
from ..workloads.tasks import accuracy, endless
from . import probes as P
from .setup import (
    DATA_SEED,
    apply,
    builder,
    check_positions,
    failure_identity,
    forward,
    general_loss,
    identity,
    logits,
    majority,
    on_device,
    split_on_device,
    workload_of,
)

# What each mode of a cell runs after the common start, in order. `timing`: a further repeat; `accuracy`: the whole
# budget, then accuracy and forgetting only (tune, the accuracy suite); `capacity`: warm-up and timed steps, the
# process peak in them (peft-bench capacity); `cost`: counts, training memory, timing and FLOPs with the
# after-training checks (peft-bench sweep); `rank`: one torchrun rank (its probes live in engine/torchrun.py);
# `witness`: peft-bench validate's child (engine/witness.py).
PROBES: dict[str, tuple[str, ...]] = {
    "all": ("counts", "training", "checks", "accuracy", "forgetting", "inference", "checkpoint", "base"),
    "cost": ("counts", "training", "checks"),
    "timing": ("timed",),
    "accuracy": ("budget", "accuracy", "forgetting", "base"),
    "capacity": ("capacity",),
    "rank": ("counts", "wrap", "rank_training", "agreement"),
    "witness": ("witness",),
    "serve": ("budget", "serving"),
    "serve-timing": ("budget", "serving-timed"),
}
REPEAT_MODE = {"serve": "serve-timing"}  # what a further repeat of a mode runs (else `timing`)
NO_REFERENCE = ("rank", "witness")  # modes without the after-training checks: no reference output kept
PROBE: dict[str, Callable[[P.State], None]] = {}  # probe name → the function that runs it on a cell's state


def probe(name: str):
    """Register a probe under `name` (the torchrun module registers the rank's)."""

    def add(fn: Callable[[P.State], None]) -> Callable[[P.State], None]:
        PROBE[name] = fn
        return fn

    return add


class Progress:
    """Progress of a cell's training: a tqdm bar on a terminal; in a log (stderr not a terminal), one line at least
    every `every` seconds naming the cell and the step, so a long run is never silent."""

    def __init__(self, total: int, desc: str, every: float = 30.0, stream=None, clock=None) -> None:
        import time

        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.clock = clock or time.monotonic
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = self.last = self.clock()
        # A terminal that reports 0 columns (a pty nobody sized, as under `script` or some CI runners) would get
        # a zero-width bar, i.e. nothing: then a fixed 80 columns.
        sized = self.tty and _columns(self.stream) > 0
        self.bar = tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=sized,
                        ncols=None if sized else 80, nrows=None if sized else 24, mininterval=0.5,
                        disable=not self.tty)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = self.clock()
        if not self.tty and now - self.last >= self.every:
            print(f"  {self.desc}: training step {self.done}/{self.total} ({now - self.started:.0f} s)",
                  file=self.stream, flush=True)
            self.last = now

    def close(self) -> None:
        self.bar.close()


def _columns(stream) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 0


OWN_PROGRESS = ("training", "timed", "budget", "capacity")  # probes that print their steps (Progress)


@contextlib.contextmanager
def heartbeat(desc: str, phase: str, every: float = 30.0, stream=None):
    """A line every `every` seconds while `phase` runs (evaluation, checks, checkpoints, serving), so that no phase
    of a cell is silent for longer."""
    import threading
    import time

    stop, t0 = threading.Event(), time.monotonic()

    def beat() -> None:
        while not stop.wait(every):
            print(f"  {desc}: {phase} ({time.monotonic() - t0:.0f} s)", file=stream or sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _progress(total: int, desc: str) -> Progress:
    return Progress(total, desc)


# -- the pipeline -----------------------------------------------------------------------------------------------
def run_cell(spec: CellSpec) -> dict:
    """Measure one cell; return its row. Raises UnsupportedError / UserError / CellError, carrying in `.identity`
    what was known of the cell when it failed (workload, family, task, lengths), so a failed row says what it was."""
    s = run_probes(spec, spec.probes)
    return row(s)


def run_probes(spec: CellSpec, mode: str) -> P.State:
    """The common start, then the mode's probes in order; the cell's state at the end."""
    torch.manual_seed(spec.seed)
    method = get_method(spec.method, **spec.method_options)
    method.schedule(spec.train_steps)
    w = workload_of(spec, method)
    try:
        s = start(spec, method, w, reference=mode not in NO_REFERENCE)
        for name in PROBES[mode]:
            with contextlib.nullcontext() if name in OWN_PROGRESS else heartbeat(f"{spec.method} × {w.name}", name):
                PROBE[name](s)
        return s
    except Exception as e:
        e.identity = failure_identity(spec, w, method)
        raise


def start(spec: CellSpec, method, w, reference: bool = True) -> P.State:
    """What every mode does first: data, the process baseline, the base model and (`reference`: for the checks after
    training; a rank has none) its output on a held-out batch, the method applied."""
    held = _hold_cap(spec)  # capacity probes: the cap enforced before the cell allocates anything
    data = w.validation_data() if spec.split == "validation" else w.data(DATA_SEED)
    reason = method.unsupported_reason(w.family) or (method.unsupported_parallel(spec.parallel) if spec.parallel
                                                     else None)
    if reason:
        raise UnsupportedError(reason)
    if spec.device == "cuda" and not spec.parallel:
        memory.check_gpu_is_free()
    s = P.State(spec, method, w, data, w.formulation(), builder(w, spec))
    if held:
        s.extra["memory_cap_mechanism"] = held
    s.baseline = memory.process_footprint(spec.device)
    model = s.build()
    check_positions(model, w, method)
    if reference:
        s.check_batch = on_device(next(endless(data.test, s.form, w.batch_size, spec.seed)), spec)
        s.base_out = logits(model, s.check_batch)
    # The base's bytes from its configuration (counts × element sizes), not a walk of the storages the tracker sees.
    s.base_bytes = counts.base_bytes(model, torch.empty(0, dtype=timing.DTYPES[spec.dtype]).element_size())
    s.targets = describe(model).default_targets
    s.model = apply(spec, method, model)
    if spec.inject_fault == "harness":  # tests: 256 MiB of harness data beside the cell (it must stay out of the peak)
        s.ballast = torch.ones(64 * 2**20)
    return s


def _hold_cap(spec: CellSpec) -> str:
    """Put this process under `spec.memory_cap_bytes` (capacity probes); how the cap is held, or "" without one."""
    if not spec.memory_cap_bytes:
        return ""
    if spec.device == "cuda":  # allocations beyond the cap raise CUDA OOM, a real refusal
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_cap_bytes /
                                                       torch.cuda.get_device_properties(0).total_memory))
        return "torch.cuda.set_per_process_memory_fraction = cap (the CUDA context is outside the fraction)"
    from ..measure.cap import enter_cap

    return enter_cap(spec.memory_cap_bytes)


def row(s: P.State) -> dict:
    """A finished cell's row: its identity, then each probe's record, then the row's own fields."""
    out = identity(s.spec, s.w, s.method, s.targets)
    for record in s.records + _assembled(s):
        out.update(R.as_row(record))
    out.update(s.extra)
    out.update(replica=s.spec.replica, status="ok", reason="")
    return out


def _assembled(s: P.State) -> list:
    """The records that combine what several probes found (the trained and the base model's scores)."""
    got, out = s.scores, []
    if s.checks is not None:
        out.append(s.checks)
    if "latency" in got:
        base, unmerged, merged = got["base_latency"], *got["latency"]
        out.append(R.InferenceRecord(base.median, base.iqr, unmerged.median, unmerged.iqr, merged.median, merged.iqr))
    if "trained_accuracy" in got:
        n = len(s.data.test)
        out.append(R.AccuracyRecord.of(got["trained_accuracy"], got.get("base_accuracy", math.nan), n,
                                       majority(s.data.test)))
    if "tuned_loss" in got and "base_loss" in got:
        tuned, tokens, base = got["tuned_loss"], got["tokens"], got["base_loss"]
        out.append(R.ForgettingRecord(tuned - base, base, len(s.data.general) if tokens else 0, tokens))
    elif "trained_accuracy" in got:
        out.append(R.ForgettingRecord(math.nan, math.nan, 0, 0))
    return out


# -- the probes, by name --------------------------------------------------------------------------------------------
@probe("counts")
def _counts(s: P.State) -> None:
    s.params = P.params_probe(s.method, s.model)
    s.records.append(s.params)


@probe("training")
def _training(s: P.State) -> None:
    mem, tim, flo, _ = P.train(s, instrument=True, progress=_progress)
    s.records += [mem, tim, flo]


@probe("timed")
def _timed(s: P.State) -> None:
    s.records.append(P.train(s, instrument=False, progress=_progress)[1])


@probe("budget")
def _budget(s: P.State) -> None:
    s.records.append(P.train(s, instrument=False, steps=s.spec.train_steps, progress=_progress)[1])


@probe("capacity")
def _capacity(s: P.State) -> None:
    _, tim, _, peak = P.train(s, instrument=False, progress=_progress)
    s.records.append(tim)
    from ..measure.cap import charged_peak_bytes

    s.extra.update(capacity_peak_bytes=peak.bytes, memory_source=peak.source, capacity_charged_bytes=charged_peak_bytes())


@probe("checks")
def _checks(s: P.State) -> None:
    # The trained output, before any merge/unmerge cycle: an unmerge leaves rounding in the base weights (bounded by
    # its own check), which a restored checkpoint on a fresh base does not have.
    s.trained_out = logits(s.model, s.check_batch)
    s.checks = P.checks_probe(s.method, s.model, s.check_batch, s.base_out)


@probe("accuracy")
def _accuracy(s: P.State) -> None:
    s.scores["trained_accuracy"] = accuracy(s.model, split_on_device(s.data.test, s.spec), s.form, s.w.batch_size)


@probe("forgetting")
def _forgetting(s: P.State) -> None:
    if s.spec.split != "test":
        return
    with s.method.task_loss(s.model):
        s.scores["tuned_loss"], s.scores["tokens"] = general_loss(s.model, s.form, s.data, s.w)


@probe("inference")
def _inference(s: P.State) -> None:
    s.scores["latency"] = P.inference_probe(s.spec, s.method, s.model, s.check_batch)


@probe("serving")
def _serving(s: P.State) -> None:
    from .serve import serving_rows

    s.extra["serving_rows"] = serving_rows(s)


@probe("serving-timed")
def _serving_timed(s: P.State) -> None:
    from .serve import serving_rows

    s.extra["serving_rows"] = serving_rows(s, exact=False)


@probe("checkpoint")
def _checkpoint(s: P.State) -> None:
    ckpt, roundtrip = P.checkpoint_probe(s, s.checks.check_tolerance)
    s.records.append(ckpt)
    s.checks = dataclasses.replace(s.checks, roundtrip_max_abs_diff=roundtrip)


@probe("base")
def _base(s: P.State) -> None:
    """The base model, rebuilt (seeded: the same weights the method was applied to), measured last so that no probe
    runs in the process before the timed steps that a further repeat does not also run."""
    if s.spec.split != "test":
        return
    s.model = None
    base = s.build()
    got = s.scores
    if "latency" in got:
        got["base_latency"] = timing.latency(forward(base, s.check_batch), s.spec.device, s.spec.latency_seconds)
    if s.spec.base_probe:
        got["base_accuracy"] = accuracy(base, split_on_device(s.data.test, s.spec), s.form, s.w.batch_size)
    got["base_loss"], _ = general_loss(base, s.form, s.data, s.w)


def training_step(spec: CellSpec):
    """An in-process training step for `spec` (what pytest-benchmark times); returns (step, method, model).

    The same step as the CLI's `step_time_s` (`loop.train_step`): the batches are built and placed on the device
    beforehand, so each call is zero_grad, forward, backward and optimizer step with one synchronisation at the end."""
    import itertools

    from .loop import Trainer

    torch.manual_seed(spec.seed)
    method = get_method(spec.method, **spec.method_options)
    method.schedule(spec.train_steps)
    w = workload_of(spec, method)
    data, form = w.data(DATA_SEED), w.formulation()
    model = apply(spec, method, builder(w, spec)())
    trainer = Trainer(model, method, spec.lr, spec.device)
    stream = endless(data.train, form, w.batch_size, spec.seed)
    batches = itertools.cycle([on_device(next(stream), spec)
                               for _ in range(max(1, spec.warmup_steps + spec.timed_steps))])
    model.train()

    def step() -> float:
        trainer.step(next(batches))
        return trainer.losses[-1]

    return step, method, model


def run_in_child(spec: dict, out_path: str) -> None:
    """Entry of the fresh per-cell process: measure, then write the row (whatever happened) as JSON."""
    import signal

    # Ctrl-C reaches the whole process group: the parent ends this process itself, so no traceback here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet()
    try:
        row = run_cell(CellSpec(**spec))
    except UnsupportedError as e:
        row = {**getattr(e, "identity", {}), "status": "unsupported", "reason": str(e)}
    except UserError as e:
        row = {**getattr(e, "identity", {}), "status": "error", "reason": str(e)}
    except MemoryError:
        row = {"status": "oom", "reason": "out of memory (MemoryError)"}
    except Exception as e:  # recorded, explained, and the suite goes on
        oom = type(e).__name__ == "OutOfMemoryError"
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        row = {**getattr(e, "identity", {}), "status": "oom" if oom else "error",
               "reason": f"{type(e).__name__}: {text}" if text else type(e).__name__}
    from ..measure.interference import own_cpu_s

    row["cell_cpu_s"] = own_cpu_s()  # the runner subtracts it from the machine's busy time over the cell
    if Path(out_path).parent.is_dir():  # else the run that asked has ended (interrupted as this process started)
        Path(out_path).write_text(json.dumps(row, default=float))


def main(argv: list[str] | None = None) -> int:
    """`python -m peft_bench.engine.cell SPEC.json OUT.json`: one cell in this process."""
    spec_path, out_path = argv or sys.argv[1:]
    run_in_child(json.loads(Path(spec_path).read_text()), out_path)
    return 0


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("kernels").setLevel(logging.ERROR)  # "Skipping publisher trust check" when offline
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())

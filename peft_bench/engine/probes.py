"""The probes of a single-process cell, each measuring one thing on the cell's state (`State`) and returning a
typed record (`peft_bench.measure.records`): counts against the closed form, the training steps (timing, memory,
FLOPs, the learning probe), the after-training checks, accuracy and forgetting, inference latency, the checkpoint
round trip. Which of them a cell runs, in which order, is `peft_bench.engine.cell.PROBES`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import CellSpec
from ..measure import files, memory, timing
from ..measure import records as R
from ..measure.flops import analytic_flops, count_flops
from ..methods import get_method
from ..methods.base import Method, unique_named_parameters
from ..workloads.tasks import endless, model_inputs
from .loop import Hooks, Timed, Trainer, Window, run_steps
from .setup import forward, logits, on_device

INSTRUMENTED_STEPS = 2  # after the timed steps: one under the FLOP counter, one under the tensor-memory tracker


class CellError(RuntimeError):
    """A check failed or the measurement is void: the cell is `error`, never `ok`."""


@dataclass
class ProcessPeak:
    """The process's high-water mark over the steps after the first, and its footprint before the model was built."""

    bytes: int
    baseline: int
    source: str

    @property
    def above_baseline(self) -> int:
        return self.bytes - self.baseline


@dataclass
class State:
    """One cell as its probes see it: what was built, and what the probes so far found."""

    spec: CellSpec
    method: Method
    w: object  # the workload, with the cell's options
    data: object
    form: object
    build: Callable[[], nn.Module]
    baseline: int = 0
    model: nn.Module | None = None
    check_batch: dict | None = None
    base_out: torch.Tensor | None = None
    base_bytes: int = 0
    targets: tuple[str, ...] = ()
    records: list = field(default_factory=list)
    params: R.ParamsRecord | None = None
    trained_out: torch.Tensor | None = None
    checks: R.ChecksRecord | None = None
    extra: dict = field(default_factory=dict)  # row fields outside the records (the capacity probe's peak)
    scores: dict = field(default_factory=dict)  # what several probes combine into one record (accuracy, forgetting)
    ballast: torch.Tensor | None = None  # tests only (inject_fault="harness"): a large harness tensor beside the cell


def params_probe(method: Method, model: nn.Module) -> R.ParamsRecord:
    """Counts from the tensors beside the closed form; a mismatch is an error before anything is timed."""
    trainable = method.trainable_parameters(model)
    n = sum(p.numel() for p in trainable.values())
    total = sum(p.numel() for _, p in unique_named_parameters(model))
    closed = method.closed_form_trainable(model)
    if closed != n:
        raise CellError(f"trainable parameters {n} != closed form {closed}")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return R.ParamsRecord(n, total, 100 * n / total, closed, "+".join(dtypes))


def loss_trend(losses: list[float]) -> dict:
    """Mean loss over the budget's first and last windows (a description of the curve, not the learning verdict:
    a loss that falls within the first window makes the windows' difference noisy; see `probe_losses`)."""
    k = min(max(3, len(losses) // 5), len(losses) // 2)
    if k < 1:
        return {"loss_start": math.nan, "loss_end": math.nan, "loss_window": 0}
    return {"loss_start": sum(losses[:k]) / k, "loss_end": sum(losses[-k:]) / k, "loss_window": k}


PROBE_BATCHES = 8  # the learning probe: fixed training-split batches (scored example by example) before the first
# step and after the last
PROBE_SEED = 7_919  # its batches' order, apart from the training stream's


@torch.no_grad()
def task_losses(method: Method, model: nn.Module, batches: list[dict]) -> list[float]:
    with method.task_loss(model):
        return probe_losses(model, batches)


def probe_losses(model: nn.Module, batches: list[dict]) -> list[float]:
    """The model's loss on each probe *example* (a batch of one, padding trimmed), in eval mode (no dropout): paired
    per example, before and after, a drop is told from noise even when batches differ a lot in label balance."""
    from ..workloads.tasks import trim

    was_training = model.training
    model.eval()
    out = []
    for b in batches:
        inputs = model_inputs(b)
        for i in range(len(b["labels"])):
            one = trim({k: v[i : i + 1] for k, v in inputs.items()})
            out.append(float(model(**one).loss))
    model.train(was_training)
    return out


def learning(before: list[float], after: list[float]) -> dict:
    """Paired before/after probe losses (one per example): did training lower the loss beyond the noise?"""
    from ..measure.stats import mean_ci

    if not before or not after:
        return {"loss_probe_before": math.nan, "loss_probe_after": math.nan, "loss_probe_drop_ci_low": math.nan,
                "loss_probe_examples": 0}
    drop = mean_ci([b - a for b, a in zip(before, after)])
    return {"loss_probe_before": sum(before) / len(before), "loss_probe_after": sum(after) / len(after),
            "loss_probe_drop_ci_low": drop.low, "loss_probe_examples": len(before)}


def counted_step(model: nn.Module, method: Method, step, batch: dict) -> tuple[int, int]:
    """Run one training step under the FLOP counter; (FLOPs counted, FLOPs by formula)."""
    box: dict[str, int] = {}
    counted = count_flops(lambda: box.update(analytic=analytic_flops(
        model, lambda: step(batch), getattr(model, "config", None), batch, method.extra_input_tokens,
        method.extra_key_tokens)))
    return counted, box["analytic"]


def check_finite(losses: list[float]) -> None:
    """A non-finite training loss voids the measurement: the cell is an error."""
    if not all(math.isfinite(x) for x in losses):
        raise CellError(f"training loss is not finite (first non-finite at step {_first_bad(losses)}); "
                        "the measurement is void")


def _first_bad(xs: list[float]) -> int:
    return next(i for i, x in enumerate(xs) if not math.isfinite(x))


def memory_record(tracker: memory.StepMemoryTracker, trainable: dict, base_bytes: int, params: R.ParamsRecord,
                  method: Method, peak: ProcessPeak) -> R.MemoryRecord:
    """The tracker's breakdown at the peak, and the static parts checked against the closed form.

    Closed form: weights = the base model's bytes from its configuration (`methods.counts.base_bytes`: parameter and
    buffer counts × element sizes) (+ the method's new parameters at their element size);
    gradients = trainable × element size; AdamW = 2 × trainable × element size + one 4-byte `step` per tensor.
    """
    sizes = {p.element_size() for p in trainable.values()}
    n = params.closed_form_trainable_params
    if len(sizes) == 1:
        e = sizes.pop()
        trained_bytes = n * e
    else:  # mixed adapter/head dtypes (e.g. float32 LoRA on a bfloat16 model): sizes from the tensors
        trained_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    weights = base_bytes + (0 if method.trains_everything else trained_bytes)
    optimizer = 2 * trained_bytes + 4 * len(trainable)
    closed = weights + trained_bytes + optimizer
    seen = (tracker.initial_parts["weights"], tracker.max_parts["gradients"], tracker.initial_parts["optimizer"])
    p = tracker.peak_parts
    return R.MemoryRecord(
        tensor_peak_bytes=tracker.peak_bytes, weights_bytes=p["weights"], gradients_bytes=p["gradients"],
        optimizer_bytes=p["optimizer"], activations_bytes=p["activations"], temporaries_bytes=p["temporaries"],
        saved_activations_max_bytes=tracker.max_parts["activations"], static_closed_form_bytes=closed,
        static_matches_closed_form=seen == (weights, trained_bytes, optimizer), process_peak_bytes=peak.above_baseline,
        runtime_overhead_bytes=peak.above_baseline - tracker.peak_bytes, process_baseline_bytes=peak.baseline,
        memory_source=peak.source)


def tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """|Δ| allowed between two computations of the same output on CPU/GPU kernels that do not promise bitwise
    reproducibility: 64 units of the dtype's epsilon at the logits' scale."""
    return 64 * torch.finfo(dtype).eps * max(1.0, float(reference.abs().max()))


def checks_probe(method: Method, model: nn.Module, batch: dict, base_out: torch.Tensor) -> R.ChecksRecord:
    """After training: disabled = base, merged = unmerged, unmerge restores the trained adapter."""
    # The coarsest element type in the model sets the rounding (float32 adapters on a bfloat16 base: bfloat16).
    dtype = max({p.dtype for p in model.parameters()}, key=lambda d: torch.finfo(d).eps)
    tol = tolerance(dtype, base_out)
    disabled = merge = unmerge = float("nan")
    if not method.trains_everything:
        with method.disabled(model):
            disabled = _max_diff(logits(model, batch), base_out)
        if not disabled <= tol:
            raise CellError(f"disabled adapter does not reproduce the base model (max |Δ| {disabled:.3g} > {tol:.3g})")
    if method.can_merge:
        trained = logits(model, batch)
        method.merge(model)
        merge = _max_diff(logits(model, batch), trained)
        method.unmerge(model)
        unmerge = _max_diff(logits(model, batch), trained)
        with method.disabled(model):  # the base weights themselves are back, not just the output
            unmerge = max(unmerge, _max_diff(logits(model, batch), base_out))
        if not merge <= 16 * tol:
            raise CellError(f"merged output differs from unmerged (max |Δ| {merge:.3g} > {16 * tol:.3g})")
        if not unmerge <= 16 * tol:
            raise CellError(f"unmerge does not restore the trained adapter (max |Δ| {unmerge:.3g} > {16 * tol:.3g})")
    return R.ChecksRecord(tol, disabled, merge, unmerge, float("nan"))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def inference_probe(spec: CellSpec, method: Method, model: nn.Module, batch: dict) -> tuple[timing.Stats,
                                                                                         timing.Stats]:
    """Forward latency of the trained model unmerged, and merged where the method can merge."""
    model.eval()
    fwd = forward(model, batch)
    unmerged = timing.latency(fwd, spec.device, spec.latency_seconds)
    merged = timing.Stats(float("nan"), float("nan"))
    if method.can_merge:
        method.merge(model)
        merged = timing.latency(fwd, spec.device, spec.latency_seconds)
        method.unmerge(model)
    return unmerged, merged


def checkpoint_probe(s: State, tol: float) -> tuple[R.CheckpointRecord, float]:
    """Save; restore on a fresh base cold, then warm; compare the restored output; whole-model load cold and warm.

    Every method is timed the same way, `full` included: the restore reads the checkpoint directory onto a base
    already in memory; the whole-model load copies one safetensors file of every parameter into the loaded model.
    """
    from ..methods.full import load_parameters, save_parameters

    spec, method, model, batch = s.spec, s.method, s.model, s.check_batch
    trainable = method.trainable_parameters(model)
    state_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    with tempfile.TemporaryDirectory(prefix="peft-bench-ckpt-") as tmp:
        ckpt, whole = Path(tmp, "checkpoint"), Path(tmp, "model.safetensors")
        size = method.save(model, ckpt)
        whole_size = save_parameters(model, whole)
        files.evict(ckpt)
        resident = max(files.resident_fraction(ckpt), 0.0)
        cold, restored = _restore_timed(s, ckpt, tol)
        roundtrip = _max_diff(logits(restored, batch), s.trained_out)
        del restored
        warm, restored = _restore_timed(s, ckpt, tol)
        del restored
        if not roundtrip <= tol:
            raise CellError(f"checkpoint does not round-trip: restored output differs by {roundtrip:.3g} > {tol:.3g}")
        if spec.keep_adapter:  # --save-adapters: the checkpoint that just round-tripped, and what it computes
            keep(ckpt, Path(spec.keep_adapter), batch, s.trained_out)
        files.evict(whole)
        resident = max(resident, files.resident_fraction(whole))
        _, load_cold = timing.timed(lambda: load_parameters(model, whole), spec.device)
        _, load_warm = timing.timed(lambda: load_parameters(model, whole), spec.device)
    record = R.CheckpointRecord(size, method.checkpoint_format, state_bytes, whole_size, load_cold, load_warm, cold,
                                warm, resident)
    return record, roundtrip


def keep(ckpt: Path, where: Path, batch: dict, trained_out: torch.Tensor) -> None:
    """Copy the checkpoint to `where`, with the check batch and the trained model's logits on it
    (check.safetensors: `logits` and the batch's tensors), so that a reload can be checked against the trained cell."""
    from safetensors.torch import save_file

    shutil.copytree(ckpt, where, dirs_exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in batch.items() if torch.is_tensor(v)}
    save_file({**tensors, "logits": trained_out.detach().float().cpu().contiguous()}, str(where / "check.safetensors"))


def _restore_timed(s: State, ckpt: Path, tol: float):
    spec, fresh = s.spec, s.build()
    drift = _max_diff(logits(fresh, s.check_batch), s.base_out)
    if not drift <= tol:
        raise CellError(f"rebuilding the base model is not reproducible (max |Δ| {drift:.3g}); no round trip possible")
    restorer = get_method(spec.method, **spec.method_options)
    restored, seconds = timing.timed(lambda: restorer.restore(fresh, ckpt), spec.device)
    return seconds, restored.to(spec.device)


def _inject(fault: str | None, model: nn.Module) -> None:
    """Simulated failures, so the tests can prove that a failing cell becomes a row and the run goes on."""
    if fault == "raise":
        raise RuntimeError("injected fault in the training step")
    if fault == "oom":
        raise MemoryError
    if fault == "cuda-oom":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    if fault == "nan":  # every trainable weight becomes NaN: the loss is NaN from the first step
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(float("nan"))


# -- the training steps ---------------------------------------------------------------------------------------------
class PeakWindow:
    """The process's high-water mark over the timed steps alone (`memory.track_process_peak`): opened just before
    the first timed step and closed just after the last, so neither the canary's matrices, nor the warm-up, nor the
    FLOP-counted and memory-tracked steps, nor the rest of the budget fall inside it."""

    def __init__(self, device: str) -> None:
        self.device, self.stack, self.peak = device, contextlib.ExitStack(), None

    def open(self) -> None:
        self.peak = self.stack.enter_context(memory.track_process_peak(self.device))

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> PeakWindow:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def parked(s: State):
    """The harness's own tensors (the base model's reference output the checks need after training, B × T × vocab in
    fp32: 103 MB on gpt-neo-125m-arch) kept on disk while the model trains, so the process peak is the step's alone."""
    keep = {k: v for k, v in (("base_out", s.base_out), ("ballast", s.ballast)) if v is not None}
    if not keep:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="peft-bench-harness-") as tmp:
        path = Path(tmp, "harness.pt")
        torch.save({k: v.cpu() for k, v in keep.items()}, path)
        devices = {k: v.device for k, v in keep.items()}
        s.base_out = s.ballast = None
        del keep  # freed here; the peak window's own gc and malloc_trim hand the pages back before it opens
        try:
            yield
        finally:
            for k, v in torch.load(path).items():
                setattr(s, k, v.to(devices[k]))


def window(spec: CellSpec, instrument: bool, steps: int | None = None) -> Window:
    """Warm-up, timed and (when instrumented) FLOP-counted and memory-tracked steps, checked against the budget."""
    start, end = spec.warmup_steps, spec.warmup_steps + spec.timed_steps
    need = end + INSTRUMENTED_STEPS if instrument else end
    if start < 1 or spec.timed_steps < 1 or spec.train_steps < need:
        raise CellError(f"train_steps {spec.train_steps} cannot hold {spec.warmup_steps} warm-up, {spec.timed_steps} "
                        f"timed and {INSTRUMENTED_STEPS} instrumented steps (at least one warm-up and one timed)")
    return Window(start, end, spec.train_steps if instrument else steps or end, spec.canary_reps)


def train(s: State, instrument: bool, steps: int | None = None, progress=None):
    """The training steps: warm-up, the timed steps, then (instrumented) one step under the FLOP counter and one under
    the tensor-memory tracker, then the rest of the budget. The instrumented steps come after the timed ones so that
    the timed steps run in the same process state in every repeat (a further repeat ends after its last timed step).
    Returns (memory, timing, FLOPs, process peak); memory and FLOPs are None when not instrumented."""
    spec = s.spec
    trainer = Trainer(s.model, s.method, spec.lr, spec.device)
    stream = train_stream(s, spec.seed)
    s.model.train()
    _inject(spec.inject_fault, s.model)
    win = window(spec, instrument, steps)
    bar = progress(win.last, f"{spec.method} × {s.w.name}") if progress else None
    # The learning probe is scored in every process, timed repeats included, so each runs the same prefix.
    probe = list(itertools.islice(train_stream(s, spec.seed + PROBE_SEED), PROBE_BATCHES))
    before = task_losses(s.method, s.model, probe)
    found: dict = {}
    trainer.step(next(stream))  # step 0: first-call allocations and the optimizer state
    tick = bar.update if bar else (lambda: None)
    tick()
    proc = PeakWindow(spec.device)
    with parked(s), proc:
        hooks = Hooks(_instrumented(s, trainer, win, found) if instrument else {}, on_start=proc.open,
                      on_end=proc.close, tick=tick)
        timed = run_steps(trainer, stream, win, s.form.tokens, hooks)
    if bar:
        bar.close()
    check_finite(trainer.losses)
    if not timed.walls:
        raise CellError("no step was timed: raise train_steps above warm-up")
    s.extra.update(timed.load)  # what other processes did during the timed steps (the runner's guard)
    after = task_losses(s.method, s.model, probe) if instrument or steps else []
    tim = timing_record(timed, trainer.losses, s.w.batch_size, learning(before, after))
    peak = ProcessPeak(proc.peak.peak_bytes, s.baseline, proc.peak.source)
    if not instrument:
        return None, tim, None, peak
    trainable = s.method.trainable_parameters(s.model)
    mem = memory_record(found["tracker"], trainable, s.base_bytes, s.params, s.method, peak)
    counted, analytic, top = found["counted"], found["analytic"], spec.matmul_peak_flops
    flo = R.FlopsRecord(counted, analytic, counted / analytic if analytic else float("nan"), counted / tim.step_time_s,
                        top, 100 * counted / tim.step_time_s / top)
    return mem, tim, flo, peak


def _instrumented(s: State, trainer: Trainer, win: Window, found: dict) -> dict[int, Callable[[dict], None]]:
    """The two steps after the timed ones: one under the FLOP counter, one under the tensor-memory tracker."""

    def flops(batch: dict) -> None:
        found["counted"], found["analytic"] = counted_step(s.model, s.method, trainer.step, batch)

    def tracked(batch: dict) -> None:
        found["tracker"] = tracked_step(s, trainer, batch)

    return {win.end: flops, win.end + 1: tracked}


def train_stream(s: State, seed: int):
    """The training batches of a cell, endless, shuffled by `seed`, on the cell's device."""
    return (on_device(b, s.spec) for b in endless(s.data.train, s.form, s.w.batch_size, seed))


def tracked_step(s: State, trainer: Trainer, batch: dict) -> memory.StepMemoryTracker:
    """One training step under the tensor-memory tracker, starting with no gradients held."""
    trainer.opt.zero_grad(set_to_none=True)
    with memory.StepMemoryTracker(s.model, trainer.opt) as tracker:
        trainer.step(batch)
    return tracker


def timing_record(timed: Timed, losses: list[float], batch_size: int, learned: dict) -> R.TimingRecord:
    """The timed steps as a record: medians of the whole step and of its parts, throughputs, the loss curve."""
    st = timing.Stats.of(timed.walls)
    med = [timing.Stats.of([p[k] for p in timed.parts]).median for k in range(3)]
    return R.TimingRecord(
        step_time_s=st.median, step_time_iqr_s=st.iqr, step_time_split_s=sum(med), forward_s=med[0],
        backward_s=med[1], optimizer_s=med[2], timed_steps=len(timed.walls), samples_per_s=batch_size / st.median,
        tokens_per_s=(sum(timed.tokens) / len(timed.tokens)) / st.median, padded_tokens_per_s=timed.padded / st.median,
        first_losses=json.dumps([round(x, 6) for x in losses[:3]]), final_loss=losses[-1],
        canary_flops_per_s=timed.canary, **loss_trend(losses), **learned)

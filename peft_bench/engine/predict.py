"""`peft-bench plan`: a training step's memory, predicted before anything is run, for models this machine cannot hold.

    peft-bench plan --model llama-3.1-8b --methods full,lora,prefix,ia3 --batch-size 1 --seq-len 4096 \\
        --dtype bfloat16 --memory-cap 24GiB

The model is built under `torch._subclasses.FakeTensorMode`: every tensor has its shape, dtype, device and storage
size but no data, so an 8B model costs no memory and an operator costs only its shape arithmetic. The method is
applied by the same code as a measured cell's (`setup.apply`), and the step is the one training step every route
takes (`loop.train_step`: zero_grad, forward, backward, AdamW step, the method's per-step hook): one step to create
the optimizer's state, then one under the tensor tracker the cells use (`measure.memory.StepMemoryTracker`), then one
under the FLOP counter. The prediction is therefore the measured account itself, taken on fake storages: on a
registered workload (its own data, batch and length) it equals the measured cell's tensor peak byte for byte
(`tests/test_predict.py` over the committed results).

A value the step reads from a tensor (`.item()`, a branch on a random draw: LoHa, LoKr, BOFT, AdaLoRA) is answered by
a stand-in (`_ScalarReads`; counted in `scalar_reads`): what a step holds depends on shapes, and on every committed
cell of those methods the plan still equals the measurement byte for byte. What a fake step cannot give: an operator
whose output *shape* depends on values (the row says so); the process's runtime overhead above the tensors (allocator,
libraries, the CUDA context) is not in the tensor peak. `--device cuda` runs on fake CUDA tensors where a GPU is
present, else on fake CPU tensors with CUDA's choices made as CUDA makes them (`cuda_choices`: attention kernel,
foreach AdamW, 512-byte allocator blocks); `planned_with` says which. The attention kernel each step dispatched to is
in `attention_kernels`.

A named model (`MODELS`: published configs in `peft_bench.models.PLANNED`) trains on a synthetic batch: every
sequence `--seq-len` tokens (no padding), labels the inputs themselves (T5: targets of the same length).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
from collections.abc import Iterator

import torch
from torch import nn

from ..config import VARY, CellSpec
from ..errors import UnsupportedError, UserError
from ..measure import memory, overhead
from ..measure.timing import DTYPES
from ..methods import get_method
from ..models import PLANNED
from .loop import Trainer
from .torchrun import held, shard

MODELS = tuple(PLANNED)
STEPS = 13  # what a method's schedule is told (AdaLoRA's budget); the default suite's budget on the -arch models
LENGTH = 512  # --seq-len when not given (named models)
PLANNED_WITH = "FakeTensorMode"
CHILD_TIMEOUT_S = 600


@contextlib.contextmanager
def fake_tensors() -> Iterator:
    """Fake tensors, and `Module._apply` (`.to`, `.float()`) replacing a converted parameter instead of swapping it in
    place (a fake parameter cannot be swapped); tied parameters stay tied. Tensors are made on the CPU (a fake CUDA
    tensor has no random generator to initialise it from) and moved, as a cell's are: fake CUDA tensors need no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = nn.Module._apply
    nn.Module._apply = _apply_fake
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, _Moves(), _ScalarReads():
            yield mode
    finally:
        nn.Module._apply = saved


class _Moves(torch.overrides.TorchFunctionMode):
    """`Tensor.to(device, dtype)` as the `_to_copy` operator it dispatches to: a CPU-only torch refuses `.to("cuda")`
    in Python before fake tensors see it, while the operator itself makes a fake CUDA tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            t = args[0]
            device, dtype = torch._C._nn._parse_to(*args[1:], **kwargs)[:2]
            if (device is None or device == t.device or (device.type == t.device.type and device.index is None)) \
                    and (dtype is None or dtype == t.dtype):
                return t
            return torch.ops.aten._to_copy(t, dtype=dtype or t.dtype, device=device or t.device)
        return func(*args, **kwargs)


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """A value the step reads from a fake tensor (`bool(t)`, `.item()`, `.tolist()`), answered by a stand-in: True
    for a truth value, 0 for a number. Fake tensors have no values; what a step holds depends on shapes, not on these
    answers, wherever the step only branches on a random draw or indexes with the value read: LoHa's and LoKr's
    module dropout (`torch.rand(1) > p`: True, the module applied, as it always is at p = 0), BOFT's multiplicative
    dropout (`randint(0, N).item()`: which of N equal-shaped blocks), AdaLoRA's rank budget (`kthvalue(...).item()`:
    the threshold; the masks it makes have the same shape whatever it is). A constant fake tensors track (AdamW's step
    count) is read as itself. Also over meta tensors (`with torch.device("meta"), _ScalarReads()`: BOFT's
    initialisation indexes with values). Counted in `reads`: a row that needed any says so in `scalar_reads`. An
    operator whose *shape* depends on values (`nonzero`, boolean-mask indexing) still cannot be planned."""

    reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import DataDependentOutputException

        try:
            return func(*args, **(kwargs or {}))  # a constant fake tensors track (AdamW's step count) is known
        except (DataDependentOutputException, RuntimeError):  # a fake tensor's value; a meta tensor's (`.item()`)
            if func is not torch.ops.aten._local_scalar_dense.default:
                raise
        type(self).reads += 1
        t = args[0]
        return True if t.dtype == torch.bool else 0.0 if t.is_floating_point() else 0


def _apply_fake(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    done: dict[int, nn.Parameter] = {}
    for module in self.modules():
        for key, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in done:
                with torch.no_grad():
                    new = fn(p)
                done[id(p)] = p if new is p else nn.Parameter(new, requires_grad=p.requires_grad)
            module._parameters[key] = done[id(p)]
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = fn(b)
    return self


def _faked(model: nn.Module, mode) -> nn.Module:
    """Every real parameter and buffer replaced by a fake one of the same shape, dtype and device (ties kept)."""
    from torch._subclasses.fake_tensor import is_fake

    return _apply_fake(model, lambda t: t if is_fake(t) else mode.from_tensor(t))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


@dataclasses.dataclass
class Subject:
    """What is planned: a named model (synthetic batch) or a registered workload (its own first training batch)."""

    name: str
    family: str
    build: object  # () -> nn.Module, called under fake tensors
    batch: object  # (device) -> dict of tensors
    batch_size: int
    seq_len: int


def subject(name: str, method, asked, scale: tuple = (None, None), index: int = 0) -> Subject:
    """`asked`: the plan's options (batch_size, max_length; `padded` for a named model's batch)."""
    if name in PLANNED:
        return _named(name, asked.batch_size or 1, asked.max_length or LENGTH, getattr(asked, "padded", False))
    if name not in _workload_names():
        raise _unknown(name)
    return _workload(name, method, asked.batch_size, asked.max_length, (scale, index))


def _unknown(name: str) -> UserError:
    return UserError(f"plan: unknown model {name!r}; named models: {', '.join(MODELS)}; or a workload "
                     "(`peft-bench list`)")


def _workload_names() -> list[str]:
    from ..workloads import ALIASES, list_workloads

    return list_workloads() + list(ALIASES)


def _named(name: str, batch_size: int, seq_len: int, padded: bool = False) -> Subject:
    """A synthetic batch of full-length sequences. Unpadded, it carries no attention mask: transformers drops an
    all-ones mask itself (on a GPU, sdpa then runs causal FlashAttention with grouped-query attention native). Padded
    (the last sequence one token short, as batches padded to their longest are), the mask is kept and sdpa takes the
    memory-efficient kernel over keys and values repeated per query head."""
    from ..models import planned

    kind = PLANNED[name][0]
    family = "encoder-decoder" if kind == "t5" else "decoder"
    vocab = PLANNED[name][1]["vocab_size"]
    limit = PLANNED[name][1].get("max_position_embeddings") or PLANNED[name][1].get("n_positions")
    if limit and seq_len > limit:
        raise UserError(f"plan: --seq-len {seq_len} exceeds {name}'s {limit} positions")

    def batch(device: str) -> dict:
        ids = torch.randint(4, vocab, (batch_size, seq_len)).to(device)
        if not padded:
            return {"input_ids": ids, "labels": ids.clone()}
        mask = torch.ones_like(ids)
        mask[-1, -1] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    return Subject(name, family, lambda: planned(name), batch, batch_size, seq_len)


def _workload(name: str, method, batch_size: int | None, seq_len: int | None, where: tuple) -> Subject:
    """A registered workload's batch number `index` of its seed-0 training stream (a padded length can differ from
    batch to batch: a measured cell tracks the step after its warm-up, timed and FLOP-counted ones)."""
    from ..workloads import get_workload
    from ..workloads.tasks import endless
    from .setup import DATA_SEED, place

    scale, index = where
    w = get_workload(name).with_options(batch_size=batch_size, max_length=seq_len).scaled(*scale).sized(
        method.extra_input_tokens + method.extra_key_tokens)
    data, form = w.data(DATA_SEED), w.formulation()
    real = next(itertools.islice(endless(data.train, form, w.batch_size, 0), index, None))

    def batch(device: str) -> dict:
        spec = CellSpec("x", name, device=device)
        return {k: place(v, spec) if isinstance(v, torch.Tensor) else v for k, v in real.items()}

    return Subject(name, w.family, w.build_model, batch, w.batch_size, w.max_length or 0)


def plan_cell(method_name: str, name: str, cfg, options: dict | None = None, scale: tuple = (None, None),
              index: int = 0) -> dict:
    """One (method, model) row: counts, the tensor peak and its parts, FLOPs per step; or why it cannot be planned.
    `options`: the method's own (default: from the flags); `scale`: a sweep's (width, depth)."""
    from .plan import _options_for

    method = get_method(method_name, **(options if options is not None else _options_for(method_name,
                                                                                          cfg.method_options)))
    method.schedule(STEPS)
    head = {"method": method_name, "workload": name, "device": cfg.device, "dtype": _dtype(cfg),
            "planned_with": PLANNED_WITH}
    try:
        s = subject(name, method, cfg, scale, index)
        head.update(family=s.family, batch_size=s.batch_size, seq_len=s.seq_len)
        reason = method.unsupported_reason(s.family)
        if reason:
            raise UnsupportedError(reason)
        row = {**head, **_step(method, s, cfg), "status": "ok", "reason": ""}
        return {**row, "process_peak_predicted_bytes": overhead.predicted(row)}
    except UnsupportedError as e:
        return {**head, "status": "unsupported", "reason": str(e)}
    except Exception as e:  # a data-dependent operator, or anything else the fake step met
        if type(e).__name__ in ("DataDependentOutputException", "DynamicOutputShapeException"):
            return {**head, "status": "not planned", "reason": f"an operator's output depends on tensor values ({e}):"
                    " fake tensors have none; run the cell to measure it"}
        raise


def _dtype(cfg) -> str:
    return "float32" if cfg.dtype in ("auto", None) else cfg.dtype


def _step(method, s: Subject, cfg) -> dict:
    """Build, apply, then a first step (the optimizer's state), one under the tracker, one under the FLOP counter.
    On `--device cuda` without a GPU, fake CPU tensors with CUDA's choices (`cuda_choices`)."""
    from ..measure.flops import count_flops
    from . import cuda_choices
    from .setup import apply

    cuda = cfg.device == "cuda"
    real_cuda = cuda and cuda_choices.fake_cuda_backward_works()
    if real_cuda:
        torch.zeros(1, device="cuda")  # the CUDA context, which a backward over fake CUDA tensors needs
    where = cfg.device if real_cuda or not cuda else "cpu"
    spec = CellSpec(type(method).name, s.name, device=where, dtype=_dtype(cfg),
                    gradient_checkpointing=cfg.gradient_checkpointing)
    choices = cuda_choices.CudaChoices() if cuda and not real_cuda else contextlib.nullcontext()
    mesh = _fake_mesh(cfg, where)
    _ScalarReads.reads = 0
    with fake_tensors() as mode, _seen_attention() as kernels, choices:
        with default_dtype(DTYPES[spec.dtype]):
            model = _faked(s.build().eval(), mode)  # a pretrained workload's weights were read from disk: made fake
        model = apply(spec, method, model)
        model.train()  # dropout on, as in a cell's training steps: its masks are saved for backward
        comm = _comm(model, method.trainable_parameters(model), cfg)  # from the whole model, before any sharding
        if mesh is not None:
            shard(model, mesh)
        # the clock reads the host's: nothing to synchronise; AdamW as torch picks it for the planned device
        trainer = Trainer(model, method, 1e-3, "cpu", foreach=True if cuda else None)
        # held fake tensors, as a cell's batch holds real ones (an input saved for backward is counted)
        batch = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in s.batch(where).items()}
        trainer.step(batch)
        trainer.opt.zero_grad(set_to_none=True)
        with memory.StepMemoryTracker(model, trainer.opt, cuda_choices.GRANULE if cuda else 1) as mem:
            trainer.step(batch)
        kept = {f"rank_{k}_max_bytes": v for k, v in held(model, trainer.opt).items()} if comm else {}
        if mesh is not None:
            kept["tensor_peak_torch_fsdp_tracker_bytes"] = _torch_fsdp_peak(model, trainer, batch, where)
        flops = count_flops(lambda: trainer.step(batch))
        trainable = method.trainable_parameters(model)
        total = {id(p): p.numel() for p in model.parameters()}
    how = cuda_choices.described(real_cuda) if cuda else PLANNED_WITH
    return {**_counts(trainable, total), **_memory(mem), **comm, **kept, "flops_per_step": flops,
            "attention_kernels": ",".join(sorted(kernels)) or "none (eager attention)",
            "scalar_reads": _ScalarReads.reads,
            "planned_with": how + (f"; FSDP2 on a fake process group of {comm['world_size']} ranks: the memory is "
                                   "rank 0's" if mesh is not None else "")}


def _torch_fsdp_peak(model, trainer, batch: dict, device: str) -> int | None:
    """A second instrument for an FSDP plan's per-rank peak: torch's own FSDP memory tracker
    (`torch.distributed._tools.fsdp2_mem_tracker`, which follows the same `resize_` calls) over one more step. It
    counts a tensor made before it started only when registered; the cells' tracker counts the batch's input ids
    because the embedding saves them — so the two differ by exactly those bytes (tests/test_predict.py)."""
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    except ImportError:  # a private module of torch's: absent from some version, the column is empty
        return None
    tracker = FSDPMemTracker(model, trainer.opt)
    tracker.track_external(model, trainer.opt)
    with tracker:
        trainer.step(batch)
    return int(tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"])


def _fake_mesh(cfg, device: str):
    """--parallel fsdp with --nproc N: torch's fake process group of N ranks (its collectives return at once, on
    fake tensors; this process is rank 0) and its device mesh, made before fake tensors (the mesh reads values).
    The model is then sharded as the cells shard it, and the step's tracker counts one rank's tensors: its shards,
    the blocks gathered for compute and freed again (`resize_`, which the tracker follows)."""
    world, mode = _layout(cfg)
    if mode != "fsdp":
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    if dist.get_world_size() != world:
        raise UnsupportedError(f"this process already planned {dist.get_world_size()} ranks, not {world}")
    return init_device_mesh(device, (world,))


def _layout(cfg) -> tuple[int, str | None]:
    """(ranks in all, ddp | fsdp) of a plan with --nproc N; (1, None) without."""
    if not getattr(cfg, "nproc", None):
        return 1, None
    return cfg.nproc[0] * getattr(cfg, "nnodes", 1), (cfg.parallel or ("ddp",))[0]


def _comm(model, trainable: dict, cfg) -> dict:
    """With --nproc N: the bytes per step of each collective under --parallel (`plan_comm`), and the world size."""
    world, mode = _layout(cfg)
    if mode is None:
        return {}
    from .plan_comm import planned_comm

    return {"world_size": world, "parallel": mode, **planned_comm(model, trainable, world, mode, cfg.device,
                                                                   cfg.broadcast_buffers == "on")}


def _counts(trainable: dict, total: dict) -> dict:
    return {"trainable_params": sum(p.numel() for p in trainable.values()), "total_params": sum(total.values()),
            "trainable_state_bytes": sum(p.numel() * p.element_size() for p in trainable.values())}


def _memory(mem) -> dict:
    parts = mem.peak_parts
    return {"tensor_peak_bytes": mem.peak_bytes, "weights_bytes": parts["weights"],
            "gradients_bytes": parts["gradients"], "optimizer_bytes": parts["optimizer"],
            "activations_bytes": parts["activations"], "temporaries_bytes": parts["temporaries"],
            "saved_activations_max_bytes": mem.max_parts["activations"]}


ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_attention_math")


@contextlib.contextmanager
def _seen_attention() -> Iterator[set[str]]:
    """The scaled-dot-product attention kernels the step dispatched to (their names), as the device chose them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ATTENTION_OPS:
                seen.add(name.lstrip("_"))
            return func(*args, **(kwargs or {}))

    with Seen():
        yield seen


def run(cfg) -> list[dict]:
    """Every (model, method[, varied value]) asked: a progress line each, the rows in order."""
    names = ([cfg.model] if cfg.model else []) + list(cfg.workloads or ())
    if not names:
        raise UserError("plan needs --model NAME (one of " + ", ".join(MODELS) + ") or --workloads")
    asked = over(cfg)
    if len(cfg.nproc or ()) > 1 or len(cfg.parallel or ()) > 1 or set(cfg.parallel or ()) - {"ddp", "fsdp"}:
        raise UserError("plan takes one --nproc N and one --parallel ddp|fsdp")
    for name in names:  # bad names and lengths before the first progress line
        if name in PLANNED:
            for a in asked:  # raises on a length beyond its positions
                _named(name, a.batch_size or 1, a.max_length or LENGTH)
        elif name not in _workload_names():
            raise _unknown(name)
    jobs = list(itertools.product(names, cfg.methods or ("full", "lora"), asked))
    rows = []
    for i, (name, m, a) in enumerate(jobs, 1):
        at = f" at {cfg.vary[0]} {getattr(a, VARY[cfg.vary[0]][1])}" if cfg.vary else ""
        print(f"[{i}/{len(jobs)}] planning {m} × {name}{at}", file=sys.stderr, flush=True)
        rows.append(isolated(m, name, a))
    return rows


@dataclasses.dataclass(frozen=True)
class Resolution:
    """How a search over one varied value proceeds: where it starts, the step a real probe (`capacity`) and a planned
    one (`plan --vary`: a fake step of an 8B model takes seconds) bisect to, and the ceiling."""

    start: int
    real: int
    planned: int
    ceiling: int


SEARCH = {"batch_size": Resolution(1, 1, 1, 4096), "seq_len": Resolution(16, 8, 64, 1 << 16)}  # config.VARY: options


def over(cfg) -> list:
    """The plan's options once, or once per value of --vary seq_len=... / batch_size=..."""
    if not cfg.vary:
        return [cfg]
    name, values = cfg.vary
    if name not in SEARCH:
        raise UserError(f"plan --vary takes seq_len=... or batch_size=..., got {name}")
    return [dataclasses.replace(cfg, **{VARY[name][1]: v}) for v in values]


def largest(rows: list[dict], cfg, cap: int) -> dict[tuple[str, str], tuple[int | None, str]]:
    """(model, method) → the largest varied value whose planned tensor peak fits under `cap`, bisected on fake steps
    between the largest planned value that fits and the next that does not (to `SEARCH`'s planned step), and how it
    was bounded."""
    name, _ = cfg.vary
    out = {}
    for key in dict.fromkeys((r["workload"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["method"]) == key and r.get("status") == "ok"]
        fits = [r[name] for r in mine if r["tensor_peak_bytes"] <= cap]
        lo = max(fits, default=None)
        hi = min((r[name] for r in mine if r["tensor_peak_bytes"] > cap and (lo is None or r[name] > lo)), default=None)
        if lo is None or hi is None:
            out[key] = (lo, "all planned values fit" if hi is None and lo is not None else "none planned fits")
            continue
        lo, hi = bisect(lo, hi, SEARCH[name].planned, lambda mid, key=key: _fits_at(key, cfg, mid, cap))
        out[key] = (lo, f"next {hi} does not fit")
    return out


def bisect(lo: int, hi: int, step: int, fits) -> tuple[int, int]:
    """Narrow a bracket — `lo` fits, `hi` does not — to within `step`, asking `fits(v)` at each middle value (a
    multiple of `step`); a None answer (no memory answer) stops it where it is. Capacity's real probes, its planned
    peaks and `plan --vary`'s search all bisect through here."""
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if not lo < mid < hi:
            break
        got = fits(mid)
        if got is None:
            break
        lo, hi = (mid, hi) if got else (lo, mid)
    return lo, hi


def _fits_at(key: tuple[str, str], cfg, value: int, cap: int) -> bool:
    """One search step of `largest`: (model, method) planned at `value` of the varied option, under `cap`?"""
    name = cfg.vary[0]
    print(f"  searching {key[1]} × {key[0]}: {name} {value}", file=sys.stderr, flush=True)
    got = isolated(key[1], key[0], dataclasses.replace(cfg, **{VARY[name][1]: value}))
    return got.get("status") == "ok" and got["tensor_peak_bytes"] <= cap


def isolated(method: str, name: str, cfg, *args) -> dict:
    """`plan_cell` in a child forked from the cells' fork server: a fake step that crashes native code (seen: VeRA on
    the pretrained MiniLM, a segmentation fault) or raises becomes a row saying so; the other cells are still
    planned."""
    from .launch import _context

    ctx = _context()  # the cells' fork server: a child forked from a process with threads can deadlock (seen once)
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, method, name, cfg, args))
    child.start()
    send.close()
    try:
        got = recv.recv() if recv.poll(CHILD_TIMEOUT_S) else "the fake step took longer than 10 minutes"
    except EOFError:  # died before answering
        got = None
    if child.is_alive():
        child.kill()
    child.join()
    if isinstance(got, dict):
        return got
    why = got if isinstance(got, str) else f"the fake step's process died ({_signal(child.exitcode)})"
    if why.startswith("UserError: "):
        raise UserError(why.removeprefix("UserError: "))
    return {"method": method, "workload": name, "device": cfg.device, "status": "not planned", "reason": why}


def _child(send, method: str, name: str, cfg, args: tuple) -> None:
    try:
        send.send(plan_cell(method, name, cfg, *args))
    except Exception as e:
        send.send(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    finally:
        send.close()


def _signal(code: int | None) -> str:
    import signal

    return signal.Signals(-code).name if code is not None and code < 0 else f"exit status {code}"


def against(rows: list[dict]) -> list[dict]:
    """Each measured single-process CPU row of a run planned as that cell (its method, options, batch, length, dtype,
    width and depth): the planned row beside the measured numbers (`measured_*`)."""
    import json

    out = []
    todo = [r for r in rows if r.get("status") == "ok" and not _num(r.get("replica")) and r.get("device") == "cpu"
            and not r.get("parallel") and not _num(r.get("world_size"))]
    for i, r in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] planning {r['method']} × {r['workload']} as measured", file=sys.stderr, flush=True)
        cfg = _Asked(batch_size=int(r["batch_size"]), max_length=int(r["seq_len"]) or None, dtype=r["dtype"],
                     gradient_checkpointing=str(r.get("gradient_checkpointing")) == "True")
        scale = tuple(int(r[k]) if _num(r.get(k)) else None for k in ("width", "depth"))
        got = isolated(r["method"], r["workload"], cfg, json.loads(r.get("options") or "{}"), scale, _tracked(r))
        got.update({f"measured_{k}": r.get(k) for k in ("tensor_peak_bytes", *PART_KEYS, "trainable_params",
                                                         "trainable_state_bytes")})
        got["vary"], got["vary_value"] = r.get("vary") or "", r.get("vary_value") if r.get("vary") else ""
        out.append(got)
    return out


def _tracked(r: dict) -> int:
    """The stream index of the batch a measured cell tracked: step 0, its warm-up, its timed steps, the FLOP step."""
    from .suites import budget, get_suite

    try:
        warmup = budget(get_suite(r.get("suite") or "default"), r["workload"]).warmup_steps
    except Exception:  # a workload outside its suite: the default budget's warm-up
        warmup = 3
    return warmup + int(_num(r.get("timed_steps"))) + 1


PART_KEYS = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "temporaries_bytes")


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if v != v else v


@dataclasses.dataclass(frozen=True)
class _Asked:
    """The few options `plan_cell` reads, for a cell planned as it was measured."""

    batch_size: int | None = None
    max_length: int | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    method_options: dict = dataclasses.field(default_factory=dict)
    padded: bool = False
    nproc: tuple | None = None  # (ranks per node,) and (mode,): a distributed cell's layout
    parallel: tuple | None = None
    broadcast_buffers: str = "on"

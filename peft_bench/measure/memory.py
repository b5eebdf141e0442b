"""Training-step memory, exact at the tensor level and honest at the process level.

Tensor level — `StepMemoryTracker`, a `TorchDispatchMode` that sees every storage an operator returns during one
training step and a `weakref.finalize` on each storage that sees it freed, so the bytes of live tensor storages are
known after every operator. Each live storage carries one category, kept current by hooks:

    weights      parameters and buffers of the model (registered before the step)
    optimizer    tensors in `optimizer.state` (registered before the step; steady state, so no new state)
    gradients    a trainable parameter's `.grad`, from the moment autograd accumulates it
                 (`Tensor.register_post_accumulate_grad_hook`)
    activations  storages autograd saved for backward (the pack hook of `torch.autograd.graph.saved_tensors_hooks`),
                 parameters excepted; the input batch counts here when an operator saves it
    temporaries  every other storage an operator produced or viewed during the step (outputs, logits, loss,
                 incoming gradients not yet accumulated, the optimizer's foreach scratch)

At the moment the live total is highest (`tensor_peak_bytes`) the five parts are copied; they are ≥ 0 and add up to
the peak by construction. Not seen: scratch memory a kernel allocates and frees inside one operator (oneDNN/MKL
workspaces, cuBLAS workspaces) and anything the step never touches (the dataset, the harness's own tensors); those
show up in the process-level figure instead.

Process level — `process_peak_bytes`: the resident-set high-water mark (CPU, VmHWM reset through
/proc/self/clear_refs) or `max_memory_reserved` (CUDA) during the measured steps, minus the process's footprint
before the model was built (CPU; taken after the data were loaded, a gc and `malloc_trim`). `runtime_overhead_bytes`
= process − tensor peak: allocator slack and fragmentation, kernel workspaces, thread stacks, Python objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries")


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class StepMemoryTracker(TorchDispatchMode):
    """Live tensor bytes by category during a training step; see the module docstring for the categories.

        with StepMemoryTracker(model, optimizer) as mem:
            loss = model(**batch).loss; loss.backward(); optimizer.step()
        mem.peak_bytes, mem.peak_parts, mem.max_parts
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, granule: int = 1) -> None:
        """`granule`: each storage counted rounded up to a multiple of it (CUDA's caching allocator: 512 bytes)."""
        super().__init__()
        self.granule = granule
        self.size: dict[int, int] = {}
        self.category: dict[int, str] = {}
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.peak_bytes = 0
        self.peak_parts = dict.fromkeys(CATEGORIES, 0)
        self.max_parts = dict.fromkeys(CATEGORIES, 0)  # each category's own maximum during the step
        self.initial_parts = dict.fromkeys(CATEGORIES, 0)  # what was live when the step began
        self._handles: list = []
        self._model, self._opt = model, optimizer
        self._stack = contextlib.ExitStack()

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _add(self, t: torch.Tensor, category: str) -> int:
        st = local_shard(t).untyped_storage()
        k = st._cdata
        if k in self.size:
            return k
        self.size[k], self.category[k] = 0, category
        weakref.finalize(st, self._free, k)
        self._grown(k, st)
        return k

    def _grown(self, k: int, st) -> None:
        """Storage `k` now holds `st.nbytes()` (rounded to the granule): its category's total, the peak."""
        n = -(-st.nbytes() // self.granule) * self.granule
        category = self.category[k]
        self.totals[category] += n - self.size[k]
        self.size[k] = n
        self._update(category)
        total = sum(self.totals.values())
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_parts = dict(self.totals)

    def _update(self, category: str) -> None:
        if self.totals[category] > self.max_parts[category]:
            self.max_parts[category] = self.totals[category]

    def _resized(self, st) -> None:
        """A storage resized in place (FSDP2 frees a block's unsharded parameters with `resize_(0)` after its
        forward and regrows them for its backward): its new size counts, in its category."""
        if st._cdata in self.size:
            self._grown(st._cdata, st)

    def _free(self, k: int) -> None:
        n, cat = self.size.pop(k, None), self.category.pop(k, None)
        if n is not None:
            self.totals[cat] -= n

    def _move(self, t: torch.Tensor, category: str, only_from: tuple[str, ...] = ("temporaries",)) -> None:
        k = self._add(t, category)
        old = self.category[k]
        if old != category and old in only_from:
            self.totals[old] -= self.size[k]
            self.totals[category] += self.size[k]
            self.category[k] = category
            self._update(category)

    # -- hooks ------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t, "temporaries")
        return out

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._move(t, "activations")
        return t

    def _grad_hook(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._move(p.grad, "gradients")

    def __enter__(self) -> StepMemoryTracker:
        for t in list(self._model.parameters()) + list(self._model.buffers()):
            self._add(t, "weights")
        if self._opt is not None:
            for state in self._opt.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        self._add(v, "optimizer")
        for p in self._model.parameters():
            if p.requires_grad:
                if p.grad is not None:
                    self._add(p.grad, "gradients")
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook))
        self.initial_parts = dict(self.totals)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._stack.enter_context(_resizes_seen(self._resized))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._stack.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextlib.contextmanager
def _resizes_seen(seen) -> Iterator[None]:
    """`UntypedStorage.resize_` reported to `seen` after it runs: a storage-level call no dispatch mode sees."""
    original = torch.UntypedStorage.resize_

    def resize_(storage, size):
        out = original(storage, size)
        seen(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2's parameters, gradients and optimizer state): its own storage; the
    DTensor is a wrapper with none of its own, and the operators on the shard run below this mode, unseen."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


# -- process level --------------------------------------------------------------------------------------
def release_free_memory() -> None:
    """gc, then hand freed heap pages back to the OS (glibc `malloc_trim`), so RSS readings start tight."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_footprint(device: str) -> int:
    """What the process holds now, after a gc: RSS on CPU, reserved bytes on CUDA."""
    release_free_memory()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_reserved()
    return rss_bytes()


@dataclass
class ProcessPeak:
    peak_bytes: int = 0  # absolute high-water mark (RSS or CUDA reserved)
    source: str = ""


@contextlib.contextmanager
def track_process_peak(device: str) -> Iterator[ProcessPeak]:
    """reset peak → yield → read. CPU: VmHWM (ru_maxrss if it cannot be reset); CUDA: max reserved."""
    out = ProcessPeak()
    release_free_memory()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.peak_bytes, out.source = torch.cuda.max_memory_reserved(), "torch.cuda.max_memory_reserved"
        return
    reset_ok = _reset_peak_rss()
    yield out
    hwm = _vm_hwm_bytes() if reset_ok else None
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.peak_bytes = max(hwm, rss_bytes())
    out.source = "VmHWM (peak RSS, reset before the measured steps)" if reset_ok else "ru_maxrss (peak RSS since start)"


def check_gpu_is_free(limit_bytes: int = 2 << 30) -> None:
    """Refuse to measure on a GPU that other processes already fill (their memory would distort ours)."""
    from ..errors import UserError

    free, total = torch.cuda.mem_get_info()
    used = total - free - torch.cuda.memory_reserved()  # includes our CUDA context (~0.5 GiB)
    if used > limit_bytes:
        raise UserError(f"the GPU already holds {used / 2**30:.1f} GiB from other processes; free it first")

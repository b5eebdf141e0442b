"""The one interface every PEFT method implements, and the helpers they share.

A method is built from a validated options dataclass and bound to one model by `apply`:

    method = get_method("lora", r=8)
    model = method.apply(model)          # injects adapters, freezes the rest
    method.trainable_parameters(model)   # exactly what the method made trainable
    with method.disabled(model): ...     # the base model (adapters bypassed)
    method.merge(model); method.unmerge(model)
    method.save(model, "ckpt/")             # what restores it; peft's format where peft has the method
    method2.restore(fresh_base, "ckpt/")     # a fresh base with the trained adapter
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..arch import ArchInfo, describe, lora_layer_types
from ..errors import UnsupportedError, UserError


@dataclass(frozen=True)
class MethodOptions:
    """Options shared by all methods. Subclasses add fields and extend `__post_init__`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(type(self).__name__, f, getattr(self, f.name))


def _check_type(owner: str, f: dataclasses.Field, value: object) -> None:
    kind = f.metadata.get("kind")
    if kind is None or value is None:
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{f.name} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{f.name} must be a number, got {value!r}")


def opt(default: object, kind: type | None = None, help: str = "") -> dataclasses.Field:
    """A dataclass field with a documented type that `MethodOptions` checks on construction."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help})


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


class Method:
    """Base class: subclasses set `name`, `Options`, `can_merge` and override `_inject`."""

    name: str = ""
    Options: type[MethodOptions] = MethodOptions
    # Capabilities the engine asks instead of names:
    can_merge: bool = False  # adds a weight delta that can be folded into the base weights
    trains_everything: bool = False  # the base weights themselves train: no adapter to disable
    # Another method with the same parametrisation and initialisation (the same function of the same trainable
    # numbers): `peft-bench tune` sweeps that one and this method uses its learning rate.
    tunes_like: str | None = None
    # The independent implementation this method is tested against (hand-written → peft), compared side by side.
    reference: str | None = None
    what: str = ""  # one line: what the method is, and its source
    checkpoint_format: str = ""  # what `save` writes, in words (a trained classifier head goes with it)
    extra_inference: str = "none when merged; unmerged, the adapter's matmuls"  # beyond the base model's forward

    # Virtual tokens the method adds to each sequence (prompt methods), for the analytic FLOP count.
    extra_input_tokens: int = 0  # prepended to the input embeddings
    extra_key_tokens: int = 0  # prepended to every attention's keys and values

    def __init__(self, options: MethodOptions) -> None:
        self.options = options
        self.arch: ArchInfo | None = None
        self.merged = False

    # -- applying ---------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Inject the method into `model` and freeze everything it did not create; return the model to train."""
        if self.arch is not None:
            raise UserError(f"method {self.name!r} is already applied; build a new one with get_method()")
        self.arch = describe(model)
        return self._inject(model)

    def _inject(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    # -- the training loop's hooks ----------------------------------------------------------------------
    total_steps: int | None = None

    def schedule(self, total_steps: int) -> None:
        """Told before `apply` how many optimizer steps training will take (AdaLoRA's rank budget needs it)."""
        self.total_steps = total_steps

    def task_loss(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Inside it, the model's `loss` is the task's alone: a method that adds a regulariser to the loss it trains
        on (AdaLoRA's orthogonality penalty) leaves it out, so that learning and forgetting probes measure the task."""
        return contextlib.nullcontext()

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step, before the gradients are cleared (AdaLoRA reallocates ranks here);
        part of the timed step."""

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this method trains (adapter weights, plus the task head for classifiers)."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def closed_form_trainable(self, model: nn.Module) -> int:
        """The trainable-parameter count predicted from shapes and options alone (see each method)."""
        raise NotImplementedError

    @classmethod
    def unsupported_reason(cls, family: str) -> str | None:
        """Why this method cannot serve a model of `family` (mlp / encoder / decoder / encoder-decoder), or None."""
        return None

    # Why the method cannot train under a parallel mode ("ddp" / "fsdp"), where it cannot. Tried: every method under
    # DDP and FSDP2 on 2 ranks of the tiny GPT-Neo; only AdaLoRA fails (under FSDP).
    parallel_unsupported: dict[str, str] = {}

    def unsupported_parallel(self, mode: str) -> str | None:
        return self.parallel_unsupported.get(mode)

    # -- merging and disabling ---------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base weights. Idempotent: merging a merged model does nothing."""
        self._require_merge()
        if not self.merged:
            self._merge(model)
            self.merged = True

    def unmerge(self, model: nn.Module) -> None:
        """Undo `merge`. Idempotent: unmerging an unmerged model does nothing."""
        self._require_merge()
        if self.merged:
            self._unmerge(model)
            self.merged = False

    def _require_merge(self) -> None:
        if not self.can_merge:
            raise UnsupportedError(f"method {self.name!r} cannot merge: it adds no weight delta to fold in")
        if self.arch is None:
            raise UserError(f"method {self.name!r} must be applied to a model before merge/unmerge")

    def _merge(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _unmerge(self, model: nn.Module) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the exact base model inside the block (adapters bypassed, merged weights restored)."""
        was_merged = self.merged
        if was_merged:
            self.unmerge(model)
        try:
            with self._disabled(model):
                yield model
        finally:
            if was_merged:
                self.merge(model)

    def _disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        raise UnsupportedError(f"method {self.name!r} has no adapter to disable")

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, model: nn.Module, directory: str | Path) -> int:
        """Write what a user must keep to restore the trained model to `directory`; return its size in bytes."""
        raise NotImplementedError

    def restore(self, base: nn.Module, directory: str | Path) -> nn.Module:
        """On a fresh (not yet applied) method: `base` with the checkpoint in `directory` loaded; the result gives the
        trained model's outputs. Switching adapters on a loaded base is this call."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


# -- shared helpers -------------------------------------------------------------------------------
def unique_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Named parameters with tied weights listed once (under their first name)."""
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def resolve_targets(model: nn.Module, patterns: tuple[str, ...] | None, arch: ArchInfo) -> list[str]:
    """Full names of the layers LoRA can wrap (`nn.Linear`, and `Conv1D` as in GPT-2) that the patterns select
    (default: the architecture's targets).

    A pattern matches a module whose name equals it, ends with `.pattern`, or fully matches it as a regex.
    Every pattern must match at least one such layer: a typo is an error, not a silent no-op.
    """
    kinds = lora_layer_types()
    linears = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    heads = set(arch.head_modules)
    linears = [n for n in linears if n.split(".")[0] not in heads]
    if patterns is None:
        patterns = arch.default_targets
        if not patterns:  # an MLP: every Linear, as in the tutorial
            return linears
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in linears if _matches(pattern, n)]
        if not hits:
            sample = ", ".join(sorted({n.split(".")[-1] for n in linears})[:12])
            raise UserError(f"target pattern {pattern!r} matches no Linear/Conv1D module; their names are: {sample}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def set_trainable(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    """Trainability by structure: freeze every parameter except the ones the method created."""
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def parametrize_frozen(module: nn.Module, tensor: str, parametrization: nn.Module) -> None:
    """Register `parametrization` on `module.<tensor>` and keep the original tensor frozen (the method trains only
    the parametrization's own parameters)."""
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(module, tensor, parametrization)
    getattr(module.parametrizations, tensor).original.requires_grad_(False)


class HeadCopy(nn.Module):
    """A classifier head trained as a copy, so the original stays intact for `disabled()`.

    This mirrors peft's `modules_to_save`: a freshly initialised head must train with any PEFT method,
    yet disabling the adapter must give back the base model exactly.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.trained = copy.deepcopy(original)
        self.enabled = True

    def forward(self, *args: object, **kwargs: object) -> object:
        return (self.trained if self.enabled else self.original)(*args, **kwargs)


def copy_heads(model: nn.Module, heads: tuple[str, ...]) -> list[HeadCopy]:
    """Replace each top-level head module by a `HeadCopy`; return the copies."""
    copies = []
    for h in heads:
        head = HeadCopy(getattr(model, h))
        setattr(model, h, head)
        copies.append(head)
    return copies


@contextlib.contextmanager
def heads_disabled(copies: list[HeadCopy]) -> Iterator[None]:
    for c in copies:
        c.enabled = False
    try:
        yield
    finally:
        for c in copies:
            c.enabled = True


def head_size(model: nn.Module, arch: ArchInfo) -> int:
    """Parameters of the model's classifier heads (what peft's `modules_to_save` trains as a copy)."""
    return sum(p.numel() for h in arch.head_modules for p in getattr(model, h).parameters())


def head_param_count(copies: list[HeadCopy]) -> int:
    """Parameters of the trained head copies, counted on the frozen originals they were copied from (so a trained
    tensor that changed shape is not counted by the closed form that checks it)."""
    return sum(p.numel() for c in copies for p in c.original.parameters())


PROMPT_REASON = "{} needs a transformer with token embeddings and attention; this model is a plain MLP"


def require_prompt_model(method: str, arch: ArchInfo) -> None:
    """Prompt-family methods need a transformer that consumes token embeddings."""
    if arch.family == "mlp":
        raise UnsupportedError(PROMPT_REASON.format(method))

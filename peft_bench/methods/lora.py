"""Hand-written LoRA (Hu et al. 2021, arXiv:2106.09685) that wraps each targeted `nn.Linear`.

        x ──► base Linear (frozen W, b) ──────────────┐
        │                                             (+) ──► y = W x + b + (α/r)·B A x
        └──► dropout ──► A (r×d_in) ──► B (d_out×r) ──┘

A starts Kaiming-uniform (as peft does) or Gaussian, B starts at zero, so the wrapped model is exactly the
base model before training. The base bias is untouched. No `peft` import in the forward path: this is the
reference implementation that `hf-lora` is checked against.

Adapter dtype: as peft's `autocast_adapter_dtype=True`, A and B are float32 when the base weight is float16 or
bfloat16 (the adapter's input is cast to float32 and its output back to the base dtype); otherwise the base dtype.

Checkpoints are written in peft's own format (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads an adapter trained here and
`restore` loads one trained with peft.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import layer_dims
from .base import (
    Method,
    MethodOptions,
    copy_heads,
    head_param_count,
    heads_disabled,
    opt,
    require,
    resolve_targets,
    set_trainable,
)
from .registry import register

PEFT_LORA_FORMAT = "peft LoRA adapter: A, B"


@dataclass(frozen=True)
class LoRAOptions(MethodOptions):
    r: int = opt(8, int, "rank of the update B·A")
    alpha: float = opt(16.0, float, "scale numerator: the update is multiplied by alpha / r")
    dropout: float = opt(0.0, float, "dropout on the adapter's input, in [0, 1)")
    targets: tuple[str, ...] | None = opt(None, help="module name patterns; default per architecture")
    init: str = opt("kaiming", str, "initialisation of A: 'kaiming' (uniform, as peft) or 'gaussian' (N(0, 1/r))")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.r > 0, f"r must be a positive integer (the LoRA rank), got {self.r}")
        require(math.isfinite(self.alpha) and self.alpha > 0,
                f"alpha must be a finite number > 0 (the update is scaled by alpha / r), got {self.alpha}")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.init in ("kaiming", "gaussian"), f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            require(len(self.targets) > 0, "targets must name at least one module pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """peft's policy (autocast_adapter_dtype=True): half-precision bases get float32 adapters."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def init_lora_A(A: torch.Tensor, init: str, r: int) -> None:
    """Initialise A in place; B is always zero so training starts from the base model."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    else:
        nn.init.normal_(A, std=1 / r)


class LoRALinear(nn.Module):
    """Wraps a frozen `nn.Linear` or `Conv1D` (GPT-2, weight stored d_in × d_out); `lora_A` is (r × d_in) and
    `lora_B` is (d_out × r) either way, as peft stores them."""

    def __init__(self, base: nn.Module, options: LoRAOptions) -> None:
        super().__init__()
        self.base = base
        self.scale = options.scale
        w = base.weight
        dtype = adapter_dtype(w.dtype)
        self.in_features, self.out_features, self.transposed = layer_dims(base)
        self.lora_A = nn.Parameter(torch.empty(options.r, self.in_features, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, options.r, dtype=dtype, device=w.device))
        init_lora_A(self.lora_A.data, options.init, options.r)
        self.dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False

    def own_parameters(self) -> list[nn.Parameter]:
        """The tensors this wrapper trains."""
        return [self.lora_A, self.lora_B]

    def closed_form(self, r: int) -> int:
        """r·(d_in + d_out): A and B."""
        return r * (self.in_features + self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's own layout (d_out × d_in; transposed for Conv1D)."""
        delta = (self.lora_B @ self.lora_A) * self.scale
        return delta.T if self.transposed else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled and not self.merged:
            # F.linear takes the weights as stored (out × in): no transposed copies, fused backward.
            x = self.dropout(x.to(self.lora_A.dtype))
            y = y + (F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale).to(y.dtype)
        return y

    def analytic_flops(self, x: torch.Tensor) -> int:
        """The adapter path's matmuls in one training step (the wrapped base Linear is counted on its own):
        forward A then B, 2·rows·r·(d_in + d_out); backward the same again for the A and B gradients, 2·rows·r·d_out
        to carry the gradient through B, and 2·rows·r·d_in to the input when it needs one."""
        if not self.enabled or self.merged:
            return 0
        rows, r = x.numel() // x.shape[-1], self.lora_A.shape[0]
        d_in, d_out = self.lora_A.shape[1], self.lora_B.shape[0]
        fwd = 2 * rows * r * (d_in + d_out)
        return 2 * fwd + 2 * rows * r * d_out + (2 * rows * r * d_in if x.requires_grad else 0)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class HandLoRA(Method):
    """What both hand-written LoRAs share: `self.adapters` maps each targeted module path to a module holding
    `lora_A`, `lora_B` and an `enabled` switch; disabling, the A/B pairs and peft-format checkpoints follow."""

    Options = LoRAOptions
    can_merge = True
    checkpoint_format = PEFT_LORA_FORMAT
    use_dora = False  # exported with peft's `use_dora` (and magnitude vectors)
    adapters: dict[str, nn.Module]
    heads: list

    @contextlib.contextmanager
    def _disabled(self, model: nn.Module) -> Iterator[None]:
        for adapter in self.adapters.values():
            adapter.enabled = False
        try:
            with heads_disabled(self.heads):
                yield
        finally:
            for adapter in self.adapters.values():
                adapter.enabled = True

    def pairs(self) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """{targeted module path: (A, B)}."""
        return {name: (a.lora_A, a.lora_B) for name, a in self.adapters.items()}

    def save(self, model: nn.Module, directory) -> int:
        return export_peft_lora(self, directory)

    def restore(self, base: nn.Module, directory) -> nn.Module:
        model = self.apply(base)
        import_peft_lora(self, directory)
        return model


@register
class LoRA(HandLoRA):
    """Each targeted layer wrapped in `layer_class` (a subclass may swap it: DoRA)."""

    name = "lora"
    what = "hand-written LoRA wrapping each targeted layer, y = Wx + b + (α/r)·BAx (Hu et al. 2021, arXiv:2106.09685)"
    reference = "hf-lora"
    layer_class: type[LoRALinear] = LoRALinear

    def _inject(self, model: nn.Module) -> nn.Module:
        self.targets = resolve_targets(model, self.options.targets, self.arch)
        self.adapters: dict[str, LoRALinear] = {}
        for name in self.targets:
            layer = self.layer_class(model.get_submodule(name), self.options)
            _set_submodule(model, name, layer)
            self.adapters[name] = layer
        self.heads = copy_heads(model, self.arch.head_modules)
        own = [p for layer in self.adapters.values() for p in layer.own_parameters()]
        set_trainable(model, own + [p for h in self.heads for p in h.trained.parameters()])
        return model

    def closed_form_trainable(self, model: nn.Module) -> int:
        """Per targeted layer its wrapper's closed form (LoRA: r·(d_in + d_out)), plus the classifier head."""
        return sum(m.closed_form(self.options.r) for m in self.adapters.values()) + head_param_count(self.heads)

    def _merge(self, model: nn.Module) -> None:
        for layer in self.adapters.values():
            layer.merge()

    def _unmerge(self, model: nn.Module) -> None:
        for layer in self.adapters.values():
            layer.unmerge()


# -- peft's checkpoint format, shared by both hand-written LoRAs ------------------------------------------
_PREFIX = "base_model.model."


def peft_lora_config(options: LoRAOptions, targets: list[str], arch, inference_mode: bool = False,
                     fan_in_fan_out: bool = False, **extra: object):
    """The `peft.LoraConfig` equivalent to these options on these modules (used by `hf-lora` and the exports);
    `fan_in_fan_out` when the targets are Conv1D layers (weights stored d_in × d_out); `extra`: further LoraConfig
    fields (`use_dora`)."""
    import peft

    return peft.LoraConfig(
        fan_in_fan_out=fan_in_fan_out, **extra,
        r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=list(targets),
        task_type=arch.task_type if arch.family != "mlp" else None,
        init_lora_weights=True if options.init == "kaiming" else "gaussian",
        modules_to_save=list(arch.head_modules) or None, inference_mode=inference_mode)


def _peft_tensors(method) -> dict[str, torch.Tensor]:
    """Keys as peft writes them: `base_model.model.<module>.lora_A.weight` (DoRA also `.lora_magnitude_vector`),
    heads as `base_model.model.<head>.<p>`."""
    out = {}
    for name, (A, B) in method.pairs().items():
        out[f"{_PREFIX}{name}.lora_A.weight"] = A
        out[f"{_PREFIX}{name}.lora_B.weight"] = B
        magnitude = getattr(method.adapters[name], "lora_magnitude", None)
        if magnitude is not None:
            out[f"{_PREFIX}{name}.lora_magnitude_vector"] = magnitude
    for head_name, head in zip(method.arch.head_modules, method.heads):
        out.update({f"{_PREFIX}{head_name}.{k}": v for k, v in head.trained.state_dict().items()})
    return out


def export_peft_lora(method, directory) -> int:
    """Write `method`'s adapter (and head copies) as a peft LoRA adapter directory; return its size in bytes."""
    from safetensors.torch import save_file

    from ..measure.files import size_bytes

    directory = Path(directory)
    peft_lora_config(method.options, list(method.pairs()), method.arch, inference_mode=True,
                     fan_in_fan_out=any(getattr(a, "transposed", False) for a in method.adapters.values()),
                     **({"use_dora": True} if method.use_dora else {})).save_pretrained(str(directory))
    save_file({k: v.detach().contiguous().cpu() for k, v in _peft_tensors(method).items()},
              str(directory / "adapter_model.safetensors"))
    return size_bytes(directory)


@torch.no_grad()
def import_peft_lora(method, directory) -> None:
    """Load a peft LoRA adapter directory into an applied hand-written LoRA; every tensor must find its place."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / "adapter_model.safetensors"))
    ours = _peft_tensors(method)
    if set(state) != set(ours):
        missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        raise ValueError(f"{directory} does not fit this LoRA: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, t in state.items():
        ours[k].copy_(t)

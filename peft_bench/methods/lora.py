"""Hand-written LoRA (Hu et al. 2021, arXiv:2106.09685) that wraps each targeted `nn.Linear`.

        x ──► base Linear (frozen W, b) ──────────────┐
        │                                             (+) ──► y = W x + b + (α/r)·B A x
        └──► dropout ──► A (r×d_in) ──► B (d_out×r) ──┘

A starts Kaiming-uniform (as peft does) or Gaussian, B starts at zero, so the wrapped model is exactly the
base model before training. The base bias is untouched. No `peft` import here: this is the reference
implementation that `hf-lora` is checked against.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import register
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
        require(self.alpha > 0, f"alpha must be > 0 (the update is scaled by alpha / r), got {self.alpha}")
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


def init_lora_A(A: torch.Tensor, init: str, r: int) -> None:
    """Initialise A in place; B is always zero so training starts from the base model."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    else:
        nn.init.normal_(A, std=1 / r)


class LoRALinear(nn.Module):
    """Wraps a frozen `nn.Linear`; `lora_A` is (r × d_in) and `lora_B` is (d_out × r)."""

    def __init__(self, base: nn.Linear, options: LoRAOptions) -> None:
        super().__init__()
        self.base = base
        self.scale = options.scale
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(options.r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, options.r, dtype=w.dtype, device=w.device))
        init_lora_A(self.lora_A.data, options.init, options.r)
        self.dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled and not self.merged:
            # F.linear takes the weights as stored (out × in): no transposed copies, fused backward.
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@register
class LoRA(Method):
    name = "lora"
    Options = LoRAOptions
    can_merge = True

    def _inject(self, model: nn.Module) -> nn.Module:
        self.targets = resolve_targets(model, self.options.targets, self.arch)
        self.layers: dict[str, LoRALinear] = {}
        for name in self.targets:
            layer = LoRALinear(model.get_submodule(name), self.options)
            _set_submodule(model, name, layer)
            self.layers[name] = layer
        self.heads = copy_heads(model, self.arch.head_modules)
        own = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        set_trainable(model, own + [p for h in self.heads for p in h.trained.parameters()])
        return model

    def closed_form_trainable(self, model: nn.Module) -> int:
        """r·(d_in + d_out) per targeted Linear, plus the classifier head when there is one."""
        r = self.options.r
        lora = sum(r * (m.base.in_features + m.base.out_features) for m in self.layers.values())
        return lora + head_param_count(self.heads)

    def _merge(self, model: nn.Module) -> None:
        for layer in self.layers.values():
            layer.merge()

    def _unmerge(self, model: nn.Module) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    @contextlib.contextmanager
    def _disabled(self, model: nn.Module) -> Iterator[None]:
        for layer in self.layers.values():
            layer.enabled = False
        try:
            with heads_disabled(self.heads):
                yield
        finally:
            for layer in self.layers.values():
                layer.enabled = True

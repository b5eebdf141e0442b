"""LoRA as a weight parametrization: the tutorial's own formulation, with its bugs fixed.

`torch.nn.utils.parametrize` replaces `layer.weight` by f(W) = W + (α/r)·B A, recomputed on every access
(cf. cccntu/minLoRA). The tutorial's version never applied α/r, named A/B with swapped shapes and never set
`enabled`; here A is (r × d_in), B is (d_out × r), the scale is applied and `enabled` switches the update off.
The cost of this formulation — a full d_out × d_in weight materialised per forward and in backward — is
exactly what the benchmark suite measures against the wrapper in `lora.py`.

Merging removes the parametrization with `leave_parametrized=True` (W ← W + ΔW); unmerging subtracts ΔW
and registers the same parametrization again, so A and B are kept.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch import layer_dims
from .base import copy_heads, head_param_count, parametrize_frozen, resolve_targets, set_trainable
from .lora import HandLoRA, LoRAOptions, adapter_dtype, init_lora_A
from .registry import register


class LoRAParametrization(nn.Module):
    """f(W) = W + (α/r)·B A while `enabled`, else W unchanged."""

    def __init__(self, d_in: int, d_out: int, options: LoRAOptions, like: torch.Tensor, transposed: bool = False) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out  # the wrapped layer's shape: the closed form reads these, not A and B
        self.transposed = transposed  # Conv1D (GPT-2): the weight is d_in × d_out, so ΔW is added transposed
        dtype = adapter_dtype(like.dtype)  # float32 adapters on a half-precision base, as peft
        self.lora_A = nn.Parameter(torch.empty(options.r, d_in, dtype=dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, options.r, dtype=dtype, device=like.device))
        init_lora_A(self.lora_A.data, options.init, options.r)
        self.scale = options.scale
        self.dropout = options.dropout
        self.enabled = True

    def delta_weight(self) -> torch.Tensor:
        B = nn.functional.dropout(self.lora_B, self.dropout, self.training) if self.dropout else self.lora_B
        delta = (B @ self.lora_A) * self.scale
        return delta.T if self.transposed else delta

    def analytic_flops(self, W: torch.Tensor) -> int:
        """Materialising ΔW = B·A on each weight access: 2·d_out·r·d_in forward, twice that backward (the A and B
        gradients from the full d_out × d_in weight gradient, which the Linear then also computes)."""
        return 3 * 2 * self.lora_B.shape[0] * self.lora_A.shape[0] * self.lora_A.shape[1] if self.enabled else 0

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.delta_weight().to(W.dtype) if self.enabled else W


@register
class LoRAParametrize(HandLoRA):
    """Dropout, if asked for, drops elements of B (a weight-space dropout): the parametrization sees W, never x,
    so it cannot drop the adapter's input as `lora` and `hf-lora` do. With dropout 0 the three are equivalent."""

    name = "lora-parametrize"
    what = "the tutorial's LoRA: W' = W + (α/r)·BA as a torch.nn.utils.parametrize parametrization"
    tunes_like = "lora"
    reference = "hf-lora"
    extra_inference = "none when merged; unmerged, ΔW = BA formed in full per forward"

    def _inject(self, model: nn.Module) -> nn.Module:
        self.targets = resolve_targets(model, self.options.targets, self.arch)
        self.adapters: dict[str, LoRAParametrization] = {}
        for name in self.targets:
            layer = model.get_submodule(name)
            d_in, d_out, transposed = layer_dims(layer)
            p = LoRAParametrization(d_in, d_out, self.options, layer.weight, transposed)
            parametrize.register_parametrization(layer, "weight", p)
            self.adapters[name] = p
        self.heads = copy_heads(model, self.arch.head_modules)
        own = [t for p in self.adapters.values() for t in (p.lora_A, p.lora_B)]
        set_trainable(model, own + [t for h in self.heads for t in h.trained.parameters()])
        return model

    def closed_form_trainable(self, model: nn.Module) -> int:
        r = self.options.r
        return sum(r * (p.d_in + p.d_out) for p in self.adapters.values()) + head_param_count(self.heads)

    @torch.no_grad()
    def _merge(self, model: nn.Module) -> None:
        for name in self.targets:
            parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=True)

    @torch.no_grad()
    def _unmerge(self, model: nn.Module) -> None:
        for name, p in self.adapters.items():
            layer = model.get_submodule(name)
            layer.weight -= p.delta_weight().to(layer.weight.dtype)
            parametrize_frozen(layer, "weight", p)

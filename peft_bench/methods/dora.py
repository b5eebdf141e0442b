"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), written from scratch
(issue 13, work in progress: NOT YET REGISTERED — `methods/__init__.py` does not import this module).

The weight is split into a magnitude m (one number per output feature) and a direction; LoRA updates the direction:

        W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row        (s = α / r; the norm per output row, treated as a constant
                                                          in backward, as the paper's section 4.3 and peft do)

so y = b + (m / ‖W + s·BA‖) ⊙ (W x + s·B A x). m starts at ‖W‖_row and B at zero, so the wrapped model starts as
the base model exactly. To test against peft's `LoraConfig(use_dora=True)`: same W, A, B, m → outputs and gradients
equal to 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear, LoRAOptions


class DoRALinear(LoRALinear):
    """A `LoRALinear` with a trainable magnitude vector `lora_magnitude` (d_out)."""

    def __init__(self, base: nn.Module, options: LoRAOptions) -> None:
        super().__init__(base, options)
        with torch.no_grad():
            norm = self._weight_out_in().norm(dim=1)
        self.lora_magnitude = nn.Parameter(norm.to(self.lora_A.dtype).clone())
        self._merge_factor: torch.Tensor | None = None

    def _weight_out_in(self) -> torch.Tensor:
        w = self.base.weight
        return w.T if self.transposed else w

    def _scale(self) -> torch.Tensor:
        """m / ‖W + s·BA‖_row, the norm detached (a constant in backward)."""
        delta = (self.lora_B @ self.lora_A) * self.scale
        norm = (self._weight_out_in().to(delta.dtype) + delta.detach()).norm(dim=1).detach()
        return self.lora_magnitude / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        bias = self.base.bias
        scale = self._scale()
        h = self.dropout(x.to(self.lora_A.dtype))
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale
        base_no_bias = (y - bias if bias is not None else y).to(lora.dtype)
        return y + ((scale - 1) * base_no_bias + scale * lora).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        delta = (self.lora_B @ self.lora_A) * self.scale
        factor = self._scale()
        merged = (self._weight_out_in().to(delta.dtype) + delta) * factor[:, None]
        self._merge_factor = factor
        self.base.weight.copy_((merged.T if self.transposed else merged).to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        delta = (self.lora_B @ self.lora_A) * self.scale
        w = self._weight_out_in().to(delta.dtype) / self._merge_factor[:, None] - delta
        self.base.weight.copy_((w.T if self.transposed else w).to(self.base.weight.dtype))
        self.merged = False


def dora_closed_form(layers: list[DoRALinear], r: int) -> int:
    """r·(d_in + d_out) for A and B plus d_out for the magnitude, per wrapped layer."""
    return sum(r * (m.in_features + m.out_features) + m.out_features for m in layers)


from . import register  # noqa: E402
from .base import copy_heads, head_param_count, resolve_targets, set_trainable  # noqa: E402
from .lora import HandLoRA, _set_submodule  # noqa: E402


@register
class DoRA(HandLoRA):
    """Hand-written DoRA; checkpoints in peft's format (`lora_magnitude_vector`), so peft loads them."""

    name = "dora"
    tunes_like = "hf-dora"

    def _inject(self, model: nn.Module) -> nn.Module:
        self.targets = resolve_targets(model, self.options.targets, self.arch)
        self.adapters: dict[str, DoRALinear] = {}
        for name in self.targets:
            layer = DoRALinear(model.get_submodule(name), self.options)
            _set_submodule(model, name, layer)
            self.adapters[name] = layer
        self.heads = copy_heads(model, self.arch.head_modules)
        own = [p for a in self.adapters.values() for p in (a.lora_A, a.lora_B, a.lora_magnitude)]
        set_trainable(model, own + [p for h in self.heads for p in h.trained.parameters()])
        return model

    def closed_form_trainable(self, model: nn.Module) -> int:
        return dora_closed_form(list(self.adapters.values()), self.options.r) + head_param_count(self.heads)

    def _merge(self, model: nn.Module) -> None:
        for a in self.adapters.values():
            a.merge()

    def _unmerge(self, model: nn.Module) -> None:
        for a in self.adapters.values():
            a.unmerge()

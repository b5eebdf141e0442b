"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), written from scratch.

The weight is split into a magnitude m (one number per output feature) and a direction; LoRA updates the direction:

        W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row        (s = α / r; the norm per output row, treated as a constant
                                                          in backward, as the paper's section 4.3 and peft do)

so y = b + (m / ‖W + s·BA‖) ⊙ (W x + s·B A x). m starts at ‖W‖_row and B at zero, so the wrapped model starts as
the base model exactly. Tested against peft's `LoraConfig(use_dora=True)` (`hf-dora`): given the same W, A, B and m,
outputs and gradients agree to 1e-6. Checkpoints are peft's (`lora_magnitude_vector`, `use_dora: true`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRA, LoRALinear, LoRAOptions
from .registry import register


class DoRALinear(LoRALinear):
    """A `LoRALinear` with a trainable magnitude vector `lora_magnitude` (d_out)."""

    def __init__(self, base: nn.Module, options: LoRAOptions) -> None:
        super().__init__(base, options)
        with torch.no_grad():
            norm = self._weight_out_in().norm(dim=1)
        self.lora_magnitude = nn.Parameter(norm.to(self.lora_A.dtype).clone())
        self._merge_factor: torch.Tensor | None = None

    def own_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.lora_magnitude]

    def closed_form(self, r: int) -> int:
        """r·(d_in + d_out) for A and B, plus d_out for the magnitude."""
        return r * (self.in_features + self.out_features) + self.out_features

    def _weight_out_in(self) -> torch.Tensor:
        w = self.base.weight
        return w.T if self.transposed else w

    def _factor(self) -> torch.Tensor:
        """m / ‖W + s·BA‖_row, the norm detached (a constant in backward)."""
        delta = (self.lora_B @ self.lora_A) * self.scale
        norm = (self._weight_out_in().to(delta.dtype) + delta.detach()).norm(dim=1).detach()
        return self.lora_magnitude / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        bias = self.base.bias
        factor = self._factor()
        h = self.dropout(x.to(self.lora_A.dtype))
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale
        base_no_bias = (y - bias if bias is not None else y).to(lora.dtype)
        return y + ((factor - 1) * base_no_bias + factor * lora).to(y.dtype)

    def analytic_flops(self, x: torch.Tensor) -> int:
        """LoRA's adapter matmuls plus forming W + s·BA and its row norms once per forward (2·d_out·r·d_in + 3·d_out·d_in);
        the elementwise rescaling of the output is not counted (the FLOP counter counts matmuls only)."""
        if not self.enabled or self.merged:
            return 0
        r = self.lora_A.shape[0]
        return super().analytic_flops(x) + 2 * self.out_features * r * self.in_features

    @torch.no_grad()
    def merge(self) -> None:
        """W ← (W + s·BA) · m/‖W + s·BA‖ (the factor kept, so that unmerge divides it out exactly in value)."""
        if self.merged:
            return
        delta = (self.lora_B @ self.lora_A) * self.scale
        factor = self._factor()
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


@register
class DoRA(LoRA):
    """Hand-written DoRA: `lora` with DoRA's wrapper; peft-format checkpoints, so peft loads them."""

    name = "dora"
    what = "hand-written DoRA: magnitude × LoRA-updated direction (Liu et al. 2024, arXiv:2402.09353)"
    tunes_like = "hf-dora"
    reference = "hf-dora"
    layer_class = DoRALinear
    use_dora = True
    checkpoint_format = "peft LoRA adapter (use_dora): A, B, magnitude per output"
    extra_inference = "none when merged; unmerged, the adapter and a row norm of W + BA per forward"

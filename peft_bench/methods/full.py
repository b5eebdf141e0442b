"""Full fine-tuning: every parameter trains; the reference every PEFT method is measured against."""

from __future__ import annotations

import torch
from torch import nn

from . import register
from .base import Method, unique_named_parameters


@register
class FullFineTuning(Method):
    name = "full"

    def _inject(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(True)
        return model

    def closed_form_trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # A full fine-tune's checkpoint is the whole model (tied weights saved once).
        return {name: p.detach() for name, p in unique_named_parameters(model)}

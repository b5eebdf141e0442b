"""BitFit, bias-only fine-tuning (Ben Zaken et al. 2022, arXiv:2106.10199), written from scratch
(issue 13, work in progress: NOT YET REGISTERED — `methods/__init__.py` does not import this module).

Every bias of the base model gets a trainable delta through a parametrization, f(b) = b + δ, δ starting at zero; the
original bias tensors are never written, so `disabled()` (δ switched off) is the base model bit for bit, and merging
folds δ into the bias (`leave_parametrized=True`). A model without biases (Llama, T5) has nothing to tune: the method
says so instead of training only a head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class BiasDelta(nn.Module):
    """f(b) = b + δ while enabled, else b."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))
        self.enabled = True

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b + self.delta if self.enabled else b


def biased_modules(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the modules with a bias Parameter (Linear, Conv1D, LayerNorm, ...), heads excluded."""
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "bias", None), nn.Parameter) and n.split(".")[0] not in skip]


def attach(model: nn.Module, names: list[str]) -> dict[str, BiasDelta]:
    deltas = {}
    for n in names:
        module = model.get_submodule(n)
        d = BiasDelta(module.bias)
        parametrize.register_parametrization(module, "bias", d)
        module.parametrizations.bias.original.requires_grad_(False)
        deltas[n] = d
    return deltas


def closed_form(model: nn.Module, names: list[str]) -> int:
    """Σ numel of the biases tuned (each delta has its bias's shape)."""
    return sum(model.get_submodule(n).parametrizations.bias.original.numel() for n in names)

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


import contextlib  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from . import register  # noqa: E402
from .base import Method, MethodOptions, copy_heads, head_param_count, heads_disabled, set_trainable  # noqa: E402

DELTAS = "bias_deltas.safetensors"


@dataclass(frozen=True)
class BitFitOptions(MethodOptions):
    pass


@register
class BitFit(Method):
    name = "bitfit"
    Options = BitFitOptions
    can_merge = True
    checkpoint_format = "bias deltas (safetensors) + trained head"

    def _inject(self, model: nn.Module) -> nn.Module:
        from ..errors import UnsupportedError

        self.names = biased_modules(model, self.arch.head_modules)
        if not self.names:
            raise UnsupportedError(f"bitfit tunes biases; {type(model).__name__} has none outside its head")
        self.deltas = attach(model, self.names)
        self.heads = copy_heads(model, self.arch.head_modules)
        set_trainable(model, [d.delta for d in self.deltas.values()] +
                      [p for h in self.heads for p in h.trained.parameters()])
        return model

    def closed_form_trainable(self, model: nn.Module) -> int:
        return closed_form(model, self.names) + head_param_count(self.heads)

    @contextlib.contextmanager
    def _disabled(self, model: nn.Module) -> Iterator[None]:
        for d in self.deltas.values():
            d.enabled = False
        try:
            with heads_disabled(self.heads):
                yield
        finally:
            for d in self.deltas.values():
                d.enabled = True

    @torch.no_grad()
    def _merge(self, model: nn.Module) -> None:
        for n in self.names:
            parametrize.remove_parametrizations(model.get_submodule(n), "bias", leave_parametrized=True)

    @torch.no_grad()
    def _unmerge(self, model: nn.Module) -> None:
        for n, d in self.deltas.items():
            module = model.get_submodule(n)
            module.bias -= d.delta
            parametrize.register_parametrization(module, "bias", d)
            module.parametrizations.bias.original.requires_grad_(False)

    def save(self, model: nn.Module, directory) -> int:
        from safetensors.torch import save_file

        from ..measure.files import size_bytes

        Path(directory).mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}.bias_delta": d.delta.detach().contiguous().cpu() for n, d in self.deltas.items()}
        for name, h in zip(self.arch.head_modules, self.heads):
            tensors.update({f"{name}.{k}": v.detach().contiguous().cpu() for k, v in h.trained.state_dict().items()})
        save_file(tensors, str(Path(directory) / DELTAS))
        return size_bytes(directory)

    @torch.no_grad()
    def restore(self, base: nn.Module, directory) -> nn.Module:
        from safetensors.torch import load_file

        model = self.apply(base)
        state = load_file(str(Path(directory) / DELTAS))
        ours = {f"{n}.bias_delta": d.delta for n, d in self.deltas.items()}
        for name, h in zip(self.arch.head_modules, self.heads):
            ours.update({f"{name}.{k}": v for k, v in h.trained.state_dict().items()})
        if set(state) != set(ours):
            raise ValueError(f"{directory} does not fit this model's biases")
        for k, t in state.items():
            ours[k].copy_(t)
        return model

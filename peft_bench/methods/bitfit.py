"""BitFit, bias-only fine-tuning (Ben Zaken et al. 2022, arXiv:2106.10199), written from scratch.

Every bias of the base model (Linear, Conv1D, LayerNorm, ... — the classifier head aside, which trains as a copy)
gets a trainable delta through a parametrization, f(b) = b + δ, δ starting at zero. The original bias tensors are
never written, so `disabled()` (δ switched off) is the base model bit for bit; merging folds δ into the bias
(`leave_parametrized=True`), unmerging subtracts it and registers the same δ again. A model without biases (Llama,
T5) has nothing to tune: the method says so instead of silently training only a head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UnsupportedError
from .base import Method, copy_heads, head_param_count, heads_disabled, parametrize_frozen, set_trainable
from .registry import register

DELTAS = "bias_deltas.safetensors"


class BiasDelta(nn.Module):
    """f(b) = b + δ while enabled, else b."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))
        self.enabled = True

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b + self.delta if self.enabled else b


def biased_modules(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the modules with a bias Parameter (Linear, Conv1D, LayerNorm, ...), the top-level `skip` excluded."""
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "bias", None), nn.Parameter) and n.split(".")[0] not in skip]


@register
class BitFit(Method):
    name = "bitfit"
    what = "hand-written BitFit: trainable deltas on every bias (Ben Zaken et al. 2022, arXiv:2106.10199)"
    can_merge = True
    checkpoint_format = "bias deltas (safetensors)"
    extra_inference = "none when merged; unmerged, one add per bias"

    def _inject(self, model: nn.Module) -> nn.Module:
        self.names = biased_modules(model, self.arch.head_modules)
        if not self.names:
            raise UnsupportedError(f"bitfit tunes biases; {type(model).__name__} has none outside its head")
        self.deltas: dict[str, BiasDelta] = {}
        for n in self.names:
            module = model.get_submodule(n)
            self.deltas[n] = BiasDelta(module.bias)
            parametrize_frozen(module, "bias", self.deltas[n])
        self.heads = copy_heads(model, self.arch.head_modules)
        set_trainable(model, [d.delta for d in self.deltas.values()] +
                      [p for h in self.heads for p in h.trained.parameters()])
        return model

    def closed_form_trainable(self, model: nn.Module) -> int:
        """Σ numel of the biases tuned (each δ has its bias's shape), plus the classifier head."""
        biases = sum(model.get_submodule(n).parametrizations.bias.original.numel() for n in self.names)
        return biases + head_param_count(self.heads)

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
            parametrize_frozen(module, "bias", d)

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{n}.bias_delta": d.delta for n, d in self.deltas.items()}
        for name, h in zip(self.arch.head_modules, self.heads):
            out.update({f"{name}.{k}": v for k, v in h.trained.state_dict().items()})
        return out

    def save(self, model: nn.Module, directory) -> int:
        from safetensors.torch import save_file

        from ..measure.files import size_bytes

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self._tensors().items()}, str(Path(directory) / DELTAS))
        return size_bytes(directory)

    @torch.no_grad()
    def restore(self, base: nn.Module, directory) -> nn.Module:
        from safetensors.torch import load_file

        model = self.apply(base)
        state, ours = load_file(str(Path(directory) / DELTAS)), self._tensors()
        if set(state) != set(ours):
            missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
            raise ValueError(f"{directory} does not fit this model's biases: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for k, t in state.items():
            ours[k].copy_(t)
        return model

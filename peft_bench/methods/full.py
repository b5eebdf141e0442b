"""Full fine-tuning: every parameter trains; the reference every PEFT method is measured against."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import Method, unique_named_parameters
from .counts import full_parameters
from .registry import register

WEIGHTS = "model.safetensors"


def save_parameters(model: nn.Module, path: Path) -> int:
    """Every parameter of `model` (tied weights once, under their first name) as one safetensors file."""
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous().cpu() for n, p in unique_named_parameters(model)}, str(path))
    return path.stat().st_size


@torch.no_grad()
def load_parameters(model: nn.Module, path: Path) -> None:
    """Copy a file written by `save_parameters` into `model`; every parameter must be in it, nothing else."""
    from safetensors.torch import load_file

    params = dict(unique_named_parameters(model))
    state = load_file(str(path))
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in state.items():
        params[name].copy_(tensor)


@register
class FullFineTuning(Method):
    name = "full"
    what = "every parameter trains"
    trains_everything = True
    checkpoint_format = "whole model: every parameter (safetensors)"
    extra_inference = "none (a whole new model per task)"

    def _inject(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(True)
        return model

    def closed_form_trainable(self, model: nn.Module) -> int:
        """Every parameter of the architecture, from its configuration (`counts.full_parameters`), not the tensors."""
        return full_parameters(model)

    def save(self, model: nn.Module, directory) -> int:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return save_parameters(model, Path(directory) / WEIGHTS)

    def restore(self, base: nn.Module, directory) -> nn.Module:
        model = self.apply(base)
        load_parameters(model, Path(directory) / WEIGHTS)
        return model

"""What every mode of a cell does before it measures: the workload with the cell's options, the base model built the
same way each time, the method applied, batches placed on the device, and the row's identity."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable

import torch
from torch import nn

from ..arch import describe
from ..config import CellSpec
from ..errors import UnsupportedError, UserError
from ..measure import timing
from ..methods.base import Method
from ..workloads import resolve
from ..workloads.tasks import model_inputs

DATA_SEED = 0  # the train/test split is the same for every --seed: seeds vary initialisation and batch order only


def identity(spec: CellSpec, w, method: Method, targets: tuple[str, ...]) -> dict:
    """What a row says of its cell: the workload as it ran, the budget, the method's effective options."""
    sweep = {k: getattr(spec, k) for k in ("width", "depth", "vary", "vary_value", "gradient_checkpointing")
             if getattr(spec, k)}
    return sweep | {"method": spec.method, "workload": w.name, "device": spec.device, "pretrained": w.pretrained,
            "task": w.task, "family": w.family, "batch_size": w.batch_size, "seq_len": w.max_length, "lr": spec.lr,
            "seed": spec.seed, "train_steps": spec.train_steps, "split": spec.split,
            "options": json.dumps(spec.method_options, sort_keys=True), "tokenizer": w.tokenizer_name,
            "method_config": method_config(method, targets)}


def failure_identity(spec: CellSpec, w, method: Method) -> dict:
    """What a failed cell's row says of it: its identity without the method's resolved configuration."""
    return {k: v for k, v in identity(spec, w, method, ()).items() if k != "method_config"}


def majority(split) -> float:
    return float(torch.bincount(split.labels).max()) / len(split)


def general_loss(model: nn.Module, form, data, w) -> tuple[float, int]:
    """LM loss on the workload's general text (the forgetting probe); (NaN, 0) unless the workload is a pretrained
    language model (a random-weight model has nothing to forget)."""
    if not w.pretrained or not data.general or not hasattr(form, "general_loss"):
        return math.nan, 0
    return form.general_loss(model, data.general, w.batch_size)


def method_config(method: Method, default_targets: tuple[str, ...]) -> str:
    """The method's effective options in one line (defaults filled in, targets as the method resolved them on the
    architecture), so two rows with different options never look identical."""
    parts = []
    values = {**dataclasses.asdict(method.options), **getattr(method, "settings", {})}  # a peft tuner's defaults
    resolved = getattr(method, "targets", None)  # the layers it wrapped, by their own names
    if "targets" not in values and resolved:
        values["targets"] = None
    for k, v in values.items():
        if k == "targets" and v is None and resolved:
            v = tuple(dict.fromkeys(n.split(".")[-1] for n in resolved))
        if k == "targets" and v is None:
            v = default_targets or ("every Linear",)
        if v is None:
            continue
        if isinstance(v, (tuple, list)):
            v = ",".join(map(str, v))
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def workload_of(spec: CellSpec, method: Method):
    """The cell's workload with its options applied and a sequence length that leaves the method's virtual tokens
    room within the model's positions (the runner passes one length for every method of a run)."""
    w = resolve(spec.workload, spec.model, spec.dataset, trust_remote_code=spec.trust_remote_code,
                allow_pickle=spec.allow_pickle).with_options(batch_size=spec.batch_size, max_length=spec.max_length,
                                                             test_limit=spec.test_examples)
    if spec.mnist_root and w.family == "mlp":
        from ..workloads.data import mnist_torchvision

        w = w.with_options(load_data=lambda seed: mnist_torchvision(spec.mnist_root))
    return w.scaled(spec.width, spec.depth).sized(virtual_tokens(method))


def apply(spec: CellSpec, method: Method, model: nn.Module) -> nn.Module:
    """The method applied to the base model, gradient checkpointing turned on when asked, on the cell's device."""
    if spec.gradient_checkpointing and method.extra_key_tokens:
        raise UnsupportedError("--gradient-checkpointing: the method's virtual keys and values reach the model as "
                               "past_key_values, which transformers drops under gradient checkpointing in training "
                               "(tried on GPT-Neo: a size mismatch between the keys and the mask)")
    model = method.apply(model)
    if spec.gradient_checkpointing:
        enable_checkpointing(model)
    return to_device(model, spec.device)


def to_device(model: nn.Module, device: str) -> nn.Module:
    """`model.to(device)`, skipped when every tensor is there already (a planned model's fake tensors cannot be
    swapped in place, and there is nothing to move)."""
    where = torch.device(device)
    held = itertools.chain(model.parameters(), model.buffers())
    if all(t.device.type == where.type and (where.index is None or t.device == where) for t in held):
        return model
    return model.to(device)


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing (each block's activations recomputed in backward instead of kept), with
    `use_reentrant=False`: torch's non-reentrant checkpoint sends gradients to the parameters inside a block even when
    the block's input does not require grad — under PEFT the embeddings are frozen, and the reentrant variant would
    leave every adapter inside a checkpointed block without a gradient (training nothing) unless the inputs are made
    to require grad. The same RNG state is replayed, so dropout masks match the forward's."""
    if not hasattr(model, "gradient_checkpointing_enable") or not getattr(model, "supports_gradient_checkpointing",
                                                                            True):
        raise UnsupportedError(f"--gradient-checkpointing: {type(model).__name__} has no transformer blocks to "
                               "checkpoint (transformers' gradient checkpointing)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def virtual_tokens(method: Method) -> int:
    """Positions a method's virtual tokens take beside the input (P-tuning's inputs, a prefix's keys)."""
    return method.extra_input_tokens + method.extra_key_tokens


def check_positions(model: nn.Module, w, method: Method) -> None:
    """The built model's own position limit (its config) against the length used: a workload that states its limit
    wrongly fails here, in one line, instead of an IndexError deep in an embedding."""
    limit = describe(model).position_limit
    need = (w.max_length or 0) + virtual_tokens(method)
    if limit is not None and need > limit:
        raise UserError(f"{w.name}: sequence length {w.max_length} + {virtual_tokens(method)} virtual tokens exceeds "
                        f"the model's {limit} positions")


def builder(w, spec: CellSpec) -> Callable[[], nn.Module]:
    """Build the base model the same way every time (same seed, dtype, device): the fresh base of a round trip."""

    def build() -> nn.Module:
        torch.manual_seed(spec.seed)
        return w.build_model().to(dtype=timing.DTYPES[spec.dtype], device=spec.device).eval()

    return build


def forward(model: nn.Module, batch: dict) -> Callable[[], torch.Tensor]:
    inputs = model_inputs(batch)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).logits

    return fwd


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    out = forward(model, batch)().float().clone()
    model.train(was)
    return out


def place(t: torch.Tensor, spec: CellSpec) -> torch.Tensor:
    """On the cell's device; floating-point inputs (pixels) in the cell's dtype, token ids and labels unchanged."""
    return t.to(spec.device, timing.DTYPES[spec.dtype] if t.is_floating_point() else None)


def on_device(batch: dict, spec: CellSpec) -> dict:
    return {k: place(v, spec) for k, v in batch.items()}


def split_on_device(split, spec: CellSpec):
    """A held-out split placed like a batch (text stays text: it is tokenized per batch)."""
    if torch.is_tensor(split.inputs):
        return type(split)(place(split.inputs, spec), place(split.labels, spec))
    return split

"""A sweep's cells (`peft-bench sweep --vary NAME=v1,v2,...`): each planned cell once per value of the varied
parameter; and the architecture of a model a sweep point built, which the report's per-layer lines need
(handed to `peft_bench.report` by the CLI, so that the report never builds a model)."""

from __future__ import annotations

import dataclasses

from ..config import VARY, CellSpec, RunConfig
from ..errors import UserError
from ..methods import get_method, method_class
from ..workloads import get_workload
from .setup import virtual_tokens


def expand(cells: list[CellSpec], opts: RunConfig) -> list[CellSpec]:
    """A sweep's cells: each planned cell once per value of the varied parameter, each checked before anything runs
    (a length beyond the positions, an unscalable workload or width: one line). A method without the varied option
    runs once (vary_value empty): the reference its curve is compared with."""
    name, values = opts.vary
    where, field_ = VARY[name]
    takers = [m for m in {c.method for c in cells} if field_ in {f.name for f in dataclasses.fields(
        method_class(m).Options)}]
    if where == "option" and not takers:
        raise UserError(f"--vary {name} applies to none of the chosen methods")
    out = []
    for c in cells:
        if where == "option" and c.method not in takers:
            out.append(dataclasses.replace(c, vary=name))
            continue
        for v in values:
            if where == "option":
                out.append(dataclasses.replace(c, method_options={**c.method_options, field_: v}, vary=name,
                                               vary_value=v))
            else:
                out.append(dataclasses.replace(c, **{field_: v}, vary=name, vary_value=v))
    for c in out:  # sizes that cannot run are refused now
        w = get_workload(c.workload)
        if c.width or c.depth:
            w = w.scaled(c.width, c.depth)
        if name == "seq_len" and w.family == "mlp":
            raise UserError(f"--vary seq_len: {w.name} takes images, not sequences")
        w.with_options(max_length=c.max_length).sized(virtual_tokens(get_method(c.method, **c.method_options)))
    return out


def architecture(workload: str, width=None, depth=None) -> dict:
    """A workload's model as a sweep cell built it (scaled), read on the meta device: its model type, width, heads
    and transformer layers (encoder and decoder stacks together)."""
    import torch

    from ..arch import dims

    def whole(v):
        return int(v) if v is not None and v == v else None

    w = get_workload(workload).scaled(whole(width), whole(depth))
    with torch.device("meta"):
        config = w.build_model().config
    d = dims(config)
    layers = d.layers + (d.decoder_layers if getattr(config, "is_encoder_decoder", False) else 0)
    return {"model_type": getattr(config, "model_type", ""), "hidden_size": getattr(config, "hidden_size", None),
            "num_heads": getattr(config, "num_heads", None), "layers": layers}

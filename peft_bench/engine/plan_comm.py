"""The bytes a training step's collectives move per rank, planned from the model's parameters and buffers, for the
wraps `engine/torchrun.py` applies (no process group, no data: any model the planner can build).

Counted as `measure.comm` counts the backend's records: a collective's payload is the whole tensor it acts on.

- ddp: one all-reduce of every trainable gradient (element size × count, bucketed but not padded), and — with
  `broadcast_buffers` on, DDP's default — a broadcast of every buffer of the module before each forward. The same on
  one rank (DDP still runs both).
- fsdp (FSDP2 `fully_shard` on each repeated block and on the root): each parameter sharded on dim 0, padded to a
  multiple of the world size. Per step the blocks' parameters are all-gathered twice (forward, and again in backward
  after the forward resharded them), the root's once (the root is not resharded after forward); every trainable
  gradient is reduce-scattered once — which gloo runs as an all-reduce of the whole input, so on the CPU it is
  counted as one. On one rank FSDP2 issues no collective.
"""

from __future__ import annotations

from torch import nn

KEYS = ("allreduce_bytes_per_step", "allgather_bytes_per_step", "reducescatter_bytes_per_step",
        "broadcast_bytes_per_step", "comm_bytes_per_step", "ring_estimate_bytes_per_rank_per_step")


def _bytes(tensors, world: int = 0) -> int:
    from .torchrun import padded_numel

    return sum((padded_numel(tuple(t.shape), world) if world else t.numel()) * t.element_size() for t in tensors)


def planned_comm(model: nn.Module, trainable: dict, world: int, parallel: str, device: str = "cpu",
                 broadcast_buffers: bool = True) -> dict:
    """Payload bytes per step by collective (the measured rows' column names), and the ring estimate per rank."""
    from ..measure.comm import ring_wire_bytes
    from .torchrun import blocks

    got = dict.fromkeys(("allreduce", "allgather", "reducescatter", "broadcast"), 0)
    if parallel == "ddp":
        got["allreduce"] = _bytes(trainable.values())
        got["broadcast"] = _bytes(model.buffers()) if broadcast_buffers else 0
    elif parallel == "fsdp" and world > 1:
        units = blocks(model)
        inside = {id(p) for b in units for p in b.parameters()}
        root = [p for p in model.parameters() if id(p) not in inside]
        got["allgather"] = 2 * _bytes((p for b in units for p in b.parameters()), world) + _bytes(root, world)
        got["allreduce" if device == "cpu" else "reducescatter"] = _bytes(trainable.values(), world)
    payload = {k: float(v) for k, v in got.items()}
    return {**{f"{k}_bytes_per_step": v for k, v in got.items()}, "comm_bytes_per_step": sum(got.values()),
            "ring_estimate_bytes_per_rank_per_step": ring_wire_bytes(payload, world) if world > 1 else 0.0}

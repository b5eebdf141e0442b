"""Bytes that cross between ranks, counted at the collectives themselves (not estimated from the model).

`CommCounter` wraps `torch.distributed`'s collective functions while it is active, so every collective a training
step issues through them — FSDP2's all-gathers and reduce-scatters, DDP's bucket all-reduces once
`route_ddp_through_python` has given DDP a communication hook that calls `dist.all_reduce` — adds its payload to a
per-collective total. The payload of a collective is the size of the whole tensor it acts on, per rank: an
all-reduce's tensor, an all-gather's *output*, a reduce-scatter's *input* (the convention of nccl-tests' "size").
What actually leaves a rank depends on the algorithm; for a ring it is 2(N−1)/N × payload for an all-reduce and
(N−1)/N × payload for an all-gather or reduce-scatter (`ring_wire_bytes`, labelled an estimate wherever shown).
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict

import torch

# torch.distributed function → (the argument whose size is the payload, the kind it is counted as)
COLLECTIVES = {
    "all_reduce": ("tensor", "allreduce"),
    "broadcast": ("tensor", "other"),
    "all_gather_single": ("output_tensor", "allgather"),
    "all_gather_into_tensor": ("output_tensor", "allgather"),
    "reduce_scatter_single": ("input", "reducescatter"),
    "reduce_scatter_tensor": ("input", "reducescatter"),
}
RING_FACTOR = {"allreduce": lambda n: 2 * (n - 1) / n, "allgather": lambda n: (n - 1) / n,
               "reducescatter": lambda n: (n - 1) / n, "other": lambda n: (n - 1) / n}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommCounter:
    """Payload bytes and calls per collective kind (allreduce, allgather, reducescatter, other) while active.

        with CommCounter() as comm:
            step()
        comm.bytes["allreduce"], comm.calls["allreduce"]
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: dict[str, object] = {}

    def __enter__(self) -> CommCounter:
        import torch.distributed as dist

        for name, (arg, kind) in COLLECTIVES.items():
            f = getattr(dist, name, None)
            if f is None:
                continue
            self._saved[name] = f
            setattr(dist, name, self._wrap(f, arg, kind))
        return self

    def _wrap(self, f, arg: str, kind: str):
        sig = inspect.signature(f)

        @functools.wraps(f)
        def counted(*args, **kwargs):
            t = sig.bind(*args, **kwargs).arguments[arg]
            self.bytes[kind] += _nbytes(t)
            self.calls[kind] += 1
            return f(*args, **kwargs)

        return counted

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, f in self._saved.items():
            setattr(dist, name, f)
        self._saved.clear()


def ring_wire_bytes(payload: dict[str, int], world_size: int) -> float:
    """Bytes one rank sends for these payloads under ring algorithms (an estimate: NCCL and gloo may choose trees)."""
    return sum(RING_FACTOR[k](world_size) * v for k, v in payload.items()) if world_size > 1 else 0.0


def route_ddp_through_python(ddp_model) -> None:
    """Give DDP the stock all-reduce communication hook (`default_hooks.allreduce_hook`: divide by the world size,
    `dist.all_reduce`), so its bucket all-reduces go through `torch.distributed.all_reduce`, where `CommCounter`
    counts them. The arithmetic is DDP's own default; only the call path changes."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp_model.register_comm_hook(None, default_hooks.allreduce_hook)

"""Bytes that cross between ranks: every collective the process group ran, from the backend's own records, and the
bytes the rank actually wrote to its sockets as a second, outside witness.

`Collectives` runs `torch.profiler` (CPU activity, shapes recorded) while active and reads the records the
communication backend itself emits for each collective it executes — `gloo:all_reduce`, `gloo:broadcast`,
`nccl:_reduce_scatter_base`, ... with the tensor shapes and dtypes. Those are written by the backend's C++ side, so
they see what no Python wrapper does: DDP's bucket all-reduces on its default C++ path (no communication hook
installed), the buffer broadcast DDP runs before every forward (`broadcast_buffers=True`), DDP's bucket rebuilds,
FSDP2's all-gathers and reduce-scatters, barriers. Each is counted by the collective the backend ran: gloo executes a
reduce-scatter as an all-reduce of the whole input, and it is counted (and costs on the wire) as one.

The payload of a collective is the size of the whole tensor it acts on, per rank (nccl-tests' "size"): an
all-reduce's or broadcast's tensor, an all-gather's output and a reduce-scatter's input (both N × the shard).
What leaves a rank depends on the algorithm; for a ring it is 2(N−1)/N × payload for an all-reduce and (N−1)/N ×
payload for an all-gather, reduce-scatter or broadcast (the broadcast's root sends it all, the others nothing: (N−1)/N
is the mean over ranks) — `ring_wire_bytes`, an estimate wherever shown.

The witness: `wire` is the growth of the process's `wchar` in `/proc/self/io` over the same span — bytes the process
handed to write-family system calls, which is where gloo's TCP pairs send (`writev`). Nothing else of the rank writes
during a counted step; NCCL moves data through the GPU's links, not sockets, so on CUDA (and off Linux) it is None.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

# the backend's collective (its record's name after "gloo:" / "nccl:") → the kind it is counted as
KINDS = (("reduce_scatter", "reducescatter"), ("all_gather", "allgather"), ("allgather", "allgather"),
         ("all_reduce", "allreduce"), ("allreduce", "allreduce"), ("broadcast", "broadcast"))
RING_FACTOR = {"allreduce": lambda n: 2 * (n - 1) / n, "allgather": lambda n: (n - 1) / n,
               "reducescatter": lambda n: (n - 1) / n, "broadcast": lambda n: (n - 1) / n, "other": lambda n: 0.0}
# element sizes by the dtype names the profiler records (c10's scalar type names)
ELEMENT = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "bool": 1, "unsigned char": 1,
           "signed char": 1, "short int": 2, "int": 4, "long int": 8, "c10::complex<float>": 8,
           "c10::complex<double>": 16, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}
BACKENDS = ("gloo:", "nccl:")
WIRE_TOLERANCE = 0.15  # the bytes written and the ring estimate agree within this share of the estimate


def kind_of(name: str) -> str:
    op = name.split(":", 1)[1]
    return next((kind for key, kind in KINDS if key in op), "other")


def payload_of(kind: str, shapes: list, dtypes: list, world: int) -> int:
    """Bytes of one backend record: the tensor it acts on; an all-gather or reduce-scatter as N × its shard (the
    record lists the shard, and the whole tensor too where the backend passes both)."""
    sizes = [math.prod(s) * _element(d) for s, d in zip(shapes, dtypes) if isinstance(s, list) and d]
    if not sizes:
        return 0
    return world * min(sizes) if kind in ("allgather", "reducescatter") else sum(sizes)


def _element(dtype: str) -> int:
    if dtype not in ELEMENT:
        raise ValueError(f"collective on a tensor of dtype {dtype!r}: its element size is unknown to peft-bench")
    return ELEMENT[dtype]


class Collectives:
    """Payload bytes and calls per kind (allreduce, allgather, reducescatter, broadcast, other) of every collective
    this process ran while active, and the bytes it wrote (`wire`, None where it cannot be read).

        with Collectives(world_size) as comm:
            step()
        comm.bytes["allreduce"], comm.calls["broadcast"], comm.wire
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.wire: int | None = None
        self._prof = None
        self._written: int | None = None

    def __enter__(self) -> Collectives:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        self._prof.__enter__()
        self._written = written_bytes()
        return self

    def __exit__(self, *exc) -> None:
        after = written_bytes()
        self._prof.__exit__(*exc)
        if after is not None and self._written is not None:
            self.wire = after - self._written
        for e in self._prof.profiler.kineto_results.events():
            if e.name().startswith(BACKENDS):
                kind = kind_of(e.name())
                self.bytes[kind] += payload_of(kind, e.shapes(), e.dtypes(), self.world)
                self.calls[kind] += 1


def written_bytes() -> int | None:
    """This process's `wchar`: bytes passed to write-family system calls, sockets included (Linux only)."""
    try:
        with open("/proc/self/io") as f:
            found = re.search(r"^wchar:\s*(\d+)", f.read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def ring_wire_bytes(payload: dict[str, float], world_size: int) -> float:
    """Bytes one rank sends for these payloads under ring algorithms, mean over ranks (an estimate: NCCL and gloo
    may choose trees)."""
    return sum(RING_FACTOR[k](world_size) * v for k, v in payload.items()) if world_size > 1 else 0.0

"""PyTorch's own memory profiler as the second witness of the tensor tracker (`memory.StepMemoryTracker`), in two
readings.

`allocator_peak(step)`: the allocator's own events (`profile(profile_memory=True)`: every allocation and free the
c10 allocator serves during the step, with its size), summed in order; their largest running total is the most
bytes the step held beyond what was live when it began — the tracker's peak less what it found live at the start.
Cheap (no analysis), and blind to nothing the allocator serves: scratch no tensor owns would show here first.

`profiled_peak(step)`: runs `step` under `torch.profiler.profile(profile_memory=True, record_shapes=True,
with_stack=True)` and reads the profiler's memory timeline (`torch.profiler._memory_profiler.MemoryProfileTimeline`,
the data behind `export_memory_timeline`): the live bytes of every tensor allocation it saw, by the profiler's own
categories, at each moment. Its peak and the categories at that moment are an independent reading of what the
tracker measures — a different mechanism (the allocator's allocation events and the profiler's graph analysis,
not a dispatch mode and storage finalizers), written by other people.

The categories correspond in part: AdamW state ↔ OPTIMIZER_STATE (equal, measured on every method), weights ↔
PARAMETER plus the model's buffers (which the profiler files under INPUT or leaves uncategorized). The rest are defined
differently — the profiler labels a tensor by the role it ends up in, for its whole life (the tied embedding's
gradient is GRADIENT from the moment its first part is computed; the batch is INPUT), the tracker by the role it has at
each moment — so `PARTS` is a correspondence to read, not an identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# the tracker's category → the profiler's categories it corresponds to
PARTS = {"weights": ("parameter", "uncategorized"), "optimizer": ("optimizer_state",), "gradients": ("gradient",),
         "activations": ("activation", "input"), "temporaries": ("temporary", "autograd_detail")}


@dataclass
class ProfiledPeak:
    peak_bytes: int  # the largest live total on the profiler's timeline
    categories: dict[str, int]  # the profiler's categories at that moment (lowercase; "uncategorized" for None)

    def as_parts(self) -> dict[str, int]:
        """The profiler's categories at its peak, gathered into the tracker's five (`PARTS`)."""
        return {part: sum(self.categories.get(c, 0) for c in cats) for part, cats in PARTS.items()}


def allocator_peak(step: Callable[[], None], device: str = "cpu") -> int:
    """The largest running total of the allocator's allocations minus frees during `step` (bytes above the start)."""
    prof = _profiled(step, device)
    wanted = "CUDA" if device == "cuda" else "CPU"
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type().name == wanted), key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def profiled_peak(step: Callable[[], None], device: str = "cpu") -> ProfiledPeak:
    """Run `step` once under the profiler's memory timeline; its peak and the categories at the peak."""
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    prof = _profiled(step, device, record_shapes=True, with_stack=True)  # what the timeline's analysis needs
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cuda:0" if device == "cuda"
                                                                               else "cpu")
    # each row: an unused first slot, then one per category in _CATEGORY_TO_INDEX's order (None: uncategorized)
    names = ["unused"] + [c.name.lower() if c else "uncategorized" for c in _CATEGORY_TO_INDEX]
    at = max(sizes, key=sum) if sizes else [0] * len(names)
    return ProfiledPeak(sum(at), {k: v for k, v in zip(names, at) if k != "unused"})


def _profiled(step: Callable[[], None], device: str, **options):
    """`step` run once under `torch.profiler` with memory events (and `options`); the finished profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True, **options) as prof:
        step()
    return prof

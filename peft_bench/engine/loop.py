"""The one training loop: a step (zero_grad → forward → backward → optimizer step → the method's per-step hook) and
the timed loop around it (warm-up, timed steps between two canary readings, instrumented steps after them).

Single-process cells, every torchrun rank (its model wrapped by DDP or FSDP, communication counted around the same
loop) and the pytest-benchmark route all step through `train_step`; `tests/test_layout.py` patches it and sees all
three call it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..measure import timing
from ..workloads.tasks import model_inputs


def train_step(model: nn.Module, opt: torch.optim.Optimizer, method, batch: dict, clock: timing.StepClock,
               hooked: nn.Module | None = None) -> tuple[float, float, list[float]]:
    """One training step, timed whole by `clock` (one synchronisation at its end) and split by marks between forward,
    backward and optimizer; returns (loss, wall seconds, [forward, backward, optimizer] seconds). `hooked`: the
    module the method's per-step hook sees when `model` is a wrapper (DDP, FSDP)."""
    clock.start()
    opt.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch))
    loss = out.loss
    del out
    clock.mark()
    loss.backward()
    clock.mark()
    opt.step()
    method.after_step(hooked if hooked is not None else model)  # AdaLoRA's rank allocation: part of its step
    wall, split = clock.stop()
    return _value(loss), wall, split


def _value(loss: torch.Tensor) -> float:
    """The loss as a number; NaN for a fake tensor (`peft-bench plan`'s steps carry shapes, not values)."""
    from torch._subclasses.fake_tensor import is_fake

    return math.nan if is_fake(loss) else float(loss.detach())


@dataclass
class Trainer:
    """A model, its optimizer (AdamW over the method's trainable parameters) and the losses of every step taken."""

    model: nn.Module
    method: object
    lr: float
    device: str
    hooked: nn.Module | None = None
    foreach: bool | None = None  # None: torch's default for the parameters' device (multi-tensor on CUDA)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad] if self.hooked is not None else \
            list(self.method.trainable_parameters(self.model).values())
        self.opt = torch.optim.AdamW(params, lr=self.lr, foreach=self.foreach)
        self.clock = timing.StepClock(self.device)

    def step(self, batch: dict) -> tuple[float, list[float]]:
        loss, wall, split = train_step(self.model, self.opt, self.method, batch, self.clock, self.hooked)
        self.losses.append(loss)
        return wall, split


@dataclass(frozen=True)
class Window:
    """Which steps of a loop are timed: warm-up steps 0..start-1, timed steps start..end-1, `last` steps in all."""

    start: int
    end: int
    last: int
    canary_reps: int = 5  # matmuls per canary reading (15 where repeats act on it: `CellSpec.canary_reps`)


@dataclass
class Timed:
    """What the timed steps gave: each step's wall time and split, its real (non-padding) tokens, the elements of a
    padded batch, and the slower of the two canary readings around them."""

    walls: list[float] = field(default_factory=list)
    parts: list[list[float]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    padded: int = 0
    canary: float = math.nan
    load: dict = field(default_factory=dict)  # others' CPU share and steal over the timed steps alone


@dataclass(frozen=True)
class Hooks:
    """What a caller adds to the loop: `special` steps (an index → a function run on that step's batch instead of a
    plain step: the instrumented steps), `on_start` just before the first timed step and `on_end` just after the last
    (a counter reset, the process-peak window: both inside the two canary readings), `tick` after every step."""

    special: dict = field(default_factory=dict)
    on_start: Callable[[], None] | None = None
    on_end: Callable[[], None] | None = None
    tick: Callable[[], None] = lambda: None


def run_steps(trainer: Trainer, batches: Iterator[dict], window: Window, tokens: Callable[[dict], int],
              hooks: Hooks = Hooks()) -> Timed:
    """Steps 1..window.last - 1 (step 0, the first call's allocations, is the caller's). The canary is read just
    before step `start` and just after step `end - 1`."""
    from ..measure.interference import Window as Load

    special, on_start, on_end, tick = hooks.special, hooks.on_start, hooks.on_end, hooks.tick
    out, guard = Timed(), Load()
    for i in range(1, window.last):
        batch = next(batches)
        if i == window.start:
            out.canary = timing.canary_flops(trainer.device, reps=window.canary_reps)
            if on_start:
                on_start()
            guard.__enter__()
        if i in special:
            special[i](batch)
        else:
            wall, split = trainer.step(batch)
            if window.start <= i < window.end:
                _record(out, batch, wall, split, tokens)
                if i == window.end - 1:
                    guard.__exit__(None, None, None)
                    out.load = guard.load.fields()
                    if on_end:
                        on_end()
                    out.canary = min(out.canary, timing.canary_flops(trainer.device, reps=window.canary_reps))
        del batch
        tick()
    return out


def _record(out: Timed, batch: dict, wall: float, split: list[float], tokens: Callable[[dict], int]) -> None:
    out.walls.append(wall)
    out.parts.append(list(split))
    out.tokens.append(tokens(batch))
    if not out.padded:
        out.padded = padded_elements(batch)


def padded_elements(batch: dict) -> int:
    """Tokens of a padded batch (its input ids' elements), or its examples for a model without token ids."""
    return batch["input_ids"].numel() if "input_ids" in batch else len(batch["labels"])

"""The tensor-memory tracker against closed forms: saved activations, static parts, and the peak's parts."""

from __future__ import annotations

import pytest
import torch

from peft_bench import get_method
from peft_bench.measure.memory import CATEGORIES, StepMemoryTracker

from .conftest import tiny_batch, tiny_model

B = 16


def tracked_step(method_name: str, family: str, batch: dict, **options) -> tuple[StepMemoryTracker, object, dict]:
    """Two AdamW steps; the second (steady state: optimizer state exists) runs under the tracker."""
    method = get_method(method_name, **options)
    model = method.apply(tiny_model(family)).train()
    trainable = method.trainable_parameters(model)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3)
    for i in range(2):
        opt.zero_grad(set_to_none=True)
        tracker = StepMemoryTracker(model, opt) if i else None
        if tracker:
            tracker.__enter__()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        del loss
        if tracker:
            tracker.__exit__(None, None, None)
    return tracker, model, trainable


def mlp_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(B, 784, generator=g), "labels": torch.randint(0, 10, (B,), generator=g)}


def test_mlp_saved_activations_equal_their_closed_form():
    """784→32→48→10 with ReLU and cross-entropy. Autograd must keep: the input x (for W1's gradient), both ReLU
    outputs (for their own backward and the next weight's gradient — one storage each), the log-softmax output,
    the int64 labels and nll_loss's scalar total_weight. Weights are parameters, not activations."""
    tracker, _, _ = tracked_step("full", "mlp", mlp_batch())
    f32 = 4
    expected = B * 784 * f32 + B * 32 * f32 + B * 48 * f32 + B * 10 * f32 + B * 8 + 4
    assert tracker.max_parts["activations"] == expected


def test_mlp_lora_saves_the_adapter_bottlenecks_on_top():
    """LoRA keeps the same tensors plus each adapter's r-wide bottleneck A·x (for B's gradient): 3 layers × B × r."""
    r = 4
    full, _, _ = tracked_step("full", "mlp", mlp_batch())
    lora, _, _ = tracked_step("lora", "mlp", mlp_batch(), r=r)
    assert lora.max_parts["activations"] - full.max_parts["activations"] == 3 * B * r * 4


@pytest.mark.parametrize("method", ["full", "lora", "lora-parametrize", "hf-lora", "prefix", "p-tuning"])
def test_static_parts_at_the_peak_equal_a_walk_of_the_model_and_optimizer(method):
    """A second implementation: the weights part is every parameter storage plus every buffer, walked on the model;
    the optimizer part is AdamW's two moments of each trainable tensor plus its 4-byte step counter."""
    tracker, model, _ = tracked_step(method, "gpt-neo", tiny_batch("gpt-neo", batch=4, length=16))
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    trainable = [p for p in params.values() if p.requires_grad]
    assert set(tracker.peak_parts) == set(CATEGORIES) and all(v >= 0 for v in tracker.peak_parts.values())
    assert tracker.peak_parts["weights"] == sum(p.untyped_storage().nbytes() for p in params.values()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    assert tracker.peak_parts["optimizer"] == sum(2 * p.numel() * p.element_size() + 4 for p in trainable)
    assert tracker.peak_parts["activations"] > 0


@pytest.mark.parametrize("family", ["gpt-neo", "llama", "bert"])
def test_full_fine_tuning_saves_more_than_lora(family):
    """Full FT keeps every Linear's input for its weight gradient; LoRA on q,v keeps fewer (plus tiny bottlenecks)."""
    batch = tiny_batch(family, batch=4, length=16)
    full, _, _ = tracked_step("full", family, batch)
    lora, _, _ = tracked_step("lora", family, batch)
    assert full.max_parts["activations"] > lora.max_parts["activations"] > 0


@pytest.mark.parametrize("method", ["full", "lora", "hf-lora", "p-tuning"])
def test_static_parts_equal_the_closed_form(method):
    """Weights: every parameter's bytes; gradients: 4 bytes per trainable parameter, all accumulated by the end
    of backward; AdamW: 8 bytes per trainable parameter + one 4-byte step per tensor."""
    tracker, model, trainable = tracked_step(method, "gpt-neo", tiny_batch("gpt-neo", batch=4, length=16))
    n = sum(p.numel() for p in trainable.values())
    weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert tracker.initial_parts["weights"] == weights + buffers
    assert tracker.max_parts["gradients"] == 4 * n
    assert tracker.initial_parts["optimizer"] == 8 * n + 4 * len(trainable)


def test_a_freed_tensor_leaves_the_live_total():
    model = torch.nn.Linear(8, 8)
    with StepMemoryTracker(model) as t:
        x = torch.ones(1000)
        assert t.totals["temporaries"] == 4000
        del x
        assert t.totals["temporaries"] == 0
    assert t.peak_parts["temporaries"] == 4000


def test_the_process_peak_is_the_step_s_alone_not_the_harness_s(tmp_path):
    """A 256 MiB harness tensor held beside the cell (as the reference outputs the checks need are) stays out of the
    process peak: it is parked on disk while the model trains and the peak is read over the timed steps only.
    Without parking the peak would carry the whole 256 MiB."""
    from peft_bench.config import CellSpec
    from peft_bench.engine.launch import run_isolated

    spec = CellSpec("lora", "mlp-mnist-tiny", probes="cost", train_steps=6, warmup_steps=1, timed_steps=3)
    plain = run_isolated(spec, 300)
    ballast = run_isolated(__import__("dataclasses").replace(spec, inject_fault="harness"), 300)
    assert plain["status"] == ballast["status"] == "ok", (plain.get("reason"), ballast.get("reason"))
    grew = ballast["process_peak_bytes"] - plain["process_peak_bytes"]
    assert abs(grew) < 64 * 2**20, grew  # RSS noise between two fresh processes is a few MiB; the ballast is 256
    assert ballast["tensor_peak_bytes"] == plain["tensor_peak_bytes"]

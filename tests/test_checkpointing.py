"""Gradient checkpointing (`--gradient-checkpointing`): the same gradients as without it, for every kind of method,
and less saved activation memory — non-reentrant, so adapters inside checkpointed blocks under frozen embeddings
still get gradients (the reentrant variant's known trap, shown failing below)."""

from __future__ import annotations

import pytest
import torch

from peft_bench.config import CellSpec
from peft_bench.engine.cell import run_cell
from peft_bench.engine.setup import apply, enable_checkpointing
from peft_bench.errors import UnsupportedError
from peft_bench.methods import get_method
from tests.conftest import tiny_batch, tiny_model


def _grads(method_name: str, family: str, checkpointing: bool, reentrant: bool = False) -> dict:
    method = get_method(method_name)
    model = method.apply(tiny_model(family))
    if checkpointing:
        if reentrant:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        else:
            enable_checkpointing(model)
    model.train()
    torch.manual_seed(3)
    model(**tiny_batch(family)).loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in method.trainable_parameters(model).items()}


@pytest.mark.parametrize("method", ["full", "lora", "hf-lora", "p-tuning", "ia3", "dora"])
@pytest.mark.parametrize("family", ["gpt-neo", "llama"])
def test_checkpointed_gradients_equal_the_plain_ones(method, family):
    plain, ckpt = _grads(method, family, False), _grads(method, family, True)
    assert plain.keys() == ckpt.keys()
    for n, g in plain.items():
        assert g is not None and ckpt[n] is not None, n  # every trainable tensor gets a gradient
        torch.testing.assert_close(ckpt[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_reentrant_checkpointing_starves_adapters_inside_blocks():
    """The trap the non-reentrant setting avoids: frozen embeddings, reentrant checkpoint → LoRA inside the blocks
    gets no gradient, i.e. B would never move."""
    grads = _grads("lora", "gpt-neo", True, reentrant=True)
    assert any(g is None or not g.any() for g in grads.values())


def test_lora_b_moves_and_saved_activations_shrink_in_a_checkpointed_cell():
    spec = dict(method="lora", workload="gpt-neo-tiny", train_steps=4, warmup_steps=1, timed_steps=1, probes="cost")
    plain = run_cell(CellSpec(**spec))
    ckpt = run_cell(CellSpec(**spec, gradient_checkpointing=True))
    assert ckpt["gradient_checkpointing"] is True and "gradient_checkpointing" not in plain
    assert ckpt["loss_probe_after"] != ckpt["loss_probe_before"]  # it trained
    # the tiny GPT-Neo's saved activations are mostly its 50,257-word logits (outside the blocks): a smaller drop
    assert ckpt["saved_activations_max_bytes"] < plain["saved_activations_max_bytes"]
    assert ckpt["trainable_params"] == plain["trainable_params"]


def test_prefix_under_checkpointing_is_unsupported_with_the_reason():
    with pytest.raises(UnsupportedError, match="past_key_values"):
        apply(CellSpec(method="prefix", workload="gpt-neo-tiny", gradient_checkpointing=True), get_method("prefix"),
              tiny_model("gpt-neo"))


def test_a_model_without_blocks_is_unsupported_with_the_reason():
    method = get_method("lora")
    with pytest.raises(UnsupportedError, match="no transformer blocks"):
        apply(CellSpec(method="lora", workload="mlp-mnist-tiny", gradient_checkpointing=True), method,
              tiny_model("mlp"))

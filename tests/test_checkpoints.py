"""Checkpoints round-trip for every method × family, in peft's own format where peft has the method."""

from __future__ import annotations

import json

import pytest
import torch

from peft_bench import get_method, list_methods
from peft_bench.measure import files

from .conftest import FAMILIES, tiny_batch, tiny_model
from .test_methods import TINY_OPTIONS, randomise_adapter, supported

CELLS = [(m, f) for m in list_methods() for f in FAMILIES if supported(m, f)]


def trained(method: str, family: str, **options):
    """An applied method whose trainable tensors are random (a stand-in for training: nothing is at its init)."""
    m = get_method(method, **{**TINY_OPTIONS.get(method, {}), **options})
    model = m.apply(tiny_model(family))
    randomise_adapter(m, model)
    return m, model.eval()


def out(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_batch(family)).logits


@pytest.mark.parametrize("method,family", CELLS)
def test_save_then_restore_on_a_fresh_base_gives_the_same_outputs(method, family, tmp_path):
    m, model = trained(method, family)
    expected = out(model, family)
    size = m.save(model, tmp_path / "ckpt")
    assert size == files.size_bytes(tmp_path / "ckpt") > 0
    restored = get_method(method, **TINY_OPTIONS.get(method, {})).restore(tiny_model(family), tmp_path / "ckpt").eval()
    torch.testing.assert_close(out(restored, family), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,family", [c for c in CELLS if c[0] != "full"])
def test_restore_is_not_vacuous(method, family, tmp_path):
    """The fresh base alone differs from the trained model: the round trip really carried the adapter."""
    m, model = trained(method, family)
    m.save(model, tmp_path / "ckpt")
    base = out(tiny_model(family), family)
    got = out(model, family)
    if got.shape == base.shape:
        assert not torch.allclose(got, base, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "lora-parametrize", "hf-lora", "prefix", "p-tuning", "dora"])
@pytest.mark.parametrize("family", ["gpt-neo", "llama", "t5", "bert", "mlp"])
def test_peft_loads_the_checkpoint_with_its_own_from_pretrained(method, family, tmp_path):
    """A user can carry an adapter trained here into their own stack: peft.PeftModel.from_pretrained loads it."""
    from peft import PeftModel

    if not supported(method, family) or (method == "prefix" and family == "bert"):
        pytest.skip("no prompt methods on an MLP; prefix on BERT is P-tuning v2 (peft encoder + head), tested above")
    m, model = trained(method, family)
    m.save(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "ckpt")).eval()
    # parametrize rounds W + s·B·A once in fp32, peft adds s·B·(A·x): on T5's un-normalised residual stream that
    # differs by up to 1.5e-6 (see test_lora_matches_peft_outputs_and_gradients); everything else within 1e-6.
    atol = 2e-6 if (method, family) == ("lora-parametrize", "t5") else 1e-6
    torch.testing.assert_close(out(peft_model, family), out(model, family), atol=atol, rtol=0)
    assert config["peft_type"] == {"prefix": "PREFIX_TUNING", "p-tuning": "P_TUNING"}.get(method, "LORA")
    assert config.get("use_dora", False) == (method == "dora")


@pytest.mark.parametrize("ours,theirs", [("lora", "hf-lora"), ("dora", "hf-dora")])
@pytest.mark.parametrize("family", ["gpt-neo", "bert"])
def test_hand_written_restores_an_adapter_trained_with_peft(ours, theirs, family, tmp_path):
    m, model = trained(theirs, family, r=4)
    m.save(model, tmp_path / "ckpt")
    mine = get_method(ours, r=4).restore(tiny_model(family), tmp_path / "ckpt").eval()
    torch.testing.assert_close(out(mine, family), out(model, family), atol=1e-6, rtol=0)


def test_a_checkpoint_for_another_shape_is_refused(tmp_path):
    m, model = trained("lora", "gpt-neo", r=4)
    m.save(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="does not fit this LoRA"):
        get_method("lora", r=4, targets=("q_proj",)).restore(tiny_model("gpt-neo"), tmp_path / "ckpt")


@pytest.mark.parametrize("method,family,n_values", [
    ("p-tuning", "gpt-neo", 20 * 32),  # 20 virtual tokens × width: the encoder's output, not the MLP encoder
    ("p-tuning", "t5", 20 * 2 * 32),  # encoder-decoders: two token streams
    ("prefix", "llama", 20 * 2 * 2 * 16),  # n × layers × (key, value) × the key/value heads' width (GQA)
])
def test_prompt_checkpoints_hold_the_exported_prompt(method, family, n_values, tmp_path):
    from safetensors.torch import load_file

    m, model = trained(method, family)
    m.save(model, tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == n_values
    trainable = sum(p.numel() for p in m.trainable_parameters(model).values())
    assert method == "prefix" or trainable > n_values  # P-tuning's MLP encoder is larger than what it exports


def test_evict_leaves_no_page_of_the_file_in_the_cache(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * (4 << 20))
    path.read_bytes()
    before = files.resident_fraction(path)
    if before != before:  # mincore unavailable here
        pytest.skip("mincore(2) not available")
    files.evict(path)
    assert files.resident_fraction(path) == 0.0
    path.read_bytes()
    assert files.resident_fraction(path) == 1.0

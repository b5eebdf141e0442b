"""Correctness of every registered method: equivalence with peft, frozen base, exact disable, merge, counts."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_bench import UnsupportedError, UserError, get_method, list_methods
from peft_bench.bench.cell import tolerance
from peft_bench.models import BERT_TINY, GPT_NEO_TINY, LLAMA_TINY, T5_TINY

from .conftest import FAMILIES, tiny_batch, tiny_model

ADAPTERS = ["lora", "lora-parametrize", "hf-lora", "prefix", "p-tuning"]
MERGEABLE = ["lora", "lora-parametrize", "hf-lora"]
PROMPT = ["prefix", "p-tuning"]


def supported(method: str, family: str) -> bool:
    return not (method in PROMPT and family == "mlp")


CELLS = [(m, f) for m in list_methods() for f in FAMILIES if supported(m, f)]


def applied(method: str, family: str, **options: object):
    m = get_method(method, **options)
    return m, m.apply(tiny_model(family))


def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


def randomise_adapter(method, model) -> None:
    """Give B (zero at init) random values so that equivalence and merge tests are not vacuous."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in method.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def test_list_methods_names_all_six():
    assert list_methods() == ["full", "lora", "lora-parametrize", "hf-lora", "prefix", "p-tuning"]


# -- equivalence with peft ---------------------------------------------------------------------------
def _lora_pairs(model):
    """{peft module path: (A, B)} for either LoRA implementation, keyed by the base Linear's path."""
    pairs = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and isinstance(mod.lora_A, torch.nn.Parameter):  # ours
            pairs[_clean(name)] = (mod.lora_A, mod.lora_B)
        elif hasattr(mod, "lora_A") and hasattr(mod.lora_A, "default"):  # peft
            pairs[_clean(name)] = (mod.lora_A.default.weight, mod.lora_B.default.weight)
    return pairs


def _clean(name: str) -> str:
    for junk in ("base_model.model.", ".parametrizations.weight.0"):
        name = name.replace(junk, "")
    return name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ours", ["lora", "lora-parametrize"])
def test_lora_matches_peft_outputs_and_gradients(ours, family):
    ref_method, ref = applied("hf-lora", family, r=4, alpha=8)
    randomise_adapter(ref_method, ref)
    our_method, model = applied(ours, family, r=4, alpha=8)
    ref_pairs, our_pairs = _lora_pairs(ref), _lora_pairs(model)
    assert set(ref_pairs) == set(our_pairs) and ref_pairs
    with torch.no_grad():
        for key, (A, B) in ref_pairs.items():
            our_pairs[key][0].copy_(A)
            our_pairs[key][1].copy_(B)
        _copy_heads(ref, model)
    batch = tiny_batch(family)
    out_ref, out = ref(**batch), model(**batch)
    # The wrapper computes what peft computes, in the same order. The parametrization forms W + (α/r)·B·A
    # first, a different fp32 rounding; through T5's un-normalised residual stream (values ~10) that reaches
    # 1.3e-6 on the tiny model, so that one cell is allowed 2e-6.
    tol = {"atol": 2e-6 if (ours, family) == ("lora-parametrize", "t5") else 1e-6, "rtol": 0}
    torch.testing.assert_close(out.logits, out_ref.logits, **tol)
    out_ref.loss.backward()
    out.loss.backward()
    for key, (A, B) in ref_pairs.items():
        torch.testing.assert_close(our_pairs[key][0].grad, A.grad, **tol)
        torch.testing.assert_close(our_pairs[key][1].grad, B.grad, **tol)


def _copy_heads(ref, model) -> None:
    """Classifier heads are trained copies in both implementations; give ours peft's values."""
    theirs = {n.split("modules_to_save.default.")[-1]: p for n, p in ref.named_parameters() if "modules_to_save" in n}
    ours = {n.split("trained.")[-1]: p for n, p in model.named_parameters() if ".trained." in n}
    assert set(theirs) == set(ours)
    for k, p in theirs.items():
        ours[k].copy_(p)


# -- training touches only the method's parameters ------------------------------------------------------
@pytest.mark.parametrize("method,family", CELLS)
def test_training_changes_only_method_parameters(method, family):
    m, model = applied(method, family, **({"dropout": 0.0} if "lora" in method else {}))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = m.trainable_parameters(model)
    assert trainable
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(**tiny_batch(family)).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items()), "no trainable parameter moved"


# -- disable, merge, unmerge ----------------------------------------------------------------------------
@pytest.mark.parametrize("method,family", [c for c in CELLS if c[0] in ADAPTERS])
def test_disabled_is_exactly_the_base_model(method, family):
    base = tiny_model(family)
    batch = tiny_batch(family)
    with torch.no_grad():
        expected = logits(base, batch)
    m, model = applied(method, family)
    randomise_adapter(m, model)
    with torch.no_grad():
        adapted = logits(model, batch)
        with m.disabled(model):
            got = logits(model, batch)
    # Same kernels, same inputs: equal within the engine's stated tolerance (CPU kernels promise no bitwise equality).
    torch.testing.assert_close(got, expected, atol=tolerance(got.dtype, expected), rtol=0)
    if adapted.shape == expected.shape:  # prompt methods on decoders also return the virtual positions
        assert not torch.allclose(adapted, expected), "the randomised adapter should change the output"


@pytest.mark.parametrize("method", MERGEABLE)
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged_and_unmerge_restores(method, family):
    base_state = copy.deepcopy(tiny_model(family).state_dict())
    m, model = applied(method, family)
    randomise_adapter(m, model)
    batch = tiny_batch(family)
    with torch.no_grad():
        unmerged = logits(model, batch)
        m.merge(model)
        m.merge(model)  # harmless
        merged = logits(model, batch)
        with m.disabled(model):
            disabled = logits(model, batch)
        m.unmerge(model)
        m.unmerge(model)
        after = logits(model, batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(disabled, logits(tiny_model(family), batch), atol=1e-5, rtol=0)
    for name, w in _base_weights(model).items():
        torch.testing.assert_close(w, base_state[name], atol=1e-6, rtol=0, msg=f"{name} not restored")


def _base_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.state_dict().items():
        if "lora_" in n or "trained." in n or "modules_to_save" in n:
            continue
        n = _clean(n).replace(".parametrizations.weight.original", ".weight").replace(".base.", ".")
        n = n.replace(".base_layer.", ".").replace(".original.", ".").replace(".original_module.", ".")
        out[n] = p
    return out


@pytest.mark.parametrize("method", ["full", "prefix", "p-tuning"])
def test_methods_without_weight_delta_refuse_to_merge(method):
    m, model = applied(method, "gpt-neo")
    with pytest.raises(UnsupportedError, match="cannot merge"):
        m.merge(model)


# -- closed-form parameter counts ---------------------------------------------------------------------
def _lora_expected(family: str, r: int) -> int:
    if family == "mlp":  # every Linear: 784→32→48→10
        return r * ((784 + 32) + (32 + 48) + (48 + 10))
    if family == "gpt-neo":
        c = GPT_NEO_TINY
        return c["num_layers"] * 2 * r * 2 * c["hidden_size"]
    if family == "llama":  # q: d → d; v: d → kv heads × head dim (grouped-query attention)
        c = LLAMA_TINY
        d, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
        return c["num_hidden_layers"] * r * ((d + d) + (d + kv))
    if family == "t5":  # q and v in encoder self-attn, decoder self-attn and cross-attn
        c = T5_TINY
        inner = c["num_heads"] * c["d_kv"]
        per = 2 * r * (c["d_model"] + inner)
        return per * (c["num_layers"] + 2 * c["num_decoder_layers"])
    c = BERT_TINY
    head = c["hidden_size"] * 2 + 2
    return c["num_hidden_layers"] * 2 * r * 2 * c["hidden_size"] + head


def _prompt_expected(method: str, family: str, n: int, projection: bool = False) -> int:
    layers, d, head = {
        "gpt-neo": (GPT_NEO_TINY["num_layers"], GPT_NEO_TINY["hidden_size"], 0),
        "llama": (LLAMA_TINY["num_hidden_layers"], LLAMA_TINY["hidden_size"], 0),
        "t5": (T5_TINY["num_layers"], T5_TINY["d_model"], 0),
        "bert": (BERT_TINY["num_hidden_layers"], BERT_TINY["hidden_size"], BERT_TINY["hidden_size"] * 2 + 2),
    }[family]
    if method == "prefix":
        kv = _prefix_kv_width(family)  # a prefix holds keys and values: under GQA only the key/value heads' width
        out = 2 * layers * kv
        return (n * kv + kv * d + d + d * out + out if projection else n * out) + head
    streams = 2 if family == "t5" else 1
    return n * streams * d + 3 * d * d + 2 * d + d + head


def _prefix_kv_width(family: str) -> int:
    if family == "llama":
        c = LLAMA_TINY
        return c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    return 32


def _count(m, model) -> int:
    return sum(p.numel() for p in m.trainable_parameters(model).values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", MERGEABLE)
def test_lora_trainable_count_matches_closed_form(method, family):
    m, model = applied(method, family, r=3)
    assert _count(m, model) == _lora_expected(family, 3) == m.closed_form_trainable(model)


@pytest.mark.parametrize("family", ["gpt-neo", "llama", "t5", "bert"])
@pytest.mark.parametrize("method,options", [("prefix", {}), ("prefix", {"prefix_projection": True}), ("p-tuning", {})])
def test_prompt_trainable_count_matches_closed_form(method, options, family):
    m, model = applied(method, family, num_virtual_tokens=5, **options)
    expected = _prompt_expected(method, family, 5, options.get("prefix_projection", False))
    assert _count(m, model) == expected == m.closed_form_trainable(model)


# Published parameter counts, from the model cards / peft's method comparison (independent of our code):
PUBLISHED_TOTALS = {"gpt-neo-125m": 125_198_592, "t5-small": 60_506_624, "mlp": 2_807_010}


def _meta(name: str):
    from peft_bench import models

    with torch.device("meta"):
        return {"gpt-neo-125m": lambda: models.gpt_neo("full"), "t5-small": lambda: models.t5("full"),
                "mlp": lambda: models.mlp("full")}[name]()


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_full_trains_the_published_parameter_count(name):
    m = get_method("full")
    model = m.apply(_meta(name))
    assert _count(m, model) == m.closed_form_trainable(model) == PUBLISHED_TOTALS[name]


def _llama_3b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("method,options,published", [
    ("lora", {"r": 32, "targets": ("q_proj", "v_proj")}, 9_175_040),
    ("hf-lora", {"r": 32, "targets": ("q_proj", "v_proj")}, 9_175_040),
    ("prefix", {"num_virtual_tokens": 50}, 2_867_200),
])
def test_llama_3b_counts_match_peft_method_comparison(method, options, published):
    """peft's method_comparison publishes these trainable counts for Llama-3.2-3B (grouped-query attention)."""
    m = get_method(method, **options)
    model = m.apply(_llama_3b())
    assert _count(m, model) == m.closed_form_trainable(model) == published


@pytest.mark.parametrize("method", PROMPT)
def test_prompt_methods_on_mlp_are_unsupported_with_reason(method):
    with pytest.raises(UnsupportedError, match="plain MLP"):
        applied(method, "mlp")


@pytest.mark.parametrize("method", PROMPT)
def test_prompt_methods_train_an_encoder_classifier(method):
    m, model = applied(method, "bert", num_virtual_tokens=4)
    out = model(**tiny_batch("bert"))
    out.loss.backward()
    assert all(p.grad is not None for p in m.trainable_parameters(model).values())


# -- bad options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,options,message",
    [
        ("nope", {}, r"unknown method 'nope'; choose one of: full, lora"),
        ("lora", {"r": 0}, r"r must be a positive integer"),
        ("lora", {"r": -2}, r"r must be a positive integer"),
        ("lora", {"r": 2.5}, r"r must be an integer"),
        ("hf-lora", {"alpha": 0}, r"alpha must be a finite number > 0"),
        ("lora", {"alpha": float("inf")}, r"alpha must be a finite number > 0"),
        ("lora", {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ("lora-parametrize", {"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ("prefix", {"num_virtual_tokens": 0}, r"num_virtual_tokens must be a positive integer"),
        ("p-tuning", {"num_virtual_tokens": -1}, r"num_virtual_tokens must be a positive integer"),
        ("lora", {"rank": 4}, r"unknown option 'rank' for method 'lora'; allowed: r, alpha"),
    ],
)
def test_bad_options_say_what_is_wrong_and_allowed(name, options, message):
    with pytest.raises(UserError, match=message):
        get_method(name, **options)


@pytest.mark.parametrize("method", MERGEABLE)
def test_target_pattern_matching_nothing_is_an_error(method):
    with pytest.raises(UserError, match=r"target pattern 'qkv_nope' matches no Linear/Conv1D module; their names"):
        applied(method, "gpt-neo", targets=("q_proj", "qkv_nope"))

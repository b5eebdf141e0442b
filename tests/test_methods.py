"""Correctness of every registered method: equivalence with peft, frozen base, exact disable, merge, counts."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_bench import UnsupportedError, UserError, get_method, list_methods
from peft_bench.engine.probes import tolerance
from peft_bench.methods import method_class
from peft_bench.models import BERT_TINY, GPT_NEO_TINY, LLAMA_TINY, T5_TINY

from .conftest import FAMILIES, tiny_batch, tiny_model

# Capabilities, asked of the classes (never a list of names kept here):
ADAPTERS = [m for m in list_methods() if not method_class(m).trains_everything]
MERGEABLE = [m for m in list_methods() if method_class(m).can_merge]
PROMPT = ["prefix", "p-tuning", "prompt-tuning"]
# What each method cannot serve among the tiny families, and why (the reason is asserted).
UNSUPPORTED = {**{(m, "mlp"): "plain MLP" for m in PROMPT}, ("ln-tuning", "mlp"): "normalisation layers",
               ("bitfit", "llama"): "has none outside its head", ("bitfit", "t5"): "has none outside its head"}
# Options that fit the tiny models (32 wide): FourierFT's default 1000 coefficients exceed a 48 × 10 layer.
TINY_OPTIONS = {"fourierft": {"n_frequency": 64}}


def supported(method: str, family: str) -> bool:
    return (method, family) not in UNSUPPORTED


CELLS = [(m, f) for m in list_methods() for f in FAMILIES if supported(m, f)]


def applied(method: str, family: str, **options: object):
    m = get_method(method, **{**TINY_OPTIONS.get(method, {}), **options})
    return m, m.apply(tiny_model(family))


def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


def randomise_adapter(method, model) -> None:
    """Move every trainable tensor off its initial value (B, zero at init, becomes non-zero), so that equivalence and
    merge tests are not vacuous; a perturbation, not a replacement, so that a scale starting at 1 (IA3, DoRA's
    magnitude, a norm's weight) stays near 1 as training leaves it."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in method.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def test_list_methods_names_the_core_six_then_the_rest():
    names = list_methods()
    assert names[:6] == ["full", "lora", "lora-parametrize", "hf-lora", "prefix", "p-tuning"]
    assert {"prompt-tuning", "ia3", "loha", "lokr", "vera", "oft", "boft", "adalora", "ln-tuning", "fourierft",
            "hf-dora", "rslora", "bitfit", "dora"} <= set(names) and len(names) >= 20


@pytest.mark.parametrize("method,family", sorted(UNSUPPORTED))
def test_unsupported_combinations_are_refused_with_the_reason(method, family):
    with pytest.raises(UnsupportedError, match=UNSUPPORTED[(method, family)]):
        applied(method, family)


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
    m, model = applied(method, family, **({"dropout": 0.0} if "dropout" in method_class(method).Options.__dataclass_fields__
                                          else {}))
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


@pytest.mark.parametrize("method,family", [c for c in CELLS if c[0] in MERGEABLE])
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
    # The engine's merge tolerance (probes.checks_probe): 16 × 64 float32 epsilons at the logits' scale — a merged
    # FourierFT or LoKr delta is formed in full, a different rounding than the unmerged path.
    tol = 16 * tolerance(torch.float32, unmerged)
    torch.testing.assert_close(merged, unmerged, atol=tol, rtol=0)
    torch.testing.assert_close(after, unmerged, atol=tol, rtol=0)
    torch.testing.assert_close(disabled, logits(tiny_model(family), batch), atol=tol, rtol=0)
    found = _base_weights(model, set(base_state))
    assert set(found) == set(base_state), f"base tensors not found: {sorted(set(base_state) - set(found))[:3]}"
    for name, w in found.items():
        torch.testing.assert_close(w, base_state[name], atol=1e-6, rtol=0, msg=f"{name} not restored")


def _base_weights(model, names: set[str]) -> dict[str, torch.Tensor]:
    """The adapted model's tensors that hold the base model's own (`names`), found under the wrappers' paths."""
    out = {}
    for n, p in model.state_dict().items():
        if "trained." in n or "modules_to_save" in n:
            continue
        n = _clean(n).replace(".parametrizations.weight.original", ".weight")
        n = n.replace(".parametrizations.bias.original", ".bias").replace(".base.", ".")
        n = n.replace(".base_layer.", ".").replace(".original.", ".").replace(".original_module.", ".")
        if n in names:
            out[n] = p
    return out


@pytest.mark.parametrize("method", [m for m in list_methods() if m not in MERGEABLE])
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
@pytest.mark.parametrize("method", ["lora", "lora-parametrize", "hf-lora", "rslora"])
def test_lora_trainable_count_matches_closed_form(method, family):
    m, model = applied(method, family, r=3)
    assert _count(m, model) == _lora_expected(family, 3) == m.closed_form_trainable(model)


@pytest.mark.parametrize("family", ["gpt-neo", "llama", "t5", "bert"])
@pytest.mark.parametrize("method,options", [("prefix", {}), ("prefix", {"prefix_projection": True}), ("p-tuning", {})])
def test_prompt_trainable_count_matches_closed_form(method, options, family):
    m, model = applied(method, family, num_virtual_tokens=5, **options)
    expected = _prompt_expected(method, family, 5, options.get("prefix_projection", False))
    assert _count(m, model) == expected == m.closed_form_trainable(model)


@pytest.mark.parametrize("method,family", CELLS)
def test_every_method_counts_what_its_closed_form_says(method, family):
    m, model = applied(method, family)
    assert _count(m, model) == m.closed_form_trainable(model) > 0


# Worked out by hand from the tiny configs, independently of the methods' closed forms (default options).
# GPT-Neo tiny: 2 layers, width 32, MLP 128; targets q_proj, v_proj (32 → 32); IA3 k/v-less: q, v and the MLP's c_proj.
# Llama tiny: 2 layers, width 32, 4 query heads share 2 key/value heads (v_proj 32 → 16), MLP 64, RMSNorm (no biases).
BY_HAND = {
    ("dora", "gpt-neo"): 2 * 2 * (8 * (32 + 32) + 32),  # A, B and a magnitude per output
    ("hf-dora", "gpt-neo"): 2 * 2 * (8 * (32 + 32) + 32),
    ("adalora", "gpt-neo"): 2 * 2 * 12 * (32 + 32 + 1),  # P, Q and the singular values Λ at the initial rank 12
    ("loha", "gpt-neo"): 2 * 2 * 2 * 8 * (32 + 32),  # two low-rank pairs
    ("lokr", "gpt-neo"): 2 * 2 * (4 * 4 + 8 * 8),  # 32 = 4·8 both ways: W1 4×4, W2 8×8 in full (r ≥ 8/2)
    ("vera", "gpt-neo"): 2 * 2 * (256 + 32),  # λ_d (r = 256) and λ_b (d_out)
    ("fourierft", "gpt-neo"): 2 * 2 * 64,  # the coefficients asked for (TINY_OPTIONS)
    ("oft", "gpt-neo"): 2 * 2 * (32 * 31 // 2),  # one 32-block, strictly upper triangle
    ("boft", "gpt-neo"): 2 * 2 * (8 * 4 * 4 + 32),  # eight 4×4 blocks and an output scale
    ("ia3", "gpt-neo"): 2 * (32 + 32 + 128),  # q, v scale outputs; c_proj (feed-forward) scales its 128 inputs
    ("ln-tuning", "gpt-neo"): (2 * 2 + 1) * 2 * 32,  # ln_1, ln_2 per layer and ln_f: weight and bias
    ("bitfit", "gpt-neo"): 2 * (32 + 32 + 32 + 128 + 32) + 32,  # ln_1, out_proj, ln_2, c_fc, c_proj; ln_f
    ("prompt-tuning", "gpt-neo"): 20 * 32,
    ("dora", "llama"): 2 * ((8 * (32 + 32) + 32) + (8 * (32 + 16) + 16)),
    ("ia3", "llama"): 2 * (16 + 16 + 64),  # k, v outputs (GQA: 16 wide); down_proj's 64 inputs
    ("vera", "llama"): 2 * ((256 + 32) + (256 + 16)),
    ("lokr", "llama"): 2 * ((4 * 4 + 8 * 8) + (4 * 4 + 4 * 8)),  # v: 16 = 4·4 out, 32 = 4·8 in
    ("boft", "llama"): 2 * ((8 * 16 + 32) + (8 * 16 + 16)),
    ("ln-tuning", "llama"): (2 * 2 + 1) * 32,  # RMSNorm: a weight only
    ("prompt-tuning", "t5"): 20 * 2 * 32,  # encoder and decoder prompted
}


@pytest.mark.parametrize("method,family", sorted(BY_HAND))
def test_counts_match_the_counts_worked_out_by_hand(method, family):
    m, model = applied(method, family)
    assert _count(m, model) == m.closed_form_trainable(model) == BY_HAND[(method, family)]


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
    ("ia3", {}, 286_720),  # 28 × (1024 + 1024 + 8192): k, v outputs, down_proj inputs
    ("vera", {"r": 256}, 129_024),  # 28 × ((256 + 3072) + (256 + 1024))
    ("prompt-tuning", {"num_virtual_tokens": 200}, 614_400),  # 200 × 3072
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


@pytest.mark.parametrize("method", [m for m in list_methods() if "targets" in method_class(m).Options.__dataclass_fields__])
def test_target_pattern_matching_nothing_is_an_error(method):
    with pytest.raises(UserError, match=r"target pattern 'qkv_nope' matches no Linear/Conv1D module; their names"):
        applied(method, "gpt-neo", targets=("q_proj", "qkv_nope"))


# -- the hand-written methods against their references ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_dora_matches_peft_use_dora_outputs_and_gradients(family):
    """Given the same W, A, B and magnitude, the hand-written DoRA computes what peft's use_dora computes."""
    ref_method, ref = applied("hf-dora", family, r=4, alpha=8)
    randomise_adapter(ref_method, ref)
    ours_method, model = applied("dora", family, r=4, alpha=8)
    theirs = {_clean(n).replace(".default", ""): p for n, p in ref.named_parameters() if p.requires_grad}
    mine = {_clean(n).replace("lora_magnitude", "lora_magnitude_vector.weight").replace(".trained.", ".")
            .replace("lora_A", "lora_A.weight").replace("lora_B", "lora_B.weight"): p
            for n, p in model.named_parameters() if p.requires_grad}
    theirs = {k.replace("modules_to_save.", ""): v for k, v in theirs.items()}
    assert set(mine) == set(theirs) and any("magnitude" in k for k in mine)
    with torch.no_grad():
        for k, p in theirs.items():
            mine[k].copy_(p)
    batch = tiny_batch(family)
    out_ref, out = ref(**batch), model(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=2e-6 if family == "t5" else 1e-6, rtol=0)
    out_ref.loss.backward()
    out.loss.backward()
    for k, p in theirs.items():
        torch.testing.assert_close(mine[k].grad, p.grad, atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("family", ["mlp", "gpt-neo", "bert"])
def test_bitfit_trains_deltas_and_disabled_is_the_base_bit_for_bit(family):
    base = tiny_model(family)
    batch = tiny_batch(family)
    with torch.no_grad():
        expected = logits(base, batch)
    biases = {n: p.detach().clone() for n, p in tiny_model(family).named_parameters() if n.endswith("bias")}
    m, model = applied("bitfit", family)
    model.train()
    opt = torch.optim.AdamW(m.trainable_parameters(model).values(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    originals = {_clean(n).replace(".parametrizations.bias.original", ".bias").replace(".original.", "."): p
                 for n, p in model.named_parameters() if n.endswith("bias.original") or ".original." in n}
    assert all(torch.equal(originals[n], b) for n, b in biases.items()), "a base bias was written"
    with torch.no_grad():
        trained = logits(model, batch)
        with m.disabled(model):
            assert torch.equal(logits(model, batch), expected)
    assert not torch.equal(trained, expected)


def test_adalora_allocates_ranks_every_step():
    """With `after_step` each step (as the engine calls it) AdaLoRA prunes singular values towards its target
    budget; without it nothing is pruned — the hook is what makes it AdaLoRA."""
    def trained(allocate: bool) -> int:
        m = get_method("adalora", r=2, init_r=6)
        m.schedule(8)
        model = m.apply(tiny_model("gpt-neo")).train()
        opt = torch.optim.AdamW(m.trainable_parameters(model).values(), lr=1e-2)
        for _ in range(8):
            opt.zero_grad()
            model(**tiny_batch("gpt-neo")).loss.backward()
            opt.step()
            if allocate:
                m.after_step(model)
        return sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)

    layers = 2 * 2  # q and v in two layers
    assert trained(False) == layers * 6
    assert trained(True) < layers * 6


def test_adalora_task_loss_leaves_out_its_regulariser():
    """AdaLoRA's forward adds 0.5 × an orthogonality penalty to the loss; the learning and forgetting probes take the
    task's loss alone (the same model's forward without peft's wrapper)."""
    m, model = applied("adalora", "gpt-neo")
    randomise_adapter(m, model)
    batch = tiny_batch("gpt-neo")
    with torch.no_grad():
        trained_on = float(model(**batch).loss)
        with m.task_loss(model):
            task = float(model(**batch).loss)
        plain = float(model.get_base_model()(**batch).loss)
    assert task == pytest.approx(plain, abs=1e-6) and trained_on > task + 1e-4
    assert model.peft_config["default"].orth_reg_weight == 0.5  # restored


def _grow_one(method, model, which: int = 0) -> None:
    """One trainable tensor (the first, or the last: a head copy where there is one) gains an element after `apply`
    (a hidden check: closed forms must not follow it)."""
    p = list(method.trainable_parameters(model).values())[which]
    with torch.no_grad():
        p.data = torch.cat([p.data.reshape(-1), p.data.reshape(-1)[:1]])


@pytest.mark.parametrize("which", [0, -1])
@pytest.mark.parametrize("method,family", CELLS)
def test_every_closed_form_disagrees_with_a_count_whose_tensors_were_grown(method, family, which):
    """A closed form is a second witness only if it is written from the configuration and options, never read from
    the tensors it is compared with: grow one trainable tensor after apply, and the count moves while it does not."""
    m, model = applied(method, family)
    before = m.closed_form_trainable(model)
    _grow_one(m, model, which)
    assert _count(m, model) == before + 1
    assert m.closed_form_trainable(model) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_full_closed_form_is_the_configuration_s_not_the_tensors(family):
    """Full fine-tuning's count from the config (a formula per embedded family) equals the tensors' count as built,
    and an extra trainable tensor registered after apply is counted by the tensors alone."""
    m, model = applied("full", family)
    assert m.closed_form_trainable(model) == _count(m, model)
    target = next(mod for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    target.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    assert _count(m, model) == m.closed_form_trainable(model) + 3


def test_full_closed_form_of_a_model_without_a_formula_is_a_twin_built_from_its_config():
    """--model families without a written formula (GPT-2 here): a second instance from the config on the meta device."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from peft_bench.methods.counts import FORMULAS, twin_parameters

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=1000, n_positions=64))
    assert ("gpt2", "GPT2LMHeadModel") not in FORMULAS
    m = get_method("full")
    model = m.apply(model)
    assert m.closed_form_trainable(model) == twin_parameters(model) == _count(m, model)
    _grow_one(m, model)
    assert _count(m, model) == m.closed_form_trainable(model) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_base_bytes_from_the_configuration_equal_the_storages_and_do_not_follow_them(family, dtype):
    """The static-memory closed form's base: parameters and buffers counted from the config × element sizes (a formula
    per family, and a twin on the meta device) equal a walk of the built model's storages — and a grown weight moves
    the walk, not the closed form."""
    from peft_bench.methods.counts import _twin_bytes, base_bytes

    def walk(model) -> int:
        seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*model.parameters(),
                                                                                  *model.buffers()]}
        return sum(seen.values())

    model = tiny_model(family).to(dtype=dtype)
    element = torch.empty(0, dtype=dtype).element_size()
    closed = base_bytes(model, element)
    assert closed == walk(model)
    if family != "mlp":
        assert _twin_bytes(model, element) == closed
    p = next(model.parameters())
    with torch.no_grad():
        p.data = torch.cat([p.data.reshape(-1), p.data.reshape(-1)[:1]])
    assert walk(model) == closed + element and base_bytes(model, element) == closed

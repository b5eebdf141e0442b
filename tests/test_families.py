"""Every common model family with every method: tiny random-weight models saved as a user would bring them
(`save_pretrained` + a tokenizer), run through `peft-bench run --model DIR --dataset CSV`."""

from __future__ import annotations

import csv
import random

import pandas as pd
import pytest
import torch
import transformers as T

from peft_bench import arch
from peft_bench.cli import main
from peft_bench.workloads import get_workload, hub_workload

V = 30522  # the MiniLM WordPiece vocabulary every tiny model is saved with
TINY = {  # 2 layers, 32 wide, 4 heads (2 key/value heads under GQA), 64 positions
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=V)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
        vocab_size=V)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
        word_embed_proj_dim=32, vocab_size=V)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, vocab_size=V)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, vocab_size=V)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=101,
        eos_token_id=102, decoder_start_token_id=102, vocab_size=V)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=102, vocab_size=V)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
        pad_token_id=1, num_labels=2, vocab_size=V)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=2, vocab_size=V)),
}
FAMILY = {"gpt2": "decoder", "gpt_neox": "decoder", "opt": "decoder", "llama": "decoder", "qwen2": "decoder",
          "bart": "encoder-decoder", "t5": "encoder-decoder", "roberta": "encoder", "distilbert": "encoder"}
# The methods whose handling differs by family (LoRA targeting, hand-written and peft; prompt sizes): `full` and
# `lora-parametrize` (lora's targeting) add nothing family-specific here, and every method's contract runs in-process
# on five families in test_methods.py — the README's test command stays under 10 minutes.
# p-tuning (peft's prompt encoder) runs on five families in-process in tests/test_methods.py.
METHODS = ("lora", "prefix")  # hf-lora takes the same default targets as lora (peft wraps them; GPT-2's
# Conv1D against peft below, every method on five families in tests/test_methods.py): kept out to fit 10 minutes
# Trainable parameters worked out by hand from the shapes (r = 8 on the default targets, 20 virtual tokens), for
# the families whose layers differ most from BERT's: the engine's closed forms must give these.
BY_HAND = {
    ("gpt2", "lora"): 2 * 8 * (32 + 96),  # Conv1D c_attn: 32 → 3·32 (q, k, v fused), 2 layers
    ("gpt_neox", "lora"): 2 * 8 * (32 + 96),  # query_key_value, fused likewise
    ("qwen2", "lora"): 2 * (8 * (32 + 32) + 8 * (32 + 16)),  # q: 32 → 32; v: 32 → 2 kv heads × 8 = 16
    ("llama", "prefix"): 20 * 2 * 2 * 16,  # n · layers · (k, v) · num_key_value_heads × head_dim
    ("qwen2", "prefix"): 20 * 2 * 2 * 16,
    ("distilbert", "lora"): 2 * 2 * 8 * (32 + 32) + (32 * 32 + 32) + (32 * 2 + 2),  # q_lin, v_lin + pre_classifier, classifier
    ("roberta", "p-tuning"): 20 * 32 + 3 * (32 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2),  # embedding, MLP, head
}


@pytest.fixture(scope="session")
def reviews(tmp_path_factory) -> str:
    """200 short labelled texts, one in seven long (so the 95th-percentile length meets the 64-position limit)."""
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rng = random.Random(0)
    words = "good bad great awful fine boring fun dull film plot actor".split()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(200):
            w.writerow([" ".join(rng.choice(words) for _ in range(rng.randint(3, 12) if i % 7 else 100)), i % 2])
    return str(path)


def saved(family: str, root) -> str:
    path = root / family
    if not path.exists():
        torch.manual_seed(0)
        TINY[family]().save_pretrained(path)
        get_workload("minilm-sentiment").load_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


# Through the CLI from a saved directory: one family per kind of layer the CLI path must handle — GPT-2's Conv1D,
# Qwen2's GQA with biases, BART's encoder-decoder. GPT-NeoX's fused query_key_value, T5 and DistilBERT (and OPT, Llama,
# RoBERTa) have their targets, shapes and closed forms checked in-process (BY_HAND below, tests/test_methods.py) and T5
# runs through the CLI in the smoke suite; kept out of this matrix to fit the test time.
CLI_FAMILIES = ("gpt2", "qwen2", "bart")


@pytest.mark.parametrize("family", CLI_FAMILIES)
def test_every_family_runs_every_method_from_a_saved_directory(family, model_root, reviews, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--model", saved(family, model_root), "--dataset", reviews, "--suite", "smoke", "--steps",
                 "4", "--methods", ",".join(METHODS), "--out", str(out)]) in (0, 1)
    rows = pd.read_csv(out / "metrics.csv").set_index("method")
    assert sorted(rows.index) == sorted(METHODS)
    bad = rows[~rows.status.isin(["ok", "unsupported"])]
    assert bad.empty, bad.reason.to_dict()
    ok = rows[rows.status == "ok"]
    assert (ok.trainable_params == ok.closed_form_trainable_params).all()
    assert set(rows.family) == {FAMILY[family]}
    if FAMILY[family] == "decoder":
        assert set(ok.index) == set(METHODS)
    for (f, method), n in BY_HAND.items():
        if f == family:
            assert rows.loc[method, "trainable_params"] == n, method
    # One length for every method of the run, leaving the virtual tokens room in 64 positions (none for T5).
    assert set(rows.seq_len) == ({104} if family == "t5" else {64 - 20})
    unsupported = rows[rows.status == "unsupported"]
    assert all("past key/values" in r for r in unsupported.reason), unsupported.reason.to_dict()


def test_task_and_family_are_decided_once_from_the_config_and_from_the_model(model_root):
    for family in TINY:
        path = saved(family, model_root)
        w = hub_workload(path)
        info = arch.describe(TINY[family]())
        assert (w.family, info.family) == (FAMILY[family], FAMILY[family]), family
        assert info.task_type == arch.PEFT_TASK_TYPE[w.task]


def test_position_limits_count_robertas_offset_and_none_for_relative_positions():
    limits = {f: arch.describe(TINY[f]()).position_limit for f in TINY}
    assert limits == {"gpt2": 64, "gpt_neox": 64, "opt": 64, "llama": 64, "qwen2": 64, "bart": 64, "t5": None,
                      "roberta": 64, "distilbert": 64}
    for f in ("roberta", "bart", "opt"):  # every position up to the limit embeds, one more does not
        model = TINY[f]().eval()
        ids = torch.full((1, 64), 5)
        model(input_ids=ids, decoder_input_ids=ids[:, :2]) if f == "bart" else model(input_ids=ids)
        with pytest.raises((IndexError, RuntimeError)):
            ids = torch.full((1, 65), 5)
            model(input_ids=ids, decoder_input_ids=ids[:, :2]) if f == "bart" else model(input_ids=ids)


def test_sequence_length_is_a_high_percentile_of_the_data_capped_by_the_model(model_root, reviews):
    import numpy as np

    w = hub_workload(saved("t5", model_root), reviews)  # relative positions: no cap
    form = w.formulation_of(0)
    lengths = [len(form.tok("sentiment:", add_special_tokens=False).input_ids)
               + len(form.tok(t, add_special_tokens=False).input_ids) + 2 for t in w.data(0).train.inputs]  # [CLS], [SEP]
    assert w.sized().max_length == int(np.ceil(np.percentile(lengths, 95) / 8) * 8) == 104
    gpt2 = hub_workload(saved("gpt2", model_root), reviews)
    assert gpt2.sized().max_length == 64 and gpt2.sized(reserve=20).max_length == 44
    short = hub_workload(saved("t5", model_root))  # the embedded snippets: most are one sentence
    assert 8 <= short.sized().max_length < 104


@pytest.mark.parametrize("flags,message", [
    (["--seq-len", "100", "--methods", "lora"],
     "sequence length 100 does not fit the model's 64 positions; use --seq-len 64 or less"),
    (["--seq-len", "60", "--methods", "p-tuning"], "does not fit the model's 64 positions less 20 virtual tokens"),
    (["--virtual-tokens", "60", "--methods", "prefix"], "60 virtual tokens leave 4 of the model's 64 positions"),
    (["--batch-size", "64"], "each needs at least one batch of 64"),
])
def test_lengths_beyond_the_model_and_batches_beyond_the_data_are_refused(flags, message, model_root, reviews,
                                                                           tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, model = tmp_path / "o", saved("gpt2", model_root)
    capsys.readouterr()  # saving the model (when this test comes first) prints its own progress
    assert main(["run", "--model", model, "--dataset", reviews, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_lora_on_conv1d_equals_peft_and_merges(model_root):
    """The hand-written LoRAs on GPT-2's Conv1D against peft (fan_in_fan_out) with the same A and B."""
    from peft_bench.methods import get_method

    x = torch.randint(5, 1000, (2, 9))
    outs = {}
    for name in ("lora", "lora-parametrize", "hf-lora"):
        torch.manual_seed(0)
        method = get_method(name, r=4)
        model = method.apply(TINY["gpt2"]().eval())
        torch.manual_seed(1)
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.data.normal_(0, 0.1)
        outs[name] = model(input_ids=x).logits.detach()
        method.merge(model)
        assert torch.allclose(model(input_ids=x).logits, outs[name], atol=1e-5), name
        method.unmerge(model)
    assert torch.allclose(outs["lora"], outs["hf-lora"], atol=1e-5)
    assert torch.allclose(outs["lora-parametrize"], outs["hf-lora"], atol=1e-5)


def test_a_checkpoint_runs_in_its_own_dtype_by_default_and_the_row_says_so(model_root, reviews, tmp_path):
    path = tmp_path / "bf16"
    TINY["llama"]().to(torch.bfloat16).save_pretrained(path)
    get_workload("minilm-sentiment").load_tokenizer().save_pretrained(path)
    assert main(["run", "--model", str(path), "--dataset", reviews, "--suite", "smoke", "--steps", "4",
                 "--methods", "lora", "--out", str(tmp_path / "o")]) == 0
    row = pd.read_csv(tmp_path / "o" / "metrics.csv").iloc[0]
    assert row["status"] == "ok" and row["dtype"] == "bfloat16+float32"  # float32 adapters on a bfloat16 base, as peft


@pytest.mark.parametrize("family, method", list(BY_HAND))
def test_trainable_counts_worked_out_by_hand_in_process(family, method):
    """The hand-worked counts above for every family listed, the CLI matrix's families or not."""
    from peft_bench.methods import get_method

    torch.manual_seed(0)
    m = get_method(method)
    model = m.apply(TINY[family]())
    assert sum(p.numel() for p in m.trainable_parameters(model).values()) == BY_HAND[family, method]
    assert m.closed_form_trainable(model) == BY_HAND[family, method]

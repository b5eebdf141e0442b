"""Serving probes (suite `inference`): the cached greedy loop, the KV cache's bytes, merged = unmerged, many adapters,
merge fidelity — each against a second computation; and one real run of the suite on the tiny GPT-Neo."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from peft_bench.config import CellSpec
from peft_bench.engine import serve
from peft_bench.engine.cell import PROBES, run_probes

PROBES.setdefault("trained", ("budget",))


def trained(method: str, lr: float = 3e-2):
    return run_probes(CellSpec(method=method, workload="gpt-neo-tiny", train_steps=6, warmup_steps=1, timed_steps=2,
                               lr=lr), "trained")


def recomputed(model, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy tokens by the training path: the whole sequence through the model's forward, no cache, per token."""
    seq = ids
    with torch.inference_mode():
        for _ in range(k):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, -k:]


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt-tuning"])
def test_cached_loop_gives_the_tokens_of_the_uncached_forward(method):
    s = trained(method)
    s.model.eval()
    ids = serve.prompt_ids(s, 24, 2)
    got = serve.greedy(s.model, ids, 6)
    assert torch.equal(got.tokens, recomputed(s.model, ids, 6))
    base = serve.greedy(s.model.get_base_model() if hasattr(s.model, "get_base_model") else s.model, ids, 6)
    if method != "lora":  # the trained prompt changes what is generated: the loop did put it in front
        assert not torch.equal(base.first_logits, got.first_logits)


@pytest.mark.parametrize("method,virtual", [("lora", 0), ("prefix", 20)])
def test_kv_cache_bytes_equal_the_closed_form_from_the_config(method, virtual):
    s = trained(method)
    s.model.eval()
    ids = serve.prompt_ids(s, 16, 3)
    got = serve.greedy(s.model, ids, 5)
    # gpt-neo-tiny: 2 layers × 4 heads × 8 per head (hidden 32), float32; 16 prompt + 4 fed-back tokens
    assert got.cache_bytes == 2 * 2 * 4 * 8 * 3 * (virtual + 16 + 4) * 4


def test_prompts_are_real_reviews_of_exactly_the_length_asked():
    s = trained("lora")
    ids = serve.prompt_ids(s, 40, 3)
    assert ids.shape == (3, 40)
    assert len({tuple(r.tolist()) for r in ids}) == 3  # one stretch of text per row
    assert serve.fitted(s, 10_000) == 256 - serve.NEW_TOKENS  # the tiny GPT-Neo's 256 positions


def test_merged_generates_unmerged_tokens_and_fidelity_copies_leave_the_model_alone():
    s = trained("hf-lora")
    s.model.eval()
    ids = serve.prompt_ids(s, 32, 1)
    with torch.inference_mode():
        before = s.model(input_ids=ids).logits
    rows = {r["dtype"]: r for r in serve.fidelity_rows(s)}
    with torch.inference_mode():
        assert torch.equal(s.model(input_ids=ids).logits, before) and not s.method.merged
    assert rows["float32"]["max_abs_diff"] < 1e-5 and rows["float32"]["tokens_equal"]
    # bfloat16 rounds W + BA where unmerged adds BA·x to W·x: a real, visible difference (peft #1388)
    assert rows["bfloat16"]["max_abs_diff"] > 10 * rows["float32"]["max_abs_diff"]
    gen = [r for r in serve.generation_rows(s) if r["variant"] == "merged"]
    assert gen and all(r["tokens_equal"] for r in gen)


def test_disagreement_reports_the_first_divergence_and_the_logit_gap():
    ref = serve.Generated(torch.tensor([[1, 2, 3]]), 0.0, [], 0, torch.tensor([[0.0, 5.0, 1.0, 0.0]]),
                          [torch.tensor([[0.0, 1.0, 4.0, 3.5]]), torch.zeros(1, 4)])
    other = dataclass_copy(ref, tokens=torch.tensor([[1, 3, 3]]))
    got = serve._agreement(other, ref)
    assert got == {"tokens_equal": False, "first_divergence": 1, "logit_gap": pytest.approx(0.5)}


def dataclass_copy(g, **changes):
    import dataclasses

    return dataclasses.replace(copy.copy(g), **changes)


def test_many_adapters_mixed_batch_equals_each_row_alone():
    s = trained("hf-lora")
    serve_adapters = serve.ADAPTERS
    try:
        serve.ADAPTERS = (1, 8)
        rows = serve.adapter_rows(s)
    finally:
        serve.ADAPTERS = serve_adapters
    loaded = [r for r in rows if r["probe"] == "adapters"]
    # r=8 on q_proj, v_proj of 2 layers (32 wide): 2 × 2 × 8 × (32 + 32) float32 parameters per adapter
    assert all(r["adapter_bytes"] == r["adapter_closed_form_bytes"] == 2 * 2 * 8 * 64 * 4 for r in loaded)
    mixed = next(r for r in rows if r["variant"] == "mixed batch")
    assert mixed["tokens_equal"] and mixed["max_abs_diff"] < 1e-5
    swap = next(r for r in rows if r["variant"] == "hot-swap from disk")
    assert swap["max_abs_diff"] < 1e-6
    # the adapters differ: the mixed batch is not one adapter eight times
    names = [n for n in s.model.peft_config]
    assert len(names) == 8


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    from peft_bench.cli import main

    out = tmp_path_factory.mktemp("inference") / "run"
    assert main(["run", "--suite", "inference", "--workloads", "gpt-neo-tiny", "--methods", "hf-lora",
                 "--repeats", "2", "--out", str(out)]) == 0
    return out


def test_suite_writes_serving_rows_per_repeat_and_a_summary(suite_run):
    rows = list(csv.DictReader((suite_run / "serving.csv").open()))
    assert {"0", "1"} <= {r["repeat"] for r in rows}  # a repeat disturbed under the test load is measured again
    fidelity = [r for r in rows if r["probe"] == "fidelity"]
    assert fidelity and {r["repeat"] for r in fidelity} == {"0"}  # exact: measured once
    gen = [r for r in rows if r["probe"] == "generation"]
    assert all(r["kv_cache_bytes"] == r["kv_cache_closed_form_bytes"] for r in gen)
    assert {r["method"] for r in gen} == {"hf-lora"}  # peft's LoRA: generation and many adapters in one cell
    text = (suite_run / "summary.md").read_text()
    for title in ("Generation: time to first token", "Many LoRA adapters", "One batch, a different adapter",
                  "Switching adapters", "Merge fidelity per dtype"):
        assert title in text
    assert (suite_run / "serving.png").stat().st_size > 10_000


def test_report_pairs_the_ratio_within_each_process():
    from peft_bench.report.serving import generation_table

    def row(variant, repeat, decode):
        return {"method": "m", "probe": "generation", "variant": variant, "prompt_tokens": "8", "batch": "1",
                "repeat": str(repeat), "ttft_s": "0.01", "decode_token_s": str(decode), "kv_cache_bytes": "1",
                "kv_cache_closed_form_bytes": "1", "virtual_tokens": "0", "tokens_equal": "True" if variant ==
                "merged" else "", "no_cache_agrees": "", "generate_agrees": ""}

    # the machine drifts 2× between processes; unmerged is 1.5× merged in each: the paired ratio sees 1.5 exactly
    rows = [row("unmerged", r, 0.003 * f) for r, f in enumerate((1, 2, 1.3))] + \
           [row("merged", r, 0.002 * f) for r, f in enumerate((1, 2, 1.3))]
    line = generation_table(rows)[2]
    assert "1.50×" in line and "≈" not in line

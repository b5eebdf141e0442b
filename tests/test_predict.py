"""`peft-bench plan`: a training step's memory on fake tensors equals the measured cell's; named published configs
have their published sizes; bad input is one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from peft_bench.cli import main
from peft_bench.engine import predict
from peft_bench.report import plan

ROOT = Path(__file__).resolve().parents[1]
# One cell of each tiny family, and the methods whose steps differ most (virtual tokens, a parametrisation): the
# committed smoke baseline measured them in real processes; `peft-bench plan --against results/smoke` plans all 22.
CELLS = [("full", "t5-tiny"), ("lora", "minilm-sentiment-tiny"), ("p-tuning", "gpt-neo-tiny"),
         ("lora-parametrize", "mlp-mnist-tiny")]


def test_planned_tensor_peak_equals_the_committed_measurement_byte_for_byte_in_every_part():
    rows = [r for r in csv.DictReader(open(ROOT / "results" / "smoke" / "metrics.csv"))
            if (r["method"], r["workload"]) in CELLS and r["status"] == "ok"]
    assert len(rows) == len(CELLS)
    for r in predict.against(rows):
        assert r["status"] == "ok" and plan.equal(r), {k: (r.get(k), r.get(f"measured_{k}"))
                                                       for k in ("tensor_peak_bytes", *plan.PARTS)}
        assert r["trainable_params"] == int(r["measured_trainable_params"])
        # the checkpoint's tensors: what the cell's checkpoint probe counted
        assert r["trainable_state_bytes"] == int(float(r["measured_trainable_state_bytes"]))


def test_llama_3_2_3b_has_its_published_size_and_lora_r32_on_q_v_peft_s_published_count():
    """From its published config on fake tensors: 3,212,749,824 parameters; LoRA r32 on q,v trains 9,175,040 (peft's
    method comparison, MetaMathQA on Llama-3.2-3B)."""
    from peft_bench.engine.setup import apply
    from peft_bench.methods import get_method
    from peft_bench.models import planned

    with predict.fake_tensors():
        model = planned("llama-3.2-3b")
        assert sum(p.numel() for p in model.parameters()) == 3_212_749_824
        method = get_method("hf-lora", r=32, targets=("q_proj", "v_proj"))
        model = apply(predict._Asked(), method, model)
        assert sum(p.numel() for p in method.trainable_parameters(model).values()) == 9_175_040


def test_full_fine_tuning_s_parts_are_their_closed_forms_from_the_config(capsys):
    """Llama-3.2-1B in bfloat16, full fine-tuning: weights 2 bytes a parameter (1,235,814,400, the published size)
    plus the rotary buffers (inv_freq and its original, 64 float32 each); AdamW's state two bf16 moments per
    parameter plus a 4-byte step count per tensor — written from the configuration, not read off the tensors."""
    assert main(["plan", "--model", "llama-3.2-1b", "--methods", "full", "--batch-size", "1", "--seq-len", "8",
                 "--dtype", "bfloat16", "--format", "json"]) == 0
    (full,) = json.loads(capsys.readouterr().out)
    n = 1_235_814_400
    assert full["trainable_params"] == full["total_params"] == n
    tensors = 16 * 9 + 2  # per layer: q, k, v, o, gate, up, down and two norms; the embeddings (tied); the final norm
    assert full["optimizer_bytes"] == 2 * 2 * n + 4 * tensors
    assert full["weights_bytes"] == 2 * n + 2 * (64 // 2) * 4
    assert full["tensor_peak_bytes"] > full["weights_bytes"] + full["optimizer_bytes"]


def test_a_method_that_reads_a_value_is_named_not_planned(capsys):
    assert main(["plan", "--workloads", "gpt-neo-tiny", "--methods", "boft", "--format", "csv"]) == 0
    row = next(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert row["status"] == "not planned" and "reads a tensor's value" in row["reason"]


@pytest.mark.parametrize("argv,text", [
    (["--model", "llama-9b"], "unknown model 'llama-9b'"),
    (["--model", "gpt-neo-125m", "--seq-len", "4096"], "exceeds gpt-neo-125m's 2048 positions"),
    (["--model", "llama-3.1-8b", "--device", "cuda"], "needs a torch built with CUDA"),
    (["--against", "/nonexistent"], "no metrics.csv rows there"),
])
def test_bad_input_is_one_line_and_exit_2(argv, text, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err

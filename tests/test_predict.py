"""`peft-bench plan`: a training step's memory on fake tensors equals the measured cell's; named published configs
have their published sizes; bad input is one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from peft_bench.cli import main
from peft_bench.engine import predict
from peft_bench.engine.published import LITGPT_ALPACA2K, PEFT_METAMATHQA
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


def test_methods_that_read_values_plan_their_committed_measurement_byte_for_byte():
    """LoHa's module dropout branches on a random draw; AdaLoRA's rank budget reads a threshold and masks by it: fake
    tensors have no values, the planner answers with stand-ins (`scalar_reads` counts them), and the plan still
    equals what the cell measured in every part — a stand-in that changed what the step holds would not."""
    rows = [r for r in csv.DictReader(open(ROOT / "results" / "methods" / "metrics.csv"))
            if r["method"] in ("loha", "adalora") and r["workload"] == "minilm-sentiment" and r["status"] == "ok"]
    assert len(rows) == 2
    for r in predict.against(rows):
        assert r["status"] == "ok" and r["scalar_reads"] > 0 and plan.equal(r), r


@pytest.mark.parametrize("argv,text", [
    (["--model", "llama-9b"], "unknown model 'llama-9b'"),
    (["--model", "gpt-neo-125m", "--seq-len", "4096"], "exceeds gpt-neo-125m's 2048 positions"),
    (["--against", "/nonexistent"], "no metrics.csv rows there"),
])
def test_bad_input_is_one_line_and_exit_2(argv, text, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


@pytest.mark.parametrize("row", [p for p in PEFT_METAMATHQA if p.trainable], ids=lambda p: p.experiment)
def test_published_experiment_settings_train_the_published_number_of_parameters(row):
    """Each of peft's experiments, applied with the settings `plan --published` plans it with, trains exactly the
    num_trainable_params its results file publishes: the settings are theirs (a wrong rank, target list or prompt
    length would not match)."""
    from peft_bench.methods import get_method
    from peft_bench.models import planned

    method = get_method(row.method, **row.options)
    # BOFT builds a permutation matrix element by element (9 s for 28 layers): one layer, its 28th share
    layers = 1 if row.method == "boft" else 28
    with torch.device("meta"), predict._ScalarReads():  # BOFT's initialisation indexes with values: answered
        model = method.apply(planned("llama-3.2-3b", num_hidden_layers=layers))
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) * 28 // layers == row.trainable


@pytest.mark.parametrize("row", [p for p in LITGPT_ALPACA2K if p.method == "hf-lora"], ids=lambda p: p.experiment)
def test_litgpt_settings_train_what_litgpt_s_lora_trains(row):
    """litgpt's LoRA on query and value (one fused qkv projection, its q and v slices): A is (2r × d), B is
    ((d + kv) × r) per layer — written from the model's published config, against what peft's LoRA with the planned
    settings trains on our model."""
    from peft_bench.methods import get_method
    from peft_bench.models import PLANNED, planned

    _, c = PLANNED[row.model]
    d, kv = c["hidden_size"], c["num_key_value_heads"] * c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    r = row.options["r"]
    method = get_method(row.method, **row.options)
    with torch.device("meta"):
        model = method.apply(planned(row.model))
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) == \
        c["num_hidden_layers"] * (2 * r * d + (d + kv) * r)


def test_cuda_attention_kernel_follows_cudas_rules():
    """torch's sdp_utils on an Ampere-or-newer GPU: FlashAttention for half precision without a mask (grouped-query
    attention native), the memory-efficient kernel with a mask or in float32, the math path for float32 with
    grouped-query attention."""
    from peft_bench.engine.cuda_choices import sdpa_kernel

    q = torch.empty(1, 8, 16, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 2, 16, 64, dtype=torch.bfloat16, device="meta")
    mask = torch.empty(1, 1, 16, 16, dtype=torch.bool, device="meta")
    assert sdpa_kernel(q, k, None, enable_gqa=True) == "flash"
    assert sdpa_kernel(q, q, mask, enable_gqa=False) == "efficient"
    assert sdpa_kernel(q.float(), q.float(), None, enable_gqa=False) == "efficient"
    assert sdpa_kernel(q.float(), k.float(), None, enable_gqa=True) == "math"
    wide = torch.empty(1, 8, 16, 512, dtype=torch.bfloat16, device="meta")
    assert sdpa_kernel(wide, wide, None, enable_gqa=False) == "efficient"


def test_a_cuda_plan_runs_on_a_cpu_only_machine_with_cudas_choices(capsys):
    """No GPU here: fake CPU tensors with CUDA's choices — the flash kernel an unpadded batch gets, its log-sum-exp
    (fp32, one per query row and head) saved instead of the CPU's, every block a multiple of 512 bytes."""
    argv = ["plan", "--model", "smollm2-135m", "--methods", "lora", "--dtype", "bfloat16", "--batch-size", "2",
            "--seq-len", "64", "--format", "json"]
    assert main([*argv, "--device", "cuda"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "ok" and row["attention_kernels"] == "scaled_dot_product_flash_attention"
    assert "CUDA's choices" in row["planned_with"]
    assert all(row[k] % 512 == 0 for k in ("tensor_peak_bytes", *plan.PARTS))


def test_the_largest_length_that_fits_is_searched_on_fake_steps_and_plotted(capsys, tmp_path):
    """--vary seq_len, then a cap between two planned lengths: the search ends on a length whose planned peak fits
    and whose next step (64 tokens more) does not — checked here by planning both again — and the plot is drawn."""
    from peft_bench.config import RunConfig
    from peft_bench.report.plots import planned_peak

    assert main(["plan", "--workloads", "gpt-neo-tiny", "--methods", "lora", "--batch-size", "1", "--format", "json",
                 "--vary", "seq_len=64,128,256"]) == 0
    rows = json.loads(capsys.readouterr().out)
    peaks = {r["seq_len"]: r["tensor_peak_bytes"] for r in rows}
    cap = (peaks[128] + peaks[256]) // 2
    cfg = RunConfig(methods=("lora",), workloads=("gpt-neo-tiny",), batch_size=1, vary=("seq_len", (64, 128, 256)))
    found = predict.largest(rows, cfg, cap)
    best = found["gpt-neo-tiny", "lora"][0]
    assert 128 <= best < 256 and best % 64 == 0
    at = {n: predict.isolated("lora", "gpt-neo-tiny", predict._Asked(batch_size=1, max_length=n))["tensor_peak_bytes"]
          for n in (best, best + 64)}
    assert at[best] <= cap < at[best + 64]
    png = tmp_path / "peak.png"
    planned_peak(plan.with_largest(plan.with_cap(rows, cap), "seq_len", found), "seq_len", cap, png)
    assert png.stat().st_size > 10_000


def test_planned_collectives_equal_the_counted_ones_of_every_committed_distributed_cell():
    """Planned from the configuration (which parameters, buffers and blocks the model has; the wraps torchrun
    applies), never from a process group: each committed DDP and FSDP cell's all-reduce, all-gather,
    reduce-scatter and broadcast bytes per step — counted from gloo's own records — equal byte for byte."""
    from peft_bench.engine.plan_comm import planned_comm
    from peft_bench.methods import get_method
    from peft_bench.workloads import get_workload

    rows = [r for r in csv.DictReader(open(ROOT / "results" / "distributed" / "metrics.csv"))
            if r["status"] == "ok" and r.get("parallel")]
    assert len(rows) >= 12
    for r in rows:
        method = get_method(r["method"], **json.loads(r.get("options") or "{}"))
        with torch.device("meta"):
            model = method.apply(get_workload(r["workload"]).build_model())
        got = planned_comm(model, method.trainable_parameters(model), int(r["world_size"]), r["parallel"],
                           r["device"], str(r.get("broadcast_buffers", "True")) != "False")
        for kind in ("allreduce", "allgather", "reducescatter", "broadcast"):
            key = f"{kind}_bytes_per_step"
            assert got[key] == int(float(r[key])), (r["method"], r["parallel"], r["world_size"], key)


def test_an_fsdp_plan_holds_what_each_committed_fsdp_rank_held_and_torch_s_own_tracker_agrees():
    """--parallel fsdp plans rank 0 of torch's fake process group, sharded as the cells shard: the parameter,
    gradient and AdamW bytes it holds equal what the committed 2-rank FSDP cells' ranks held, byte for byte; and its
    per-rank tensor peak is what torch's own FSDP memory tracker reads on the same step, but for the batch's input ids
    (4 × 128 int64), which the cells' tracker counts when the embedding trains and saves them, and torch's does not."""
    rows = [r for r in csv.DictReader(open(ROOT / "results" / "distributed" / "metrics.csv"))
            if r["status"] == "ok" and r.get("parallel") == "fsdp" and r["world_size"] == "2"
            and r["method"] in ("full", "lora")]  # the embedding trained, and not (prefix: as lora, 5 s more)
    assert len(rows) == 2
    for r in rows:
        asked = predict._Asked(nproc=(2,), parallel=("fsdp",))
        got = predict.isolated(r["method"], r["workload"], asked, json.loads(r.get("options") or "{}"))
        for part in ("weights", "gradients", "optimizer"):
            assert got[f"rank_{part}_max_bytes"] == int(float(r[f"rank_{part}_max_bytes"])), (r["method"], part)
        inputs = 4 * 128 * 8 if r["method"] == "full" else 0
        assert got["tensor_peak_bytes"] - got["tensor_peak_torch_fsdp_tracker_bytes"] == inputs, r["method"]


def test_the_cpu_overhead_model_is_the_fit_of_the_committed_cells_and_its_report_is_current():
    """`measure/overhead.py`'s constants are what a fit on every committed single-process CPU cell gives, and
    `results/plan/process-peak.md` prints the coverage that fit has now: out of sample (each workload left out of its
    own fit) ≥ 90 % of the cells with a tensor peak ≥ 256 MiB are within ±10 % of their measured process peak."""
    from peft_bench.measure.overhead import CPU_FIT
    from peft_bench.report import overhead

    rows = overhead.cells(ROOT / "results")
    assert len(rows) == CPU_FIT.cells and overhead._same(overhead.fit(rows), CPU_FIT)
    fresh = overhead.report(rows, ["plan", "--fit-overhead"]).splitlines()
    committed = (ROOT / "results" / "plan" / "process-peak.md").read_text().rstrip("\n").splitlines()
    assert fresh[4:] == committed[4:]  # all but the line naming the commit
    big = [e for r, e in zip(rows, overhead.cross_validated(rows)) if float(r["tensor_peak_bytes"]) >= overhead.SMALL]
    assert sum(abs(e) <= 0.10 for e in big) >= 0.9 * len(big)

"""The cell's probes: each record checked against something independent, and every check able to fail."""

from __future__ import annotations

import math

import pytest
import torch

from peft_bench import get_method
from peft_bench.config import CellSpec
from peft_bench.engine import cell, probes
from peft_bench.engine.cell import run_cell
from peft_bench.engine.probes import CellError, checks_probe, tolerance
from peft_bench.methods.lora import LoRA

from .conftest import tiny_batch, tiny_model
from .test_methods import randomise_adapter

# One xdist worker (`pytest -n 2 --dist loadgroup`, the README's test command): its tests share module-scoped cells
# (once, not once per worker).
pytestmark = pytest.mark.xdist_group("cell")

FAST = dict(train_steps=4, warmup_steps=1, timed_steps=1, latency_seconds=0.02)


@pytest.fixture(scope="module")
def neo_rows() -> dict[str, dict]:
    return {m: run_cell(CellSpec(m, "gpt-neo-tiny", **FAST)) for m in ("full", "lora", "hf-lora", "p-tuning")}


def test_memory_parts_match_the_closed_form_from_the_parameter_counts(neo_rows):
    """The optimizer part is AdamW's two float32 moments of every trained parameter (counted from the rows' own
    trainable_params, not from the tracker) plus one 4-byte step counter per trained tensor."""
    parts = ["weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "temporaries_bytes"]
    for method, row in neo_rows.items():
        assert all(row[p] >= 0 for p in parts), method
        assert 0 <= row["optimizer_bytes"] - 8 * row["trainable_params"] <= 4 * 64, method  # ≤ 64 trained tensors
        assert row["static_matches_closed_form"] is True, method
        assert row["process_peak_bytes"] > 0 and row["process_baseline_bytes"] > 0


def test_full_fine_tuning_keeps_more_activations_than_lora(neo_rows):
    assert neo_rows["full"]["saved_activations_max_bytes"] > neo_rows["lora"]["saved_activations_max_bytes"] > 0


def test_counted_flops_agree_with_the_formula(neo_rows):
    """Exact for full fine-tuning (every matmul is an nn.Linear or attention); within 5 % otherwise (the formula
    charges every layer's attention a full backward, layer 0's frozen query path has none)."""
    assert neo_rows["full"]["step_flops"] == neo_rows["full"]["step_flops_analytic"]
    for method, row in neo_rows.items():
        assert row["flops_counted_vs_analytic"] == pytest.approx(1.0, abs=0.05), method
    assert neo_rows["lora"]["step_flops"] < neo_rows["full"]["step_flops"]  # no weight gradients of the base


def test_every_method_reports_base_and_trained_latency_and_merged_only_when_it_can(neo_rows):
    for method, row in neo_rows.items():
        assert row["inference_base_s"] > 0 and row["inference_adapter_s"] > 0
        assert (row["inference_merged_s"] == row["inference_merged_s"]) == (method in ("lora", "hf-lora"))
        assert row["full_model_load_cold_s"] > 0 and row["adapter_switch_cold_s"] > 0
        assert row["roundtrip_max_abs_diff"] <= row["check_tolerance"]


def test_p_tuning_checkpoint_is_the_exported_prompt_and_says_so(neo_rows):
    row = neo_rows["p-tuning"]
    assert row["checkpoint_bytes"] < row["trainable_state_bytes"]
    assert "virtual-token embeddings" in row["checkpoint_format"]


def test_a_non_finite_loss_is_an_error_never_ok():
    with pytest.raises(CellError, match="training loss is not finite"):
        run_cell(CellSpec("lora", "gpt-neo-tiny", inject_fault="nan", **FAST))


def test_too_few_steps_is_an_error():
    with pytest.raises(CellError, match="cannot hold 1 warm-up, 1 timed and 2 instrumented steps"):
        run_cell(CellSpec("lora", "mlp-mnist-tiny", train_steps=3, warmup_steps=1, timed_steps=1))


def test_bfloat16_cell_keeps_float32_adapters_like_peft():
    rows = {m: run_cell(CellSpec(m, "gpt-neo-tiny", dtype="bfloat16", **FAST)) for m in ("lora", "hf-lora")}
    for method, row in rows.items():
        assert row["dtype"] == "bfloat16+float32", method
        assert row["static_matches_closed_form"] is True, method
        assert row["check_tolerance"] >= 64 * 2**-7  # bfloat16's epsilon is 2^-7: a looser check, stated
    assert rows["lora"]["trainable_params"] == rows["hf-lora"]["trainable_params"]


def test_bfloat16_pixels_follow_the_model_and_the_check_uses_the_coarsest_dtype():
    """Image inputs are cast to --dtype; with float32 adapters on a bfloat16 MLP the checks' tolerance is
    bfloat16's (the hand LoRA lists its float32 A, B first, which once made it float32's and failed the merge)."""
    row = run_cell(CellSpec("lora", "mlp-mnist-tiny", dtype="bfloat16", **FAST))
    assert row["dtype"] == "bfloat16+float32"
    assert row["check_tolerance"] >= 64 * 2**-7


# -- the checks can fail, and do not fail on correct methods ------------------------------------------------
def trained_neo(method: str):
    m = get_method(method)
    model = m.apply(tiny_model("gpt-neo"))
    randomise_adapter(m, model)
    return m, model


def base_output(batch) -> torch.Tensor:
    with torch.no_grad():
        return tiny_model("gpt-neo")(**batch).logits


def test_the_disabled_check_never_fails_on_a_correct_method_in_many_repeats():
    batch = tiny_batch("gpt-neo", batch=4, length=32)
    base = base_output(batch)
    for method in ("hf-lora", "lora"):
        m, model = trained_neo(method)
        for _ in range(15):
            record = checks_probe(m, model, batch, base)
            assert record.disabled_max_abs_diff <= record.check_tolerance


def test_a_disable_that_does_not_disable_is_caught(monkeypatch):
    import contextlib

    monkeypatch.setattr(LoRA, "_disabled", lambda self, model: contextlib.nullcontext())
    batch = tiny_batch("gpt-neo")
    m, model = trained_neo("lora")
    with pytest.raises(CellError, match="disabled adapter does not reproduce the base model"):
        checks_probe(m, model, batch, base_output(batch))


def test_an_unmerge_that_does_not_restore_is_caught(monkeypatch):
    monkeypatch.setattr(LoRA, "_unmerge", lambda self, model: None)
    batch = tiny_batch("gpt-neo")
    m, model = trained_neo("lora")
    with pytest.raises(CellError, match="unmerge does not restore"):
        checks_probe(m, model, batch, base_output(batch))


def test_a_checkpoint_that_does_not_restore_is_caught(monkeypatch):
    from peft_bench.methods import lora

    real = lora.import_peft_lora
    monkeypatch.setattr(lora, "import_peft_lora", lambda method, directory: None)  # loads nothing
    with pytest.raises(CellError, match="checkpoint does not round-trip"):
        run_cell(CellSpec("lora", "gpt-neo-tiny", lr=0.05, **FAST))
    monkeypatch.setattr(lora, "import_peft_lora", real)


def test_tolerance_is_derived_from_the_dtype_and_the_logits_scale():
    x = torch.tensor([0.5, -20.0])
    assert tolerance(torch.float32, x) == 64 * torch.finfo(torch.float32).eps * 20.0
    assert tolerance(torch.bfloat16, torch.tensor([0.1])) == 64 * 2**-7


def test_cell_module_names_no_method():
    """Capabilities, not names: the engine never asks `method.name == ...`."""
    import inspect

    assert "name ==" not in inspect.getsource(cell)


@pytest.mark.parametrize("method", ["full", "lora", "prefix", "p-tuning"])
def test_encoder_decoder_flops_agree_with_the_formula(method):
    """T5: the prefix reaches the decoder's self-attention only and a frozen encoder has no backward pass; the
    formula that assumed otherwise was 10 % above the counted FLOPs for prefix tuning."""
    row = run_cell(CellSpec(method, "t5-tiny", **FAST))
    assert row["flops_counted_vs_analytic"] == pytest.approx(1.0, abs=0.05)


def test_a_bfloat16_hub_checkpoint_runs_in_the_requested_dtype_and_says_so(tmp_path):
    """transformers 5 loads a checkpoint in its own dtype; the cell casts to --dtype and records what it measured."""
    from peft_bench import models
    from peft_bench.workloads import get_workload

    models.gpt_neo("tiny").to(torch.bfloat16).save_pretrained(tmp_path / "model")
    get_workload("gpt-neo-tiny").load_tokenizer().save_pretrained(tmp_path / "model")
    rows = [f'"review number {i} was {"great" if i % 2 else "awful"}",{i % 2}' for i in range(40)]
    (tmp_path / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    spec = dict(workload="", model=str(tmp_path / "model"), dataset=str(tmp_path / "reviews.csv"), batch_size=4,
                max_length=24, **FAST)
    for method in ("lora", "hf-lora"):
        row = run_cell(CellSpec(method, **spec))
        assert row["dtype"] == "float32" and row["static_matches_closed_form"] is True, method


def test_list_metrics_defines_every_column(capsys):
    from peft_bench.cli import main
    from peft_bench.measure import records

    assert main(["list", "--metrics"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(records.columns()) and all(": " in line for line in printed)


def test_rows_carry_wilson_columns_and_no_forgetting_on_random_weights(neo_rows):
    from scipy.stats import binomtest  # a second implementation of the Wilson score interval

    for row in neo_rows.values():
        n = row["test_examples"]
        ci = binomtest(round(row["accuracy"] * n), n).proportion_ci(0.95, method="wilson")
        assert row["accuracy_ci_low"] == pytest.approx(ci.low, abs=1e-9)
        assert row["accuracy_ci_high"] == pytest.approx(ci.high, abs=1e-9)
        assert 0.5 <= row["majority_rate"] <= 1
        assert math.isnan(row["forgetting"]) and row["forgetting_tokens"] == 0  # random weights: nothing to forget
        assert row["loss_window"] >= 1 and row["split"] == "test" and row["loss_probe_examples"] == probes.PROBE_BATCHES * 8
        assert row["loss_probe_before"] > 0 and row["loss_probe_after"] > 0


def test_progress_in_a_log_prints_a_line_at_least_every_30_seconds():
    import io

    now = [0.0]
    log = io.StringIO()  # not a terminal
    p = cell.Progress(10, "lora × w", stream=log, clock=lambda: now[0])
    for t in (5, 20, 31, 40, 62, 63):
        now[0] = t
        p.update()
    p.close()
    lines = log.getvalue().splitlines()
    assert lines == ["  lora × w: training step 3/10 (31 s)", "  lora × w: training step 5/10 (62 s)"]


def test_progress_on_a_terminal_draws_a_bar_even_when_the_terminal_reports_no_size():
    """A pty nobody sized (0 × 0, as under `script` or a CI runner) gave tqdm a zero-width bar: nothing at all."""
    import os
    import pty

    master, slave = pty.openpty()  # a fresh pty reports 0 columns
    with os.fdopen(slave, "w", encoding="utf-8") as stream:
        assert stream.isatty() and cell._columns(stream) == 0
        p = cell.Progress(4, "lora × w", stream=stream)
        for _ in range(4):
            p.update()
        p.close()
        stream.flush()
        drawn = os.read(master, 65536).decode("utf-8", "replace")
    os.close(master)
    assert "lora × w:" in drawn and "0/4" in drawn and "%|" in drawn  # later updates wait mininterval


def test_heartbeat_prints_while_a_phase_runs_and_stops_after():
    import io
    import time

    from peft_bench.engine.cell import heartbeat

    out = io.StringIO()
    with heartbeat("lora × w", "accuracy", every=0.05, stream=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("  lora × w: accuracy (") for line in lines)
    time.sleep(0.15)
    assert out.getvalue().splitlines() == lines  # silent once the phase is over

"""Second witnesses: the tensor tracker against PyTorch's own memory profiler for every method on four families, and
`peft-bench validate`'s four verdicts on the embedded GPT-Neo and on a model brought as a directory."""

from __future__ import annotations

import pytest
import torch

from peft_bench import get_method
from peft_bench.errors import UnsupportedError
from peft_bench.measure.memory import StepMemoryTracker
from peft_bench.measure.profiled import profiled_peak
from peft_bench.methods import method_class
from peft_bench.names import METHODS

from .conftest import tiny_batch, tiny_model

# The stated tolerance, measured over every method on the four families: the peaks agree to within a few hundred
# bytes (the input batch, which the profiler counts and the tracker only when an operator saves it), except LN tuning
# (−1 KB), OFT (the profiler lower by 15 to 47 KB, up to 0.80 % on T5: not explained yet) and AdaLoRA (+12 to +43 KB, up to 0.74 %): peft's rank
# allocator keeps importance scores per adapter tensor (exp_avg_ipt, exp_avg_unc) outside the model and the optimizer,
# which the profiler sees and the tracker does not — a known blind spot of the tracker, bounded here. Categories: AdamW state equals OPTIMIZER_STATE exactly, weights equal
# PARAMETER plus the model's buffers (which the profiler files under INPUT or leaves uncategorized). The other three are
# defined differently, so they are printed, not compared: the profiler labels a tensor by the role it ends up in for
# its whole life (the tied embedding's gradient is GRADIENT from the moment its first part is computed), the tracker
# by the role it has at that moment.
PEAK_TOLERANCE = {"adalora": 0.01, "oft": 0.01}  # the rest: 0.5 %


def witnessed(method_name: str, family: str):
    """Two AdamW steps, then the same batch once under the tracker and once under the profiler."""
    method = get_method(method_name)
    model = method.apply(tiny_model(family)).train()
    opt = torch.optim.AdamW(method.trainable_parameters(model).values(), lr=1e-3)
    batch = tiny_batch(family, batch=2, length=8)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
        method.after_step(model)

    step()
    step()
    opt.zero_grad(set_to_none=True)
    with StepMemoryTracker(model, opt) as tracker:
        step()
    opt.zero_grad(set_to_none=True)
    return tracker, profiled_peak(step), model


@pytest.mark.parametrize("family", ["gpt-neo", "llama", "bert", "t5"])
def test_tracker_peak_is_the_profiler_s_for_every_method(family):
    """Every registered method the family supports: the tracker's peak equals the profiler timeline's within 0.5 %
    (AdaLoRA and OFT 1 %);
    AdamW state exactly; weights = PARAMETER + the model's buffers within the same tolerance."""
    seen = []
    for name in METHODS:
        if method_class(name).unsupported_reason(family):
            continue
        try:
            tracker, prof, model = witnessed(name, family)
        except UnsupportedError:  # refused by the model itself (BitFit on a model without biases)
            continue
        bound = PEAK_TOLERANCE.get(name, 0.005) * prof.peak_bytes
        assert abs(prof.peak_bytes - tracker.peak_bytes) <= bound, (name, tracker.peak_bytes, prof.peak_bytes)
        assert tracker.peak_parts["optimizer"] == prof.categories["optimizer_state"], name
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        assert abs(tracker.peak_parts["weights"] - prof.categories["parameter"] - buffers) <= bound, name
        seen.append(name)
    assert len(seen) >= 14, seen


def _validate(capsys, *argv) -> list[str]:
    from peft_bench.cli import main

    code = main(["validate", "--methods", "lora", "--steps", "6", "--allow-busy", *argv])
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.strip()]
    assert code == 0, out
    return lines


@pytest.mark.xdist_group("torchrun")  # its wire check starts a 2-rank cell: beside the other torchrun tests
def test_validate_prints_four_verdicts_on_the_embedded_gpt_neo(capsys):
    lines = _validate(capsys, "--workloads", "gpt-neo-tiny")
    assert [x.split()[0] + " " + x.split()[1] for x in lines] == ["tensor peak", "process peak", "step time",
                                                                   "wire bytes"]
    assert all(": agree" in x for x in lines), lines


@pytest.mark.xdist_group("torchrun")
def test_validate_on_a_model_brought_as_a_directory(capsys, tmp_path):
    from .test_families import saved

    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{'good fun film' if i % 2 else 'dull boring plot'} {i},{i % 2}\n"
                                             for i in range(120)))
    lines = _validate(capsys, "--model", saved("llama", tmp_path), "--dataset", str(data))
    assert len(lines) == 4 and all(": agree" in x for x in lines) and "llama" in lines[0], lines

"""Second witnesses: the tensor tracker against PyTorch's own memory profiler for every method on four families, and
`peft-bench validate`'s four verdicts on the embedded GPT-Neo and on a model brought as a directory."""

from __future__ import annotations

import pytest
import torch

from peft_bench import get_method
from peft_bench.errors import UnsupportedError
from peft_bench.measure.memory import StepMemoryTracker
from peft_bench.measure.profiled import allocator_peak, profiled_peak
from peft_bench.methods import method_class
from peft_bench.names import METHODS

from .conftest import tiny_batch, tiny_model

# Two readings of PyTorch's profiler, two tolerances, measured over every method on the four families:
# - the allocator's own events (every allocation and free, summed in order): their largest running total equals the
#   tracker's peak less what was live when the step began to within 344 B for every method but FourierFT, where the
#   tracker reads 64 KB (GPT-Neo, BERT) to 192 KB (T5) more than the allocator served — not explained yet (its
#   inverse FFT alone agrees to 12 B), bounded at 4 % of the peak and said in the closing note;
# - the memory timeline (the profiler's analysis, with its categories), on GPT-Neo: the peaks agree to within a few
#   hundred bytes (the input batch, which the profiler counts and the tracker only when an operator saves it), except
#   LN tuning (−1 KB), OFT (the timeline lower by 15 to 47 KB, up to 0.80 % on T5) and AdaLoRA (+12 to +43 KB, up to
#   0.74 %: peft's rank allocator keeps importance scores per adapter tensor outside the model and the optimizer,
#   live before the step began, which the timeline counts and the tracker does not — the allocator reading, which
#   sees only the step, agrees). AdamW state equals OPTIMIZER_STATE exactly; weights equal PARAMETER plus the model's
#   buffers (which the profiler files under INPUT or leaves uncategorized). The other three are defined differently,
#   so they are printed, not compared: the timeline labels a tensor by the role it ends up in, for its whole life (the
#   tied embedding's gradient is GRADIENT from the moment its first part is computed), the tracker by its role then.
ALLOCATOR_TOLERANCE = 1024  # bytes; FourierFT: 4 % of the peak
TIMELINE_TOLERANCE = {"adalora": 0.01, "oft": 0.01}  # the rest: 0.5 % of the peak


def trained(method_name: str, family: str):
    """A method on a tiny model after two AdamW steps, and `step`, which takes one more on the same batch."""
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
    return model, opt, step


def tracked(model, opt, step) -> StepMemoryTracker:
    with StepMemoryTracker(model, opt) as tracker:
        step()
    opt.zero_grad(set_to_none=True)
    return tracker


def every_method(family: str, only: tuple[str, ...] = METHODS):
    for name in only:
        if method_class(name).unsupported_reason(family):
            continue
        try:
            yield name, trained(name, family)
        except UnsupportedError:  # refused by the model itself (BitFit on a model without biases)
            continue


@pytest.mark.parametrize("family", ["gpt-neo", "llama", "bert", "t5"])
def test_tracker_peak_is_the_allocator_s_for_every_method(family):
    seen = []
    for name, (model, opt, step) in every_method(family):
        tracker = tracked(model, opt, step)
        above_start = tracker.peak_bytes - sum(tracker.initial_parts.values())
        bound = 0.04 * tracker.peak_bytes if name == "fourierft" else ALLOCATOR_TOLERANCE
        assert abs(allocator_peak(step) - above_start) <= bound, (name, above_start)
        seen.append(name)
    assert len(seen) >= 14, seen


TIMELINE_METHODS = ("full", "lora", "adalora", "oft")  # the two largest and the two outliers


def test_tracker_peak_and_categories_against_the_profiler_timeline_on_gpt_neo():
    """The timeline's analysis is the slow reading (about 0.5 s a step, 3 s for full): full and LoRA, as the issue
    measured them, and the two methods whose gaps are described above; every method against the allocator above."""
    seen = []
    for name, (model, opt, step) in every_method("gpt-neo", TIMELINE_METHODS):
        tracker = tracked(model, opt, step)
        prof = profiled_peak(step)
        bound = TIMELINE_TOLERANCE.get(name, 0.005) * prof.peak_bytes
        assert abs(prof.peak_bytes - tracker.peak_bytes) <= bound, (name, tracker.peak_bytes, prof.peak_bytes)
        assert tracker.peak_parts["optimizer"] == prof.categories["optimizer_state"], name
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        assert abs(tracker.peak_parts["weights"] - prof.categories["parameter"] - buffers) <= bound, name
        seen.append(name)
    assert tuple(seen) == TIMELINE_METHODS, seen


def _validate(capsys, *argv) -> list[str]:
    from peft_bench.cli import main

    code = main(["validate", "--methods", "lora", "--steps", "6", "--allow-busy", *argv])
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.strip()]
    assert code == 0, out
    return lines


# Not in the torchrun group (torchrun --standalone picks a free port, so two launches do not meet): the scheduler may
# balance it against that group, the largest one worker carries
def test_validate_on_a_model_brought_as_a_directory(capsys, tmp_path):
    """Four verdicts, all agreeing, on a model brought as a directory (the embedded GPT-Neo runs the same code: its
    output is in the README)."""
    from .test_families import saved

    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{'good fun film' if i % 2 else 'dull boring plot'} {i},{i % 2}\n"
                                             for i in range(120)))
    lines = _validate(capsys, "--model", saved("llama", tmp_path), "--dataset", str(data))
    assert [x.split()[0] + " " + x.split()[1] for x in lines] == ["tensor peak", "process peak", "step time",
                                                                   "wire bytes"]
    assert all(": agree" in x for x in lines) and "llama" in lines[0], lines


def test_validate_says_in_one_line_when_its_child_dies(capsys, monkeypatch):
    from peft_bench.cli import main
    from peft_bench.engine import witness

    def dies(spec):
        raise RuntimeError("the validation child failed: killed by SIGKILL")

    monkeypatch.setattr(witness, "observe", dies)
    monkeypatch.setattr(witness, "wire_verdict", lambda spec, timeout: witness.Verdict("wire bytes", "c", "–", "–",
                                                                                     None, "not run here"))
    assert main(["validate", "--workloads", "gpt-neo-tiny", "--methods", "lora", "--steps", "4", "--allow-busy"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cell") and "DISAGREE (the validation child failed: killed by SIGKILL)" in out[0]

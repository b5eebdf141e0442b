"""Device placement without a GPU: the model on the `meta` device stands in for CUDA, and a dispatch mode records
every operator whose (non-scalar) tensor arguments lie on more than one device — what fails on a GPU ("expected all
tensors to be on the same device") but passes silently on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from peft_bench.methods import get_method
from peft_bench.workloads import get_workload
from peft_bench.workloads.tasks import batches, predictions


class MixedDevices(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device.type for t in tree_flatten((args, kwargs or {}))[0]
                   if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            self.mixed.append(f"{func}: {sorted(devices)}")
        return func(*args, **(kwargs or {}))


def _on_meta(workload: str, method: str):
    w = get_workload(workload)
    torch.manual_seed(0)
    model = get_method(method).apply(w.build_model()).to("meta")
    data = w.data(0)
    return model, type(data.test)(data.test.inputs[:8], data.test.labels[:8]), w.formulation()


@pytest.mark.parametrize("workload, method", [("gpt-neo-tiny", "lora"), ("gpt-neo-tiny", "prefix"),
                                              ("gpt-neo-tiny", "p-tuning"), ("mlp-mnist-tiny", "lora")])
def test_accuracy_pass_moves_every_batch_to_the_models_device(workload, method):
    model, split, form = _on_meta(workload, method)
    with MixedDevices() as mode:
        for pred, truth in predictions(model.eval(), split, form, 4):
            assert pred.device.type == "meta" and truth.device.type == "meta"
    assert not mode.mixed, mode.mixed[:3]


def test_a_batch_left_on_the_cpu_fails_on_the_stand_in_device():
    """The check above can fail: the same forward with the batch not moved raises."""
    model, split, form = _on_meta("gpt-neo-tiny", "lora")
    b = next(batches(split, form, 4, seed=0, shuffle=False))
    with MixedDevices() as mode:
        form.predict(model.eval(), b)
    assert mode.mixed


def test_datasheet_peak_is_looked_up_by_gpu_name_most_specific_first():
    from peft_bench.measure.timing import datasheet_peak_flops

    assert datasheet_peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert datasheet_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert datasheet_peak_flops("NVIDIA H100 80GB HBM3", "float32") == 67e12
    assert datasheet_peak_flops("NVIDIA GeForce GTX 1080", "bfloat16") is None
    assert datasheet_peak_flops(None, "float32") is None

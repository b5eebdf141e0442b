"""Shared fixtures: a fixed seed for every test, tiny models of each family and a batch for each."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PEFT_BENCH_ALLOW_BUSY", "1")  # the busy-machine guard has its own test

from peft_bench import models  # noqa: E402

FAMILIES = ["mlp", "gpt-neo", "llama", "t5", "bert"]


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


_PEAKS: dict = {}


@pytest.fixture(autouse=True)
def matmul_peak_once_per_session(monkeypatch) -> None:
    """Runs started in this process measure the matmul peak (MFU's denominator, ~8 s) once per test session instead
    of once per run: still measured on this machine, in a forked child, per device and dtype. Runs started as a
    subprocess (the CLI tests) measure their own."""
    from peft_bench.bench import runner

    real = runner.matmul_peak_in_child

    def once(device: str, dtype: str) -> float:
        if (device, dtype) not in _PEAKS:
            _PEAKS[device, dtype] = real(device, dtype)
        return _PEAKS[device, dtype]

    monkeypatch.setattr(runner, "matmul_peak_in_child", once)


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    build = {"mlp": lambda: models.mlp("tiny"), "gpt-neo": lambda: models.gpt_neo("tiny"),
             "t5": lambda: models.t5("tiny"), "bert": lambda: models.bert_classifier("tiny"),
             "llama": lambda: models.llama("tiny")}[family]
    return build().eval()


def tiny_batch(family: str, batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if family == "mlp":
        return {"pixel_values": torch.randn(batch, 784, generator=g), "labels": torch.randint(0, 10, (batch,), generator=g)}
    ids = torch.randint(5, 1000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if family == "t5":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(5, 1000, (batch, 2), generator=g)}
    if family == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}

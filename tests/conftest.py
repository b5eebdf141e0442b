"""Shared fixtures: a fixed seed for every test, tiny models of each family and a batch for each."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` (the README's test command) two workers share the two cores: one intra-op thread each (the
    # fork servers and cells they start inherit it), so they do not oversubscribe the cores. Nothing measured here is
    # judged by its speed.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case a plugin imported torch before this file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PEFT_BENCH_ALLOW_BUSY", "1")  # the busy-machine guard has its own test

from peft_bench import models  # noqa: E402

FAMILIES = ["mlp", "gpt-neo", "llama", "t5", "bert"]
@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)



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


@pytest.fixture(scope="session")
def repeated(tmp_path_factory):
    """One real run with repeats (full, LoRA and an unsupported prefix on the tiny MLP; 2 rounds with an A/A copy),
    read by test_repeats.py and test_report.py — both in the xdist group "repeats", so it runs once."""
    from peft_bench.cli import run_and_report
    from peft_bench.config import RunConfig

    out = tmp_path_factory.mktemp("repeats") / "run"
    opts = RunConfig(suite="smoke", methods=("full", "lora", "prefix"), workloads=("mlp-mnist-tiny",), out=out,
                     train_steps=4, repeats=2)
    assert run_and_report(opts, ["run", "--repeats", "2"]) == 0
    return out

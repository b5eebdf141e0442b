"""The tutorial's demonstrations on a reduced budget: their invariants, not their figures."""

from __future__ import annotations

import csv

import pytest
import torch

from peft_bench.cli import main
from peft_bench.demos import mnist_lora, svd
from peft_bench.workloads.data import mnist_5k

# One xdist worker (`pytest -n 2 --dist loadgroup`, the README's test command): its tests share one module-scoped demo
# run (once, not once per worker).
pytestmark = pytest.mark.xdist_group("demos")


def test_rank2_matrix_factors_exactly_into_40_parameters():
    ex = svd.exact_rank2(seed=0)
    assert (ex.rank, ex.params_full, ex.params_factored) == (2, 100, 40)
    assert ex.max_abs_diff_y < 1e-12


def test_truncation_error_falls_to_zero_at_full_rank_and_ratio_is_closed_form():
    rows = svd.truncation_table(d=32, k=16, seed=0)
    errors = [r["relative_error"] for r in rows]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12 and errors[0] > 0.5
    for r in rows:
        assert r["param_ratio"] == r["rank"] * (32 + 16) / (32 * 16)


def test_svd_command_writes_csv_and_plot(tmp_path):
    assert main(["demo", "svd", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"svd_exact.csv", "svd_truncation.csv", "svd_truncation.png"}


@pytest.fixture(scope="module")
def trained_base():
    data = mnist_5k(0)
    return data, mnist_lora.train_base(data, seed=0, steps=60)


@pytest.mark.parametrize("method", mnist_lora.IMPLEMENTATIONS)
def test_mnist_lora_invariants(trained_base, method):
    data, base = trained_base
    before_state = {k: v.clone() for k, v in base.state_dict().items()}
    r = mnist_lora.finetune(base, data, method, steps=10)
    # Rank 1 on 784→1000→2000→10: (784+1000) + (1000+2000) + (2000+10) = 6,794, as the tutorial reports.
    assert r.lora_params == 6794 and r.base_params == 2_807_010
    assert r.layer_shapes == ["linear1: A (1, 784), B (1000, 1)", "linear2: A (1, 1000), B (2000, 1)",
                              "linear3: A (1, 2000), B (10, 1)"]
    assert r.base_unchanged and r.disabled_exact
    assert r.disabled.wrong_per_digit == r.base.wrong_per_digit
    assert r.weakest_digit == max(range(10), key=lambda d: r.base.wrong_per_digit[d])
    assert r.after.wrong_per_digit != r.base.wrong_per_digit  # the fine-tune did something
    for k, v in base.state_dict().items():  # the demo works on a copy
        assert torch.equal(v, before_state[k])


def test_mnist_lora_implementations_agree_on_the_tutorial_task(trained_base):
    data, base = trained_base
    results = [mnist_lora.finetune(base, data, m, steps=10) for m in mnist_lora.IMPLEMENTATIONS]
    ref = results[0]
    for r in results[1:]:
        assert r.weakest_digit == ref.weakest_digit
        assert abs(r.after.accuracy - ref.after.accuracy) <= 0.01  # same A, B init and data; fp rounding only


def test_mnist_lora_command_writes_its_files(tmp_path, trained_base, monkeypatch):
    # the command's files, not its epoch of base training (the invariants above train the same code): this module's
    # 60-step base stands in for it
    monkeypatch.setattr(mnist_lora, "train_base", lambda data, seed: trained_base[1])
    out = tmp_path / "demo"
    assert main(["demo", "mnist-lora", "--out", str(out)]) == 0
    with open(out / "mnist_lora_summary.csv") as f:
        row = next(csv.DictReader(f))
    assert row["base_unchanged"] == "True" and row["disabled_exact"] == "True" and row["lora_params"] == "6794"
    assert (out / "mnist_lora_per_digit.png").stat().st_size > 10_000


def test_mnist_lora_rejects_other_methods(tmp_path, capsys):
    assert main(["demo", "mnist-lora", "--method", "prefix", "--out", str(tmp_path / "d")]) == 2
    assert "mnist-lora runs with lora-parametrize, lora, hf-lora or all" in capsys.readouterr().err

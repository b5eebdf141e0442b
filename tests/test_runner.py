"""The run loop: failing cells become rows, the run goes on, kills lose nothing, resume completes, determinism."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from peft_bench import results
from peft_bench.cli import main
from peft_bench.cli import run_and_report as run_suite
from peft_bench.config import CellSpec
from peft_bench.config import RunConfig as RunOptions
from peft_bench.engine.cell import run_cell
from peft_bench.engine.launch import run_isolated as _run_isolated
from peft_bench.engine.plan import plan

FAST = dict(train_steps=4, warmup_steps=1, timed_steps=1, latency_seconds=0.02)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fault,status,reason", [
    ("raise", "error", "RuntimeError: injected fault in the training step"),
    ("oom", "oom", "out of memory (MemoryError)"),
    ("cuda-oom", "oom", "OutOfMemoryError: CUDA out of memory"),
])
def test_a_failing_cell_becomes_a_row_with_status_and_one_line_reason(fault, status, reason):
    row = _run_isolated(CellSpec("lora", "mlp-mnist-tiny", inject_fault=fault, **FAST), timeout=120)
    assert row["status"] == status
    assert row["reason"].startswith(reason) and "\n" not in row["reason"]


def test_cell_timeout_becomes_a_timeout_row():
    row = _run_isolated(CellSpec("full", "gpt-neo-tiny", train_steps=10_000), timeout=3)
    assert row["status"] == "timeout" and "--cell-timeout 3s" in row["reason"]


def test_run_goes_on_after_failures_and_exit_code_says_so(tmp_path, monkeypatch):
    from peft_bench.engine import launch as runner

    real = runner.run_isolated

    def flaky(spec, timeout):  # the first cell fails inside its process, the others run normally
        if spec.method == "full":
            spec = __import__("dataclasses").replace(spec, inject_fault="raise")
        return real(spec, timeout)

    monkeypatch.setattr(runner, "run_isolated", flaky)
    opts = RunOptions(suite="smoke", methods=["full", "lora", "prefix"], workloads=["mlp-mnist-tiny"], out=tmp_path,
                      train_steps=4)
    assert run_suite(opts) == 1
    got = {(r["method"], r["status"]) for r in rows(tmp_path / "metrics.csv")}
    assert got == {("full", "error"), ("lora", "ok"), ("prefix", "unsupported")}
    for name in ["summary.md", "environment.json", "peak_memory.png", "step_time.png"]:
        assert (tmp_path / name).is_file()
    assert not (tmp_path / "accuracy_vs_memory.png").exists()  # random weights: accuracy is never plotted


def test_killed_run_keeps_a_valid_csv_and_resume_completes_it(tmp_path, capsys):
    """SIGKILL the whole run after its second row, then --resume: no row lost, none duplicated."""
    cmd = [sys.executable, "-m", "peft_bench.cli", "run", "--suite", "smoke", "--workloads", "mlp-mnist-tiny",
           "--methods", "full,lora,hf-lora", "--steps", "4", "--out", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = tmp_path / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(rows(metrics)) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = rows(metrics)
    assert len(partial) == 2 and all(r["status"] == "ok" for r in partial)
    assert results.read_rows(metrics)  # still a valid peft-bench file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    assert main(cmd[3:] + ["--resume"]) == 0  # resumed in this process (the kill above was a real one)
    assert capsys.readouterr().err.count("already done") == len(partial)
    final = rows(metrics)
    assert sorted(r["method"] for r in final) == sorted(("full", "lora", "hf-lora"))
    assert {r["cell_key"]: r["step_time_s"] for r in final if r["cell_key"] in {p["cell_key"] for p in partial}} == \
        {p["cell_key"]: p["step_time_s"] for p in partial}  # finished rows were kept, not re-measured


@pytest.mark.parametrize("method,workload", [("lora", "gpt-neo-tiny")])  # the MLP's full cell: the same code path
def test_same_seed_same_counts_losses_and_accuracy(method, workload):
    spec = CellSpec(method, workload, **FAST)
    a, b = run_cell(spec), run_cell(spec)
    for key in ("trainable_params", "first_losses", "accuracy", "base_accuracy", "final_loss"):
        assert a[key] == b[key], key
    c = run_cell(CellSpec(method, workload, seed=1, probes="timing", **FAST))  # the training steps are enough here
    assert c["first_losses"] != a["first_losses"]


def test_seed_is_recorded_in_the_environment(tmp_path):
    opts = RunOptions(suite="smoke", methods=["prefix"], workloads=["mlp-mnist-tiny"], out=tmp_path, seeds=(5,))
    assert run_suite(opts, ["run", "--seed", "5"]) == 0
    env = __import__("json").loads((tmp_path / "environment.json").read_text())
    assert env["seeds"] == [5] and env["torch"] and env["peft"] and env["cpu"]


def test_seeds_and_rates_multiply_cells_and_a_pretrained_base_is_scored_once():
    cells = plan(RunOptions(suite="accuracy", methods=["lora", "prefix"], workloads=["minilm-sentiment"]))
    assert [(c.method, c.seed) for c in cells] == [(m, s) for m in ("lora", "prefix") for s in (0, 1, 2)]
    assert len({c.key() for c in cells}) == 6 and all(c.probes == "accuracy" for c in cells)
    assert [c.base_probe for c in cells] == [True] + [False] * 5
    grid = plan(RunOptions(suite="accuracy", methods=["lora", "full"], workloads=["minilm-sentiment"], seeds=(0,),
                           lrs={"lora": (1e-4, 1e-3), "full": (1e-5,)}))
    assert [(c.method, c.lr) for c in grid] == [("lora", 1e-4), ("lora", 1e-3), ("full", 1e-5)]
    tiny = plan(RunOptions(suite="smoke", methods=["lora"], workloads=["gpt-neo-tiny"], seeds=(0, 1, 2),
                           probes="accuracy"))
    assert [c.base_probe for c in tiny] == [True] * 3  # random weights: the base depends on the seed


def test_sigterm_mid_run_keeps_finished_rows_and_leaves_no_process(tmp_path):
    """SIGTERM to `peft-bench run`: the running cell and the fork server end, finished rows and the summary stay,
    one line says how to resume, and no child prints a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "o"
    env = {**os.environ, "PEFT_BENCH_ALLOW_BUSY": "1", "HF_HUB_OFFLINE": "1"}
    # the smoke suite: one repeat (no idle reference, no A/A copy); 300 steps keep the second cell running for
    # seconds after the first cell's row is written, when the signal comes
    p = subprocess.Popen([sys.executable, "-m", "peft_bench.cli", "run", "--suite", "smoke", "--workloads",
                          "mlp-mnist-tiny,gpt-neo-tiny", "--methods", "full,lora", "--steps", "300", "--out", str(out)],
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.csv").exists():  # the first cell has finished
        time.sleep(0.02)
    assert (out / "metrics.csv").exists()
    children = psutil.Process(p.pid).children(recursive=True)
    os.kill(p.pid, signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.cmdline()[:3] for c in alive]
    assert "Traceback" not in err and "resume with: peft-bench run" in err and err.rstrip().endswith("--resume")
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 2 and (out / "summary.md").exists()


def test_save_adapters_reloads_in_plain_peft_with_the_trained_cells_outputs(tmp_path):
    """A hand-written and a peft method: PeftModel.from_pretrained on the same base gives the logits the trained cell
    gave (kept beside the adapter); full keeps the whole model."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    from peft_bench.cli import main
    from peft_bench.config import CellSpec
    from peft_bench.engine.setup import builder, logits, workload_of
    from peft_bench.methods import get_method

    out, kept = tmp_path / "run", tmp_path / "kept"
    assert main(["run", "--workloads", "gpt-neo-tiny", "--methods", "lora,hf-lora,full", "--steps", "4",
                 "--save-adapters", str(kept), "--out", str(out)]) == 0
    assert sorted(p.name for p in (kept / "gpt-neo-tiny").iterdir()) == ["full", "hf-lora", "lora"]
    assert any((kept / "gpt-neo-tiny" / "full").glob("*.safetensors"))
    for method in ("lora", "hf-lora"):
        folder = kept / "gpt-neo-tiny" / method
        row = json.loads((folder / "row.json").read_text())
        assert row["method"] == method and row["status"] == "ok"
        spec = CellSpec(method=method, workload="gpt-neo-tiny", seed=0)
        base = builder(workload_of(spec, get_method(method)), spec)()
        model = PeftModel.from_pretrained(base, str(folder))
        check = load_file(str(folder / "check.safetensors"))
        want = check.pop("logits")
        got = logits(model, check)
        assert torch.allclose(got, want, atol=1e-5), (method, float((got - want).abs().max()))
        with model.disable_adapter():  # the adapter is what reproduces them: the base alone does not
            assert not torch.allclose(logits(model, check), want, atol=1e-5)


def test_the_pytest_benchmark_route_leaves_git_status_unchanged_and_its_params_serialise(tmp_path):
    """`pytest bench --benchmark-only` writes into the untracked runs/<suite>/ by default, never the committed
    results/ (it once overwrote the CI baseline in results/smoke); pytest-benchmark's JSON holds its parameters as
    plain strings (no UNSERIALIZABLE) and the cell's exact counts."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True,
                              text=True, check=True).stdout

    before, out = status(), tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XDIST"))}  # a plain pytest, not a
    env.update(PEFT_BENCH_ALLOW_BUSY="1", HF_HUB_OFFLINE="1")  # worker (pytest-benchmark would disable itself)
    got = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-only", "--suite", "smoke", "-q",
                          "-p", "no:xdist", "-p", "no:cacheprovider", "-k", "mlp-mnist-tiny-lora and not parametrize",
                          f"--benchmark-json={out}"], cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    assert status() == before
    text = out.read_text()
    assert "UNSERIALIZABLE" not in text
    (bench,) = json.loads(text)["benchmarks"]
    assert bench["params"] == {"cell_id": "mlp-mnist-tiny-lora"} and bench["group"] == "mlp-mnist-tiny"
    assert bench["extra_info"]["trainable_params"] == bench["extra_info"]["closed_form_trainable_params"]

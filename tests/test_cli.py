"""Bad input: one line naming the problem and what is allowed, exit 2, nothing written or overwritten."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peft_bench import UserError
from peft_bench.cli import main


def snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else None


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "metrics.csv").write_text("method,workload,status,cell_key\nlora,t5-tiny,ok,k1\n")
    return d


BAD = [
    (["--methods", "nope"], "unknown method 'nope'; choose one of: full, lora"),
    (["--workloads", "nope"], "unknown workload 'nope'; choose one of: mlp-mnist"),
    (["--suite", "huge"], "unknown suite 'huge'; choose one of: smoke, default, accuracy, methods, "
                          "distributed, inference, custom, gpu"),
    (["--device", "tpu"], "unknown device 'tpu'; choose cpu or cuda"),
    (["--rank", "0"], "--rank must be a positive int"),
    (["--rank", "two"], "--rank must be a positive int, got 'two'"),
    (["--alpha", "-1"], "--alpha must be a positive float"),
    (["--dropout", "1.5"], r"dropout must be in [0, 1), got 1.5"),
    (["--virtual-tokens", "0"], "--virtual-tokens must be a positive int"),
    (["--batch-size", "0"], "--batch-size must be a positive int"),
    (["--seq-len", "-4"], "--seq-len must be a positive int"),
    (["--steps", "0"], "--steps must be a positive int"),
    (["--steps", "3"], "--steps must be at least 4: one warm-up step, at least one timed step, then 2 instrumented"),
    (["--alpha", "inf"], "--alpha must be a positive float, got 'inf'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--cell-timeout", "0"], "--cell-timeout must be a positive float"),
    (["--workloads", "mlp-mnist-tiny", "--targets", "linear9"],
     "mlp-mnist-tiny: target pattern 'linear9' matches no Linear/Conv1D module; their names are: linear1"),
    (["--model", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
    (["--dataset", "stanfordnlp/imdb"], "--dataset needs --model"),
    (["--mnist-root", "/nonexistent"], "full MNIST via torchvision: "),
    (["--seeds", "0,0"], "expected distinct non-negative integers like 0,1,2, got '0,0'"),
    (["--seeds", "0,x"], "expected a non-negative integer, got 'x'"),
    (["--seed", "1", "--seeds", "0,1"], "give --seeds or --seed, not both"),
    (["--lr", "2"], "learning rates must lie in (0, 1), got '2'"),
    (["--lr", "fast"], "expected numbers like 1e-4,3e-4, got 'fast'"),
    (["--seed", "-1"], "expected a non-negative integer, got '-1'"),
    (["--cell-timeout", "inf"], "--cell-timeout must be a positive float, got 'inf'"),
    (["--cell-timeout", "nan"], "--cell-timeout must be a positive float, got 'nan'"),
    (["--methods", ""], "expected comma-separated names, got ''"),
    (["--methods", "lora,lora"], "'lora' given more than once in 'lora,lora'"),
    (["--methods", "prefix", "--rank", "4"], "--rank applies to none of the chosen methods (prefix)"),
    (["--model", "x", "--workloads", "gpt-neo-tiny"], "give --model (a hub id or directory) or --workloads, not both"),
    (["--suite", "custom"], "suite 'custom' has no workloads of its own; pass --workloads or --model"),
    (["--workloads", "gpt-neo-tiny", "--batch-size", "100000"],
     "--batch-size 100000 exceeds the 400 training examples of gpt-neo-tiny"),
    (["--workloads", "gpt-neo-tiny", "--nproc", "4096"], "--nproc 4096 on cpu: this machine has"),
    (["--workloads", "gpt-neo-tiny", "--nproc", "1", "--rdzv-endpoint", "nohostport"],
     "--rdzv-endpoint takes HOST:PORT with a port in 1–65535, got 'nohostport'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_run_options(args, message, out, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cwd = tmp_path / "cwd"  # the working directory stays untouched too
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = snapshot(out)
    assert main(["run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peft-bench: error: ")
    assert message in err
    assert snapshot(out) == before
    assert list(cwd.iterdir()) == []


def test_cuda_without_a_gpu_is_refused(out, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    before = snapshot(out)
    assert main(["run", "--device", "cuda", "--out", str(out)]) == 2
    assert "--device cuda: no CUDA GPU is visible" in capsys.readouterr().err
    assert snapshot(out) == before


def test_output_directory_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["run", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["run", "--out", str(f / "sub")]) == 2
    assert "lies under the file" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_unwritable_output_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores permission bits
    assert main(["run", "--out", str(tmp_path / "x")]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_output_path_may_not_climb_out(capsys):
    assert main(["run", "--out", "results/../../elsewhere"]) == 2
    assert "must not contain '..'" in capsys.readouterr().err


def test_malformed_metrics_csv_is_refused_and_kept(tmp_path, capsys):
    d = tmp_path / "out"
    d.mkdir()
    (d / "metrics.csv").write_text("this is,not,ours\n1,2,3\n")
    before = snapshot(d)
    assert main(["run", "--out", str(d), "--workloads", "mlp-mnist-tiny"]) == 2
    err = capsys.readouterr().err
    assert "is not a peft-bench metrics file" in err and "left untouched" in err and "pass --out" in err
    assert snapshot(d) == before
    assert main(["report", str(d)]) == 2  # reading it says the same, without "append"
    err = capsys.readouterr().err
    assert "is not a peft-bench metrics file" in err and "append" not in err


def test_empty_out_is_refused_and_nothing_is_written_in_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--out", "", "--workloads", "mlp-mnist-tiny"]) == 2
    assert "--out must name a directory, got ''" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,message", [
    ("text,stars\na,1\nb,0\n", "needs columns 'text' and 'label'"),
    ("text,label\na,1\nb,3\n", "labels must be 0 (negative) or 1 (positive)"),
])
def test_a_bad_local_dataset_is_refused_before_anything_runs(tmp_path, capsys, content, message):
    csv = tmp_path / "d.csv"
    csv.write_text(content)
    model = tmp_path / "m"
    from peft_bench import models

    models.gpt_neo("tiny").save_pretrained(model)
    assert main(["run", "--model", str(model), "--dataset", str(csv), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_refuses_bad_values_and_keeps_its_outputs(tmp_path, capsys):
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.csv").write_text("method,workload,status,cell_key,step_time_s\nlora,t5-tiny,ok,k1,fast\n")
    (d / "summary.md").write_text("old")
    assert main(["report", str(d)]) == 2
    assert "row 2, column step_time_s: 'fast' is not a number" in capsys.readouterr().err
    assert (d / "summary.md").read_text() == "old" and sorted(p.name for p in d.iterdir()) == ["metrics.csv", "summary.md"]
    (d / "metrics.csv").write_text("method,workload\nlora,t5-tiny\n")
    assert main(["report", str(d)]) == 2
    assert "missing columns cell_key, status" in capsys.readouterr().err


def test_demo_svd_takes_no_method(tmp_path, capsys):
    assert main(["demo", "svd", "--method", "nosuch", "--out", str(tmp_path / "d")]) == 2
    assert "demo svd takes no --method" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_bare_command_prints_usage_with_commands_and_version_and_debug_anywhere(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: peft-bench" in err and all(c in err for c in ("run", "report", "compare", "tune", "demo", "list"))
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("peft-bench 0.")
    with pytest.raises(UserError):  # --debug after the command: accepted, and the error is raised with its traceback
        main(["run", "--methods", "nope", "--debug"])


def test_report_needs_a_metrics_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.csv" in capsys.readouterr().err


def test_unknown_demo(capsys, tmp_path):
    assert main(["demo", "fft", "--out", str(tmp_path / "d")]) == 2
    assert "unknown demo 'fft'; choose one of: svd, mnist-lora" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_real_process_exit_code_and_single_line_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "peft_bench.cli", "run", "--methods", "lora,nope", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("peft-bench: error: unknown method 'nope'; choose one of: full, lora, lora-parametrize, "
                           "hf-lora, prefix, p-tuning, dora, bitfit,")
    assert not (tmp_path / "o").exists()


def test_list_shows_methods_workloads_and_unsupported_reasons(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ["mlp-mnist", "minilm-sentiment", "gpt-neo-125m-arch", "t5-small-arch"]:
        assert f"  {name}" in out
    from peft_bench import list_methods

    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0][2:].strip("`") for r in rows] == list_methods()  # the capability table, a row each
    cells = {r.split(" | ")[0][2:].strip("`"): r.split(" | ")[2:] for r in rows}
    assert cells["bitfit"][:5] == ["✓", "✓", "✓", "✗[3]", "✗[4]"] and "[3] bitfit tunes biases; LlamaForCausalLM" in out
    assert cells["prefix"][:7] == ["✗[1]", "✓", "✓", "✓", "✓", "no", "n extra keys and values in every attention"]
    assert "prefix × mlp-mnist: prefix needs a transformer" in out
    assert "  accuracy: 1 repeat, seeds 0,1,2, accuracy probes only" in out
    assert "smollm2-135m-sentiment     40 steps (3 warm-up, 8 timed)" in out  # its own budget


def test_offline_hub_id_fails_at_once_naming_an_embedded_workload(tmp_path, capsys, monkeypatch):
    import time

    from peft_bench.workloads import data as D

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(D, "hub_reachable", lambda timeout=2.0: False)
    t0 = time.perf_counter()
    assert main(["run", "--model", "EleutherAI/gpt-neo-125m", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face Hub cannot be reached and it is not in the local cache" in err
    assert "'smollm2-135m-sentiment'" in err and time.perf_counter() - t0 < 10 and not (tmp_path / "o").exists()


def test_a_model_needing_remote_code_names_the_flag(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "xcustom", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}')
    assert main(["run", "--model", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "needs its repository's own code to load; pass --trust-remote-code" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_help_lists_every_registered_suite_and_says_what_methods_defaults_to(command, capsys):
    from peft_bench.engine.suites import SUITES

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in SUITES.names())
    assert "(default: all)" not in text and "examples per training step" in text

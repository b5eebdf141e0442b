"""`peft-bench compare` as a gate that can fail everywhere: doctored copies of the committed results (a torchrun cell,
a sweep point, one seed made 1.5× slower), a deleted row, and every kind of bad input each end with the exit status
they must — none of these runs a cell."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from peft_bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def doctor(src: Path, dst: Path, pick: Callable[[dict], bool], factor: float = 1.5, **columns) -> Path:
    """A copy of `src` whose picked cells ran `factor` × slower (rows and repeats alike), other columns set."""
    shutil.copytree(src, dst)
    for name in ("metrics.csv", "repeats.csv"):
        if not (dst / name).exists():
            continue
        df = pd.read_csv(dst / name)
        m = df.cell_key.map(lambda k: pick(json.loads(k)))
        cols = [c for c in ("step_time_s", "step_time_ci_low_s", "step_time_ci_high_s") if c in df]
        df.loc[m, cols] *= factor
        for col, value in columns.items():
            if col in df:
                df.loc[m, col] = value
        df.to_csv(dst / name, index=False)
    return dst


def _compare(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["compare", *map(str, args)])
    got = capsys.readouterr()
    return code, got.out, got.err


@pytest.mark.parametrize("suite, pick, named", [
    ("distributed", lambda k: k.get("parallel") == "ddp" and k.get("nproc") == 2 and k["method"] == "lora"
     and not k.get("replica"), "lora × gpt-neo-125m-arch (ddp × 2): step_time_s"),
    ("scaling/seq_len", lambda k: k["method"] == "lora" and k.get("vary_value") == 256,
     "lora × gpt-neo-125m-arch (seq_len=256): step_time_s"),
    ("accuracy", lambda k: k["method"] == "lora" and k["seed"] == 1 and k["workload"] == "minilm-sentiment",
     "lora × minilm-sentiment (seed 1): step_time_s"),
])
def test_a_slower_torchrun_cell_sweep_point_or_seed_fails_the_gate_by_name(suite, pick, named, tmp_path, capsys):
    new = doctor(RESULTS / suite, tmp_path / "new", pick, interference_repeats=0)
    base = doctor(RESULTS / suite, tmp_path / "base", pick, factor=1.0, interference_repeats=0)
    code, out, err = _compare(capsys, base, new)
    assert code == 1 and f"worse: {named}" in err, err
    assert len(err.strip().splitlines()) == 1  # that cell alone: no other row collapsed into it or moved


def test_a_cell_measured_under_interference_is_not_comparable_for_time_and_never_worse(tmp_path, capsys):
    pick = lambda k: k["method"] == "lora" and k.get("vary_value") == 256  # noqa: E731
    new = doctor(RESULTS / "scaling/seq_len", tmp_path / "new", pick, factor=5.0, interference_repeats=1)
    code, out, err = _compare(capsys, RESULTS / "scaling/seq_len", new)
    line = next(x for x in out.splitlines() if "(seq_len=256) | step_time_s" in x)
    assert code == 0 and "not comparable" in line and "measured under interference" in line


def test_one_repeat_shows_no_interval_and_is_judged_by_the_floor(tmp_path, capsys):
    new = doctor(RESULTS / "smoke", tmp_path / "new", lambda k: k["method"] == "lora", interference_repeats=0)
    base = doctor(RESULTS / "smoke", tmp_path / "base", lambda k: k["method"] == "lora", 1.0, interference_repeats=0)
    code, out, err = _compare(capsys, base, new)
    line = next(x for x in out.splitlines() if x.startswith("| lora × gpt-neo-tiny | step_time_s"))
    assert code == 1 and "| 1.50× |" in line and "one repeat: no interval" in line


@pytest.mark.parametrize("exact_only", [False, True])
def test_a_row_missing_from_new_fails_by_name_unless_allowed(exact_only, tmp_path, capsys):
    new = doctor(RESULTS / "smoke", tmp_path / "new", lambda k: False)
    df = pd.read_csv(new / "metrics.csv")
    gone = (df.method == "hf-lora") & (df.workload == "t5-tiny")
    df[~gone].to_csv(new / "metrics.csv", index=False)
    flags = ["--exact-only"] if exact_only else []
    code, _, err = _compare(capsys, RESULTS / "smoke", new, *flags)
    assert code == 1 and "missing: hf-lora × t5-tiny" in err
    assert _compare(capsys, RESULTS / "smoke", new, *flags, "--allow-missing")[0] == 0


def _header_only(d: Path) -> None:
    text = (d / "metrics.csv").read_text()
    (d / "metrics.csv").write_text(text.splitlines()[0] + "\n")


def _non_numeric(d: Path) -> None:
    df = pd.read_csv(d / "metrics.csv", dtype=str)
    df.loc[df.method == "lora", "step_time_s"] = "fast"
    df.loc[df.method == "lora", "trainable_params"] = "many"
    df.to_csv(d / "metrics.csv", index=False)


def _drop_column(d: Path) -> None:
    df = pd.read_csv(d / "metrics.csv")
    df.drop(columns=["checkpoint_bytes", "step_time_s"]).to_csv(d / "metrics.csv", index=False)


def _duplicate(d: Path) -> None:
    df = pd.read_csv(d / "metrics.csv")
    pd.concat([df, df.iloc[[3]]]).to_csv(d / "metrics.csv", index=False)


def _other_torch(d: Path) -> None:
    env = json.loads((d / "environment.json").read_text())
    env["torch"] = "2.14.0"
    (d / "environment.json").write_text(json.dumps(env))


@pytest.mark.parametrize("exact_only", [False, True])
@pytest.mark.parametrize("spoil, says", [(_header_only, "has no rows"), (_non_numeric, "not a number"),
                                         (_drop_column, "lacks the column"), (_duplicate, "two rows for one cell"),
                                         (_other_torch, "not comparable: torch")])
def test_bad_new_results_exit_2_in_one_line(spoil, says, exact_only, tmp_path, capsys):
    new = doctor(RESULTS / "smoke", tmp_path / "new", lambda k: False)
    spoil(new)
    code, _, err = _compare(capsys, RESULTS / "smoke", new, *(["--exact-only"] if exact_only else []))
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_other_versions_compare_only_when_asked(tmp_path, capsys):
    new = doctor(RESULTS / "smoke", tmp_path / "new", lambda k: False)
    _other_torch(new)
    code, out, _ = _compare(capsys, RESULTS / "smoke", new, "--exact-only", "--across-versions")
    assert code == 0 and "checkpoint_bytes" in out and "other versions: torch" in out


@pytest.mark.parametrize("exact_only", [False, True])
def test_two_runs_with_no_cell_in_common_exit_2(exact_only, capsys):
    code, _, err = _compare(capsys, RESULTS / "smoke", RESULTS / "default", *(["--exact-only"] if exact_only else []))
    assert code == 2 and "no cell in common" in err


def test_ci_s_smoke_gate_passes_on_the_committed_baseline(capsys):
    code, out, _ = _compare(capsys, RESULTS / "smoke", RESULTS / "smoke", "--exact-only")
    assert code == 0 and "missing: 0, worse: 0" in out

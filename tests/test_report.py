"""Reports are rebuilt from metrics.csv alone; the Pareto front is right; writes are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_bench import results
from peft_bench.cli import main
from peft_bench.report.plots import pareto

# The worker of test_repeats.py (`pytest -n 2 --dist loadgroup`, the README's test command): its tests read that
# module's real run with repeats (the session fixture `repeated`), made once.
pytestmark = pytest.mark.xdist_group("repeats")


def test_pareto_front_keeps_only_undominated_points():
    pts = [(100, 0.9), (50, 0.8), (60, 0.7), (200, 0.95), (50, 0.85)]
    assert pareto(pts) == [4, 0, 3]


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old")

    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_write_text(target, "new")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


@pytest.fixture
def run_dir(repeated):
    """The session's real run with repeats (tests/conftest.py), read only."""
    return repeated


def test_report_command_rebuilds_plots_and_summary_from_the_csv(run_dir, capsys, tmp_path):
    import shutil

    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))  # the shared run stays as it was made
    made = ["summary.md", "trainable_params.png", "peak_memory.png", "step_time.png"]
    for name in made:
        (run_dir / name).unlink()
    assert main(["report", str(run_dir)]) == 0
    for name in made:
        assert (run_dir / name).stat().st_size > 0
    assert not (run_dir / "accuracy_vs_memory.png").exists()  # random-weight workloads only: no accuracy plot
    text = (run_dir / "summary.md").read_text()
    assert "Made by `peft-bench run" in text and "## mlp-mnist-tiny" in text and "| lora |" in text
    assert "unsupported: prefix needs a transformer" in text


def test_metrics_csv_loads_with_pandas_and_has_the_promised_columns(run_dir):
    import pandas as pd

    df = pd.read_csv(run_dir / "metrics.csv")
    promised = ["method", "workload", "device", "status", "reason", "trainable_params", "total_params",
                "tensor_peak_bytes", "process_peak_bytes", "step_time_s", "step_time_iqr_s", "forward_s", "backward_s",
                "optimizer_s",
                "samples_per_s", "accuracy", "checkpoint_bytes", "batch_size", "seq_len", "dtype", "options"]
    assert set(promised) <= set(df.columns)
    ok = df[(df.status == "ok") & (df.replica == 0)]  # the A/A copy (replica 1) times steps only
    assert len(ok) == 2 and (ok.trainable_params == ok.closed_form_trainable_params).all()
    assert ok.static_matches_closed_form.all()


def test_every_summary_table_has_one_cell_per_column(run_dir):
    """GitHub renders a table only when header, separator and rows agree in their cell count."""
    lines = (run_dir / "summary.md").read_text().splitlines()
    tables = 0
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and lines[i + 1].startswith("|---"):
            tables += 1
            width = line.count("|")
            rest = lines[i + 1 :]
            rows = rest[: next((k for k, x in enumerate(rest) if not x.startswith("|")), len(rest))]
            assert len(rows) >= 2 and all(x.count("|") == width for x in rows), line
    assert tables >= 3  # the workload's, the paired ratios', the checkpoints'


def test_csv_columns_all_come_from_records_or_the_cell_identity(run_dir):
    import csv

    from peft_bench.measure import records

    header = next(csv.reader(open(run_dir / "metrics.csv")))
    known = set(results.IDENTITY) | set(records.columns()) | set(results.BOOKKEEPING)
    assert set(header) <= known
    assert all(records.definitions()[c] for c in records.columns())


def test_csv_json_and_png_outputs_share_one_mode(tmp_path):
    import os
    import stat

    from peft_bench import results as R

    R.atomic_write_text(tmp_path / "a.csv", "x\n")
    (tmp_path / "b.png").write_bytes(b"png")  # what matplotlib's savefig does: a plain open()
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.csv") == mode(tmp_path / "b.png")


def test_a_cell_clearly_below_its_base_never_stands_on_the_pareto_front():
    """SmolLM2 prefix tuning reached 0.517 (0.460–0.573) against a zero-shot 0.763: lowest memory, yet no trade-off."""
    import pandas as pd

    from peft_bench.report.plots import on_front

    def cell(acc):
        return pd.Series({"accuracy": acc, "test_examples": 300, "loss_probe_drop_ci_low": 0.1, "status": "ok"})

    assert not on_front(cell(0.517), 0.763)
    assert on_front(cell(0.740), 0.763)  # its interval reaches the base: within the noise, may stand
    assert on_front(cell(0.517), 0.465)


def test_plots_give_every_method_its_own_look_for_any_number_of_methods(tmp_path):
    """20+ methods: one (colour, marker) pair each, and the accuracy plot draws them all without running out."""
    import pandas as pd

    from peft_bench.report import plots

    names = [f"m{i}" for i in range(26)]
    looks = plots.style(names)
    assert len(set(looks.values())) == len(names)
    rows = [dict(method=m, workload="w", status="ok", pretrained="true", tensor_peak_bytes=(i + 1) * 2**20,
                 accuracy=0.5 + i / 100, test_examples=200, base_accuracy=0.5, loss_probe_drop_ci_low=0.1,
                 trainable_params=10 * (i + 1), trainable_pct=0.1, weights_bytes=2**20, gradients_bytes=0,
                 optimizer_bytes=0, activations_bytes=0, temporaries_bytes=0, process_peak_bytes=2**21,
                 step_time_s=0.01, forward_s=0.004, backward_s=0.005, optimizer_s=0.001)
            for i, m in enumerate(names)]
    df = pd.DataFrame(rows)
    plots.make_all(df, tmp_path)
    for name in ("accuracy_vs_memory.png", "step_time.png", "peak_memory.png", "trainable_params.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_a_run_where_no_cell_finished_says_so_and_names_only_files_it_wrote(tmp_path, capsys):
    from peft_bench.cli import main

    out = tmp_path / "none"
    main(["run", "--workloads", "mlp-mnist-tiny", "--methods", "prefix", "--out", str(out)])
    text = (out / "summary.md").read_text()
    assert text.startswith("# peft-bench: no cell finished") and "unsupported" in text
    assert not list(out.glob("*.png"))
    err = capsys.readouterr().err
    assert "results: " in err and "plots" not in err.splitlines()[-1]


def test_a_method_keeps_its_colour_and_marker_in_every_plot():
    from peft_bench.methods import list_methods
    from peft_bench.report.plots import style

    alone, among = style(["lora"]), style(["full", "dora", "ia3", "lora"])
    assert alone["lora"] == among["lora"]
    every = style(list_methods())
    assert len(set(every.values())) == len(every)  # no two registered methods look alike
    assert style(["lora @ r=4"])["lora @ r=4"] == alone["lora"]


def test_step_time_is_relative_to_full_only_where_full_ran():
    import pandas as pd

    from peft_bench.report.plots import reference

    assert reference(pd.DataFrame({"method": ["lora"], "step_time_s": [0.5]})) == ("", 1e-3)
    assert reference(pd.DataFrame({"method": ["lora", "full"], "step_time_s": [0.5, 2.0]})) == ("full", 2.0)

"""The run's cost estimate: from the suite's committed repeats, rescaled as cells finish."""

from __future__ import annotations

from peft_bench.config import CellSpec
from peft_bench.engine.estimate import GUESS_S, Cost, duration


def _repeats(root, rows):
    d = root / "mine"
    d.mkdir(parents=True)
    lines = ["method,workload,repeat,status,cell_seconds"] + [",".join(map(str, r)) for r in rows]
    (d / "repeats.csv").write_text("\n".join(lines) + "\n")


def test_first_round_and_later_repeats_are_estimated_apart_and_unknown_cells_get_the_median(tmp_path):
    _repeats(tmp_path, [("full", "w", 0, "ok", 100), ("full", "w", 1, "ok", 40), ("full", "w", 2, "ok", 44),
                        ("lora", "w", 0, "ok", 80), ("lora", "w", 1, "error", 999)])
    cells = [CellSpec(method="full", workload="w"), CellSpec(method="lora", workload="w"),
             CellSpec(method="dora", workload="w")]
    cost = Cost(cells, 2, "mine", tmp_path)
    median = sorted([100, 42, 80])[1]  # of the known (method, workload, first?) medians
    assert cost.total_s == 100 + 42 + 80 + median + median + median
    assert "mine/repeats.csv" in cost.source


def test_what_is_left_is_rescaled_by_the_finished_cells(tmp_path):
    cells = [CellSpec(method=m, workload="w") for m in ("full", "lora", "dora")]
    cost = Cost(cells, 1, "none", tmp_path)
    assert cost.total_s == 3 * GUESS_S and "flat guess" in cost.source
    cost.done(cells[0].key(), 0, 2 * GUESS_S)  # the machine runs at half the speed guessed
    assert cost.left_s() == 2 * (2 * GUESS_S)


def test_durations_read_as_people_say_them():
    assert [duration(x) for x in (30, 600, 7200)] == ["30 s", "10 min", "2.0 h"]

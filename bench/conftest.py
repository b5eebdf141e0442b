"""pytest-benchmark front end to the same engine as `peft-bench run`.

    pytest bench --benchmark-only [--suite smoke|default|gpu] [--device cpu|cuda] [--results-dir DIR]

Each cell is measured in a fresh process (memory, step split, accuracy, ...) and written to
DIR/metrics.csv exactly as `peft-bench run` does; then pytest-benchmark times the training step in-process,
with the cell's non-time metrics in `extra_info` and the benchmark grouped by workload. The timed step is the
CLI's `step_time_s` step: zero_grad, forward, backward, optimizer, one synchronisation; batches are built and
placed on the device before timing. `--benchmark-compare` / `--benchmark-autosave` work as usual.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("peft-bench")
    g.addoption("--suite", default="smoke", help="smoke | default | gpu")
    g.addoption("--device", default="cpu", help="cpu | cuda")
    g.addoption("--results-dir", default=None, help="where metrics.csv and the report go (default runs/<suite>)")
    g.addoption("--cell-timeout", type=float, default=None, help="seconds per cell")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrized by a plain string ("workload-method"), so pytest-benchmark's JSON `params` serialise."""
    if "cell_id" not in metafunc.fixturenames:
        return
    from peft_bench.config import RunConfig
    from peft_bench.engine.plan import plan

    opts = RunConfig(suite=metafunc.config.getoption("--suite"), device=metafunc.config.getoption("--device"),
                      repeats=1)  # pytest-benchmark repeats the step itself; no A/A copy here
    planned = plan(opts)
    if any(c.parallel for c in planned):  # pytest-benchmark times one process's step: it cannot time a torchrun cell
        raise pytest.UsageError(f"suite {opts.suite!r} runs its cells under torchrun; use `peft-bench run --suite "
                                f"{opts.suite}`")
    cells = {f"{c.workload or c.model}-{c.method}": c for c in planned}
    metafunc.config.peft_bench_cells = cells
    metafunc.parametrize("cell_id", list(cells), ids=list(cells))


@pytest.fixture
def cell(cell_id: str, request: pytest.FixtureRequest):
    """The CellSpec behind a cell id."""
    return request.config.peft_bench_cells[cell_id]


class Results:
    """Collects rows like the CLI runner does; the report is rebuilt at the end of the session."""

    def __init__(self, out: Path, opts) -> None:
        from peft_bench import results
        from peft_bench.engine.environment import environment
        from peft_bench.measure import timing
        from peft_bench.results import prepare_out_dir

        self.out = prepare_out_dir(out)
        self.rows = results.read_rows(self.out / "metrics.csv")
        self.peak = timing.matmul_peak_flops(opts.device, "float32" if opts.dtype == "auto" else opts.dtype)
        env = environment(opts, self.peak, ["(pytest bench)", "--suite", opts.suite])
        results.atomic_write_text(self.out / "environment.json", json.dumps(env, indent=2) + "\n")

    def add(self, row: dict) -> None:
        from peft_bench import results

        self.rows = [r for r in self.rows if r.get("cell_key") != row["cell_key"]] + [row]
        results.write_rows(self.out / "metrics.csv", self.rows)


@pytest.fixture(scope="session")
def results(request: pytest.FixtureRequest):
    from peft_bench.config import RunConfig
    from peft_bench.engine.sweep import architecture
    from peft_bench.report.build import build

    suite = request.config.getoption("--suite")
    opts = RunConfig(suite=suite, device=request.config.getoption("--device"))
    out = Path(request.config.getoption("--results-dir") or Path("runs") / suite)
    res = Results(out, opts)
    yield res
    if res.rows:  # the pytest front end, like the CLI: the runner's rows first, then the report reads them
        build(res.out, arch=architecture)


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    import peft
    import torch
    import transformers

    machine_info.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                        torch_threads=torch.get_num_threads(),
                        cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None)

"""Run a suite: each cell in a fresh process, every row written atomically as soon as the cell ends.

A cell that raises, runs out of memory or exceeds `cell_timeout` becomes a row with `status` error / oom /
timeout and a one-line `reason`; the run goes on. `resume` skips cells (and repeats) whose identical spec already
has a finished row. Rows of cells not in this run are kept.

With `repeats` N > 1 the suite runs N rounds, round-robin (A B C, A B C, ...), so that drift on the machine hits
every method alike: the first round runs every probe, later rounds only the training steps up to the last timed
one. Each round's timing is a sample in `repeats.csv`. One cell is also measured as an independent copy (A/A,
`replica` 1) whose ratio to the original is the run's noise floor. A repeat that saw other processes use the CPU
is flagged and, after the rounds, measured once more.

The runner writes rows; it never writes a report. The CLI (or the pytest-benchmark front end) builds the report
from the rows afterwards (`peft_bench.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import results
from ..config import CellSpec, RunConfig
from ..errors import UserError
from ..measure import repeats as rep
from ..results import check_out_dir, prepare_out_dir
from . import launch
from .environment import environment
from .plan import plan, repeats_of, seeds_of, validate_targets
from .torchrun import ELSEWHERE

FAILED = ("error", "oom", "timeout")
FINISHED = ("ok", "unsupported")


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its exit status (0, 1 when a cell failed, 130 when interrupted), where its rows are, how many
    cells failed, and whether there is anything to report."""

    code: int
    out: Path
    failed: int
    reportable: bool


class Run:
    """One run of a suite: its cells, the rows and samples so far, and the files they are written to."""

    def __init__(self, cfg: RunConfig, argv: list[str] | None) -> None:
        # Everything a user can get wrong is checked before the first byte is written.
        self.cfg, self.argv = cfg, argv
        out = check_out_dir(cfg.out or Path("results") / cfg.suite)
        self.rows = results.read_rows(out / "metrics.csv")  # refuses a malformed file, untouched
        self.samples = results.read_samples(out / "repeats.csv")
        if cfg.device == "cuda":
            _require_cuda()
        self.cells = plan(cfg)
        self.n_rounds = repeats_of(cfg)
        validate_targets(self.cells, cfg)
        if not cfg.allow_busy and not os.environ.get("PEFT_BENCH_ALLOW_BUSY"):
            refuse_if_busy(cfg.device)
        self.out = prepare_out_dir(out)
        self.failed = 0
        self._start()

    def _start(self) -> None:
        """The matmul peak per dtype (the MFU denominator) and environment.json."""
        cfg, cells = self.cfg, self.cells
        if cfg.model and not cfg.max_length and cells:
            from ..workloads import LENGTH_PERCENTILE

            print(f"sequence length {cells[0].max_length}: the {LENGTH_PERCENTILE}th percentile of the data's "
                  "formatted examples, capped by the model's positions less the run's virtual tokens (--seq-len to "
                  "choose)", file=sys.stderr)
        peaks = {d: launch.matmul_peak_in_child(cfg.device, d) for d in sorted({c.dtype for c in cells} or {"float32"})}
        self.cells = [dataclasses.replace(c, matmul_peak_flops=peaks[c.dtype]) for c in cells]
        env = environment(cfg, max(peaks.values()), self.argv)
        env.update(dtype="+".join(peaks), repeats=self.n_rounds, seeds=list(seeds_of(cfg)))  # --dtype auto resolved
        results.atomic_write_text(self.out / "environment.json", json.dumps(env, indent=2) + "\n")
        self.done = {r.get("cell_key") for r in self.rows if r.get("status") in FINISHED}
        self.have = {(s["cell_key"], int(s["repeat"])) for s in self.samples if s.get("status") == "ok"}

    def save(self) -> None:
        results.write_samples(self.out / "repeats.csv", self.samples)
        results.write_rows(self.out / "metrics.csv", rep.aggregate(self.rows, self.samples))

    def measure(self, spec: CellSpec, r: int, label: str, remeasure: bool = False) -> dict:
        """One process of a cell: the first round's runs every probe, a later one (or the A/A copy) the timed steps."""
        key = spec.key()
        first = r == 0 and spec.replica == 0 and not remeasure
        t0 = time.perf_counter()
        row = launch.run_isolated(spec if first else dataclasses.replace(spec, probes="timing"), self.cfg.cell_timeout)
        seconds = round(time.perf_counter() - t0, 2)
        if row["status"] == ELSEWHERE:  # another node writes this cell's row
            print(f"{label}: {row['reason']} ({seconds:.1f}s)", file=sys.stderr)
            return row
        row.update(cell_key=key, cell_seconds=seconds, suite=self.cfg.suite)
        if r == 0 and not remeasure:  # the cell's row (the replica's holds its timing only)
            self.rows = [x for x in self.rows if x.get("cell_key") != key] + [row]
            self.failed += row["status"] in FAILED
        if row["status"] == "ok":
            self.samples.append(rep.sample(row, key, r, remeasured=remeasure))
        self.save()
        flag = " [interference: other processes used {:.0f}% of the CPU]".format(float(row["other_cpu_pct"])) \
            if row["status"] == "ok" and row.get("interference_repeats") else ""
        print(f"{label}: {row['status']}{' — ' + row['reason'] if row.get('reason') else ''} ({seconds:.1f}s){flag}",
              file=sys.stderr)
        return row

    def rounds(self) -> None:
        """Every cell, round after round; a cell that did not finish its first round is not repeated."""
        total, n = len(self.cells) * self.n_rounds, self.n_rounds
        for r in range(n):
            for i, spec in enumerate(self.cells, 1):
                key = spec.key()
                label = (f"[{r * len(self.cells) + i}/{total}] {spec.method} × {spec.workload or spec.model}"
                         + (" (A/A copy)" if spec.replica else "") + (f", repeat {r + 1}/{n}" if n > 1 else ""))
                if self.cfg.resume and (key, r) in self.have and (r > 0 or spec.replica or key in self.done):
                    print(f"{label}: already done, skipped", file=sys.stderr)
                    continue
                if r > 0:
                    base = next((x for x in self.rows if x.get("cell_key") == key), None)
                    if base is None or base.get("status") != "ok":
                        continue  # unsupported or failed in the first round: nothing to repeat
                self.measure(spec, r, label)

    def remeasure(self) -> None:
        """A disturbed repeat (other processes, steal, or a slow machine) is measured once more."""
        if self.n_rounds < 2:
            return
        for s, why in rep.to_remeasure(self.samples):
            spec = next((c for c in self.cells if c.key() == s["cell_key"]), None)
            if spec is None:
                continue
            row = self.measure(spec, int(s["repeat"]), f"re-measure {spec.method} × {spec.workload}, repeat "
                                                       f"{int(s['repeat']) + 1} ({why})", remeasure=True)
            if row["status"] == "ok":
                s["used"] = False
        self.save()

    def outcome(self, code: int | None = None) -> Outcome:
        if code is None:
            code = 1 if self.failed else 0
        ok = any(r.get("status") == "ok" for r in self.rows)
        return Outcome(code, self.out, self.failed, reportable=bool(self.rows) and (code != 130 or ok))


def run_suite(cfg: RunConfig, argv: list[str] | None = None) -> Outcome:
    """Run the planned cells, `repeats` rounds. Ctrl-C and SIGTERM end the run like each other: the running cell is
    killed, every finished row kept (exit status 130)."""
    run = Run(cfg, argv)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        run.rounds()
        run.remeasure()
        return run.outcome()
    except KeyboardInterrupt:
        launch.stop_fork_server()
        run.save()
        return run.outcome(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch (torch "
                        f"{torch.__version__}); use --device cpu")


def refuse_if_busy(device: str, seconds: float = 1.0) -> None:
    """Bad input, not a measurement: a machine already busy would make every time in the run incomparable."""
    from ..measure.interference import THRESHOLD_PCT, gpu_other_processes, machine_load

    load = machine_load(seconds)
    if load.busy:
        raise UserError(f"the machine is busy: other processes used {load.other_cpu_pct:.0f}% of its CPU capacity "
                        f"(steal {load.steal_pct:.0f}%, load average {load.load_avg_1m:.2f}) over {seconds:g} s, above "
                        f"{THRESHOLD_PCT:g}%; times would not be comparable — wait, or pass --allow-busy (every row "
                        "records the interference it saw)")
    if device == "cuda" and gpu_other_processes():
        raise UserError("the GPU is busy: other processes hold memory on it; pass --allow-busy to measure anyway")


_CONTEXT = None

"""Run a suite: each cell in a fresh process, every row written atomically as soon as the cell ends.

A cell that raises, runs out of memory or exceeds `cell_timeout` becomes a row with `status` error / oom /
timeout and a one-line `reason`; the run goes on. `resume` skips cells (and repeats) whose identical spec already
has a finished row. Rows of cells not in this run are kept.

With `repeats` N > 1 the suite runs N rounds, round-robin (A B C, A B C, ...), so that drift on the machine hits
every method alike: the first round runs every probe, later rounds only the training steps up to the last timed
one. Each round's timing is a sample in `repeats.csv`. One cell is also measured as an independent copy (A/A,
`replica` 1) whose ratio to the original is the run's noise floor. After the minimum rounds, more are added for the cells
whose interval is still wider than `--target-ci` (each with the cells it is paired with), until every one is met or
the time budget is spent; a repeat that saw other processes use the CPU during its timed steps, or a slow machine, is
measured once more *as a pair* — with its references, in a new round — and the disturbed one set aside.

Each run has an id (environment.json, every repeat and row). `--resume` continues that run; a new run into a used
`--out` is refused unless `--overwrite`, so the repeats of two runs never mix.

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
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import results
from ..config import CellSpec, RunConfig
from ..errors import UserError
from ..measure import repeats as rep
from ..results import check_out_dir, prepare_out_dir
from . import launch
from .environment import environment
from .estimate import Cost, duration
from .plan import plan, repeats_of, seeds_of, validate_data, validate_targets
from .suites import get_suite
from .torchrun import ELSEWHERE

FAILED = ("error", "oom", "timeout")
FINISHED = ("ok", "unsupported")
MAX_ROUNDS = 12  # no cell gets more processes than this, whatever the target


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its exit status (0, 1 when a cell failed, 130 when interrupted), where its rows are, how many
    cells failed, and whether there is anything to report."""

    code: int
    out: Path
    failed: int
    reportable: bool


def kept_where(cells: list[CellSpec], root: Path) -> list[CellSpec]:
    """--save-adapters: each cell's folder, ROOT/<workload>/<method>/, and where several cells share that (seeds,
    rates, sweep values, process counts) a subfolder naming what differs."""
    def where(c: CellSpec) -> Path:
        return root / (c.workload or f"hub-{c.model}").replace("/", "-") / c.method

    shared = [where(c) for c in cells if not c.replica]
    out = []
    for c in cells:
        if c.replica:
            out.append(c)
            continue
        d = where(c)
        if shared.count(d) > 1:
            d = d / "--".join([f"seed{c.seed}", f"lr{c.lr:g}"] + ([f"{c.vary}{c.vary_value:g}"] if c.vary else [])
                              + ([f"{c.parallel}{c.nproc}"] if c.parallel else []))
        out.append(dataclasses.replace(c, keep_adapter=str(d)))
    return out


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{'' if n == 1 else suffix}"


def _name(spec: CellSpec) -> str:
    """How a progress line names a cell: method × workload, and a sweep's value."""
    value = f" ({spec.vary}={spec.vary_value:g})" if spec.vary and spec.vary_value is not None else ""
    n = spec.nproc * spec.nnodes
    ranks = f" ({spec.parallel}, {n} process{'es' * (n != 1)})" if spec.parallel else ""
    return f"{spec.method} × {spec.workload or spec.model}{value}{ranks}"


class Run:
    """One run of a suite: its cells, the rows and samples so far, and the files they are written to."""

    def __init__(self, cfg: RunConfig, argv: list[str] | None) -> None:
        # Everything a user can get wrong is checked before the first byte is written.
        self.cfg, self.argv = cfg, argv
        out = check_out_dir(cfg.out or Path("runs") / cfg.suite)
        self.rows = results.read_rows(out / "metrics.csv")  # refuses a malformed file, untouched
        self.samples = results.read_samples(out / "repeats.csv")
        self.serving = results.read_serving(out / "serving.csv")
        if cfg.device == "cuda":
            _require_cuda()
        self.cells = plan(cfg)
        self.n_rounds = repeats_of(cfg)
        validate_targets(self.cells, cfg)
        validate_data(self.cells, cfg)
        self.before = _old_environment(out)
        self.run_id = _run_id(cfg, out, bool(self.rows or self.samples), self.before)
        if cfg.overwrite:
            self.rows, self.samples, self.serving = [], [], []
        if not cfg.allow_busy and not os.environ.get("PEFT_BENCH_ALLOW_BUSY"):
            refuse_if_busy(cfg.device)
        self.out = prepare_out_dir(out)
        if cfg.save_adapters:
            self.cells = kept_where(self.cells, Path(cfg.save_adapters))
        self.failed, self.t0 = 0, time.monotonic()
        budget = cfg.time_budget if cfg.time_budget is not None else get_suite(cfg.suite).time_budget_s
        self.budget = budget if budget is not None else 0.0
        self.cost = Cost(self.cells, self.n_rounds, cfg.suite)
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
        reps = 15 if self.n_rounds > 1 else 5  # with one repeat nothing acts on the canary: a coarse reading
        self.cells = [dataclasses.replace(c, matmul_peak_flops=peaks[c.dtype], canary_reps=reps) for c in cells]
        env = environment(cfg, max(peaks.values()), self.argv)
        self.reference = self.before.get("canary_idle_flops_per_s") if cfg.resume else None
        if self.n_rounds > 1 and not self.reference:  # the whole run's speed is judged where repeats are
            ranks = [c.threads_per_rank for c in self.cells if c.parallel and c.threads_per_rank]
            self.reference = launch.canary_in_child(cfg.device, min(ranks) if ranks else None)
        env.update(dtype="+".join(peaks), repeats=self.n_rounds, seeds=list(seeds_of(cfg)),  # --dtype auto resolved
                   run_id=self.run_id, canary_idle_flops_per_s=self.reference, target_ci_pct=cfg.target_ci,
                   time_budget_s=self.budget or None, lr_sources=_lr_sources(self.cells))
        if cfg.resume and self.before:  # the runs before this one, whose rows it keeps
            env["resumed_runs"] = self.before.get("resumed_runs", []) + [
                {k: self.before.get(k) for k in ("git_commit", "date_utc", "command")}]
        results.atomic_write_text(self.out / "environment.json", json.dumps(env, indent=2) + "\n")
        self.done = {r.get("cell_key") for r in self.rows if r.get("status") in FINISHED}
        self.have = {(s["cell_key"], int(s["repeat"])) for s in self.samples if s.get("status") == "ok"}

    def save(self) -> None:
        results.write_samples(self.out / "repeats.csv", self.samples)
        if self.serving:
            results.write_serving(self.out / "serving.csv", self.serving)
        results.write_rows(self.out / "metrics.csv", rep.aggregate(self.rows, self.samples, self.run_id, self.reference))

    def measure(self, spec: CellSpec, r: int, label: str, remeasure: bool = False) -> dict:
        """One process of a cell: the first round's runs every probe, a later one (or the A/A copy) the timed steps."""
        key = spec.key()
        first = r == 0 and spec.replica == 0 and not remeasure
        t0 = time.perf_counter()
        from .cell import REPEAT_MODE

        again = REPEAT_MODE.get(spec.probes, "timing")
        row = launch.run_isolated(spec if first else dataclasses.replace(spec, probes=again), self.cfg.cell_timeout)
        serving = row.pop("serving_rows", None)
        seconds = round(time.perf_counter() - t0, 2)
        if row["status"] == ELSEWHERE:  # another node writes this cell's row
            print(f"{label}: {row['reason']} ({seconds:.1f}s)", file=sys.stderr)
            return row
        row.update(cell_key=key, cell_seconds=seconds, suite=self.cfg.suite, run_id=self.run_id)
        if r == 0 and not remeasure:  # the cell's row (the replica's holds its timing only)
            self.rows = [x for x in self.rows if x.get("cell_key") != key] + [row]
            self.failed += row["status"] in FAILED
        if row["status"] == "ok":
            self.samples.append(rep.sample(row, key, r, remeasured=remeasure, run_id=self.run_id))
        self._beside(spec, row, r, first, serving)
        self.save()
        self.cost.done(key, r, seconds)
        flag = " [interference: other processes used {:.0f}% of the CPU during the timed steps]".format(
            float(row["other_cpu_pct"])) if row["status"] == "ok" and row.get("interference_repeats") else ""
        print(f"{label}: {row['status']}{' — ' + row['reason'] if row.get('reason') else ''} ({seconds:.1f}s){flag}"
              f"; about {duration(self.cost.left_s())} left", file=sys.stderr)
        return row

    def _beside(self, spec: CellSpec, row: dict, r: int, first: bool, serving: list[dict] | None) -> None:
        """What a process writes beside its row: a kept adapter's row.json, the serving measurements."""
        if row["status"] == "ok" and first and spec.keep_adapter and Path(spec.keep_adapter).is_dir():
            results.atomic_write_text(Path(spec.keep_adapter) / "row.json", json.dumps(row, indent=1, default=str))
        if serving:
            self.serving += [{"run_id": self.run_id, "cell_key": row["cell_key"], "method": spec.method,
                              "workload": spec.workload or spec.model, "repeat": r, "used": True, **x}
                             for x in serving]

    def rounds(self) -> None:
        """Every cell, round after round; a cell that did not finish its first round is not repeated."""
        total, n = len(self.cells) * self.n_rounds, self.n_rounds
        budget = f"; then rounds until ±{self.cfg.target_ci:g} %, within {duration(self.budget)} in all" \
            if self.budget and n > 1 else ""
        print(f"{len(self.cells)} cells × {_plural(n, 'repeat')} = {_plural(total, 'process', 'es')}: about "
              f"{duration(self.cost.total_s)} ({self.cost.source}){budget}", file=sys.stderr)
        for r in range(n):
            for i, spec in enumerate(self.cells, 1):
                key = spec.key()
                label = (f"[{r * len(self.cells) + i}/{total}] {_name(spec)}"
                         + (" (A/A copy)" if spec.replica else "") + (f", repeat {r + 1}/{n}" if n > 1 else ""))
                if self.cfg.resume and (key, r) in self.have and (r > 0 or spec.replica or key in self.done):
                    print(f"{label}: already done, skipped", file=sys.stderr)
                    continue
                if r > 0:
                    base = next((x for x in self.rows if x.get("cell_key") == key), None)
                    if base is None or base.get("status") != "ok":
                        continue  # unsupported or failed in the first round: nothing to repeat
                self.measure(spec, r, label)

    def more(self) -> None:
        """Rounds after the minimum: the disturbed repeats of the minimum rounds (each once, set aside when its
        re-measurement succeeds) and, with a time budget, the cells still wider than the target — each with its
        references — until none is left or time is up."""
        if self.n_rounds < 2:
            return self._stopped("one repeat")
        r, why = self._next_round(), "target met"
        while True:
            mine = [s for s in rep.of_run(self.samples, self.run_id) if int(s["repeat"]) < self.n_rounds]
            redo = {s["cell_key"]: s for s, _ in rep.to_remeasure(mine)}
            wide = self._too_wide() if self.budget else []
            if not redo and not wide:
                break
            keys = [c.key() for c in self.cells]
            todo = set(redo) | set(wide)
            todo |= {ref for k in todo for ref in rep.references(k, keys)}
            if r >= MAX_ROUNDS:
                why = f"max rounds ({MAX_ROUNDS})"
                break
            if self.budget and not self._affordable(todo):
                why = "time budget spent"
                break
            self._round(r, todo, redo)
            r += 1
        self._stopped(why if self.budget else "no time budget")

    def _round(self, r: int, todo: set[str], redo: dict[str, dict]) -> None:
        for spec in (c for c in self.cells if c.key() in todo):
            why = f" (re-measure: repeat {int(redo[spec.key()]['repeat']) + 1} disturbed)" if spec.key() in redo else ""
            label = f"[round {r + 1}] {_name(spec)}" + \
                (" (A/A copy)" if spec.replica else "") + why
            row = self.measure(spec, r, label, remeasure=spec.key() in redo)
            if row["status"] == "ok" and spec.key() in redo:
                redo[spec.key()]["used"] = False
                self._set_aside_serving(spec.key(), int(redo[spec.key()]["repeat"]))
        self.save()

    def _set_aside_serving(self, key: str, repeat: int) -> None:
        """The serving rows of a disturbed repeat, measured again: no longer counted (as its sample)."""
        for x in self.serving:
            if x["cell_key"] == key and int(x["repeat"]) == repeat and str(x.get("run_id")) == self.run_id:
                x["used"] = False

    def _next_round(self) -> int:
        mine = rep.of_run(self.samples, self.run_id)
        return max([int(s["repeat"]) + 1 for s in mine] + [self.n_rounds])

    def _met(self) -> dict[str, bool]:
        """Each ok cell: is its judged interval (`ci_half_width_pct`) within the target? (None is not.)"""
        rows = rep.aggregate(self.rows, self.samples, self.run_id, self.reference)
        return {r["cell_key"]: rep.number(r.get("ci_half_width_pct")) <= self.cfg.target_ci
                for r in rows if r.get("status") == "ok"}

    def _too_wide(self) -> list[str]:
        return [k for k, met in self._met().items() if not met]

    def _affordable(self, todo: set[str]) -> bool:
        """Time left for one more process of each cell in `todo` (each costing what its last one did)."""
        last = {s["cell_key"]: rep.number(s.get("cell_seconds")) for s in rep.of_run(self.samples, self.run_id)}
        cost = sum(last.get(k, 0.0) for k in todo)
        return time.monotonic() - self.t0 + cost <= self.budget

    def _stopped(self, why: str) -> None:
        met = self._met()
        for row in self.rows:
            if row.get("status") == "ok":
                row["repeats_stopped"] = "target met" if met.get(row["cell_key"]) and why != "one repeat" else why
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
        run.more()
        return run.outcome()
    except KeyboardInterrupt:
        launch.stop_fork_server()
        run.save()
        return run.outcome(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _lr_sources(cells) -> dict[str, dict[str, str]]:
    """workload → method → where its rate came from (`suites.lr_source`), for the report to say."""
    from ..workloads import get_workload
    from .suites import lr_source

    out: dict[str, dict[str, str]] = {}
    for c in (c for c in cells if c.workload and not c.replica):
        out.setdefault(c.workload, {})[c.method] = lr_source(c.method, c.workload, get_workload(c.workload).family,
                                                             c.lr)
    return out


def _old_environment(out: Path) -> dict:
    try:
        return json.loads((out / "environment.json").read_text())
    except (OSError, ValueError):
        return {}


def _run_id(cfg: RunConfig, out: Path, used: bool, before: dict) -> str:
    """The id of this run: a new one, or with --resume the id of the run in `out` (a used `out` needs one of
    --resume and --overwrite: the repeats of two runs must never mix)."""
    if cfg.resume and cfg.overwrite:
        raise UserError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    if used and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already holds a run ({before.get('command', 'its metrics.csv')!s}); pass --resume to "
                        "continue it, --overwrite to replace it, or --out with a new directory")
    if cfg.resume and used:
        return str(before.get("run_id") or "")  # "": a folder from before run ids
    return uuid.uuid4().hex[:12]


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

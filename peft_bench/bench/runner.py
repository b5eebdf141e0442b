"""Run a suite: each cell in a fresh process, every row written atomically as soon as the cell ends.

A cell that raises, runs out of memory or exceeds `cell_timeout` becomes a row with `status` error / oom /
timeout and a one-line `reason`; the run goes on. `resume` skips cells (and repeats) whose identical spec already
has a finished row. Rows of cells not in this run are kept.

With `repeats` N > 1 the suite runs N rounds, round-robin (A B C, A B C, ...), so that drift on the machine hits
every method alike: the first round runs every probe, later rounds only the training steps up to the last timed
one. Each round's timing is a sample in `repeats.csv`. One cell is also measured as an independent copy (A/A,
`replica` 1) whose ratio to the original is the run's noise floor. A repeat that saw other processes use the CPU
is flagged and, after the rounds, measured once more.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..measure import timing
from ..methods import get_method, method_class
from ..workloads import get_workload
from . import repeats as rep
from . import report
from .cell import INSTRUMENTED_STEPS, CellSpec
from .suites import budget, get_suite, learning_rate

FAILED = ("error", "oom", "timeout")
FINISHED = ("ok", "unsupported")


@dataclass
class RunOptions:
    suite: str = "smoke"
    methods: list[str] | None = None
    workloads: list[str] | None = None
    device: str = "cpu"
    out: Path | None = None
    resume: bool = False
    cell_timeout: float | None = None
    seeds: tuple[int, ...] | None = None  # None: the suite's; each cell runs once per seed
    lrs: tuple[float, ...] | dict | None = None  # None: the suite's rate; else each cell per rate (or per-method grids)
    split: str = "test"  # "validation": peft-bench tune
    probes: str | None = None  # None: the suite's; "accuracy": no timing/memory/checkpoint probes (tune)
    method_options: dict | None = None
    batch_size: int | None = None
    max_length: int | None = None
    train_steps: int | None = None
    dtype: str = "auto"  # auto: the workload's own (a checkpoint's dtype, float32 for embedded workloads)
    model: str | None = None
    dataset: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    mnist_root: str | None = None
    repeats: int | None = None  # None: the suite's default
    allow_busy: bool = False
    vary: tuple[str, tuple[int, ...]] | None = None  # a sweep: (parameter, values); each cell once per value
    nproc: tuple[int, ...] | None = None  # under torchrun: each cell once per process count (per node)
    parallel: tuple[str, ...] | None = None  # ddp | fsdp: each cell once per mode (default ddp with --nproc)
    nnodes: int = 1
    rdzv_endpoint: str = ""
    gradient_checkpointing: bool = False



def plan(opts: RunOptions) -> list[CellSpec]:
    """The cells to run, validated before anything is written."""
    suite = get_suite(opts.suite)
    if opts.dataset and not opts.model:
        raise UserError("--dataset needs --model (a hub id or local directory); embedded workloads bring their data")
    if opts.model and opts.workloads:
        raise UserError("give --model (a hub id or directory) or --workloads, not both")
    if not opts.model and not opts.workloads and not suite.workloads:
        raise UserError(f"suite {suite.name!r} has no workloads of its own; pass --workloads or --model")
    methods = opts.methods or list(suite.methods)
    for m in methods:
        method_class(m)
    _check_options_apply(methods, opts.method_options or {})
    if opts.model:
        workloads = [None]
    else:
        workloads = opts.workloads or list(suite.workloads)
        for w in workloads:
            get_workload(w)
    if opts.mnist_root:  # torchvision missing or no MNIST files there: refused before anything runs
        from ..workloads.data import mnist_torchvision

        mnist_torchvision(opts.mnist_root)
    if opts.dataset and Path(opts.dataset).suffix in (".csv", ".json", ".jsonl"):  # columns and labels checked now
        from ..workloads.data import hub_dataset

        hub_dataset(opts.dataset, 0)
    lengths = sequence_lengths(opts, methods, workloads)
    if opts.train_steps is not None and opts.train_steps < INSTRUMENTED_STEPS + 2:
        raise UserError(f"--steps must be at least {INSTRUMENTED_STEPS + 2}: one warm-up step, at least one timed "
                        f"step, then {INSTRUMENTED_STEPS} instrumented steps (FLOP count, tensor-memory tracker), got "
                        f"{opts.train_steps}")
    seeds = seeds_of(opts)
    grids = opts.lrs if isinstance(opts.lrs, dict) else {m: opts.lrs for m in methods} if opts.lrs else {}
    for grid in grids.values():
        if not grid or any(not (0 < x < 1) for x in grid):
            raise UserError(f"--lr takes learning rates in (0, 1), e.g. 1e-4,3e-4; got {','.join(map(str, grid))}")
    cells = []
    for w, m, seed in itertools.product(workloads, methods, seeds):
        b = budget(suite, w or "*")
        family = get_workload(w).family if w else "transformer"
        steps = opts.train_steps or b.train_steps
        for lr in grids.get(m) or (None,):
            cells.append(CellSpec(
                method=m, workload=w or "", device=opts.device, seed=seed, split=opts.split,
                probes=opts.probes or suite.probes,
                method_options=_options_for(m, opts.method_options or {}), batch_size=opts.batch_size,
                max_length=lengths[w][0], dtype=lengths[w][1], lr=lr or learning_rate(m, w or "", family),
                warmup_steps=(wu := max(1, min(b.warmup_steps, steps - INSTRUMENTED_STEPS - 1))),
                timed_steps=max(1, min(b.timed_steps, steps - wu - INSTRUMENTED_STEPS)),
                train_steps=steps, latency_seconds=b.latency_seconds, test_examples=b.test_examples, model=opts.model,
                dataset=opts.dataset,
                trust_remote_code=opts.trust_remote_code, allow_pickle=opts.allow_pickle, mnist_root=opts.mnist_root,
                gradient_checkpointing=opts.gradient_checkpointing))
    if opts.vary:
        cells = expand(cells, opts)
    if opts.nproc or opts.parallel or opts.nnodes > 1 or opts.rdzv_endpoint or suite.nproc:
        cells = distribute(cells, dataclasses.replace(opts, nproc=opts.nproc or suite.nproc or None,
                                                      parallel=opts.parallel or suite.parallel or None))
    for c in cells:  # options are validated here, before the first cell runs
        get_method(c.method, **c.method_options)
    cells = _base_once(cells)
    if repeats_of(opts) > 1 and cells:
        cells.append(dataclasses.replace(_aa_cell(cells, suite), replica=1))
    return cells


def expand(cells: list[CellSpec], opts: RunOptions) -> list[CellSpec]:
    """A sweep's cells: each planned cell once per value of the varied parameter, each checked before anything runs
    (a length beyond the positions, an unscalable workload or width: one line). A method without the varied option
    runs once (vary_value empty): the reference its curve is compared with."""
    from .cell import virtual_tokens
    from .sweep import VARY

    name, values = opts.vary
    where, field_ = VARY[name]
    takers = [m for m in {c.method for c in cells} if field_ in {f.name for f in dataclasses.fields(
        method_class(m).Options)}]
    if where == "option" and not takers:
        raise UserError(f"--vary {name} applies to none of the chosen methods")
    out = []
    for c in cells:
        if where == "option" and c.method not in takers:
            out.append(dataclasses.replace(c, vary=name))
            continue
        for v in values:
            if where == "option":
                out.append(dataclasses.replace(c, method_options={**c.method_options, field_: v}, vary=name,
                                               vary_value=v))
            else:
                out.append(dataclasses.replace(c, **{field_: v}, vary=name, vary_value=v))
    for c in out:  # sizes that cannot run are refused now
        w = get_workload(c.workload)
        if c.width or c.depth:
            w = w.scaled(c.width, c.depth)
        if name == "seq_len" and w.family == "mlp":
            raise UserError(f"--vary seq_len: {w.name} takes images, not sequences")
        w.with_options(max_length=c.max_length).sized(virtual_tokens(get_method(c.method, **c.method_options)))
    return out


def distribute(cells: list[CellSpec], opts: RunOptions) -> list[CellSpec]:
    """Each planned cell once per parallel mode and process count, run under torchrun; checked before anything runs.
    Every rank gets the same number of threads in the whole run (this machine's cores ÷ the largest --nproc), so a
    one-process cell is the scaling reference of the same cell on N processes."""
    from .distributed import MODES, threads_per_rank

    if not opts.nproc:
        raise UserError("--parallel, --nnodes and --rdzv-endpoint need --nproc (processes per node), e.g. --nproc 2")
    if any(n < 1 for n in opts.nproc):
        raise UserError(f"--nproc takes positive integers, got {','.join(map(str, opts.nproc))}")
    modes = opts.parallel or ("ddp",)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"--parallel takes {' or '.join(MODES)} (comma-separated for both), got {','.join(bad)}")
    if opts.nnodes < 1:
        raise UserError(f"--nnodes must be at least 1, got {opts.nnodes}")
    if opts.nnodes > 1 and not opts.rdzv_endpoint:
        raise UserError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the rendezvous every node joins)")
    if opts.device == "cuda":
        import torch

        if max(opts.nproc) > torch.cuda.device_count():
            raise UserError(f"--nproc {max(opts.nproc)} on cuda: this machine has {torch.cuda.device_count()} GPUs "
                            "(one rank per GPU)")
    threads = threads_per_rank(max(opts.nproc))
    out = []
    for c in cells:
        for mode in modes:
            for n in sorted(set(opts.nproc)):
                out.append(dataclasses.replace(c, parallel=mode, nproc=n, nnodes=opts.nnodes,
                                               rdzv_endpoint=opts.rdzv_endpoint, threads_per_rank=threads,
                                               base_probe=False))
    return out


def sequence_lengths(opts: RunOptions, methods: list[str], workloads: list[str | None]) -> dict:
    """One sequence length per workload for every method of the run, decided before anything runs: --seq-len or the
    workload's own, checked against the model's positions; for a model brought with --model, from the data
    (`Workload.sized`). Every method sees the same length, so the positions the run's prompt methods need for their
    virtual tokens are left free for all. None: the workload's own length (the cell keeps it). With it, the element
    type: --dtype, or for `auto` the workload's (a checkpoint's own)."""
    from ..workloads import resolve
    from .cell import virtual_tokens

    reserve = max(virtual_tokens(get_method(m, **_options_for(m, opts.method_options or {}))) for m in methods)
    out = {}
    for name in workloads:  # a hub id or path that cannot be loaded fails here, in one line
        w = resolve(name, opts.model, opts.dataset, trust_remote_code=opts.trust_remote_code,
                    allow_pickle=opts.allow_pickle).with_options(max_length=opts.max_length)
        sized = w.sized(reserve)
        if opts.dataset:  # a user's data: at least one full batch to train on, something to score
            d = w.data(0)
            batch = opts.batch_size or w.batch_size
            if min(len(d.train), len(d.test)) < batch:
                raise UserError(f"dataset {opts.dataset!r} gives {len(d.train)} training and {len(d.test)} test "
                                f"examples (80/20); each needs at least one batch of {batch} (--batch-size)")
        out[name] = (opts.max_length or (sized.max_length if w.max_length is None else None),
                     w.dtype if opts.dtype == "auto" else opts.dtype)
    return out


def _base_once(cells: list[CellSpec]) -> list[CellSpec]:
    """The base model's accuracy is scored once per pretrained workload (per seed on random weights): it depends on
    neither the method nor, for pretrained weights, the seed."""
    seen = set()
    out = []
    for c in cells:
        if not c.workload:
            out.append(c)
            continue
        key = (c.workload, None if get_workload(c.workload).pretrained else c.seed)
        out.append(dataclasses.replace(c, base_probe=key not in seen))
        seen.add(key)
    return out


def seeds_of(opts: RunOptions) -> tuple[int, ...]:
    seeds = opts.seeds if opts.seeds is not None else get_suite(opts.suite).seeds
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"--seeds takes distinct non-negative integers, e.g. 0,1,2; got {','.join(map(str, seeds))}")
    return tuple(seeds)


def repeats_of(opts: RunOptions) -> int:
    n = opts.repeats if opts.repeats is not None else get_suite(opts.suite).repeats
    if n < 1:
        raise UserError(f"--repeats must be at least 1, got {n}")
    return n


def _aa_cell(cells: list[CellSpec], suite) -> CellSpec:
    """The cell measured twice for the noise floor: the suite's choice when planned, else the first supported."""
    matches = [c for c in cells if (c.method, c.workload) == suite.aa]
    if matches:  # under torchrun, the most processes: where ranks contend most
        return max(matches, key=lambda c: c.nproc)
    for c in cells:
        if not c.workload or not method_class(c.method).unsupported_reason(get_workload(c.workload).family):
            return c
    return cells[0]


FLAGS = {"r": "--rank", "alpha": "--alpha", "dropout": "--dropout", "num_virtual_tokens": "--virtual-tokens",
         "targets": "--targets"}


def _check_options_apply(methods: list[str], options: dict) -> None:
    """An option that none of the chosen methods has is a mistake (e.g. --rank with --methods prefix)."""
    for key in options:
        takers = [m for m in methods if key in {f.name for f in dataclasses.fields(method_class(m).Options)}]
        if not takers:
            raise UserError(f"{FLAGS.get(key, key)} applies to none of the chosen methods ({', '.join(methods)})")


def _options_for(method: str, options: dict) -> dict:
    """Keep only the options the method has (e.g. --rank goes to LoRA methods, --virtual-tokens to prompts)."""
    fields = {f.name for f in dataclasses.fields(method_class(method).Options)}
    return {k: v for k, v in options.items() if k in fields}


def run_suite(opts: RunOptions, argv: list[str] | None = None) -> int:
    """Run the planned cells, `repeats` rounds; return 1 if any cell failed, else 0."""
    # Everything a user can get wrong is checked before the first byte is written.
    out = check_out_dir(opts.out or Path("results") / opts.suite)
    rows = report.read_rows(out / "metrics.csv")  # refuses a malformed file, untouched
    samples = report.read_samples(out / "repeats.csv")
    if opts.device == "cuda":
        _require_cuda()
    cells = plan(opts)
    n_rounds = repeats_of(opts)
    validate_targets(cells, opts)
    if not opts.allow_busy and not os.environ.get("PEFT_BENCH_ALLOW_BUSY"):
        refuse_if_busy(opts.device)
    out = prepare_out_dir(out)
    if opts.model and not opts.max_length and cells:
        from ..workloads import LENGTH_PERCENTILE

        print(f"sequence length {cells[0].max_length}: the {LENGTH_PERCENTILE}th percentile of the data's formatted "
              "examples, capped by the model's positions less the run's virtual tokens (--seq-len to choose)",
              file=sys.stderr)
    peaks = {d: matmul_peak_in_child(opts.device, d) for d in sorted({c.dtype for c in cells} or {"float32"})}
    cells = [dataclasses.replace(c, matmul_peak_flops=peaks[c.dtype]) for c in cells]
    env = report.environment(opts, max(peaks.values()), argv)
    env["dtype"] = "+".join(peaks)  # what the cells run in (--dtype auto resolved)
    env["repeats"] = n_rounds
    env["seeds"] = list(seeds_of(opts))
    report.atomic_write_text(out / "environment.json", json.dumps(env, indent=2) + "\n")
    done = {r.get("cell_key"): r for r in rows if r.get("status") in FINISHED}
    have = {(s["cell_key"], int(s["repeat"])) for s in samples if s.get("status") == "ok"}
    failed = 0

    def save() -> None:
        report.write_samples(out / "repeats.csv", samples)
        report.write_rows(out / "metrics.csv", rep.aggregate(rows, samples))

    def measure(spec: CellSpec, r: int, label: str, remeasure: bool = False) -> dict:
        nonlocal rows, failed
        key = spec.key()
        first = r == 0 and spec.replica == 0 and not remeasure
        t0 = time.perf_counter()
        row = _run_isolated(spec if first else dataclasses.replace(spec, probes="timing"), opts.cell_timeout)
        seconds = round(time.perf_counter() - t0, 2)
        row.update(cell_key=key, cell_seconds=seconds, suite=opts.suite)
        if r == 0 and not remeasure:  # the cell's row (the replica's holds its timing only)
            rows = [x for x in rows if x.get("cell_key") != key] + [row]
            failed += row["status"] in FAILED
        if row["status"] == "ok":
            samples.append(rep.sample(row, key, r, remeasured=remeasure))
        save()
        flag = " [interference: other processes used {:.0f}% of the CPU]".format(float(row["other_cpu_pct"])) \
            if row["status"] == "ok" and row.get("interference_repeats") else ""
        print(f"{label}: {row['status']}{' — ' + row['reason'] if row.get('reason') else ''} ({seconds:.1f}s){flag}",
              file=sys.stderr)
        return row

    total = len(cells) * n_rounds
    def rounds() -> int:
        for r in range(n_rounds):
            for i, spec in enumerate(cells, 1):
                key = spec.key()
                label = (f"[{r * len(cells) + i}/{total}] {spec.method} × {spec.workload or spec.model}"
                         + (" (A/A copy)" if spec.replica else "") + (f", repeat {r + 1}/{n_rounds}" if n_rounds > 1 else ""))
                if opts.resume and (key, r) in have and (r > 0 or spec.replica or key in done):
                    print(f"{label}: already done, skipped", file=sys.stderr)
                    continue
                if r > 0:
                    base = next((x for x in rows if x.get("cell_key") == key), None)
                    if base is None or base.get("status") != "ok":
                        continue  # unsupported or failed in the first round: nothing to repeat
                measure(spec, r, label)
        if n_rounds > 1:  # a disturbed repeat (other processes, steal, or a slow machine) is measured once more
            for s, why in rep.to_remeasure(samples):
                spec = next((c for c in cells if c.key() == s["cell_key"]), None)
                if spec is None:
                    continue
                row = measure(spec, int(s["repeat"]), f"re-measure {spec.method} × {spec.workload}, repeat "
                                                      f"{int(s['repeat']) + 1} ({why})", remeasure=True)
                if row["status"] == "ok":
                    s["used"] = False
            save()
        report.build(out)
        print(f"results: {out}/metrics.csv, summary.md, plots ({failed} failed cell{'s' * (failed != 1)})", file=sys.stderr)
        return 1 if failed else 0

    try:  # SIGTERM ends the run like Ctrl-C: the running cell is killed, every finished row kept
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return rounds()
    except KeyboardInterrupt:
        stop_fork_server()
        save()
        if any(r.get("status") == "ok" for r in rows):
            report.build(out)
        again = " ".join(a for a in (argv or ["run", "--suite", opts.suite]) if a != "--resume")
        print(f"peft-bench: interrupted; the finished cells are in {out}/metrics.csv and summary.md; resume with: "
              f"peft-bench {again} --resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_fork_server() -> None:
    """End the fork server (it would otherwise outlive an interrupted run)."""
    global _CONTEXT
    if _CONTEXT is not None:
        from multiprocessing import forkserver

        try:
            forkserver._forkserver._stop()
        except Exception:
            pass
        _CONTEXT = None


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


def _context():
    """A fork server that has imported torch, transformers and peft once: each cell is a fresh process
    forked from it (no model, no allocations), so per-cell start-up costs milliseconds, not seconds."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "transformers", "peft", "peft_bench.bench.cell"])
    return _CONTEXT


def _peak_child(device: str, dtype: str, out_path: str) -> None:
    Path(out_path).write_text(repr(timing.matmul_peak_flops(device, dtype)))


def matmul_peak_in_child(device: str, dtype: str) -> float:
    """The matmul peak measured in a process forked from the same server as the cells, so that the MFU denominator
    is measured under the cells' own conditions (threads, allocator, nothing else loaded)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "peak")
        proc = _context().Process(target=_peak_child, args=(device, dtype, str(path)))
        proc.start()
        proc.join()
        return float(path.read_text()) if path.exists() else timing.matmul_peak_flops(device, dtype)


def _run_isolated(spec: CellSpec, timeout: float | None) -> dict:
    """Run one cell in a fresh process; translate timeouts and kills into rows."""
    from .cell import run_in_child

    base = {"method": spec.method, "workload": spec.workload or f"hub:{spec.model}", "device": spec.device,
            "options": json.dumps(spec.method_options, sort_keys=True), "seed": spec.seed}
    reason = method_class(spec.method).unsupported_reason(get_workload(spec.workload).family) if spec.workload else None
    if not reason and spec.parallel:
        reason = get_method(spec.method, **spec.method_options).unsupported_parallel(spec.parallel)
    if reason:  # known without building anything
        w = get_workload(spec.workload)
        return {**base, "family": w.family, "task": w.task, "pretrained": w.pretrained, "status": "unsupported",
                "reason": reason}
    from ..measure.interference import Window

    if spec.parallel:  # torchrun: the ranks' CPU time comes back through the waited-for children's usage
        import resource

        from .distributed import launch

        with Window() as window:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            row = launch(spec, timeout)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            window.also_own(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        return {**base, **_with_load(row, window.load)}

    row = None
    with tempfile.TemporaryDirectory() as tmp, Window() as window:
        row_path = Path(tmp, "row.json")
        proc = _context().Process(target=run_in_child, args=(dataclasses.asdict(spec), str(row_path)))
        proc.start()
        try:
            proc.join(timeout)
        except BaseException:  # Ctrl-C or SIGTERM: the running cell ends with the run
            proc.kill()
            proc.join()
            raise
        if proc.is_alive():
            proc.kill()
            proc.join()
            return {**base, "status": "timeout", "reason": f"cell exceeded --cell-timeout {timeout:g}s"}
        if row_path.exists():
            row = json.loads(row_path.read_text())
            window.also_own(float(row.pop("cell_cpu_s", 0.0)))  # the cell's own CPU time is not interference
    if row is not None:
        return {**base, **_with_load(row, window.load)}
    if proc.exitcode is not None and proc.exitcode < 0:
        sig = signal.Signals(-proc.exitcode).name
        hint = " (likely the kernel's out-of-memory killer)" if sig == "SIGKILL" else ""
        return {**base, "status": "oom" if sig == "SIGKILL" else "error", "reason": f"cell killed by {sig}{hint}"}
    return {**base, "status": "error", "reason": f"cell process exited with status {proc.exitcode}"}


def _with_load(row: dict, load) -> dict:
    """An ok row gets what other processes did to the machine while the cell ran."""
    if row.get("status") == "ok":
        row.update(other_cpu_pct=load.other_cpu_pct, cpu_steal_pct=load.steal_pct, load_avg_1m=load.load_avg_1m,
                   interference_repeats=int(load.busy), remeasured=0)
    return row


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch (torch "
                        f"{torch.__version__}); use --device cpu")


def validate_targets(cells: list[CellSpec], opts: RunOptions) -> None:
    """A --targets pattern that matches no Linear module is bad input: check it on each workload's
    architecture (built on the meta device: shapes only, no memory, no weights read)."""
    targets = (opts.method_options or {}).get("targets")
    if not targets:
        return
    import torch

    from ..arch import describe
    from ..methods.base import resolve_targets
    from ..workloads import resolve

    for name in {c.workload for c in cells if "targets" in c.method_options}:
        w = resolve(name or None, opts.model, opts.dataset, trust_remote_code=opts.trust_remote_code,
                    allow_pickle=opts.allow_pickle)
        try:
            with torch.device("meta"):
                model = w.build_model()
        except RuntimeError:  # from_pretrained refuses the meta device: build it for real
            model = w.build_model()
        try:
            resolve_targets(model, tuple(targets), describe(model))
        except UserError as e:
            raise UserError(f"{w.name}: {e}") from None


def check_out_dir(path: Path) -> Path:
    """Refuse an output path that is a file, lies under a file, is not writable, or contains '..'."""
    path = Path(path)
    if ".." in path.parts:
        raise UserError(f"output directory {str(path)!r} must not contain '..'")
    if path.exists() and not path.is_dir():
        raise UserError(f"output directory {str(path)!r} is a file; pass --out with a directory")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"output directory {str(path)!r} lies under the file {str(parent)!r}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {str(path)!r} is not writable")
    return path


def prepare_out_dir(path: Path) -> Path:
    """Create the (checked) output directory."""
    path = check_out_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {str(path)!r}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output directory {str(path)!r} is not writable")
    return path

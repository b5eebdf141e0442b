"""From what the user asked for (`RunConfig`) to the cells to run (`CellSpec`s), every one validated before anything
is written: names, options that apply to no chosen method, lengths beyond a model's positions, sweeps and torchrun
layouts that cannot run, a user's data too small for one batch."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

from ..config import CellSpec, RunConfig, method_flag
from ..errors import UserError
from ..methods import get_method, method_class
from ..workloads import get_workload
from .probes import INSTRUMENTED_STEPS
from .suites import budget, get_suite, learning_rate


def plan(opts: RunConfig) -> list[CellSpec]:
    """The cells to run, validated before anything is written."""
    suite = get_suite(opts.suite)
    methods, workloads = _names(opts, suite)
    _check_inputs(opts)
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
    cells = [cell for w, m, seed in itertools.product(workloads, methods, seeds)
             for cell in _cells(opts, suite, (w, m, seed), lengths[w], grids.get(m))]
    if opts.vary:
        from .sweep import expand

        cells = expand(cells, opts)
    if opts.nproc or opts.parallel or opts.nnodes > 1 or opts.rdzv_endpoint or opts.broadcast_buffers != "on" \
            or suite.nproc:
        cells = distribute(cells, dataclasses.replace(opts, nproc=opts.nproc or suite.nproc or None,
                                                      parallel=opts.parallel or suite.parallel or None))
    for c in cells:  # options are validated here, before the first cell runs
        get_method(c.method, **c.method_options)
    cells = _base_once(cells)
    if repeats_of(opts) > 1 and cells and cells[0].probes != "serve":  # serving: pairs within each process
        cells.append(dataclasses.replace(_aa_cell(cells, suite), replica=1))
    return cells


def _names(opts: RunConfig, suite) -> tuple[list[str], list[str | None]]:
    """The methods and workloads of the run, each name checked; [None] for a model brought with --model."""
    if opts.dataset and not opts.model:
        raise UserError("--dataset needs --model (a hub id or local directory); embedded workloads bring their data")
    if opts.model and opts.workloads:
        raise UserError("give --model (a hub id or directory) or --workloads, not both")
    if not opts.model and not opts.workloads and not suite.workloads:
        raise UserError(f"suite {suite.name!r} has no workloads of its own; pass --workloads or --model")
    methods = list(opts.methods or suite.methods)
    for m in methods:
        method_class(m)
    _check_options_apply(methods, opts.method_options)
    if opts.model:
        return methods, [None]
    workloads = list(opts.workloads or suite.workloads)
    for w in workloads:
        get_workload(w)
    return methods, workloads


def _check_inputs(opts: RunConfig) -> None:
    """Data the user pointed at, read now: torchvision's MNIST, a local dataset file's columns and labels."""
    if opts.mnist_root:  # torchvision missing or no MNIST files there: refused before anything runs
        from ..workloads.data import mnist_torchvision

        mnist_torchvision(opts.mnist_root)
    if opts.dataset and Path(opts.dataset).suffix in (".csv", ".json", ".jsonl"):
        from ..workloads.data import hub_dataset

        hub_dataset(opts.dataset, 0)


def _cells(opts: RunConfig, suite, names: tuple, length: tuple, rates) -> list[CellSpec]:
    """One (workload, method, seed)'s cells, one per learning rate, at the suite's budget for the workload."""
    w, m, seed = names
    b = budget(suite, w or "*")
    family = get_workload(w).family if w else "transformer"
    steps = opts.train_steps or b.train_steps
    warmup = max(1, min(b.warmup_steps, steps - INSTRUMENTED_STEPS - 1))
    return [CellSpec(
        method=m, workload=w or "", device=opts.device, seed=seed, split=opts.split, probes=opts.probes or suite.probes,
        method_options=_options_for(m, opts.method_options), batch_size=opts.batch_size, max_length=length[0],
        dtype=length[1], lr=lr or learning_rate(m, w or "", family), warmup_steps=warmup,
        timed_steps=max(1, min(b.timed_steps, steps - warmup - INSTRUMENTED_STEPS)), train_steps=steps,
        latency_seconds=b.latency_seconds, test_examples=opts.test_examples or b.test_examples, model=opts.model,
        dataset=opts.dataset,
        trust_remote_code=opts.trust_remote_code, allow_pickle=opts.allow_pickle, mnist_root=opts.mnist_root,
        gradient_checkpointing=opts.gradient_checkpointing) for lr in rates or (None,)]


def _check_endpoint(endpoint: str) -> None:
    """HOST:PORT with a port in 1–65535 (else torchrun waits minutes before it fails)."""
    if not endpoint:
        return
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint takes HOST:PORT with a port in 1–65535, got {endpoint!r}")


def distribute(cells: list[CellSpec], opts: RunConfig) -> list[CellSpec]:
    """Each planned cell once per parallel mode and process count, run under torchrun; checked before anything runs.
    Every rank gets the same number of threads in the whole run (this machine's cores ÷ the largest --nproc), so a
    one-process cell is the scaling reference of the same cell on N processes."""
    from .torchrun import MODES, threads_per_rank

    if not opts.nproc:
        raise UserError("--parallel, --nnodes, --rdzv-endpoint and --broadcast-buffers need --nproc (processes per "
                        "node), e.g. --nproc 2")
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
    _check_endpoint(opts.rdzv_endpoint)
    cores = os.cpu_count() or 1
    if opts.device == "cpu" and max(opts.nproc) > cores and not opts.oversubscribe:
        raise UserError(f"--nproc {max(opts.nproc)} on cpu: this machine has {cores} CPU cores (one per rank; "
                        "--oversubscribe to run more)")
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
                                               rdzv_endpoint=opts.rdzv_endpoint, rdzv_timeout=opts.rdzv_timeout,
                                               threads_per_rank=threads,
                                               broadcast_buffers=opts.broadcast_buffers == "on", base_probe=False))
    return out


def sequence_lengths(opts: RunConfig, methods: list[str], workloads: list[str | None]) -> dict:
    """One sequence length per workload for every method of the run, decided before anything runs: --seq-len or the
    workload's own, checked against the model's positions; for a model brought with --model, from the data
    (`Workload.sized`). Every method sees the same length, so the positions the run's prompt methods need for their
    virtual tokens are left free for all. None: the workload's own length (the cell keeps it). With it, the element
    type: --dtype, or for `auto` the workload's (a checkpoint's own)."""
    from ..workloads import resolve
    from .setup import virtual_tokens

    reserve = max(virtual_tokens(get_method(m, **_options_for(m, opts.method_options))) for m in methods)
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


def seeds_of(opts: RunConfig) -> tuple[int, ...]:
    seeds = opts.seed_list()
    seeds = seeds if seeds is not None else get_suite(opts.suite).seeds
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"--seeds takes distinct non-negative integers, e.g. 0,1,2; got {','.join(map(str, seeds))}")
    return tuple(seeds)


def repeats_of(opts: RunConfig) -> int:
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


def _check_options_apply(methods: list[str], options: dict) -> None:
    """An option that none of the chosen methods has is a mistake (e.g. --rank with --methods prefix)."""
    for key in options:
        takers = [m for m in methods if key in {f.name for f in dataclasses.fields(method_class(m).Options)}]
        if not takers:
            raise UserError(f"{method_flag(key)} applies to none of the chosen methods ({', '.join(methods)})")


def _options_for(method: str, options: dict) -> dict:
    """Keep only the options the method has (e.g. --rank goes to LoRA methods, --virtual-tokens to prompts)."""
    fields = {f.name for f in dataclasses.fields(method_class(method).Options)}
    return {k: v for k, v in options.items() if k in fields}


def validate_targets(cells: list[CellSpec], opts: RunConfig) -> None:
    """A --targets pattern that matches no Linear module is bad input: check it on each workload's
    architecture (built on the meta device: shapes only, no memory, no weights read)."""
    targets = opts.method_options.get("targets")
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




def validate_data(cells: list[CellSpec], opts: RunConfig) -> None:
    """With --batch-size or --dataset, each workload's data is read once before the run: a batch larger than its
    training split, or a dataset with a single label (accuracy would be trivially 1 or meaningless), is bad input."""
    if not (opts.batch_size or opts.dataset):
        return
    from ..workloads import resolve
    from .setup import DATA_SEED

    for name in {c.workload for c in cells}:
        w = resolve(name or None, opts.model, opts.dataset, trust_remote_code=opts.trust_remote_code,
                    allow_pickle=opts.allow_pickle)
        data = w.data(DATA_SEED)
        if opts.batch_size and opts.batch_size > len(data.train):
            raise UserError(f"--batch-size {opts.batch_size} exceeds the {len(data.train)} training examples of "
                            f"{w.name}")
        labels = {int(x) for x in data.train.labels.tolist()}
        if len(labels) < 2:
            raise UserError(f"{w.name}: every training example has the label {labels.pop() if labels else '?'}; a "
                            "classification needs at least two")

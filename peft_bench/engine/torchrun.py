"""Cells on several processes: torchrun launches the ranks, each trains under DDP or FSDP2, communication counted.

Parent side (`launch`): the runner hands a `CellSpec` with `parallel` set; it becomes one
`python -m torch.distributed.run --nproc-per-node N ... -m peft_bench.engine.torchrun SPEC DIR` in a new session.
Global rank 0 gathers every rank's record and writes the cell's row; a rank that raises writes its own error row and
ends its process, which makes torchrun stop the others. The run goes on in every case: a rank that dies becomes an
`error` row naming the rank and its exit code, a cell that outlives `--cell-timeout` (a hung collective) a `timeout`
row, and no process of the cell survives either (the whole process tree is killed).

Rank side (`rank_main`): build the model exactly as a single-process cell does (same seed on every rank), count its
trainable parameters against the closed form, then wrap it —

- ddp: `DistributedDataParallel(gradient_as_bucket_view=True)` (gradients are views into the all-reduce buckets:
  no second copy) on its default path — nothing installed — with `broadcast_buffers` as the cell says (DDP's
  default on: rank 0's buffers are broadcast before every forward). Trainable tensors that get no gradient in a probe
  step before wrapping (none for the methods here) turn on `find_unused_parameters`; otherwise it stays off, so a
  parameter that stops receiving gradients later is DDP's error, not silently skipped.
- fsdp: FSDP2 `fully_shard` on each repeated block (every element of a ModuleList of one block class) and on the
  root. FSDP2 shards parameter by parameter, so frozen and trainable parameters in one unit are never flattened
  together: only the trainable ones get gradients and are reduce-scattered (checked: the gradient payload equals the
  closed form of the trainable parameters, per tensor padded to the world size).

— then warm-up and timed steps (each rank with its own batches, nothing installed), the rank's process peak over
them, then COUNTED_STEPS more steps with every collective of the process group counted from the backend's own
records and the bytes the rank wrote to its sockets read beside them (`peft_bench.measure.comm`), and what it holds
between steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

MODES = ("ddp", "fsdp")
RANK_SEED_STRIDE = 104_729  # each rank's batch order: seed + rank × stride (rank 0 sees a single process's batches)
KILL_GRACE_S = 10.0
ELSEWHERE = "elsewhere"  # a multi-node cell seen from a node without global rank 0: no row here
COUNTED_STEPS = 2  # steps after the timed ones, under the collective counter (its profiler stays out of the timing)


# -- parent side ------------------------------------------------------------------------------------------------
def threads_per_rank(nproc: int) -> int:
    """Each rank's share of this machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, nproc))


def torchrun_args(spec, entry: list[str]) -> list[str]:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(spec.nproc), "--max-restarts", "0",
            "--monitor-interval", "0.1"]
    if spec.nnodes > 1 or spec.rdzv_endpoint:
        args += ["--nnodes", str(spec.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint,
                 "--rdzv-id", rendezvous_id(spec), "--rdzv-conf", f"join_timeout={spec.rdzv_timeout:g}"]
    else:
        args += ["--standalone"]
    return args + entry


def rendezvous_id(spec) -> str:
    """The same on every node that runs the same command: from the cell's key through SHA-256 (Python's `hash()` is
    salted per process, so two nodes asked for different rendezvous and waited for each other forever)."""
    import hashlib

    return "peft-bench-" + hashlib.sha256(spec.key().encode()).hexdigest()[:16]


STORE_FAILED = "could not reach the rendezvous store"


def launch(spec, timeout: float | None) -> dict:
    """Run one distributed cell; its row (ok, or error/timeout with the reason). A rendezvous store connection that
    failed (seen under heavy load) is tried once more before the row says so."""
    row = _launch_once(spec, timeout)
    if row.get("status") == "error" and STORE_FAILED in str(row.get("reason")):
        row = _launch_once(spec, timeout)
        if row.get("status") == "error" and STORE_FAILED in str(row.get("reason")):
            row["reason"] += " (tried twice)"
    return row


def _launch_once(spec, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="peft-bench-dist-") as tmp:
        spec_path, log_path = Path(tmp, "spec.json"), Path(tmp, "torchrun.log")
        spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads_per_rank or threads_per_rank(spec.nproc)),
               "TORCHELASTIC_ERROR_FILE": str(Path(tmp, "error.json")), "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(torchrun_args(spec, ["-m", "peft_bench.engine.torchrun", str(spec_path), tmp]),
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                _wait(proc, timeout, f"{spec.method} × {spec.workload or spec.model} ({spec.nproc} rank"
                                     f"{'s' * (spec.nproc != 1)} × {spec.nnodes} node{'s' * (spec.nnodes > 1)})")
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                return {"status": "timeout", "reason": f"distributed cell exceeded --cell-timeout {timeout:g}s (a "
                        "rank hung or the ranks waited on each other); every process of it was killed"}
            except BaseException:  # Ctrl-C / SIGTERM: the ranks end with the run
                kill_tree(proc)
                raise
            finally:
                kill_tree(proc)  # nothing of the cell outlives it, even a rank torchrun lost track of
        result = Path(tmp, "result.json")
        if result.exists():
            return json.loads(result.read_text())
        errors = sorted(Path(tmp).glob("rank*.json"))
        if errors:
            return json.loads(errors[0].read_text())
        if spec.nnodes > 1 and (proc.returncode == 0 or len(list(Path(tmp).glob("done*"))) == spec.nproc):
            # every rank here finished; global rank 0 runs on another node. An agent's non-zero exit after all its
            # ranks passed the final barrier is the rendezvous store closing as the other node's agent left first
            return {"status": ELSEWHERE, "reason": "this node's ranks finished; the node of global rank 0 writes the row"}
        log = log_path.read_text(errors="replace")
        return {"status": "error", "reason": rendezvous_reason(log, spec) or dead_rank_reason(log, proc.returncode)}


def _wait(proc: subprocess.Popen, timeout: float | None, desc: str, every: float = 30.0) -> None:
    """Wait for torchrun (TimeoutExpired after `timeout`), with a line every `every` seconds: its ranks write to a
    log, so without it a long rendezvous or cell would be silent."""
    import time

    t0 = time.monotonic()
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - t0)
        if left is not None and left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        try:
            proc.wait(every if left is None else min(every, left))
            return
        except subprocess.TimeoutExpired:
            if left is None or left > every:
                print(f"  {desc}: running under torchrun ({time.monotonic() - t0:.0f} s)", file=sys.stderr,
                      flush=True)


def rendezvous_reason(log: str, spec) -> str:
    """One line when the nodes never met: which rendezvous, how long this node waited, how many were expected."""
    if "RendezvousTimeoutError" in log:
        return (f"rendezvous {spec.rdzv_endpoint} did not complete within --rdzv-timeout {spec.rdzv_timeout:g}s: "
                f"{spec.nnodes} nodes expected, and at least one other node (not this one) did not arrive")
    if "RendezvousConnectionError" in log:
        return (f"rendezvous {spec.rdzv_endpoint or 'on this machine'}: this node {STORE_FAILED} (the node that "
                "hosts it is down or overloaded, or the address is wrong)")
    return ""


def dead_rank_reason(log: str, code: int | None) -> str:
    """One line from torchrun's failure report: which rank ended and how."""
    root = log[log.find("Root Cause"):] if "Root Cause" in log else log  # the first rank to fail, not the ones stopped
    found = re.search(r"rank\s*:\s*(\d+)[^\n]*\n(?:[^\n]*\n)*?\s*exitcode\s*:\s*(-?\d+)", root)
    if found:
        rank, exitcode = int(found.group(1)), int(found.group(2))
        how = f"killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exited with status {exitcode}"
        return f"rank {rank} {how} without a result; torchrun stopped the other ranks"
    tail = [x for x in log.strip().splitlines() if x.strip()][-1:] or [""]
    return f"torchrun exited with status {code} and no result: {tail[0][:200]}"


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun and every process under it (the ranks run in sessions of their own), then SIGKILL to
    whatever is left after a grace period."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=KILL_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=KILL_GRACE_S)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass


# -- rank side --------------------------------------------------------------------------------------------------
def rank_main(spec_path: str, out_dir: str) -> int:
    import torch
    import torch.distributed as dist

    from ..config import CellSpec
    from ..errors import UnsupportedError, UserError
    from .cell import _quiet

    _quiet()
    spec = CellSpec(**json.loads(Path(spec_path).read_text()))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(spec.threads_per_rank or threads_per_rank(spec.nproc))
    cuda = spec.device == "cuda"
    if cuda:
        torch.cuda.set_device(local)  # "cuda" below is this rank's own GPU
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=600))
    try:
        _fault(spec.inject_fault, rank, world)
        row = run_rank(spec, world, backend)
    except Exception as e:  # this rank's error row; its exit makes torchrun stop the others
        status = "unsupported" if isinstance(e, UnsupportedError) else "oom" if type(e).__name__ in (
            "OutOfMemoryError", "MemoryError") else "error"
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        reason = text if isinstance(e, (UnsupportedError, UserError)) else \
            f"rank {rank}: {type(e).__name__}" + (f": {text}" if text else "")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({**getattr(e, "identity", {}), "status": status,
                                                                 "reason": reason}, default=float))
        sys.stderr.flush()
        os._exit(1)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        out = combine(rows, spec)
        tmp = Path(out_dir, "result.json.tmp")
        tmp.write_text(json.dumps(out, default=float))
        tmp.replace(Path(out_dir, "result.json"))
    dist.barrier()
    Path(out_dir, f"done{rank}").touch()  # this rank's work, the row included, is finished (see _launch_once)
    dist.destroy_process_group()
    return 0


def _fault(fault: str | None, rank: int, world: int) -> None:
    """Tests: the last rank dies (SIGKILL, as the OOM killer would) or hangs before the first collective."""
    if rank != world - 1:
        return
    if fault == "rank-dies":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "rank-hangs":
        time.sleep(3600)
    if fault == "rank-raises":
        raise RuntimeError("injected fault on the last rank")


def blocks(model) -> list:
    """The repeated blocks of a model: every element of a ModuleList whose elements are all of one class (the
    transformer layers; encoder and decoder stacks both). FSDP shards each as one unit."""
    from torch import nn

    out = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1:
            if not any(b is m or _contains(b, m) for b in out):
                out.extend(m)
    return out


def _contains(outer, inner) -> bool:
    return any(x is inner for x in outer.modules())


def _bytes(tensors) -> int:
    from ..measure.memory import local_shard

    return sum(local_shard(t).numel() * local_shard(t).element_size() for t in tensors)


def held(model, opt) -> dict:
    """The bytes this rank holds between steps: parameters and buffers, gradients, AdamW state (shards under FSDP)."""
    import torch

    return {"weights": _bytes(list(model.parameters()) + list(model.buffers())),
            "gradients": _bytes(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer": _bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))}


def padded_numel(shape, world: int) -> int:
    """Elements of a tensor sharded on dim 0 by FSDP2 across `world` ranks, padding included."""
    if not shape:
        return world  # a scalar: one (padded) element per rank
    rows = -(-shape[0] // world) * world
    return rows * math.prod(shape[1:])


def run_rank(spec, world: int, backend: str) -> dict:
    """This rank's record: the cell worker's `rank` mode (counts, wrap, the one training loop, communication counted
    on steps of its own, agreement between ranks), then what rank 0 needs to combine the ranks into one row."""
    from ..measure.comm import ring_wire_bytes
    from . import cell

    _register()
    s = cell.run_probes(spec, "rank")
    got = s.scores
    timed, proc, comm = got["timed"], got["peak"], got["comm"]
    payload = {k: v / COUNTED_STEPS for k, v in comm.bytes.items()}
    return {"identity": cell.identity(spec, s.w, s.method, s.targets), "params": dataclasses.asdict(s.params),
            "walls": timed.walls, "parts": timed.parts, "losses": got["losses"], "tokens": timed.tokens,
            "canary": timed.canary, "comm_bytes": payload, "comm_calls": sum(comm.calls.values()) / COUNTED_STEPS,
            "closed_comm": got["closed_comm"], "process_peak": proc.peak_bytes - s.baseline, "baseline": s.baseline,
            "source": proc.source, "held": got["held"], "replicas": got["replicas"], "covered": got["covered"],
            "unused": got["unused"], "backend": backend, "ring": ring_wire_bytes(payload, world),
            "wire": None if comm.wire is None or backend != "gloo" else comm.wire / COUNTED_STEPS}


def _wrap(s) -> None:
    """DDP (gradients as views into the all-reduce buckets, its default path, buffers broadcast as the cell says) or
    FSDP2 (each repeated block and the root), with the closed form of the gradient payload per step."""
    import torch
    import torch.distributed as dist

    from .setup import on_device

    spec, module, world = s.spec, s.model, dist.get_world_size()
    trainable = s.method.trainable_parameters(module)
    e = {p.element_size() for p in trainable.values()}
    element = e.pop() if len(e) == 1 else 4
    s.scores["stream"] = stream = _rank_stream(s, dist.get_rank())
    s.scores["module"], s.scores["unused"] = module, 0
    if spec.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        s.scores["unused"] = unused = _unused(module, trainable, on_device(next(stream), spec))
        s.scores["wrapped"] = DDP(module, device_ids=[torch.cuda.current_device()] if spec.device == "cuda" else None,
                                  gradient_as_bucket_view=True, find_unused_parameters=unused > 0,
                                  broadcast_buffers=spec.broadcast_buffers)
        s.scores["closed_comm"] = element * s.params.trainable_params
        return
    # one rank has nothing to reduce: FSDP2 then issues no collective at all
    s.scores["closed_comm"] = element * sum(padded_numel(tuple(p.shape), world) for p in trainable.values()) \
        if world > 1 else 0
    s.scores["total_elements"] = sum(p.numel() for p in module.parameters())
    shard(module)
    s.scores["wrapped"] = module


def shard(module, mesh=None) -> None:
    """FSDP2 as the cells apply it: each repeated block, then the root (`mesh`: the default one, or a planner's)."""
    from torch.distributed.fsdp import fully_shard

    for b in blocks(module):
        fully_shard(b, mesh=mesh)
    fully_shard(module, mesh=mesh)


def _rank_stream(s, rank: int):
    from .probes import train_stream

    return train_stream(s, s.spec.seed + RANK_SEED_STRIDE * rank)


def _rank_training(s) -> None:
    """Warm-up and timed steps through the one training loop with nothing installed, the process peak over the timed
    ones; then COUNTED_STEPS more with every collective counted and the bytes written read beside them."""
    import torch.distributed as dist

    from ..measure.comm import Collectives
    from .loop import Hooks, Trainer, Window, run_steps
    from .probes import PeakWindow, check_finite

    spec, got = s.spec, s.scores
    trainer = Trainer(got["wrapped"], s.method, spec.lr, spec.device, hooked=got["module"])
    got["wrapped"].train()
    end = spec.warmup_steps + spec.timed_steps
    trainer.step(next(got["stream"]))
    proc = PeakWindow(spec.device)
    with proc:
        got["timed"] = run_steps(trainer, got["stream"], Window(spec.warmup_steps, end, end, spec.canary_reps), s.form.tokens,
                                 Hooks(on_start=proc.open, on_end=proc.close))
    batches = [next(got["stream"]) for _ in range(COUNTED_STEPS)]  # drawn before counting: no I/O inside
    dist.barrier()  # every rank enters the counted steps from the same point
    with Collectives(dist.get_world_size()) as comm:
        for batch in batches:
            trainer.step(batch)
    check_finite(trainer.losses)
    got.update(peak=proc.peak, comm=comm, losses=trainer.losses, opt=trainer.opt)


def _agreement(s) -> None:
    """What each rank holds between steps; DDP's replicas identical, FSDP's shards adding up to the model."""
    import torch
    import torch.distributed as dist

    from ..measure.memory import local_shard

    got, model = s.scores, s.scores["wrapped"]
    got["held"] = held(model, got["opt"])
    if s.spec.parallel == "ddp":  # the replicas stayed identical
        trainable = s.method.trainable_parameters(got["module"])
        flat = torch.cat([p.detach().reshape(-1).float() for p in trainable.values()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        diff = torch.tensor([float((flat - ref).abs().max())], device=flat.device)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        got["replicas"], got["covered"] = float(diff), True
        return
    n = torch.tensor([sum(local_shard(p).numel() for p in model.parameters())], device=s.spec.device)
    dist.all_reduce(n)
    got["replicas"], got["covered"] = math.nan, int(n) == got["total_elements"]


def _register() -> None:
    from .cell import probe

    probe("wrap")(_wrap)
    probe("rank_training")(_rank_training)
    probe("agreement")(_agreement)


def _unused(model, trainable: dict, batch: dict) -> int:
    """Trainable tensors without a gradient after one forward and backward (no optimizer step; gradients cleared)."""
    from ..workloads.tasks import model_inputs

    model(**model_inputs(batch)).loss.backward()
    n = sum(p.grad is None for p in trainable.values())
    for p in trainable.values():
        p.grad = None
    return n


def combine(rows: list[dict], spec) -> dict:
    """The cell's row from every rank's record: step times of the slowest rank, memory max/min over ranks."""
    from ..measure import records as R

    r0 = rows[0]
    peaks = [r["process_peak"] for r in rows]
    row = {**r0["identity"], **r0["params"], **R.as_row(_timing(rows)), **R.as_row(_distributed(rows, spec)),
           "process_peak_bytes": max(peaks), "process_baseline_bytes": r0["baseline"], "memory_source": r0["source"],
           "replica": spec.replica, "status": "ok", "reason": ""}
    grad_payload = gradient_payload({k: row[f"{k}_bytes_per_step"] for k in ("allreduce", "reducescatter")},
                                    spec.parallel)
    if not row["comm_matches_closed_form"]:
        row.update(status="error", reason=f"gradient payload counted {grad_payload} B per step != closed form "
                   f"{r0['closed_comm']} B ({spec.parallel}, {len(rows)} ranks)")
    if not row["shards_cover_model"]:
        row.update(status="error", reason="the ranks' parameter shards do not add up to the model")
    if row["replicas_max_abs_diff"] > 0:
        row.update(status="error", reason=f"DDP replicas differ after training (max |Δ| "
                   f"{row['replicas_max_abs_diff']:.3g}): the all-reduce did not keep them identical")
    return row


def _timing(rows: list[dict]):
    """Per step the slowest rank's wall time; the split over every rank's steps; throughput of all ranks together."""
    from .loop import Timed
    from .probes import learning, timing_record

    r0, world = rows[0], len(rows)
    batch = r0["identity"]["batch_size"] * world
    timed = Timed(walls=[max(r["walls"][i] for r in rows) for i in range(len(r0["walls"]))],
                  parts=[p for r in rows for p in r["parts"]],
                  tokens=[sum(sum(r["tokens"]) / len(r["tokens"]) for r in rows)],
                  padded=batch * (r0["identity"]["seq_len"] or 1), canary=min(r["canary"] for r in rows))
    return timing_record(timed, r0["losses"], batch, learning([], []))


def gradient_payload(kinds: dict, parallel: str) -> int:
    """The bytes that carried gradients: DDP's all-reduces; FSDP's reduce-scatters (gloo runs each as an all-reduce
    of the whole input, so there they are all-reduces)."""
    return kinds["allreduce"] if parallel == "ddp" else kinds["reducescatter"] + kinds["allreduce"]


def _distributed(rows: list[dict], spec):
    """Communication per step by collective, against its closed form and the bytes on the wire; memory per rank."""
    from ..measure import records as R
    from ..measure.comm import WIRE_TOLERANCE
    from ..measure.timing import Stats

    r0, world = rows[0], len(rows)
    fastest = [min(r["walls"][i] for r in rows) for i in range(len(r0["walls"]))]
    kinds = {k: int(round(r0["comm_bytes"].get(k, 0))) for k in ("allreduce", "allgather", "reducescatter",
                                                                  "broadcast", "other")}
    held, peaks = [r["held"] for r in rows], [r["process_peak"] for r in rows]
    wires = [r["wire"] for r in rows if r["wire"] is not None]
    wire = sum(wires) / len(wires) if len(wires) == world else math.nan
    ring = sum(r["ring"] for r in rows) / world
    return R.DistributedRecord(
        world_size=world, parallel=spec.parallel, backend=r0["backend"],
        threads_per_rank=spec.threads_per_rank or threads_per_rank(spec.nproc),
        fastest_rank_step_time_s=Stats.of(fastest).median,
        broadcast_buffers=spec.broadcast_buffers if spec.parallel == "ddp" else None,
        comm_counted_steps=COUNTED_STEPS, allreduce_bytes_per_step=kinds["allreduce"],
        allgather_bytes_per_step=kinds["allgather"], reducescatter_bytes_per_step=kinds["reducescatter"],
        broadcast_bytes_per_step=kinds["broadcast"], other_collective_bytes_per_step=kinds["other"],
        comm_bytes_per_step=sum(kinds.values()), collectives_per_step=r0["comm_calls"],
        ring_estimate_bytes_per_rank_per_step=ring, wire_bytes_per_step=wire,
        wire_bytes_max_rank_per_step=max(wires) if len(wires) == world else math.nan,
        wire_within_15pct=bool(abs(wire - ring) <= WIRE_TOLERANCE * ring) if ring and wire == wire else None,
        comm_closed_form_bytes=r0["closed_comm"],
        comm_matches_closed_form=gradient_payload(kinds, spec.parallel) == r0["closed_comm"],
        rank_process_peak_max_bytes=max(peaks), rank_process_peak_min_bytes=min(peaks),
        rank_weights_max_bytes=max(h["weights"] for h in held), rank_weights_min_bytes=min(h["weights"] for h in held),
        rank_gradients_max_bytes=max(h["gradients"] for h in held),
        rank_optimizer_max_bytes=max(h["optimizer"] for h in held), shards_cover_model=all(r["covered"] for r in rows),
        replicas_max_abs_diff=r0["replicas"], unused_parameters=r0["unused"], scaling_efficiency=math.nan,
        scaling_efficiency_ci_low=math.nan, scaling_efficiency_ci_high=math.nan)


def main(argv: list[str] | None = None) -> int:
    spec_path, out_dir = argv or sys.argv[1:]
    return rank_main(spec_path, out_dir)


if __name__ == "__main__":
    sys.exit(main())

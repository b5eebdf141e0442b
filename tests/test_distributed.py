"""Distributed cells: the communication counter against closed forms, and torchrun cells end to end (2 and 4 ranks ×
1 thread over gloo on the tiny GPT-Neo): DDP's all-reduce = 4 × trainable, its buffer broadcast counted, the bytes
on the sockets against the ring estimate, FSDP's shards, dead and hung ranks."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import torch.distributed as dist

from peft_bench.config import CellSpec
from peft_bench.engine import torchrun as D
from peft_bench.measure import comm as C
from peft_bench.measure.comm import Collectives, ring_wire_bytes

# One xdist worker (`pytest -n 2 --dist loadgroup`, the README's test command): it looks for leftover torchrun
# processes by name: no other rank may run beside it.
pytestmark = pytest.mark.xdist_group("torchrun")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo group in this process (gloo records every collective whatever the world size)."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def test_counter_counts_what_the_backend_ran(group):
    """From gloo's own records: an all-reduce's tensor, an all-gather's output, a reduce-scatter as the all-reduce of
    its whole input gloo runs in its place, a broadcast's tensor in its own dtype (bool: 1 B), a barrier (no bytes)."""
    import warnings

    a = torch.ones(10, 3)  # 120 B
    out = torch.empty(8, dtype=torch.float64)  # all-gather output 64 B
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Collectives(1) as comm:
            dist.all_reduce(a)
            dist.all_reduce(tensor=a)
            dist.all_gather_into_tensor(out, torch.zeros(8, dtype=torch.float64))
            dist.reduce_scatter_tensor(torch.empty(4), torch.ones(4))  # input 16 B
            dist.broadcast(torch.ones(5, dtype=torch.bool), 0)
            dist.barrier()
    assert dict(comm.bytes) == {"allreduce": 256, "allgather": 64, "broadcast": 5, "other": 0}
    assert dict(comm.calls) == {"allreduce": 3, "allgather": 1, "broadcast": 1, "other": 1}


def test_ddp_default_path_is_counted_with_nothing_installed(group):
    """DDP's bucket all-reduce runs in C++ (no communication hook): still counted, = 4 × trainable; its buffer
    broadcast before forward too, and not when broadcast_buffers is off."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for broadcast in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        model.register_buffer("mask", torch.ones(9, 2, dtype=torch.bool))  # 18 B
        model[0].weight.requires_grad_(False)  # frozen: not communicated
        ddp = DDP(model, gradient_as_bucket_view=True, broadcast_buffers=broadcast)
        assert not ddp._get_ddp_logging_data().get("comm_hook")  # the default path: no hook
        for _ in range(2):  # the first step builds the buckets, the second rebuilds them (a broadcast of indices)
            ddp(torch.randn(4, 5)).sum().backward()
        with Collectives(1) as comm:
            ddp(torch.randn(4, 5)).sum().backward()
        assert comm.bytes["allreduce"] == 4 * (7 + 21 + 3) and comm.calls["allreduce"] == 1
        assert comm.bytes.get("broadcast", 0) == (18 if broadcast else 0)


def test_payload_and_ring_estimate_closed_forms():
    # an all-gather or reduce-scatter record lists the shard (gloo) or the shard and the whole (nccl): N × shard
    assert C.payload_of("allgather", [[8]], ["float"], 4) == 128
    assert C.payload_of("reducescatter", [[32], [8]], ["float", "float"], 4) == 128
    assert C.payload_of("allreduce", [[3, 5]], ["c10::BFloat16"], 4) == 30
    assert C.payload_of("other", [], [], 4) == 0
    with pytest.raises(ValueError, match="dtype"):
        C.payload_of("allreduce", [[3]], ["mystery"], 2)
    assert C.kind_of("gloo:all_reduce") == "allreduce" and C.kind_of("nccl:_reduce_scatter_base") == "reducescatter"
    assert C.kind_of("nccl:all_gather_into_tensor_coalesced") == "allgather" and C.kind_of("gloo:barrier") == "other"
    assert ring_wire_bytes({"allreduce": 100}, 2) == 100  # 2(N-1)/N
    assert ring_wire_bytes({"allreduce": 100, "allgather": 100}, 4) == 150 + 75
    assert ring_wire_bytes({"broadcast": 100, "other": 100}, 4) == 75
    assert ring_wire_bytes({"allreduce": 100}, 1) == 0
    assert D.padded_numel((50257, 768), 2) == 50258 * 768
    assert D.padded_numel((768,), 2) == 768
    assert D.padded_numel((3, 4), 4) == 16


def test_blocks_are_the_repeated_layers_of_every_family():
    from peft_bench.workloads import get_workload

    with torch.device("meta"):
        neo = get_workload("gpt-neo-tiny").build_model()
        t5 = get_workload("t5-tiny").build_model()
        mlp = get_workload("mlp-mnist-tiny").build_model()
    assert [type(b).__name__ for b in D.blocks(neo)] == ["GPTNeoBlock"] * neo.config.num_layers
    names = {type(b).__name__ for b in D.blocks(t5)}
    assert names == {"T5Block"} and len(D.blocks(t5)) == t5.config.num_layers + t5.config.num_decoder_layers
    assert all(type(b).__name__ != "T5LayerSelfAttention" for b in D.blocks(t5))  # not the layers inside a block
    assert list(D.blocks(mlp)) == []  # no transformer block: FSDP wraps the root alone


def test_the_rendezvous_id_is_the_same_in_every_process():
    """Two nodes run the same command in separate interpreters (each with its own hash salt): same id."""
    import os
    import subprocess
    import sys

    code = ("from peft_bench.config import CellSpec; from peft_bench.engine.torchrun import rendezvous_id; "
            "print(rendezvous_id(CellSpec('lora', 'gpt-neo-tiny', parallel='ddp', nproc=1, nnodes=2)))")
    ids = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
           for seed in (1, 2)}
    assert len(ids) == 1 and ids.pop().startswith("peft-bench-")
    spec = CellSpec("lora", "gpt-neo-tiny", parallel="ddp", nproc=1, nnodes=2, rdzv_endpoint="127.0.0.1:29561")
    assert D.rendezvous_id(spec) in D.torchrun_args(spec, [])


def test_dead_rank_reason_names_the_rank_and_signal():
    log = ("Failures:\n[1]:\n  time      : x\n  host      : h\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15 "
           "(pid: 9722)  (SIGTERM)\n------\nRoot Cause (first observed failure):\n[0]:\n  time      : x\n  host      : h\n"
           "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 123)\n")  # torchrun's report, as printed
    assert D.dead_rank_reason(log, 1) == "rank 1 killed by SIGKILL without a result; torchrun stopped the other ranks"


def test_bad_distributed_options_are_refused_before_anything_runs(tmp_path, capsys):
    from peft_bench.cli import main

    out = tmp_path / "out"
    for argv, text in ((["--parallel", "fsdp"], "need --nproc"), (["--nproc", "2", "--parallel", "zero"], "ddp or fsdp"),
                       (["--nproc", "2", "--nnodes", "2"], "--rdzv-endpoint")):
        code = main(["run", "--workloads", "gpt-neo-tiny", "--methods", "lora", "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2 and text in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def _cells(out, *argv):
    from peft_bench.cli import main

    assert main(["run", "--workloads", "gpt-neo-125m-arch-tiny", "--steps", "4", "--allow-busy", "--oversubscribe",
                 "--out", str(out), *argv]) == 0  # 4 ranks on 2 cores: more ranks than cores, asked for
    return pd.read_csv(out / "metrics.csv")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Full and LoRA under DDP on 2 ranks and LoRA on 4, shared by the tests below (full on 4 ranks runs the same
    code; its cell is left out to keep the test command under 6 minutes)."""
    out = tmp_path_factory.mktemp("ddp")
    two = _cells(out, "--nproc", "2", "--parallel", "ddp", "--methods", "lora,full")
    four = _cells(tmp_path_factory.mktemp("ddp4"), "--nproc", "4", "--parallel", "ddp", "--methods", "lora")
    return pd.concat([two, four], ignore_index=True), out


def test_ddp_counts_every_byte_and_the_sockets_agree_on_2_and_4_ranks(ddp_run):
    """The issue's done-when: ok rows; DDP's all-reduce = 4 × trainable (fp32) and its buffer broadcast = the causal
    masks (from the configuration: a positions² bool mask per layer); the bytes each rank wrote to its sockets within
    15 % of the ring estimate from the counted payload, for full and LoRA on 2 ranks and LoRA on 4."""
    df, out = ddp_run
    assert (df.status == "ok").all(), df.reason.tolist()
    assert sorted(df.world_size) == [2, 2, 4] and (df.backend == "gloo").all()
    masks = _causal_mask_bytes()
    for _, r in df.iterrows():
        assert r.allreduce_bytes_per_step == 4 * r.trainable_params == r.comm_closed_form_bytes
        assert r.broadcast_bytes_per_step == masks and str(r.broadcast_buffers) == "True"
        assert r.allgather_bytes_per_step == 0 and r.replicas_max_abs_diff == 0
    _wire_agrees(df)
    text = (out / "summary.md").read_text()
    assert "## Communication per training step" in text and (out / "distributed.png").stat().st_size > 10_000
    assert "full : lora = **" in text and "buffers broadcast" in text
    from tests.markdown import tables

    assert len(tables(text)) == 3


def test_fsdp_shards_and_its_gradient_payload(ddp_run, tmp_path):
    """FSDP2 on 2 ranks against DDP's LoRA row: weights per rank about half of what a rank holds whole, gradients
    half, the gradient payload = the padded closed form, every parameter gathered, no broadcast; the wire agrees."""
    df = _cells(tmp_path / "fsdp", "--nproc", "2", "--parallel", "fsdp", "--methods", "lora")
    assert (df.status == "ok").all(), df.reason.tolist()
    f = df.iloc[0]
    ddp = ddp_run[0]
    d = ddp[(ddp.method == "lora") & (ddp.world_size == 2)].iloc[0]
    assert f.broadcast_bytes_per_step == 0
    assert f.reducescatter_bytes_per_step + f.allreduce_bytes_per_step == f.comm_closed_form_bytes >= \
        4 * f.trainable_params
    assert f.allgather_bytes_per_step >= d.rank_weights_max_bytes * 0.9  # every parameter gathered once per step
    assert 0.45 < f.rank_weights_max_bytes / d.rank_weights_max_bytes < 0.6  # buffers (masks) are not sharded
    assert f.rank_gradients_max_bytes * 2 == pytest.approx(d.rank_gradients_max_bytes, rel=0.01)
    assert str(f.shards_cover_model) == "True"
    _wire_agrees(df)


def _causal_mask_bytes() -> int:
    """GPT-Neo's buffers from its configuration: a bool positions × positions causal mask per attention layer."""
    from peft_bench.workloads import get_workload

    c = get_workload("gpt-neo-125m-arch-tiny").build_model().config
    return c.num_layers * c.max_position_embeddings ** 2


def _wire_agrees(df) -> None:
    for _, r in df.iterrows():
        est, wire = r.ring_estimate_bytes_per_rank_per_step, r.wire_bytes_per_step
        assert est > 0 and abs(wire - est) <= 0.15 * est, (r.method, r.parallel, r.world_size, wire, est)
        assert str(r.wire_within_15pct) == "True"


def _no_cell_processes(spec_dir_marker: str = "peft_bench.engine.torchrun") -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if spec_dir_marker in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("fault, status, text", [
    ("rank-dies", "error", "rank 1 killed by SIGKILL"),
    ("rank-raises", "error", "rank 1: RuntimeError: injected fault"),
    ("rank-hangs", "timeout", "exceeded --cell-timeout"),
])
def test_a_dead_or_hung_rank_is_a_row_and_leaves_no_process(fault, status, text):
    from peft_bench.engine.launch import run_isolated as _run_isolated

    spec = CellSpec(method="lora", workload="gpt-neo-tiny", parallel="ddp", nproc=2, threads_per_rank=1,
                    train_steps=4, warmup_steps=1, timed_steps=1, inject_fault=fault)
    row = _run_isolated(spec, 8.0)
    assert row["status"] == status and text in row["reason"], row
    assert not _no_cell_processes()


def test_cell_key_of_a_single_process_cell_is_unchanged():
    """Results made before distributed cells existed keep their keys (--resume, compare)."""
    c = CellSpec(method="lora", workload="gpt-neo-tiny")
    assert "parallel" not in c.key() and "nproc" not in c.key() and "nnodes" not in c.key()
    d = dataclasses.replace(c, parallel="ddp", nproc=1)
    assert '"nproc": 1' in d.key() and '"parallel": "ddp"' in d.key() and d.key() != c.key()


def test_adalora_is_refused_under_fsdp_with_the_reason_and_runs_under_ddp():
    from peft_bench.methods import get_method

    assert "shard" in get_method("adalora").unsupported_parallel("fsdp")
    assert get_method("adalora").unsupported_parallel("ddp") is None
    assert get_method("lora").unsupported_parallel("fsdp") is None

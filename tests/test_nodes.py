"""Two torchrun launchers on one machine, as two nodes: they meet, or a missing one ends the cell in time. Outside
the "torchrun" xdist group on purpose: each test is two processes waiting on each other, not a measurement."""

from __future__ import annotations

import csv

import pytest


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(out, port: int, *extra: str):
    import subprocess
    import sys

    code = "import sys; from peft_bench.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, "run", "--workloads", "gpt-neo-tiny", "--methods", "lora",
                             "--steps", "4", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                             "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_nodes_on_one_machine_meet_and_the_node_of_rank_0_writes_the_row(tmp_path):
    """Two launchers, one process each, on loopback: they meet, train, and exactly one of them writes an ok row of
    a 2-rank cell; the other says in one line that the row is on the other node."""
    port = _free_port()
    nodes = [_node(tmp_path / f"node{i}", port) for i in (0, 1)]
    outs = [p.communicate(timeout=400) for p in nodes]
    if [p.returncode for p in nodes] != [0, 0]:  # both nodes' own words, whole (an assert's repr is cut short)
        pytest.fail("\n\n".join(f"node {i} exited {p.returncode}:\n{err[-4000:]}"
                                  for i, (p, (_, err)) in enumerate(zip(nodes, outs))), pytrace=False)
    rows = [list(csv.DictReader((tmp_path / f"node{i}" / "metrics.csv").open()))
            for i in (0, 1) if (tmp_path / f"node{i}" / "metrics.csv").exists()]
    ok = [r for rs in rows for r in rs if r["status"] == "ok"]
    assert len(ok) == 1 and ok[0]["world_size"] == "2"
    assert sum("the rows are on the node of global rank 0" in err for _, err in outs) == 1


def test_a_node_that_never_arrives_ends_the_cell_within_the_rendezvous_timeout(tmp_path):
    import time

    t0 = time.monotonic()
    node = _node(tmp_path / "alone", _free_port(), "--rdzv-timeout", "5")
    _, err = node.communicate(timeout=300)
    took = time.monotonic() - t0
    assert node.returncode == 1 and took < 130, (took, err[-1500:])
    row = next(csv.DictReader((tmp_path / "alone" / "metrics.csv").open()))
    assert row["status"] == "error" and "did not complete within --rdzv-timeout 5s" in row["reason"]
    assert "2 nodes expected" in row["reason"]

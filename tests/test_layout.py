"""The shape of the package, enforced: a straight stack of imports (no cycle), the engine never importing the report,
the report never importing torch, a model or a method, one training step for every route, short functions.

Imports are read from the source (every `import` statement, inside functions too), so a cycle hidden in a
function-level import fails here as surely as one at module level.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import peft_bench

PACKAGE = Path(peft_bench.__file__).parent
# What the reporting side may import of the package: rows, their definitions, statistics and formatting.
REPORT_MAY_IMPORT = {"peft_bench", "peft_bench.errors", "peft_bench.results", "peft_bench.config", "peft_bench.names",
                     "peft_bench.measure", "peft_bench.measure.records", "peft_bench.measure.stats",
                     "peft_bench.measure.repeats", "peft_bench.measure.overhead"}
MAX_LINES, MAX_PARAMS = 60, 6


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every peft_bench module `path` imports (absolute or relative, anywhere in the file)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("peft_bench")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if not base.startswith("peft_bench"):
                continue
            for a in node.names:  # `from . import cell` imports the module peft_bench.engine.cell
                sub = f"{base}.{a.name}"
                out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    return out - {me}


def graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    assert _cycle(graph()) is None, " → ".join(_cycle(graph()) or [])


def test_the_cycle_finder_finds_a_cycle():  # the check above can fail
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_never_imports_the_report():
    bad = {(m, i) for m, deps in graph().items() if m.startswith("peft_bench.engine") for i in deps
           if i.startswith("peft_bench.report")}
    assert not bad


def test_the_report_imports_only_rows_definitions_and_statistics():
    bad = {(m, i) for m, deps in graph().items() if m.startswith("peft_bench.report") for i in deps
           if not i.startswith("peft_bench.report") and i not in REPORT_MAY_IMPORT}
    assert not bad


def test_importing_the_report_loads_no_torch_transformers_or_peft():
    """An outside witness of the rule above: a fresh interpreter imports every report module, then lists what came."""
    modules = sorted(m for m in graph() if m.startswith("peft_bench.report") or m in REPORT_MAY_IMPORT)
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'datasets'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node, params


def test_no_function_is_longer_than_60_lines():
    long = [(name, node.end_lineno - node.lineno + 1) for name, node, _ in _functions()
            if node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long


def test_no_function_takes_more_than_6_parameters():
    many = [(name, len(params)) for name, _, params in _functions() if len(params) > MAX_PARAMS]
    assert not many


def test_the_report_knows_the_methods_in_the_registry_order():
    from peft_bench import names
    from peft_bench.methods import list_methods, method_class

    assert list(names.METHODS) == list_methods()
    assert names.REFERENCES == {m: method_class(m).reference for m in list_methods() if method_class(m).reference}


def test_every_run_option_is_declared_once_and_every_flag_comes_from_its_declaration():
    from peft_bench import config
    from peft_bench.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("run", "sweep", "capacity", "tune"):
        flags = {s for a in sub.choices[command]._actions for s in a.option_strings} - {"-h", "--help"}
        declared = {config._flag(f) for f in config.flags(command)}
        assert flags == declared, command
    names = [f.name for f in dataclasses.fields(config.RunConfig)]
    assert len(names) == len(set(names))


def test_compare_identity_is_the_declared_cell_identity():
    from peft_bench.config import CellSpec
    from peft_bench.report import compare

    key_fields = {f.name for f in dataclasses.fields(CellSpec)} - set(__import__("peft_bench.config").config.NOT_IN_KEY)
    assert set(compare.IDENTITY) == {n for n in key_fields if not CellSpec.__dataclass_fields__[n].metadata.get("budget")}
    base = CellSpec("lora", "w")
    ident = compare._identity({"cell_key": base.key()})[0]
    distinct = dict(parallel="ddp", nproc=2, nnodes=2, vary="seq_len", vary_value=64.0, width=128, depth=2, seed=1,
                    gradient_checkpointing=True, broadcast_buffers=False, replica=1, lr=0.5, dtype="bfloat16",
                    method_options={"r": 4})
    for name, value in distinct.items():  # each makes another cell: rows never collapse in compare
        assert compare._identity({"cell_key": dataclasses.replace(base, **{name: value}).key()})[0] != ident, name
    budget = compare._identity({"cell_key": dataclasses.replace(base, train_steps=99).key()})
    assert budget[0] == ident and budget[1]["train_steps"] == 99  # a budget: the same cell, not comparable


def test_every_mode_of_a_cell_names_registered_probes():
    from peft_bench.engine import cell, torchrun, witness

    torchrun._register()
    witness._register()
    for mode, probes in cell.PROBES.items():
        assert probes and all(p in cell.PROBE for p in probes), mode


@pytest.fixture
def step_calls(monkeypatch):
    """Every call of the one training step, by the route that made it."""
    from peft_bench.engine import loop

    calls: list[str] = []
    real = loop.train_step

    def spy(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    return calls


TINY = {"warmup_steps": 1, "timed_steps": 1, "train_steps": 4}


def test_a_single_process_cell_steps_through_the_one_training_step(step_calls):
    from peft_bench.config import CellSpec
    from peft_bench.engine.cell import run_cell

    row = run_cell(CellSpec("lora", "mlp-mnist-tiny", probes="cost", **TINY))
    assert row["status"] == "ok" and len(step_calls) == TINY["train_steps"]


def test_the_pytest_benchmark_route_steps_through_the_one_training_step(step_calls):
    from peft_bench.config import CellSpec
    from peft_bench.engine.cell import training_step

    step, _, _ = training_step(CellSpec("lora", "mlp-mnist-tiny", **TINY))
    step()
    step()
    assert len(step_calls) == 2


def test_a_torchrun_rank_steps_through_the_one_training_step(step_calls, monkeypatch, tmp_path):
    """A one-rank gloo group in this process: the rank's worker (DDP around the model) uses the same step."""
    import torch.distributed as dist

    from peft_bench.config import CellSpec
    from peft_bench.engine import torchrun

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29617")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        torchrun._register()
        spec = CellSpec("lora", "gpt-neo-tiny", parallel="ddp", nproc=1, **TINY)
        record = torchrun.run_rank(spec, 1, "gloo")
    finally:
        dist.destroy_process_group()
    assert set(step_calls) == {"DistributedDataParallel"} and len(step_calls) == TINY["warmup_steps"] + \
        TINY["timed_steps"] + torchrun.COUNTED_STEPS
    assert record["replicas"] == 0 and len(record["walls"]) == TINY["timed_steps"]

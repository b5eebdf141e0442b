"""Suites: which (method × workload) cells run, with what training budget.

* smoke   — the tiny workloads, every method; a couple of minutes on 2 CPU cores.
* default — the embedded workloads at their real sizes on CPU, at least 3 repeats, rounds added until every interval
            is within ±5 % or 30 minutes are spent (2 cores).
* custom  — no workloads of its own: `run --workloads X` / `--model M` without --suite, each at its own budget.
* accuracy — the pretrained workloads, every method, 3 seeds, accuracy probes only: mean accuracy with its CI.
* distributed — gpt-neo-125m-arch, full / lora / prefix on 1 and 2 processes under torchrun, DDP and FSDP2.
* inference — the causal LMs served: KV-cache generation base / unmerged / merged, many LoRA adapters, merge fidelity.
* gpu     — the embedded workloads at real size with larger budgets, for CUDA; the tutorial's hub models
            run on top with `--model EleutherAI/gpt-neo-125m --dataset stanfordnlp/imdb` (hub or local copy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..methods import list_methods
from ..registry import Registry


@dataclass(frozen=True)
class Budget:
    train_steps: int
    warmup_steps: int = 2  # steps before the first timed one (the two instrumented steps follow the timed ones)
    timed_steps: int = 5
    latency_seconds: float = 0.5  # min_run_time of each inference latency (base, unmerged, merged)
    test_examples: int | None = None  # cap on the workload's test split (a cheaper suite); None: all of it


# The tutorial's methods: what the smoke, default, accuracy and gpu suites compare (their results stay comparable
# across releases); the `methods` suite runs every registered method.
CORE = ("full", "lora", "lora-parametrize", "hf-lora", "prefix", "p-tuning")
ALL = tuple(list_methods())


@dataclass(frozen=True)
class Suite:
    name: str
    workloads: tuple[str, ...]
    budgets: dict[str, Budget]
    methods: tuple[str, ...] = CORE
    repeats: int = 1  # fresh processes per cell, run round-robin (`--repeats` overrides): the minimum
    time_budget_s: float | None = None  # wall time for the run; rounds are added until --target-ci (None: none added)
    aa: tuple[str, str] | None = None  # (method, workload) measured twice for the noise floor when repeats > 1
    seeds: tuple[int, ...] = (0,)  # each cell once per seed (`--seeds` overrides)
    probes: str = "all"  # "accuracy": training and accuracy only (see cell.CellSpec.probes)
    nproc: tuple[int, ...] = ()  # under torchrun with these process counts (`--nproc` overrides); () single process
    parallel: tuple[str, ...] = ()  # ddp / fsdp (`--parallel` overrides)


# AdamW learning rates chosen by `peft-bench tune` (highest validation accuracy, on a validation split held apart
# from the test split) — see results/tune/summary.md for every rate tried, the budget and the commit. Workloads
# absent here use the conventional rates below.
TUNED: dict[str, dict[str, float]] = {
    "minilm-sentiment": {"adalora": 0.0003, "bitfit": 0.0003, "boft": 0.003, "fourierft": 0.0003, "full": 0.0001,
                         "hf-dora": 0.003, "ia3": 0.01, "ln-tuning": 0.003, "loha": 0.003, "lokr": 0.003,
                         "lora": 0.001, "oft": 0.001, "p-tuning": 0.03, "prefix": 0.03, "prompt-tuning": 0.01,
                         "rslora": 0.001, "vera": 0.01},
    "smollm2-135m-sentiment": {"full": 0.0001, "lora": 0.001, "p-tuning": 0.003, "prefix": 0.01},
}
TUNED_SOURCE = "results/tune/summary.md"
# The rates `peft-bench tune` tries by default, around each method's conventional rate (a factor ~3 apart).
LR_GRID = {"full": (1e-5, 3e-5, 1e-4), "prefix": (3e-3, 1e-2, 3e-2), "p-tuning": (3e-3, 1e-2, 3e-2),
           "ia3": (1e-3, 3e-3, 1e-2), "vera": (3e-3, 1e-2, 3e-2), "prompt-tuning": (1e-2, 3e-2, 1e-1)}
LR_GRID_ADAPTERS = (3e-4, 1e-3, 3e-3)


def lr_grid(method: str) -> tuple[float, ...]:
    return LR_GRID.get(method, LR_GRID_ADAPTERS)


def learning_rate(method: str, workload: str, family: str) -> float:
    """The tuned rate of (method, workload) when there is one; else fixed, conventional rates: small for full
    fine-tuning of a transformer, larger for adapters and prompts, the tutorial's Adam rate on the MLP."""
    from ..methods import method_class

    tuned = TUNED.get(workload, {})
    for name in (method, method_class(method).tunes_like):
        if name in tuned:
            return tuned[name]
    if family == "mlp":
        return 1e-3  # the tutorial's Adam rate, for every method
    return CONVENTIONAL.get(method, 1e-3)


def lr_source(method: str, workload: str, family: str, lr: float) -> str:
    """Where a cell's rate came from: "tuned" (TUNED, chosen on the validation split), "conventional" (the untuned
    fallback below) or "asked" (--lr)."""
    from ..methods import method_class

    tuned = TUNED.get(workload, {})
    for name in (method, method_class(method).tunes_like):
        if name in tuned:
            return "tuned" if tuned[name] == lr else "asked"
    return "conventional" if lr == learning_rate(method, workload, family) else "asked"


# Untuned rates for transformers (1e-3 for any other adapter), from the methods' papers and peft's examples. Only the
# TUNED ones above were chosen by validation; a row's `lr` says which rate it trained with.
CONVENTIONAL = {"full": 5e-5, "prefix": 5e-3, "p-tuning": 5e-3,
                "prompt-tuning": 3e-2,  # peft's prompt-tuning examples; Lester et al. use far larger on T5
                "ia3": 3e-3,  # IA3 (T-Few) paper
                "vera": 1e-2}  # VeRA trains only scaling vectors; its paper's rates are 1e-2 and above


SMOLLM2_BUDGET = Budget(train_steps=40, warmup_steps=3, timed_steps=8, latency_seconds=1)  # 320 reviews, batch 8

SUITES: Registry[Suite] = Registry("suite")
for _suite in (
    Suite("smoke", ("mlp-mnist-tiny", "minilm-sentiment-tiny", "gpt-neo-tiny", "t5-tiny"),
                   {"*": Budget(train_steps=8, warmup_steps=1, timed_steps=5, latency_seconds=0.1)},
          aa=("lora", "gpt-neo-tiny")),
    # SmolLM2 (the pretrained decoder) is not in the default workloads: its cells alone took 23 of the suite's 52
    # minutes; `--suite default --workloads smollm2-135m-sentiment` (or the methods and accuracy suites) run it.
    Suite("default", ("mlp-mnist", "minilm-sentiment", "gpt-neo-125m-arch", "t5-small-arch"),
                     {"mlp-mnist": Budget(train_steps=400, warmup_steps=5, timed_steps=50),  # one epoch, batch 10
                      "minilm-sentiment": Budget(train_steps=80, warmup_steps=2, timed_steps=8),
                      # costs on a pretrained decoder; accuracy with its spread is the accuracy suite's job
                      "smollm2-135m-sentiment": Budget(train_steps=16, warmup_steps=3, timed_steps=8,
                                                       latency_seconds=1, test_examples=300),
                      "gpt-neo-125m-arch": Budget(train_steps=13, warmup_steps=3, timed_steps=8, latency_seconds=1),
                      "t5-small-arch": Budget(train_steps=13, warmup_steps=3, timed_steps=8, latency_seconds=1)},
          repeats=3, aa=("lora", "gpt-neo-125m-arch"), time_budget_s=30 * 60),
    # Accuracy only, with its spread over training seeds: the pretrained workloads, every method, 3 seeds.
    Suite("accuracy", ("minilm-sentiment", "smollm2-135m-sentiment"),
          {"minilm-sentiment": Budget(train_steps=80, warmup_steps=2, timed_steps=8),
           # the tuned budget; 500 test reviews (every seed and method scored on the same ones) to fit 2 CPU cores
           "smollm2-135m-sentiment": dataclasses.replace(SMOLLM2_BUDGET, test_examples=500),
           "*": Budget(train_steps=40, warmup_steps=2, timed_steps=8)}, seeds=(0, 1, 2), probes="accuracy"),
    # Every registered method: speed and memory on the GPT-Neo-125M architecture, accuracy on the pretrained encoder
    # (about 55 min on 2 cores; SmolLM2 for all 20 methods would add about 90 — name it with --workloads to run it).
    Suite("methods", ("gpt-neo-125m-arch", "minilm-sentiment"),
          {"gpt-neo-125m-arch": Budget(train_steps=13, warmup_steps=3, timed_steps=8, latency_seconds=1),
           "minilm-sentiment": Budget(train_steps=80, warmup_steps=2, timed_steps=8),
           "smollm2-135m-sentiment": dataclasses.replace(SMOLLM2_BUDGET, test_examples=300)},
          methods=ALL, repeats=3, aa=("lora", "gpt-neo-125m-arch"), time_budget_s=90 * 60),
    # Data-parallel and sharded training under torchrun: 1 and 2 processes × DDP and FSDP2, communication counted
    # (2 ranks × 1 thread on this 2-core machine; about 30 min).
    Suite("distributed", ("gpt-neo-125m-arch",),
          {"gpt-neo-125m-arch": Budget(train_steps=13, warmup_steps=2, timed_steps=6)},
          methods=("full", "lora", "prefix"), repeats=3, aa=("lora", "gpt-neo-125m-arch"), nproc=(1, 2),
          time_budget_s=50 * 60,
          parallel=("ddp", "fsdp")),
    # Serving (engine/serve.py): each method briefly trained, then greedy generation with the KV cache — base,
    # unmerged, merged — at three (prompt, batch) shapes, many LoRA adapters over one base, merge fidelity per dtype.
    # Every repeat is a fresh process that times it all again (the exact checks in the first); intervals over the
    # processes. The pretrained SmolLM2 only (about 15 min on 2 cores); `--workloads gpt-neo-125m-arch` adds the
    # random-weight GPT-Neo (about as long again).
    Suite("inference", ("smollm2-135m-sentiment",),
          {"*": Budget(train_steps=6, warmup_steps=1, timed_steps=2, latency_seconds=0.1)},
          methods=("lora", "hf-lora", "ia3", "prefix", "prompt-tuning"), repeats=3, probes="serve"),
    # No budgets of its own: each workload's own (see own_budget). What `run --workloads/--model` without --suite runs.
    Suite("custom", (), {}, methods=ALL),
    Suite("gpu", ("minilm-sentiment", "gpt-neo-125m-arch", "t5-small-arch"),
          {"*": Budget(train_steps=200, warmup_steps=5, timed_steps=30, latency_seconds=2)},
          repeats=3, aa=("lora", "gpt-neo-125m-arch")),
):
    SUITES.add(_suite.name, _suite)


def get_suite(name: str) -> Suite:
    return SUITES.get(name)


# Budgets of their own: a workload run outside a suite (`peft-bench run --workloads X` or `--model M` without
# --suite, the `custom` suite) trains for its own budget — the one below, else the default suite's for it, else the
# smoke suite's for a -tiny workload, else HUB_BUDGET (a --model, or a workload no suite names).
WORKLOAD_BUDGETS = {"smollm2-135m-sentiment": SMOLLM2_BUDGET}
HUB_BUDGET = Budget(train_steps=20, warmup_steps=3, timed_steps=8, latency_seconds=1)


def own_budget(workload: str) -> Budget:
    if workload in WORKLOAD_BUDGETS:
        return WORKLOAD_BUDGETS[workload]
    default, smoke = SUITES.get("default"), SUITES.get("smoke")
    if workload in default.budgets:
        return default.budgets[workload]
    if workload.endswith("-tiny"):
        return budget(smoke, workload)
    return HUB_BUDGET


def budget(suite: Suite, workload: str) -> Budget:
    """The suite's budget for `workload` ("*" for a --model), its catch-all, else the workload's own."""
    if workload in suite.budgets:
        return suite.budgets[workload]
    if "*" in suite.budgets:
        return suite.budgets["*"]
    return own_budget(workload)

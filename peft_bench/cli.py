"""The `peft-bench` command line.

Bad input gets one line on stderr naming the problem and what is allowed, exit status 2, and nothing
written (`--debug` shows the traceback). A run whose cells failed exits 1; its rows are all kept.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UserError(message)


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a positive {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _list(text: str) -> list[str]:
    """Comma-separated names: at least one, each once."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, twice))} given more than once in {text!r}")
    return names


def _out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("--out must name a directory, got ''")
    return Path(text)


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    values = [_nonnegative_int(t) for t in text.split(",") if t.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers like 0,1,2, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1e-4,3e-4, got {text!r}") from None
    if not values or any(not (0 < v < 1) for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must lie in (0, 1), got {text!r}")
    return values


def _cmd_list(args: argparse.Namespace) -> int:
    from .methods import list_methods, method_class
    from .workloads import get_workload, list_workloads

    if args.metrics:
        from .measure.records import definitions

        for name, doc in definitions().items():
            print(f"{name}: {doc}")
        return 0

    from .methods.capabilities import capabilities, readme_block, table

    if args.readme:
        from .bench.report import update_readme
        from .methods.capabilities import README_BEGIN, README_END

        update_readme(args.readme, readme_block(), (README_BEGIN, README_END))
        print(f"updated the methods section of {args.readme}")
        return 0
    print(f"methods ({len(list_methods())}; `--methods` takes these names):")
    print(table(capabilities()))
    print("workloads:")
    for name in list_workloads():
        w = get_workload(name)
        print(f"  {name:24s} {w.family:16s} pretrained={str(w.pretrained).lower():5s} {w.description}")
    print("unsupported combinations:")
    for name in list_workloads():
        for m in list_methods():
            reason = method_class(m).unsupported_reason(get_workload(name).family)
            if reason:
                print(f"  {m} × {name}: {reason}")
    print("hub (with network or a local copy): --model EleutherAI/gpt-neo-125m | google-t5/t5-small | DIR "
          "[--dataset stanfordnlp/imdb | FILE.csv]")
    from .bench.suites import SUITES, budget, own_budget

    def text(b) -> str:
        return (f"{b.train_steps} steps ({b.warmup_steps} warm-up, {b.timed_steps} timed)"
                + (f", test ≤ {b.test_examples}" if b.test_examples else ""))

    print("suites (budgets per workload; repeats; seeds):")
    for name in SUITES.names():
        s = SUITES.get(name)
        print(f"  {name}: {s.repeats} repeat{'s' * (s.repeats != 1)}, seeds {','.join(map(str, s.seeds))}"
              + (", accuracy probes only" if s.probes == "accuracy" else ""))
        for w in s.workloads:
            print(f"    {w:26s} {text(budget(s, w))}")
        if not s.workloads:
            print("    (the workloads you name, each at its own budget)")
    print("own budgets (outside a suite, e.g. `run --workloads X`):")
    for name in list_workloads():
        print(f"    {name:26s} {text(own_budget(name))}")
    print(f"    {'--model (hub or directory)':26s} {text(own_budget('*'))}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .bench.runner import run_suite

    return run_suite(_run_options(args), args.argv)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .bench.runner import run_suite

    if not args.workloads:
        raise UserError("sweep needs --workloads (e.g. gpt-neo-125m-arch-tiny)")
    opts = _run_options(args)
    opts.vary = args.vary
    opts.probes = "cost"  # how cost grows: no accuracy, latency or checkpoint probes at every point
    opts.out = args.out or Path("results") / "sweep"
    return run_suite(opts, args.argv)


def _cmd_capacity(args: argparse.Namespace) -> int:
    from .bench import capacity

    cap = capacity.parse_bytes(args.memory_cap)
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {args.device!r}; choose cpu or cuda")
    return capacity.run(args.workloads, args.methods, cap, args.vary, args.device, args.out, args.cell_timeout,
                        args.argv)


def _vary(text: str) -> tuple[str, tuple[int, ...]]:
    """NAME=v1,v2,... with NAME a sweepable parameter and at least three distinct positive integer values."""
    from .bench.sweep import VARY

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


def _run_options(args: argparse.Namespace):
    from .bench.runner import RunOptions

    if args.device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {args.device!r}; choose cpu or cuda")
    options = {k: v for k, v in {"r": args.rank, "alpha": args.alpha, "dropout": args.dropout,
                                 "num_virtual_tokens": args.virtual_tokens,
                                 "targets": tuple(args.targets) if args.targets else None}.items() if v is not None}
    suite = args.suite or ("custom" if args.workloads or args.model else "smoke")
    opts = RunOptions(suite=suite, methods=args.methods, workloads=args.workloads, device=args.device,
                      out=args.out, resume=args.resume, cell_timeout=args.cell_timeout, seeds=_seeds(args), lrs=args.lr,
                      method_options=options, batch_size=args.batch_size, max_length=args.seq_len,
                      train_steps=args.steps, dtype=args.dtype, model=args.model, dataset=args.dataset,
                      trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                      mnist_root=args.mnist_root, repeats=args.repeats, allow_busy=args.allow_busy,
                      nproc=tuple(args.nproc) if args.nproc else None,
                      parallel=tuple(args.parallel) if args.parallel else None, nnodes=args.nnodes,
                      rdzv_endpoint=args.rdzv_endpoint or "", gradient_checkpointing=args.gradient_checkpointing)
    return opts


def _seeds(args: argparse.Namespace) -> tuple[int, ...] | None:
    if args.seeds is not None and args.seed is not None:
        raise UserError("give --seeds or --seed, not both")
    return tuple(args.seeds) if args.seeds is not None else (args.seed,) if args.seed is not None else None


def _cmd_tune(args: argparse.Namespace) -> int:
    from .bench import tune

    return tune.run(workloads=args.workloads, methods=args.methods, lrs=args.lr, steps=args.steps, out=args.out,
                    resume=args.resume, argv=args.argv)


def _cmd_report(args: argparse.Namespace) -> int:
    from .bench import report

    out = Path(args.dir)
    if not (out / "metrics.csv").is_file():
        raise UserError(f"{out} has no metrics.csv; pass the --out directory of a run")
    if args.readme:
        readme = Path(args.readme)
        if not readme.is_file():
            raise UserError(f"--readme {readme}: no such file")
        markers = report.readme_markers(out)
        block = report.accuracy_readme_block(out) if markers[0] == report.ACCURACY_BEGIN else report.readme_block(out)
        report.update_readme(readme, block, markers)
        print(f"updated the results section of {readme} from {out}/metrics.csv", file=sys.stderr)
        return 0
    report.build(out)
    print(f"rebuilt {out}/summary.md and plots from {out}/metrics.csv", file=sys.stderr)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .bench.compare import compare

    text, lines = compare(Path(args.base), Path(args.new), args.format, args.exact_only)
    sys.stdout.write(text)
    worse = [x for x in lines if x.verdict == "worse"]
    for x in worse:
        print(f"peft-bench compare: worse: {x.cell}: {x.metric} {x.base} → {x.new} {x.change} ({x.why})",
              file=sys.stderr)
    return 1 if worse else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demos

    if args.method is not None and args.name == "svd":
        raise UserError(f"demo svd takes no --method (it has no adapter); got {args.method!r}")
    return demos.run(args.name, Path(args.out), method=args.method or "lora-parametrize", seed=args.seed)


def _run_arguments(r: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The options of `run`, shared by `sweep` (one source for both)."""
    r.add_argument("--suite", help="smoke | default | accuracy | gpu | custom (default: custom — each workload at its "
                   "own budget — when --workloads or --model is given, else smoke); `peft-bench list` shows them")
    r.add_argument("--methods", type=_list, help="comma-separated method names (default: all)")
    r.add_argument("--workloads", type=_list, help="comma-separated workload names (default: the suite's)")
    r.add_argument("--device", default="cpu", help="cpu | cuda")
    r.add_argument("--out", type=_out_dir, help="output directory (default: results/sweep)" if sweep else
                   "output directory (default: results/<suite>)")
    r.add_argument("--resume", action="store_true", help="skip cells already finished in <out>/metrics.csv")
    r.add_argument("--cell-timeout", type=_positive(float, "--cell-timeout"), help="seconds per cell")
    r.add_argument("--seed", type=_nonnegative_int, help="one training seed (default: the suite's, 0)")
    r.add_argument("--seeds", type=_int_list, help="comma-separated training seeds: each cell runs once per seed and "
                   "the summary gives mean accuracy with its CI across seeds (the data split stays fixed)")
    r.add_argument("--lr", type=_float_list, help="AdamW learning rate(s), comma-separated; each cell runs once per "
                   "rate (default: the suite's tuned rate per method and workload)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="element type of the base model; auto: a checkpoint brought with --model in its own dtype "
                   "(config.json), embedded workloads in float32. Adapters follow peft's policy: float32 on a half "
                   "base. The row's dtype column says what ran")
    r.add_argument("--rank", type=_positive(int, "--rank"), help="LoRA rank r")
    r.add_argument("--alpha", type=_positive(float, "--alpha"), help="LoRA alpha")
    r.add_argument("--dropout", type=float, help="LoRA dropout in [0, 1)")
    r.add_argument("--virtual-tokens", type=_positive(int, "--virtual-tokens"), help="prefix / P-tuning length")
    r.add_argument("--targets", type=_list, help="comma-separated module name patterns for LoRA")
    r.add_argument("--batch-size", type=_positive(int, "--batch-size"))
    r.add_argument("--seq-len", type=_positive(int, "--seq-len"), help="max tokens per example")
    r.add_argument("--steps", type=_positive(int, "--steps"), help="training steps per cell (budget)")
    r.add_argument("--model", help="hub id or local model directory (instead of --workloads)")
    r.add_argument("--dataset", help="hub dataset id (e.g. stanfordnlp/imdb) or a local .csv/.json file")
    r.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own code to run")
    r.add_argument("--allow-pickle", action="store_true", help="accept non-safetensors (pickle) weights")
    r.add_argument("--repeats", type=_positive(int, "--repeats"),
                   help="fresh processes per cell, run round-robin (default: the suite's; default suite 3, smoke 1)")
    r.add_argument("--allow-busy", action="store_true",
                   help="measure even if other processes use the CPU/GPU (each row records the interference)")
    r.add_argument("--mnist-root", help="mlp-mnist: use the full MNIST under this directory via torchvision")
    r.add_argument("--nproc", type=_int_list, help="run each cell under torchrun with this many processes per node "
                   "(comma-separated for several, e.g. 1,2: the one-process cell is the scaling reference)")
    r.add_argument("--parallel", type=_list, help="ddp | fsdp (comma-separated for both; default ddp) with --nproc")
    r.add_argument("--nnodes", type=_positive(int, "--nnodes"), default=1, help="machines, each running the same "
                   "command (torchrun --nnodes)")
    r.add_argument("--rdzv-endpoint", help="HOST:PORT every node's torchrun meets at (several nodes)")
    r.add_argument("--gradient-checkpointing", action="store_true", help="recompute each transformer block's "
                   "activations in backward (non-reentrant): less activation memory, more compute")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="peft-bench", description="Measure PEFT methods side by side.")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also accepted after the command)")
    p.add_argument("--version", action="version", version=f"peft-bench {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="methods, workloads and unsupported combinations")
    ls.add_argument("--metrics", action="store_true", help="every metric's one-line definition instead")
    ls.add_argument("--readme", type=Path, help="regenerate this README's methods section (the capability table)")
    ls.set_defaults(func=_cmd_list)

    r = sub.add_parser("run", help="run a benchmark suite, one fresh process per cell")
    _run_arguments(r)
    r.set_defaults(func=_cmd_run)
    sw = sub.add_parser("sweep", help="cells at several values of one parameter: fitted growth, crossovers")
    sw.add_argument("--vary", type=_vary, required=True,
                    help="NAME=v1,v2,... with NAME one of rank, seq_len, batch_size, virtual_tokens, width, depth")
    _run_arguments(sw, sweep=True)
    sw.set_defaults(func=_cmd_sweep)
    cap = sub.add_parser("capacity", help="the largest batch or context each method trains within a memory cap")
    cap.add_argument("--workloads", type=_list, required=True, help="comma-separated workload names")
    cap.add_argument("--methods", type=_list, required=True, help="comma-separated method names")
    cap.add_argument("--memory-cap", required=True, help="e.g. 4GiB, 512MiB")
    cap.add_argument("--vary", required=True, choices=["batch_size", "seq_len"])
    cap.add_argument("--device", default="cpu", help="cpu | cuda")
    cap.add_argument("--out", type=_out_dir, help="output directory (default: results/capacity)")
    cap.add_argument("--cell-timeout", type=_positive(float, "--cell-timeout"), help="seconds per probe")
    cap.set_defaults(func=_cmd_capacity)


    t = sub.add_parser("tune", help="choose learning rates per method on a validation split (not the test split)")
    t.add_argument("--workloads", type=_list, help="comma-separated (default: the pretrained workloads)")
    t.add_argument("--methods", type=_list, help="comma-separated (default: all)")
    t.add_argument("--lr", type=_float_list, help="rates to try for every method (default: a grid per method)")
    t.add_argument("--steps", type=_positive(int, "--steps"), help="training steps (default: the accuracy suite's)")
    t.add_argument("--out", type=_out_dir, default=Path("results/tune"), help="output directory (default: results/tune)")
    t.add_argument("--resume", action="store_true", help="skip (method, workload, rate) cells already finished")
    t.set_defaults(func=_cmd_tune)

    rep = sub.add_parser("report", help="rebuild plots and summary.md from DIR/metrics.csv")
    rep.add_argument("dir")
    rep.add_argument("--readme", help="instead: regenerate this README's section from DIR (results: gpt-neo-125m-arch; "
                     "accuracy: an accuracy-only run)")
    rep.set_defaults(func=_cmd_report)

    c = sub.add_parser("compare", help="judge what changed between two result directories (exit 1 if worse)")
    c.add_argument("base", help="baseline result directory (with metrics.csv)")
    c.add_argument("new", help="new result directory")
    c.add_argument("--format", default="markdown", choices=["markdown", "csv", "json"])
    c.add_argument("--exact-only", action="store_true",
                   help="only the exact quantities (parameter counts, static memory, checkpoint bytes): the CI gate")
    c.set_defaults(func=_cmd_compare)

    d = sub.add_parser("demo", help="the tutorial's experiments: svd | mnist-lora")
    d.add_argument("name", help="svd | mnist-lora")
    d.add_argument("--out", type=_out_dir, default=Path("results/demo"), help="output directory (default: results/demo)")
    d.add_argument("--method", help="mnist-lora: lora-parametrize (default) | lora | hf-lora | all")
    d.add_argument("--seed", type=_nonnegative_int, default=0)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    debug = "--debug" in argv
    parser = build_parser()
    if not argv:  # bare `peft-bench`: the usage with the commands
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parser.parse_args([a for a in argv if a != "--debug"])
        args.argv = argv
        return args.func(args)
    except UserError as e:
        if debug:
            raise
        print(f"peft-bench: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peft-bench: interrupted; finished cells are in metrics.csv (re-run with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

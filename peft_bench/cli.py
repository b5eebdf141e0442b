"""The `peft-bench` command line.

Bad input gets one line on stderr naming the problem and what is allowed, exit status 2, and nothing
written (`--debug` shows the traceback). A run whose cells failed exits 1; its rows are all kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .config import add_flags, from_flags, nonnegative_int, out_dir
from .errors import UserError
from .results import atomic_write_text, read_rows


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UserError(message)


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
        from .methods.capabilities import README_BEGIN, README_END
        from .results import update_readme

        update_readme(args.readme, readme_block(), (README_BEGIN, README_END))
        print(f"updated the methods section of {args.readme}")
        return 0
    print(f"methods ({len(list_methods())}; `--methods` takes these names):")
    print(table(capabilities()))
    print("workloads:")
    for name in list_workloads():
        w = get_workload(name)
        print(_wrapped(f"  {name:24s} {w.family:16s} pretrained={str(w.pretrained).lower():5s} {w.description}", 68))
    print("unsupported combinations:")
    for name in list_workloads():
        for m in list_methods():
            reason = method_class(m).unsupported_reason(get_workload(name).family)
            if reason:
                print(_wrapped(f"  {m} × {name}: {reason}", 6))
    print("hub (with network or a local copy): --model EleutherAI/gpt-neo-125m | google-t5/t5-small | DIR "
          "[--dataset stanfordnlp/imdb | FILE.csv]")
    from .engine.suites import SUITES, budget, own_budget

    def text(b) -> str:
        return (f"{b.train_steps} steps ({b.warmup_steps} warm-up, {b.timed_steps} timed)"
                + (f", test ≤ {b.test_examples}" if b.test_examples else ""))

    print("suites (budgets per workload; repeats; seeds):")
    for name in SUITES.names():
        s = SUITES.get(name)
        print(f"  {name}: {'at least ' * bool(s.time_budget_s)}{s.repeats} repeat{'s' * (s.repeats != 1)}"
              + (f" (then rounds until --target-ci, within {s.time_budget_s / 60:g} min)" if s.time_budget_s else "")
              + f", seeds {','.join(map(str, s.seeds))}" + (", accuracy probes only" if s.probes == "accuracy" else ""))
        for w in s.workloads:
            print(f"    {w:26s} {text(budget(s, w))}")
        if not s.workloads:
            print("    (the workloads you name, each at its own budget)")
    print("own budgets (outside a suite, e.g. `run --workloads X`):")
    for name in list_workloads():
        print(f"    {name:26s} {text(own_budget(name))}")
    print(f"    {'--model (hub or directory)':26s} {text(own_budget('*'))}")
    return 0


def _wrapped(line: str, indent: int, width: int = 118) -> str:
    """A long listing line folded to `width`, continuation lines indented under its text."""
    import textwrap

    return "\n".join(textwrap.wrap(line, width, subsequent_indent=" " * indent, break_on_hyphens=False)) or line


def _cmd_run(args: argparse.Namespace) -> int:
    return run_and_report(from_flags(vars(args), "run"), args.argv)


def _cmd_sweep(args: argparse.Namespace) -> int:
    cfg = from_flags(vars(args), "sweep")
    # how cost grows: no accuracy, latency or checkpoint probes at every point
    cfg = dataclasses.replace(cfg, probes="cost", out=cfg.out or Path("runs") / "sweep")  # untracked by default
    return run_and_report(cfg, args.argv)


def run_and_report(cfg, argv: list[str] | None = None) -> int:
    """The runner writes the rows, then the report reads them: summary.md and the plots (tune: chosen.json)."""
    from .engine.runner import run_suite
    from .engine.sweep import architecture
    from .report.build import build

    done = run_suite(cfg, argv)
    if done.reportable:
        build(done.out, arch=architecture)
    elif done.code == 0:  # every cell's row is on another node (several nodes, this one without global rank 0)
        print("peft-bench: this node took part in every cell; the rows are on the node of global rank 0",
              file=sys.stderr)
        return 0
    written = ", ".join(f.name for f in (done.out / "metrics.csv", done.out / "summary.md") if f.exists())
    if done.code == 130:
        again = " ".join(a for a in (argv or ["run", "--suite", cfg.suite]) if a != "--resume")
        what = f"the finished cells are in {done.out}/ ({written})" if written else "no cell had finished"
        print(f"peft-bench: interrupted; {what}; resume with: peft-bench {again} --resume", file=sys.stderr)
        return 130
    print(f"results: {done.out}/ ({written or 'nothing written'}; {done.failed} failed cell"
          f"{'s' * (done.failed != 1)})", file=sys.stderr)
    return done.code


def _cmd_capacity(args: argparse.Namespace) -> int:
    from .engine import capacity
    from .report.capacity import summary

    cfg = from_flags(vars(args), "capacity")
    rows = capacity.run(cfg)
    out = cfg.out or Path("results") / "capacity"
    atomic_write_text(out / "summary.md", summary(rows, capacity.parse_bytes(cfg.memory_cap), cfg.search, cfg.device,
                                                  args.argv))
    print(f"results: {out}/capacity.csv, summary.md", file=sys.stderr)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .engine import tune
    from .report.build import build

    cfg = from_flags(vars(args), "tune")
    out = cfg.out or Path("results/tune")
    done = tune.run(cfg, args.argv)
    if done.reportable:
        build(done.out)  # a validation split: the tune summary and chosen.json
    print(f"chosen rates: {out}/chosen.json (copy them into peft_bench/engine/suites.py TUNED)")
    return done.code


def _cmd_plan(args: argparse.Namespace) -> int:
    from .engine import predict
    from .engine.capacity import parse_bytes
    from .report import plan

    cfg = from_flags(vars(args), "plan")
    if cfg.against:
        measured = read_rows(Path(cfg.against) / "metrics.csv")
        if not measured:
            raise UserError(f"plan --against {cfg.against}: no metrics.csv rows there")
        rows = predict.against(measured)
        print(plan.against_table(rows, cfg.against, args.argv, _commit()))
        return 0 if all(r.get("status") != "ok" or plan.equal(r) for r in rows) else 1
    if cfg.fit_overhead:
        from .report import overhead

        print(overhead.report(overhead.cells(), args.argv, _commit()))
        return 0
    if cfg.published:
        from .engine.published import LITGPT_ALPACA2K, plan_published

        print(plan.published_table(plan_published(), plan_published(LITGPT_ALPACA2K), args.argv, _commit()))
        return 0
    cap = parse_bytes(cfg.memory_cap) if cfg.memory_cap else None
    if cfg.plot and not cfg.vary:
        raise UserError("plan --plot draws over a varied value: add --vary seq_len=... or batch_size=...")
    rows = plan.with_cap(predict.run(cfg), cap)
    if cfg.vary and cap:
        rows = plan.with_largest(rows, cfg.vary[0], predict.largest(rows, cfg, cap))
    print(plan.render(rows, cfg.output_format))
    if cfg.plot:
        from .report.plots import planned_peak

        planned_peak(rows, cfg.vary[0], cap, cfg.plot)
        print(f"plot: {cfg.plot}", file=sys.stderr)
    return 0


def _commit() -> str:
    """This checkout's commit, marked dirty where peft_bench/ has changes."""
    from .engine.environment import _git

    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "peft_bench")
    return _git("rev-parse", "HEAD")[:10] + (" (dirty)" if dirty else "")


def _cmd_validate(args: argparse.Namespace) -> int:
    from .engine import witness

    verdicts = witness.run(from_flags(vars(args), "validate"))
    failed = [v for v in verdicts if v.agree is False]
    print(f"{len(verdicts) - len(failed)} of {len(verdicts)} verdicts without disagreement", file=sys.stderr)
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .engine.sweep import architecture
    from .report import summary as report
    from .report.build import build

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
    if args.reread_peaks:
        reread_peaks(out)
    if args.reaggregate or args.reread_peaks:
        reaggregate(out)
    if args.html:
        from .report.build import write_html

        print(f"wrote {write_html(out)}", file=sys.stderr)
        return 0
    build(out, arch=architecture)
    print(f"rebuilt {out}/summary.md, report.html and plots from {out}/metrics.csv", file=sys.stderr)
    return 0


def reread_peaks(out: Path) -> None:
    """The matmul peak and the idle canary read again here (in children forked like the cells'), metrics.csv's
    `matmul_peak_flops_per_s` and `pct_of_matmul_peak` recomputed from each row's own achieved FLOP/s;
    environment.json records the new readings beside the run's own."""
    import datetime
    import json

    from . import results
    from .engine import launch
    from .engine.environment import _git
    from .measure.repeats import number

    env, rows = results.read_environment(out), results.read_rows(out / "metrics.csv")
    device = env.get("device", "cpu")
    peaks = {d: launch.matmul_peak_in_child(device, d) for d in sorted({r.get("dtype") or "float32" for r in rows})}
    for r in rows:
        peak = peaks[r.get("dtype") or "float32"]
        r["matmul_peak_flops_per_s"] = peak
        r["pct_of_matmul_peak"] = 100 * number(r.get("achieved_flops_per_s")) / peak
    results.write_rows(out / "metrics.csv", rows)
    env["peaks_reread"] = {"git_commit": _git("rev-parse", "HEAD"), "date_utc": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "run_matmul_peak_flops_per_s":
        env.get("matmul_peak_flops_per_s"), "run_canary_idle_flops_per_s": env.get("canary_idle_flops_per_s")}
    env["matmul_peak_flops_per_s"] = max(peaks.values())
    if env.get("canary_idle_flops_per_s"):
        env["canary_idle_flops_per_s"] = launch.canary_in_child(device)
    results.atomic_write_text(out / "environment.json", json.dumps(env, indent=2) + "\n")
    print(f"re-read the matmul peak ({max(peaks.values()) / 1e9:.0f} GFLOP/s) and the idle canary for {out}",
          file=sys.stderr)


def reaggregate(out: Path) -> None:
    """metrics.csv's repeat columns computed again from repeats.csv with this version's estimator (each row's own
    measurements untouched; only the run's own repeats count)."""
    import json

    from . import results
    from .measure.repeats import aggregate

    rows, samples = results.read_rows(out / "metrics.csv"), results.read_samples(out / "repeats.csv")
    env = results.read_environment(out)
    results.write_rows(out / "metrics.csv", aggregate(rows, samples, env.get("run_id"),
                                                      env.get("canary_idle_flops_per_s")))
    if env:  # the summary says which code computed the intervals
        import datetime

        from .engine.environment import _git

        env["reaggregated"] = {"git_commit": _git("rev-parse", "HEAD"), "date_utc": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")}
        results.atomic_write_text(out / "environment.json", json.dumps(env, indent=2) + "\n")
    print(f"re-aggregated {out}/metrics.csv from {len(samples)} repeats", file=sys.stderr)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .report.compare import compare

    text, lines = compare(Path(args.base), Path(args.new), args.format, args.exact_only, args.allow_missing,
                          args.across_versions)
    sys.stdout.write(text)
    worse = [x for x in lines if x.verdict in ("worse", "missing")]
    for x in worse:
        print(f"peft-bench compare: {x.verdict}: {x.cell}: {x.metric} {x.base} → {x.new} {x.change} ({x.why})",
              file=sys.stderr)
    return 1 if worse else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demos

    if args.method is not None and args.name == "svd":
        raise UserError(f"demo svd takes no --method (it has no adapter); got {args.method!r}")
    return demos.run(args.name, Path(args.out), method=args.method or "lora-parametrize", seed=args.seed)


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

    commands = {"run": ("run a benchmark suite, one fresh process per cell", _cmd_run),
                "sweep": ("cells at several values of one parameter: fitted growth, crossovers", _cmd_sweep),
                "capacity": ("the largest batch or context each method trains within a memory cap", _cmd_capacity),
                "tune": ("choose learning rates per method on a validation split (not the test split)", _cmd_tune),
                "validate": ("each instrument beside an independent witness, on this machine and model (exit 1 if "
                             "any disagrees)", _cmd_validate),
                "plan": ("predict a training step's memory on fake tensors, for models this machine cannot hold",
                         _cmd_plan)}
    for name, (text, func) in commands.items():  # their flags: generated from RunConfig's declarations
        cmd = sub.add_parser(name, help=text)
        add_flags(cmd, name)
        cmd.set_defaults(func=func)

    rep = sub.add_parser("report", help="rebuild plots, summary.md and report.html from DIR/metrics.csv")
    rep.add_argument("dir")
    rep.add_argument("--readme", help="instead: regenerate this README's section from DIR (results: gpt-neo-125m-arch; "
                     "accuracy: an accuracy-only run)")
    rep.add_argument("--reaggregate", action="store_true", help="first recompute metrics.csv's repeat columns "
                     "(step time, intervals, ratios) from repeats.csv with this version's estimator")
    rep.add_argument("--reread-peaks", action="store_true", help="first read the matmul peak (the MFU denominator) "
                     "and the idle canary (the whole-run speed reference) again on this machine, now idle, and "
                     "recompute what depends on them (when the run's own readings were taken on a busy machine); "
                     "environment.json keeps the old readings; implies --reaggregate")
    rep.add_argument("--html", action="store_true", help="only DIR/report.html (a self-contained page: sortable "
                     "tables, definitions on hover, the plots inline; every run and report writes it too)")
    rep.set_defaults(func=_cmd_report)

    c = sub.add_parser("compare", help="judge what changed between two result directories (exit 1 if worse)")
    c.add_argument("base", help="baseline result directory (with metrics.csv)")
    c.add_argument("new", help="new result directory")
    c.add_argument("--format", default="markdown", choices=["markdown", "csv", "json"])
    c.add_argument("--exact-only", action="store_true",
                   help="only the exact quantities (parameter counts, static memory, checkpoint bytes): the CI gate")
    c.add_argument("--allow-missing", action="store_true", help="a BASE cell missing from NEW is not a failure")
    c.add_argument("--across-versions", action="store_true",
                   help="compare runs made with other library versions or on another machine (each such line says so)")
    c.set_defaults(func=_cmd_compare)

    d = sub.add_parser("demo", help="the tutorial's experiments: svd | mnist-lora")
    d.add_argument("name", help="svd | mnist-lora")
    d.add_argument("--out", type=out_dir, default=Path("results/demo"), help="output directory (default: results/demo)")
    d.add_argument("--method", help="mnist-lora: lora-parametrize (default) | lora | hf-lora | all")
    d.add_argument("--seed", type=nonnegative_int, default=0)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers' `kernels` hub logs a warning per kernel repo when offline ("Skipping publisher trust check"),
    # three lines at the start of every run that say nothing about it.
    logging.getLogger("kernels").setLevel(logging.ERROR)
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

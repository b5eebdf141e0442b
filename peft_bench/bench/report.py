"""Results on disk: metrics.csv (atomic), environment.json, plots and summary.md, rebuilt from the CSV alone.

Each metric declares whether lower or higher is better (`BETTER`), and field names carry their units.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from ..measure import records

# The cell's identity first, then every record's fields (`peft_bench.measure.records`), then bookkeeping.
IDENTITY = ["method", "workload", "device", "status", "reason", "options", "pretrained", "task", "family",
            "batch_size", "seq_len", "lr", "seed", "train_steps", "tokenizer"]
BOOKKEEPING = ["suite", "cell_seconds", "cell_key"]
COLUMNS = IDENTITY + records.columns() + BOOKKEEPING
TEXT = {"method", "workload", "device", "status", "reason", "options", "pretrained", "task", "family", "tokenizer",
        "suite", "cell_key", "first_losses", "memory_source", "dtype", "checkpoint_format", "static_matches_closed_form"}
REQUIRED = {"method", "workload", "status", "cell_key"}
BETTER = records.better()


# -- the CSV ------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_rows(path: Path, rows: list[dict]) -> None:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_rows(path: Path) -> list[dict]:
    """Rows of an existing metrics.csv ([] if none). A file that is not one of ours is refused, untouched."""
    if not path.exists():
        return []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = set(reader.fieldnames or [])
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as e:
        raise _malformed(path, str(e)) from None
    if not REQUIRED <= header:
        raise _malformed(path, f"missing columns {', '.join(sorted(REQUIRED - header))}")
    if any(None in r or not r.get("cell_key") for r in rows):
        raise _malformed(path, "a row has the wrong number of fields or no cell_key")
    return rows


def _malformed(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a peft-bench metrics file ({why}); refusing to append to it — move it "
                     "away or pass --out with another directory")


# -- the environment ----------------------------------------------------------------------------------------
def environment(opts, peak: float, argv: list[str] | None) -> dict:
    import peft
    import torch
    import transformers

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "peft-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "suite": opts.suite, "seed": opts.seed, "device": opts.device, "dtype": getattr(opts, "dtype", "float32"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "platform": platform.platform(), "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": __import__("psutil").virtual_memory().total,
        "gpu": torch.cuda.get_device_name() if opts.device == "cuda" else None,
        "cuda": torch.version.cuda if opts.device == "cuda" else None,
        "matmul_peak_flops_per_s": peak, "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes to the code (results/ is output, not code).
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")),
    }
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# -- plots and summary --------------------------------------------------------------------------------------
def load_frame(out: Path):
    import pandas as pd

    rows = read_rows(out / "metrics.csv")
    if not rows:
        raise UserError(f"{out}/metrics.csv has no rows to report")
    df = pd.DataFrame(rows)
    for c in df.columns:
        if c not in TEXT:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def build(out: Path) -> None:
    """Rebuild plots and summary.md from metrics.csv (and environment.json when present)."""
    from . import plots

    df = load_frame(out)
    plots.make_all(df, out)
    env_path = out / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    atomic_write_text(out / "summary.md", summary(df, env))


def _mib(x: float) -> str:
    return "" if x != x else f"{x / 2**20:,.1f}" if abs(x) < 10 * 2**20 else f"{x / 2**20:,.0f}"


def _ms(x: float) -> str:
    return "" if x != x else f"{x * 1e3:.3g}"


def _size(x: float) -> str:
    if x != x:
        return ""
    return f"{x / 2**20:,.1f} MiB" if x >= 2**20 else f"{x / 2**10:,.1f} KiB"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table: header, separator and every row have the same number of cells."""
    clean = [[str(c).replace("|", "/").replace("\n", " ") for c in row] for row in rows]
    if any(len(r) != len(header) for r in clean):
        raise ValueError("a table row does not have one cell per column")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in clean]


MAIN = ["method", "trainable", "% of total", "tensor peak MiB", "weights / grads / optim / activations / temps MiB",
        "process peak MiB (overhead)", "step s [IQR]", "fwd / bwd / opt s", "vs full", "samples/s",
        "GFLOP/step counted / formula", "% matmul peak", "infer base / unmerged / merged ms", "accuracy (base)",
        "status"]
CKPT = ["method", "checkpoint", "holds", "trainable tensors", "restore cold / warm ms",
        "whole-model load cold / warm ms", "round trip max abs diff"]


def _main_row(r, full_t: float) -> list[str]:
    if r.status != "ok":
        return [r.method] + [""] * (len(MAIN) - 2) + [f"{r.status}: {r.reason}"]
    parts = " / ".join(_mib(r[c]) for c in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
                                            "temporaries_bytes"))
    return [r.method, f"{int(r.trainable_params):,}", f"{r.trainable_pct:.3g}", _mib(r.tensor_peak_bytes), parts,
            f"{_mib(r.process_peak_bytes)} ({_mib(r.runtime_overhead_bytes)})",
            f"{r.step_time_s:.3g} [{r.step_time_iqr_s:.2g}]",
            f"{r.forward_s:.3g} / {r.backward_s:.3g} / {r.optimizer_s:.3g}",
            "" if full_t != full_t else f"{r.step_time_s / full_t:.2f}×", f"{r.samples_per_s:.3g}",
            f"{r.step_flops / 1e9:.3g} / {r.step_flops_analytic / 1e9:.3g}", f"{r.pct_of_matmul_peak:.1f}",
            f"{_ms(r.inference_base_s)} / {_ms(r.inference_adapter_s)} / {_ms(r.inference_merged_s)}",
            f"{r.accuracy:.3f} ({r.base_accuracy:.3f})", "ok"]


def _ckpt_row(r) -> list[str]:
    return [r.method, _size(r.checkpoint_bytes), r.checkpoint_format, _size(r.trainable_state_bytes),
            f"{_ms(r.adapter_switch_cold_s)} / {_ms(r.adapter_switch_warm_s)}",
            f"{_ms(r.full_model_load_cold_s)} / {_ms(r.full_model_load_warm_s)}", f"{r.roundtrip_max_abs_diff:.2g}"]


def summary(df, env: dict) -> str:
    lines = ["# peft-bench results", ""]
    if env:
        lines += [f"Made by `{env.get('command', '?')}` on {env.get('date_utc', '?')}: {env.get('cpu', '?')}, "
                  f"{env.get('cpu_count')} cores ({env.get('torch_threads')} torch threads), "
                  f"{(env.get('memory_total_bytes') or 0) / 2**30:.0f} GiB"
                  + (f", GPU {env['gpu']}" if env.get("gpu") else "")
                  + f"; torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}; "
                  f"commit {str(env.get('git_commit', ''))[:10]}{' (dirty)' if env.get('git_dirty') else ''}; "
                  f"seed {env.get('seed')}; dtype {env.get('dtype', 'float32')}. Measured matmul peak: "
                  f"{(env.get('matmul_peak_flops_per_s') or float('nan')) / 1e9:.0f} GFLOP/s "
                  f"({env.get('dtype', 'float32')}).", ""]
    lines += ["Every cell runs in a fresh process and checks itself before its numbers count: the trainable count "
              "equals its closed form; after training the disabled adapter reproduces the base model, merged equals "
              "unmerged and unmerge restores (within the tolerance in `check_tolerance`); the checkpoint restored "
              "onto a freshly built base gives the trained model's output. Definitions of every column: "
              "`peft-bench list --metrics`; the ones used below are footnoted at the end.", ""]
    for wl, g in df.groupby("workload", sort=False):
        ok = g[g.status == "ok"]
        first = ok.iloc[0] if len(ok) else g.iloc[0]
        pre = str(first.get("pretrained", "")).lower() == "true"
        lines += [f"## {wl}", "",
                  f"{'pretrained' if pre else 'random-weight (pretrained=false)'} base; batch {_int(first, 'batch_size')}"
                  + (f" × {_int(first, 'seq_len')} tokens" if _int(first, "seq_len") not in ("", "0") else "")
                  + f"; {_int(first, 'train_steps')} training steps; device {first.get('device')}"
                  + f"; dtype {first.get('dtype', '')}; tokenizer: {first.get('tokenizer') or 'none'}; AdamW learning "
                  "rates: " + ", ".join(f"{r.method} {r.lr:g}" for _, r in ok.iterrows()) + ".", ""]
        full = ok[ok.method == "full"].step_time_s
        full_t = float(full.iloc[0]) if len(full) else float("nan")
        lines += table(MAIN, [_main_row(r, full_t) for _, r in g.iterrows()]) + [""]
        if len(ok):
            lines += table(CKPT, [_ckpt_row(r) for _, r in ok.iterrows()]) + [""]
    defs = records.definitions()
    lines += ["Definitions:", ""] + [f"- `{k}`: {defs[k]}" for k in (
        "tensor_peak_bytes", "weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
        "temporaries_bytes", "process_peak_bytes", "runtime_overhead_bytes", "step_time_s", "step_flops",
        "step_flops_analytic", "pct_of_matmul_peak", "inference_base_s", "checkpoint_bytes", "adapter_switch_cold_s",
        "full_model_load_cold_s", "check_tolerance")] + [""]
    lines += ["Plots: `trainable_params.png`, `peak_memory.png`, `step_time.png`, `accuracy_vs_memory.png`.", ""]
    return "\n".join(lines)


def _int(row, key: str) -> str:
    v = row.get(key)
    return "" if v is None or v != v else str(int(float(v)))

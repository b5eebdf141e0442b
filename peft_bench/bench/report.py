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

COLUMNS = [
    "method", "workload", "device", "status", "reason", "trainable_params", "total_params", "trainable_pct",
    "closed_form_trainable_params", "peak_memory_bytes", "weights_bytes", "gradients_bytes", "optimizer_bytes",
    "activations_other_bytes", "static_matches_closed_form", "peak_reserved_bytes", "baseline_memory_bytes",
    "memory_source", "step_time_s", "step_time_iqr_s", "forward_s", "backward_s", "optimizer_s", "timed_steps",
    "samples_per_s", "tokens_per_s", "step_flops", "achieved_flops_per_s", "matmul_peak_flops_per_s",
    "pct_of_matmul_peak", "inference_base_s", "inference_adapter_s", "inference_merged_s", "merge_max_abs_diff",
    "accuracy", "base_accuracy", "pretrained", "test_examples", "train_steps", "first_losses", "final_loss",
    "checkpoint_bytes", "full_checkpoint_bytes", "adapter_switch_s", "full_model_load_s", "options", "batch_size",
    "seq_len", "dtype", "lr", "seed", "task", "family", "tokenizer", "suite", "cell_seconds", "cell_key",
]
REQUIRED = {"method", "workload", "status", "cell_key"}
BETTER = {"trainable_params": "lower", "peak_memory_bytes": "lower", "step_time_s": "lower",
          "inference_adapter_s": "lower", "checkpoint_bytes": "lower", "accuracy": "higher",
          "samples_per_s": "higher", "adapter_switch_s": "lower"}


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
        "suite": opts.suite, "seed": opts.seed, "device": opts.device,
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
    for c in COLUMNS:
        if c in df and c not in ("method", "workload", "device", "status", "reason", "memory_source", "options",
                                 "dtype", "task", "family", "tokenizer", "suite", "cell_key", "first_losses",
                                 "pretrained", "static_matches_closed_form"):
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
    return "" if x != x else f"{x / 2**20:,.0f}"


def _num(x: float, fmt: str) -> str:
    return "" if x != x else format(x, fmt)


def summary(df, env: dict) -> str:
    lines = ["# peft-bench results", ""]
    if env:
        lines += [f"Made by `{env.get('command', '?')}` on {env.get('date_utc', '?')}: {env.get('cpu', '?')}, "
                  f"{env.get('cpu_count')} cores ({env.get('torch_threads')} torch threads), "
                  f"{(env.get('memory_total_bytes') or 0) / 2**30:.0f} GiB"
                  + (f", GPU {env['gpu']}" if env.get("gpu") else "")
                  + f"; torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}; "
                  f"commit {str(env.get('git_commit', ''))[:10]}{' (dirty)' if env.get('git_dirty') else ''}; "
                  f"seed {env.get('seed')}. Measured matmul peak: "
                  f"{(env.get('matmul_peak_flops_per_s') or float('nan')) / 1e9:.0f} GFLOP/s (fp32).", ""]
    lines += ["Step time is the median of the timed steps (IQR in brackets), split into forward / backward / "
              "optimizer. Peak memory is the peak RSS of a fresh process per cell above its baseline before the "
              "model was built (CPU), or the CUDA peak allocated; its static parts (weights, gradients, AdamW "
              "state) are read from the tensors and checked against their closed form. Accuracy is on the held-out "
              "split after the fixed step budget, with the base model's accuracy before training beside it; a "
              "base that is not pretrained has random weights, so its accuracy says little.", ""]
    for wl, g in df.groupby("workload", sort=False):
        ok = g[g.status == "ok"]
        first = ok.iloc[0] if len(ok) else g.iloc[0]
        pre = str(first.get("pretrained", "")).lower() == "true"
        lines += [f"## {wl}", "",
                  f"{'pretrained' if pre else 'random-weight (pretrained=false)'} base; batch {_int(first, 'batch_size')}"
                  + (f" × {_int(first, 'seq_len')} tokens" if _int(first, "seq_len") not in ("", "0") else "")
                  + f"; {_int(first, 'train_steps')} training steps; device {first.get('device')}"
                  + f"; tokenizer: {first.get('tokenizer') or 'none'}; AdamW learning rates: "
                  + ", ".join(f"{r.method} {r.lr:g}" for _, r in ok.iterrows()) + ".", ""]
        lines += ["| method | trainable | % | peak MiB | weights / grads / optim / other MiB | step s [IQR] | "
                  "fwd / bwd / opt s | vs full | samples/s | % matmul peak | infer base / adapter / merged ms | "
                  "checkpoint | accuracy (base) | status |",
                  "|" + "---|" * 15]
        full = ok[ok.method == "full"].step_time_s
        full_t = float(full.iloc[0]) if len(full) else float("nan")
        for _, r in g.iterrows():
            if r.status != "ok":
                lines.append(f"| {r.method} |" + " |" * 13 + f" {r.status}: {r.reason} |")
                continue
            lines.append(
                f"| {r.method} | {int(r.trainable_params):,} | {r.trainable_pct:.3g} | {_mib(r.peak_memory_bytes)} | "
                f"{_mib(r.weights_bytes)} / {_mib(r.gradients_bytes)} / {_mib(r.optimizer_bytes)} / "
                f"{_mib(r.activations_other_bytes)} | {r.step_time_s:.4g} [{r.step_time_iqr_s:.2g}] | "
                f"{r.forward_s:.3g} / {r.backward_s:.3g} / {r.optimizer_s:.3g} | {r.step_time_s / full_t:.2f}× | "
                f"{r.samples_per_s:.3g} | {r.pct_of_matmul_peak:.1f} | {_num(r.inference_base_s * 1e3, '.3g')} / "
                f"{_num(r.inference_adapter_s * 1e3, '.3g')} / {_num(r.inference_merged_s * 1e3, '.3g')} | "
                f"{_mib_or_kib(r.checkpoint_bytes)} | {r.accuracy:.3f} ({r.base_accuracy:.3f}) | ok |")
        lines += ["", "Adapter switch vs whole-model load (s): " + ", ".join(
            f"{r.method} {r.adapter_switch_s:.3g} vs {r.full_model_load_s:.3g}" for _, r in ok.iterrows()), ""]
    lines += ["Plots: `trainable_params.png`, `peak_memory.png`, `step_time.png`, `accuracy_vs_memory.png`.", ""]
    return "\n".join(lines)


def _int(row, key: str) -> str:
    v = row.get(key)
    return "" if v is None or v != v else str(int(float(v)))


def _mib_or_kib(x: float) -> str:
    return f"{x / 2**20:,.1f} MiB" if x >= 2**20 else f"{x / 2**10:,.1f} KiB"

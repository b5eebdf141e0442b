"""environment.json: what a run ran on and with (versions, CPU/GPU, threads, seed, dtype, git commit)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path


def environment(opts, peak: float, argv: list[str] | None) -> dict:
    import torch

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "peft-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "suite": opts.suite, "seeds": list(opts.seeds or ()), "device": opts.device, "dtype": getattr(opts, "dtype", "float32"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
        "peft": version("peft"), "platform": platform.platform(), "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": __import__("psutil").virtual_memory().total,
        "gpu": torch.cuda.get_device_name() if opts.device == "cuda" else None,
        "cuda": torch.version.cuda if opts.device == "cuda" else None,
        "gpu_driver": _nvidia_driver() if opts.device == "cuda" else None,
        "matmul_peak_flops_per_s": peak, "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes to the code (results/ is output, not code).
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")),
    }
    if env["gpu"]:  # the vendor's figure beside the measured one, labelled as such
        from ..measure.timing import datasheet_peak_flops

        env["gpu_datasheet_dense_peak_flops_per_s"] = datasheet_peak_flops(env["gpu"], env["dtype"])
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


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

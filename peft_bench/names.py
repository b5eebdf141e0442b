"""What the report may know of the methods without importing one: their names in the registry's order (the order
of every table) and, for each hand-written method, the peft implementation it is tested against.

A leaf module (no torch). `tests/test_layout.py` holds it equal to the registry (`peft_bench.methods`): a method
added there and not here fails that test.
"""

from __future__ import annotations

METHODS = ("full", "lora", "lora-parametrize", "hf-lora", "prefix", "p-tuning", "dora", "bitfit", "hf-dora", "rslora",
           "adalora", "loha", "lokr", "vera", "fourierft", "oft", "boft", "ia3", "ln-tuning", "prompt-tuning")
REFERENCES = {"lora": "hf-lora", "lora-parametrize": "hf-lora", "dora": "hf-dora"}


def rank() -> dict[str, int]:
    """Each method's position in the registry's order."""
    return {m: i for i, m in enumerate(METHODS)}

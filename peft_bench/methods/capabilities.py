"""What each method can do, as `peft-bench list` shows it: family support probed by applying the method to each
embedded workload's architecture, built on the meta device (no memory, no weights; not declared: a method is
supported where it applies and its count equals its closed form), whether it merges, what it costs at inference,
what its checkpoint holds."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedError, UserError

# The families of the embedded workloads, each by a tiny model of its architecture.
PROBES: dict[str, tuple[str, Callable[[], nn.Module]]] = {}


def _probes() -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    if not PROBES:
        from .. import models

        PROBES.update({
            "MLP": ("the tutorial's 784→1000→2000→10", lambda: models.mlp("full")),
            "BERT": ("MiniLM-L6 encoder classifier", lambda: models.bert_classifier("full")),
            "GPT-Neo": ("GPT-Neo-125M decoder", lambda: models.gpt_neo("full")),
            "Llama": ("SmolLM2-135M decoder: grouped-query attention, no biases", lambda: models.llama("full")),
            "T5": ("T5-small encoder-decoder, no biases", lambda: models.t5("full")),
        })
    return PROBES


@dataclass(frozen=True)
class Capability:
    method: str
    support: dict[str, str | None]  # family → None (supported) or the reason it is not
    can_merge: bool
    extra_inference: str
    saved: str


def probe(method: str, build: Callable[[], nn.Module]) -> str | None:
    """None when `method` applies to the model `build` makes with count = closed form; else the reason."""
    import torch

    from . import get_method

    m = get_method(method)
    with torch.device("meta"):
        base = build()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = m.apply(base)  # the method's own tensors where it puts them; the base's stay on meta
    except (UnsupportedError, UserError) as e:
        return str(e)
    except Exception as e:  # a failure of the probe itself is shown, never hidden
        return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    n = sum(p.numel() for p in m.trainable_parameters(model).values())
    if n != m.closed_form_trainable(model):
        return f"trainable {n} != closed form {m.closed_form_trainable(model)}"
    return None


def capabilities(methods: list[str] | None = None) -> list[Capability]:
    from . import list_methods, method_class

    out = []
    for name in methods or list_methods():
        cls = method_class(name)
        support = {fam: probe(name, build) for fam, (_, build) in _probes().items()}
        out.append(Capability(name, support, cls.can_merge, cls.extra_inference, cls.checkpoint_format))
    return out


def table(caps: list[Capability]) -> str:
    """A GitHub-markdown table, footnoted reasons for every ✗."""
    fams = list(_probes())
    lines = ["| method | " + " | ".join(fams) + " | merges | extra inference cost | checkpoint holds |",
             "|---|" + "---|" * len(fams) + "---|---|---|"]
    notes: list[str] = []
    for c in caps:
        cells = []
        for f in fams:
            reason = c.support[f]
            if reason is None:
                cells.append("✓")
            else:
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"✗[{notes.index(reason) + 1}]")
        lines.append(f"| {c.method} | " + " | ".join(cells) +
                     f" | {'yes' if c.can_merge else 'no'} | {c.extra_inference} | {c.saved} |")
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    lines += ["", "Probed on the meta device: " + "; ".join(f"{f}: {d}" for f, (d, _) in _probes().items()) + "."]
    return "\n".join(lines)

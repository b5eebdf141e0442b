"""LoRA from scratch on MNIST, the tutorial's experiment made correct and measurable.

1. Train the MLP 784→1000→2000→10 for one epoch (batch 10, Adam 1e-3); count wrong answers per digit.
2. Snapshot the base weights; add rank-1 LoRA (α = 1) to the three Linear layers.
3. Fine-tune only the LoRA parameters for 100 batches on the digit with the most errors.
4. Prove the base weights are bit-identical to the snapshot, and that with LoRA disabled the model reproduces
   the original accuracy and per-digit counts exactly; measure what the fine-tune cost the other digits.
"""

from __future__ import annotations

import copy
import csv
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import models
from ..errors import UserError
from ..methods import get_method
from ..workloads.data import Data, Split, mnist_5k

IMPLEMENTATIONS = ("lora-parametrize", "lora", "hf-lora")


@dataclass
class Evaluation:
    accuracy: float
    wrong_per_digit: list[int]


@dataclass
class Result:
    method: str
    base: Evaluation
    after: Evaluation
    disabled: Evaluation
    weakest_digit: int
    base_params: int
    lora_params: int
    layer_shapes: list[str]
    base_unchanged: bool
    disabled_exact: bool
    other_accuracy_before: float
    other_accuracy_after: float
    finetune_steps: int
    losses: list[float] = field(default_factory=list)


def check_method(method: str) -> None:
    if method != "all" and method not in IMPLEMENTATIONS:
        raise UserError(f"mnist-lora runs with {', '.join(IMPLEMENTATIONS)} or all; got {method!r}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split) -> Evaluation:
    model.eval()
    pred = torch.cat([model(pixel_values=split.inputs[i : i + 500]).logits.argmax(-1)
                      for i in range(0, len(split), 500)])
    wrong = pred != split.labels
    per_digit = [int(wrong[split.labels == d].sum()) for d in range(10)]
    return Evaluation(int((~wrong).sum()) / len(split), per_digit)


def train(model: torch.nn.Module, split: Split, params, steps: int | None, seed: int, batch: int = 10) -> list[float]:
    """The tutorial's loop: Adam lr 1e-3, batch 10, cross-entropy; one epoch when steps is None."""
    opt = torch.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses, done = [], 0
    total = steps if steps is not None else len(split) // batch
    while done < total:
        order = torch.randperm(len(split), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            loss = model(pixel_values=split.inputs[idx], labels=split.labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            done += 1
            if done == total:
                break
    return losses


def train_base(data: Data, seed: int, steps: int | None = None, size: str = "full") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.mlp(size)
    train(model, data.train, model.parameters(), steps, seed)
    return model


def finetune(base: torch.nn.Module, data: Data, method_name: str, steps: int = 100, seed: int = 0) -> Result:
    """Steps 2–4 on a copy of the trained base model."""
    model = copy.deepcopy(base)
    before = evaluate(model, data.test)
    weakest = max(range(10), key=lambda d: before.wrong_per_digit[d])
    base_params = sum(p.numel() for p in model.parameters())
    method = get_method(method_name, r=1, alpha=1.0)
    torch.manual_seed(seed)
    model = method.apply(model)
    trainable = method.trainable_parameters(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    shapes = _shapes(model, trainable)
    digit = data.train.subset((data.train.labels == weakest).nonzero().flatten().numpy())
    losses = train(model, digit, trainable.values(), steps, seed)
    unchanged = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    unchanged &= sum(t.numel() for t in frozen.values()) == base_params
    after = evaluate(model, data.test)
    with method.disabled(model):
        disabled = evaluate(model, data.test)
    exact = disabled.accuracy == before.accuracy and disabled.wrong_per_digit == before.wrong_per_digit
    others = data.test.labels != weakest
    return Result(method_name, before, after, disabled, weakest, base_params, sum(p.numel() for p in trainable.values()),
                  shapes, unchanged, exact, _acc_on(before, data.test, others), _acc_on(after, data.test, others),
                  steps, losses)


def _acc_on(ev: Evaluation, split: Split, mask: torch.Tensor) -> float:
    digits = split.labels[mask].unique().tolist()
    wrong = sum(ev.wrong_per_digit[d] for d in digits)
    return 1 - wrong / int(mask.sum())


def _shapes(model: torch.nn.Module, trainable: dict) -> list[str]:
    """'linear1: A (1, 784), B (1000, 1)' per adapted layer, read off the parameters the method created."""
    by_layer: dict[str, dict[str, tuple]] = {}
    for name, p in trainable.items():
        part = "A" if "lora_A" in name else "B"
        layer = next(s for s in name.split(".") if s.startswith("linear"))
        by_layer.setdefault(layer, {})[part] = tuple(p.shape)
    return [f"{layer}: A {v.get('A')}, B {v.get('B')}" for layer, v in sorted(by_layer.items())]


def main(out: Path, method: str = "lora-parametrize", seed: int = 0, **_: object) -> int:
    data = mnist_5k(seed)
    print(f"training the base MLP: one epoch over {len(data.train)} digits, batch 10, Adam 1e-3", file=sys.stderr)
    base = train_base(data, seed)
    results = [finetune(base, data, m, seed=seed) for m in (IMPLEMENTATIONS if method == "all" else (method,))]
    for r in results:
        _print(r)
    _write(results, out)
    ok = all(r.base_unchanged and r.disabled_exact for r in results)
    return 0 if ok else 1


def _print(r: Result) -> None:
    b, a = r.base, r.after
    print(f"[{r.method}] base accuracy {b.accuracy:.4f}; wrong per digit {b.wrong_per_digit}")
    print("  " + "; ".join(r.layer_shapes))
    print(f"  LoRA adds {r.lora_params:,} parameters to {r.base_params:,} ({100 * r.lora_params / r.base_params:.3f} %)")
    print(f"  weakest digit {r.weakest_digit}: wrong {b.wrong_per_digit[r.weakest_digit]} → "
          f"{a.wrong_per_digit[r.weakest_digit]} after {r.finetune_steps} LoRA batches")
    print(f"  other digits' accuracy {r.other_accuracy_before:.4f} → {r.other_accuracy_after:.4f}; "
          f"accuracy with LoRA {a.accuracy:.4f}")
    print(f"  base weights bit-identical: {r.base_unchanged}; disabled reproduces the original exactly: "
          f"{r.disabled_exact} (accuracy {r.disabled.accuracy:.4f}, wrong {r.disabled.wrong_per_digit})")


def _write(results: list[Result], out: Path) -> None:
    with (out / "mnist_lora_per_digit.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "digit", "wrong_before", "wrong_after", "wrong_disabled"])
        for r in results:
            for d in range(10):
                w.writerow([r.method, d, r.base.wrong_per_digit[d], r.after.wrong_per_digit[d],
                            r.disabled.wrong_per_digit[d]])
    with (out / "mnist_lora_summary.csv").open("w", newline="") as f:
        keys = ["method", "base_accuracy", "accuracy_after", "accuracy_disabled", "weakest_digit", "weak_wrong_before",
                "weak_wrong_after", "other_accuracy_before", "other_accuracy_after", "base_params", "lora_params",
                "lora_pct", "base_unchanged", "disabled_exact", "finetune_steps", "final_loss"]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in results:
            w.writerow(dict(zip(keys, [
                r.method, r.base.accuracy, r.after.accuracy, r.disabled.accuracy, r.weakest_digit,
                r.base.wrong_per_digit[r.weakest_digit], r.after.wrong_per_digit[r.weakest_digit],
                r.other_accuracy_before, r.other_accuracy_after, r.base_params, r.lora_params,
                100 * r.lora_params / r.base_params, r.base_unchanged, r.disabled_exact, r.finetune_steps,
                r.losses[-1] if r.losses else ""])))
    _plot(results, out / "mnist_lora_per_digit.png")
    print(f"wrote {out}/mnist_lora_per_digit.csv, mnist_lora_summary.csv, mnist_lora_per_digit.png", file=sys.stderr)


def _plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        x = torch.arange(10)
        ax.bar(x - 0.2, r.base.wrong_per_digit, 0.4, label="before (= LoRA disabled)")
        ax.bar(x + 0.2, r.after.wrong_per_digit, 0.4, label=f"after LoRA on digit {r.weakest_digit}")
        ax.set_xticks(x.tolist())
        ax.set_xlabel("digit")
        ax.set_ylabel("wrong answers on the test split")
        ax.set_title(f"{r.method} (r=1, α=1, {r.finetune_steps} batches)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


__all__ = ["Result", "evaluate", "finetune", "train_base", "main", "asdict"]

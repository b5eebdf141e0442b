"""Low rank by SVD: the idea behind LoRA.

A rank-2 10×10 matrix W factors exactly as A (10×2) · B (2×10): 40 numbers instead of 100, and
W x + b = (A B) x + b. For a random full-rank d×k matrix, truncating the SVD to rank r costs a reconstruction
error and saves parameters in the ratio r(d+k)/(dk).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class ExactFactorisation:
    rank: int
    params_full: int
    params_factored: int
    max_abs_diff_y: float


def factor(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U_r·diag(S_r) (d×r) and B = V_r^T (r×k), so A @ B is the best rank-r approximation of W."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]


def exact_rank2(seed: int = 0) -> ExactFactorisation:
    g = torch.Generator().manual_seed(seed)
    d, k, r = 10, 10, 2
    W = torch.randn(d, r, generator=g, dtype=torch.float64) @ torch.randn(r, k, generator=g, dtype=torch.float64)
    rank = int(torch.linalg.matrix_rank(W))
    A, B = factor(W, rank)
    b, x = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(k, generator=g, dtype=torch.float64)
    diff = float(((W @ x + b) - (A @ (B @ x) + b)).abs().max())
    return ExactFactorisation(rank, W.numel(), A.numel() + B.numel(), diff)


def truncation_table(d: int = 256, k: int = 256, seed: int = 0) -> list[dict]:
    """Relative Frobenius error of the rank-r truncation of a random (full-rank) d×k matrix, per r."""
    W = torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    rows, r = [], 1
    while r <= min(d, k):
        approx = (U[:, :r] * S[:r]) @ Vh[:r]
        rows.append({"d": d, "k": k, "rank": r, "relative_error": float(torch.linalg.norm(W - approx) / torch.linalg.norm(W)),
                     "param_ratio": r * (d + k) / (d * k)})
        r *= 2
    return rows


def main(out: Path, seed: int = 0, **_: object) -> int:
    ex = exact_rank2(seed)
    print(f"rank-{ex.rank} 10×10 W: {ex.params_full} parameters; A (10×{ex.rank}) and B ({ex.rank}×10): "
          f"{ex.params_factored}; max |W x + b - (A B) x - b| = {ex.max_abs_diff_y:.2e}")
    rows = truncation_table(seed=seed)
    with (out / "svd_exact.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(ex)))
        w.writeheader()
        w.writerow(asdict(ex))
    with (out / "svd_truncation.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, out / "svd_truncation.png")
    for r in rows:
        print(f"  rank {r['rank']:4d}: relative error {r['relative_error']:.3f}, parameters {r['param_ratio']:.3f} of dense")
    print(f"wrote {out}/svd_exact.csv, svd_truncation.csv, svd_truncation.png", file=sys.stderr)
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r["rank"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(ranks, [r["relative_error"] for r in rows], "o-", label="relative reconstruction error ‖W−W_r‖/‖W‖")
    ax.plot(ranks, [r["param_ratio"] for r in rows], "s--", label="parameters r(d+k)/(dk)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_title(f"Truncated SVD of a random {rows[0]['d']}×{rows[0]['k']} matrix")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)

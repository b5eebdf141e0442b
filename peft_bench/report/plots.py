"""Publication plots from the results frame (PNG, readable without the CSV)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COMPONENTS = [("weights_bytes", "weights"), ("gradients_bytes", "gradients"), ("optimizer_bytes", "optimizer state"),
              ("activations_bytes", "saved activations"), ("temporaries_bytes", "temporaries")]


def _grid(n: int, width: float = 4.2, height: float = 3.4, lines: int = 0):
    """n panels, two per row; a panel listing `lines` methods grows so that each keeps about 0.2 inch."""
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    height = max(height, 0.2 * lines + 1.4)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _save_legend_below(fig, ax, path: Path, title: str, ncol: int, room: float) -> None:
    """Save with `ax`'s legend below the panels (never over data); `room`: the figure's share reserved below."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=ncol)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, room, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _room(bottom: tuple[float, float], panels: int) -> float:
    """Room below the panels for the legend: one row of panels needs the larger share (`bottom[0]`)."""
    return bottom[0] if panels <= 2 else bottom[1]


def make_all(df, out: Path) -> None:
    ok = df[df.status == "ok"]
    if ok.empty:
        return
    groups = list(ok.groupby("workload", sort=False))
    trainable_params(groups, out / "trainable_params.png")
    peak_memory(groups, out / "peak_memory.png")
    step_time(groups, out / "step_time.png")
    trained = [(wl, g) for wl, g in groups if str(g.pretrained.iloc[0]).lower() == "true"]
    if trained:  # accuracy on a random-weight base is noise: never plotted, never on a Pareto front
        accuracy_vs_memory(trained, out / "accuracy_vs_memory.png")
    else:
        (out / "accuracy_vs_memory.png").unlink(missing_ok=True)


def _sig(x: float) -> str:
    from .format import sig

    return sig(x)


def trainable_params(groups, path: Path) -> None:
    """A dot per method on a log axis (position, not a bar length from an arbitrary origin, carries the value),
    each annotated with its count and share of the model."""
    fig, axes = _grid(len(groups), width=4.6, lines=_most(groups))
    for ax, (wl, g) in zip(axes, groups):
        y = list(range(len(g)))
        ax.grid(axis="x", which="major", color="0.9", lw=0.8, zorder=0)
        ax.scatter(g.trainable_params, y, color="tab:blue", zorder=3, s=25)
        ax.set_yticks(y, g.method)
        ax.set_xscale("log")
        lo, hi = float(min(g.trainable_params)), float(max(g.trainable_params))
        ax.set_xlim(lo / 3, hi * 60)  # room on the right for the labels
        ax.invert_yaxis()
        ax.set_title(wl, fontsize=10)
        ax.set_xlabel("trainable parameters (log scale)")
        for yi, (v, pct) in enumerate(zip(g.trainable_params, g.trainable_pct)):
            ax.annotate(f"{int(v):,} ({_sig(pct)}%)", (v, yi), xytext=(5, 0), textcoords="offset points",
                        va="center", fontsize=7)
    _save(fig, path, "Trainable parameters (count and % of the model)")


def _most(groups) -> int:
    return max(len(g) for _, g in groups)


def style(methods: list[str]) -> dict[str, tuple[tuple, str]]:
    """A (colour, marker) per method from its place in the method registry, so that a method looks the same in every
    plot of every run: 20 colours (tab20's strong shades first, then its light ones, so the first ten differ in hue)
    × 12 markers; a name outside the registry (a sweep's "lora @ r=4") takes its method's look."""
    from .. import names

    cmap = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    rank = names.rank()
    place = {m: rank.get(str(m).split(" @ ")[0], len(rank) + i) for i, m in enumerate(methods)}
    return {m: (cmap(order[place[m] % 20]), "osD^vP*Xph<>"[place[m] % 12]) for m in methods}


def peak_memory(groups, path: Path) -> None:
    fig, axes = _grid(len(groups), width=4.8, lines=_most(groups))
    for ax, (wl, g) in zip(axes, groups):
        left = [0.0] * len(g)
        for col, label in COMPONENTS:  # parts of the tensor peak: ≥ 0 and summing to it exactly
            vals = (g[col] / 2**20).tolist()
            ax.barh(g.method, vals, left=left, label=label)
            left = [a + b for a, b in zip(left, vals)]
        ax.scatter(g.process_peak_bytes / 2**20, range(len(g)), marker="|", color="k", s=120,
                   label="process peak", zorder=3)
        ax.invert_yaxis()
        ax.set_title(wl, fontsize=10)
        ax.set_xlabel("MiB (bars: tensor peak; |: process peak)")
    _save_legend_below(fig, axes[0], path, "Peak training memory by component", 3, _room((0.14, 0.07), len(groups)))


def reference(g) -> tuple[str, float]:
    """What step times are divided by: full fine-tuning's when the workload has it (a ratio), else 1 ms (milliseconds:
    a method divided by itself would plot 1)."""
    full = g[g.method == "full"]
    return ("full", float(full.iloc[0].step_time_s)) if len(full) else ("", 1e-3)


def step_time(groups, path: Path) -> None:
    """Bars: forward / backward / optimizer medians (the split; they add up to the bar). Dot and whiskers: the
    whole step's geometric mean over repeats with its 95 % interval (asymmetric; none for one repeat). Relative to
    full fine-tuning where the workload has it, else in milliseconds."""
    fig, axes = _grid(len(groups), width=4.6, lines=_most(groups))
    intervals = False
    for ax, (wl, g) in zip(axes, groups):
        name, ref = reference(g)
        y = list(range(len(g)))
        left = [0.0] * len(g)
        for col, label in (("forward_s", "forward"), ("backward_s", "backward"), ("optimizer_s", "optimizer")):
            vals = (g[col] / ref).tolist()
            ax.barh(y, vals, left=left, label=label, height=0.6)
            left = [a + b for a, b in zip(left, vals)]
        med = (g.step_time_s / ref).to_numpy()
        lo = (g.get("step_time_ci_low_s", g.step_time_s).fillna(g.step_time_s) / ref).to_numpy()
        hi = (g.get("step_time_ci_high_s", g.step_time_s).fillna(g.step_time_s) / ref).to_numpy()
        intervals |= bool((hi > lo).any())
        ax.errorbar(med, y, xerr=[med - lo, hi - med], fmt="o", color="k", ms=3, capsize=3, lw=1,
                    label="whole step, geometric mean" + (" (95 % CI)" if intervals else " (one repeat: no interval)"))
        if name:
            ax.axvline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_yticks(y, g.method)
        ax.invert_yaxis()
        ax.set_title(wl, fontsize=10)
        ax.set_xlabel(f"step time ÷ full fine-tuning's ({_sig(ref * 1e3)} ms)" if name else "ms per training step")
    _save_legend_below(fig, axes[0], path, "Training step time" + (" relative to full fine-tuning" if any(
        reference(g)[0] for _, g in groups) else ""), 4, _room((0.08, 0.05), len(groups)))


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another (lower memory and higher accuracy is better)."""
    front = []
    for i, (m, a) in enumerate(points):
        if not any((m2 <= m and a2 >= a) and (m2, a2) != (m, a) for m2, a2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def on_front(r, base_accuracy: float) -> bool:
    """Whether a cell may stand on the Pareto front: it learned (see `report.learned`) and is not clearly worse than
    the base it started from — a trained model whose whole Wilson interval lies below the untouched base's accuracy
    is no trade-off worth drawing — and clear of the majority class: a classifier whose interval reaches the rate of
    always answering the commonest label has learned nothing a user would pay memory for."""
    from ..measure.stats import wilson
    from .summary import learned

    low, high = wilson(round(r.accuracy * r.test_examples), r.test_examples)
    majority = getattr(r, "majority_rate", float("nan"))
    clear = not (majority == majority) or low > majority
    return learned(r) and high >= base_accuracy and clear


def accuracy_vs_memory(groups, path: Path) -> None:
    """Pretrained workloads only. One marker per method (same colour in every panel, named in the legend) with its
    95 % Wilson interval; the Pareto front ringed in red, drawn over the cells that learned and whose interval
    reaches the base model's accuracy. With many methods, beside each scatter a dot chart of the same cells ranked by
    accuracy, each row naming its method and memory — the scatter's clustered markers (most adapters within a few
    MiB of each other) stay readable there."""
    methods = list(dict.fromkeys(m for _, g in groups for m in g.method))
    looks = style(methods)
    many = len(methods) > 9
    fig, axes = _grid(len(groups) * (2 if many else 1), width=(7.0 if many else 6.0) if len(groups) == 1 else 4.6,
                      height=max(4.0, 0.22 * len(methods) + 1.2) if many else 4.0)
    for i, (wl, g) in enumerate(groups):
        rows = [r for _, r in g.iterrows()]
        ax = axes[2 * i if many else i]
        _scatter(ax, wl, g, rows, looks)
        if many:
            _ranked(axes[2 * i + 1], wl, g, rows, looks)
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    ncol = 3 if len(handles) <= 9 else 4
    legend_rows = -(-len(handles) // ncol)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center", ncol=ncol)
    fig.suptitle("Accuracy vs peak memory\n(hollow marker: training loss did not go down)", fontsize=10)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, min(0.5, (0.17 * legend_rows + 0.1) / height), 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _scatter(ax, wl: str, g, rows: list, looks: dict) -> None:
    from ..measure.stats import wilson
    from .summary import learned

    for r in rows:
        mem, a, n = r.tensor_peak_bytes / 2**20, r.accuracy, r.test_examples
        lo, hi = wilson(round(a * n), n)
        colour, marker = looks[r.method]
        ax.errorbar([mem], [a], yerr=[[a - lo], [hi - a]], color=colour, marker=marker, ms=6, capsize=2, lw=0.8,
                    zorder=3, label=r.method, mfc="none" if not learned(r) else colour)
    base = g.base_accuracy.dropna()
    floor = float(base.iloc[0]) if len(base) else -1.0
    ok = [r for r in rows if on_front(r, floor)]
    pts = [(r.tensor_peak_bytes / 2**20, r.accuracy) for r in ok]
    front = pareto(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:red", lw=1, zorder=2)
    ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=160, facecolors="none",
               edgecolors="tab:red", zorder=4, label="Pareto front (learned, clear of majority, not below base)")
    if len(base):
        ax.axhline(float(base.iloc[0]), color="grey", ls=":", lw=0.8, label="base, before training")
    ax.set_title(f"{wl} (n={int(rows[0].test_examples):,})", fontsize=10)
    ax.set_xlabel("tensor peak of a training step (MiB)")
    ax.set_ylabel("held-out accuracy (95% Wilson CI)")


def _ranked(ax, wl: str, g, rows: list, looks: dict) -> None:
    """The same cells as a dot chart ranked by accuracy: one row per method, named with its memory."""
    from ..measure.stats import wilson
    from .summary import learned

    ranked = sorted(rows, key=lambda r: r.accuracy)
    for y, r in enumerate(ranked):
        a, n = r.accuracy, r.test_examples
        lo, hi = wilson(round(a * n), n)
        colour, marker = looks[r.method]
        ax.errorbar([a], [y], xerr=[[a - lo], [hi - a]], color=colour, marker=marker, ms=5, capsize=2, lw=0.8,
                    mfc="none" if not learned(r) else colour)
    ax.set_yticks(range(len(ranked)), [f"{r.method} · {r.tensor_peak_bytes / 2**20:,.0f} MiB" for r in ranked],
                  fontsize=7)
    base = g.base_accuracy.dropna()
    if len(base):
        ax.axvline(float(base.iloc[0]), color="grey", ls=":", lw=0.8)
    ax.set_title(f"{wl}: ranked by accuracy (· tensor peak)", fontsize=10)
    ax.set_xlabel("held-out accuracy (95% Wilson CI)")
    ax.grid(axis="x", alpha=0.3)


def accuracy_across_seeds(seeds, path: Path) -> None:
    """One panel per pretrained workload: each method's mean accuracy over seeds with its 95 % t interval (bar),
    every seed as a dot, the majority rate and the base model's zero-shot accuracy as lines."""
    if seeds is None or not len(seeds):
        path.unlink(missing_ok=True)
        return
    import json

    from .summary import seed_count

    groups = list(seeds.groupby("workload", sort=False))
    fig, axes = _grid(len(groups), width=6.0 if len(groups) == 1 else 4.8, height=3.8, lines=_most(groups))
    for ax, (wl, g) in zip(axes, groups):
        y = range(len(g))
        for i, (_, r) in zip(y, g.iterrows()):
            hollow = r.learned_seeds < seed_count(r)
            ax.errorbar([r.accuracy_mean], [i], xerr=[[r.accuracy_mean - r.accuracy_ci_low],
                                                      [r.accuracy_ci_high - r.accuracy_mean]],
                        fmt="o", ms=7, color="tab:blue", mfc="none" if hollow else "tab:blue", capsize=3, zorder=3,
                        label="mean, 95% CI over seeds")
            per = json.loads(r.accuracies)
            ax.scatter(per, [i + 0.2] * len(per), s=12, color="dimgrey", marker="|", zorder=4, label="one seed")
        ax.axvline(float(g.majority_rate.iloc[0]), color="tab:red", ls="--", lw=0.8, label="majority rate")
        base = g.base_accuracy.dropna()
        if len(base):
            ax.axvline(float(base.iloc[0]), color="grey", ls=":", lw=0.8, label="base before training (zero-shot for an LM)")
        ax.set_yticks(list(y), list(g.method))
        ax.invert_yaxis()
        ax.set_title(f"{wl} (test n={int(g.test_examples.iloc[0]):,}, {int(g.train_steps.iloc[0])} steps)", fontsize=9)
        ax.set_xlabel("test accuracy")
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center", ncol=len(handles) or 1)
    fig.suptitle("Accuracy across training seeds (hollow: did not learn in some seed)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def planned_peak(rows: list[dict], varied: str, cap: int | None, path: Path) -> None:
    """`peft-bench plan --vary ... --plot`: the predicted tensor peak per method over the varied value (log₂ axis,
    every value labelled), the memory cap as a dashed line, the largest value that fits marked where searched."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    methods = list(dict.fromkeys(r["method"] for r in ok))
    looks = style(methods)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods:
        mine = sorted((r for r in ok if r["method"] == m), key=lambda r: r[varied])
        colour, marker = looks[m]
        best = mine[0].get("largest_fitting")
        label = m + (f" (fits up to {best:,})" if best else " (none fits)" if "largest_fitting" in mine[0] else "")
        ax.plot([r[varied] for r in mine], [r["tensor_peak_bytes"] / 2**30 for r in mine], marker=marker,
                color=colour, label=label)
        if best and cap:
            ax.plot([best], [cap / 2**30], marker="|", color=colour, markersize=16, markeredgewidth=2.5,
                    linestyle="none")
    if cap:
        ax.axhline(cap / 2**30, color="k", linestyle="--", linewidth=1, label=f"cap {cap / 2**30:g} GiB")
    values = sorted({r[varied] for r in ok})
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [f"{v:,}" for v in values])
    ax.set_xlabel({"seq_len": "sequence length (tokens)", "batch_size": "batch size"}.get(varied, varied))
    ax.set_ylabel("predicted tensor peak (GiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    first = ok[0]
    title = (f"{first['workload']}: one training step, {first['device']}, {first['dtype']}, "
             + (f"batch {first['batch_size']}" if varied == "seq_len" else f"{first['seq_len']:,} tokens")
             + ("\n| on the cap: the largest value that fits (searched on fake steps)" if cap else ""))
    _save(fig, path, title)

"""How cost grows: a sweep's fitted power laws, crossovers between methods, and their plots.

`peft-bench sweep --workloads W --methods M --vary NAME=v1,v2,...` runs the usual cells (fresh processes, repeats,
checks) once per value; the rows carry `vary` (the parameter) and `vary_value`. From them, per method and metric,
one model for every method:

* memory over the sequence length s:  y ≈ static + a·s + b·s²  (activations grow linearly, attention scores
  quadratically), by least squares on y − static; a and b with 95 % t intervals (n − 2 degrees of freedom) and the
  residual (R² of y − static, and the largest relative miss);
* anything else (memory over rank, batch, width, depth; step time; parameters): y ≈ static + a·x^b by least squares
  on log(y − static) against log(x), b with its 95 % t interval, R² of the log-log regression.

`static` is the closed form of weights + gradients + AdamW state (`static_closed_form_bytes`, per cell, from the
configuration) for the two peaks, and 0 for the other metrics — never fitted, the same rule for every method. Where an exact
count exists beside the measurement — trainable parameters (the closed form) and static memory (the closed form of
weights, gradients and AdamW state) — `fits.csv` also gives the largest relative difference between the two.

Crossovers: for every pair of methods and metric, the value of the varied parameter at which their curves cross
(interpolated linearly in log x between the two measured points around the sign change), claimed only when the two
differ significantly at the measured points on both sides (step times: their 95 % intervals do not overlap; memory:
by more than 1 %), with those two points as its interval; else "not resolved" or "none in the measured range"; and
for each method against full fine-tuning, where its peak-memory saving falls under 20 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

# (column, label, unit); the memory parts are the tensor-memory tracker's at the step's peak.
METRICS = [("trainable_params", "trainable parameters", ""), ("tensor_peak_bytes", "tensor peak", "B"),
           ("activations_bytes", "saved activations at the peak", "B"),
           ("saved_activations_max_bytes", "saved activations, most held", "B"),
           ("weights_bytes", "weights", "B"), ("gradients_bytes", "gradients", "B"),
           ("optimizer_bytes", "optimizer state", "B"), ("temporaries_bytes", "temporaries at the peak", "B"),
           ("process_peak_bytes", "process peak", "B"), ("step_time_s", "step time", "s"),
           ("tokens_per_s", "tokens/s", "1/s")]
PEAKS = {"tensor_peak_bytes", "process_peak_bytes"}  # the ones with a constant term: the static part
ANALYTIC = {"trainable_params": "closed_form_trainable_params"}
SAVING_THRESHOLD = 0.20  # "LoRA's memory is within 20 % of full fine-tuning's"


def is_sweep(df) -> bool:
    return "vary" in df.columns and df.vary.fillna("").astype(str).str.len().gt(0).any()


def labelled(df):
    """The frame with each method named with its point ("lora @ seq_len=64"), for the per-cell tables."""
    out = df.copy()
    has = out.vary_value.notna()
    out.loc[has, "method"] = out.method[has] + " @ " + out.vary[has].astype(str) + "=" + out.vary_value[has].map(
        lambda v: f"{v:g}")
    return out


def points(df):
    """Ok rows of the sweep, the reference rows (no value: a method without the varied option) apart."""
    ok = df[(df.status == "ok") & (df.get("replica", 0).fillna(0) == 0)]
    return ok[ok.vary_value.notna()], ok[ok.vary_value.isna()]


def power_fit(x: np.ndarray, y: np.ndarray, c: float | np.ndarray = 0.0) -> dict | None:
    """y ≈ c + a·x^b by least squares in log-log (c a number, or one per point); None with fewer than 3 usable
    points."""
    from scipy import stats

    z = y - c
    keep = (x > 0) & (z > 0) & np.isfinite(z)
    x, z = x[keep], z[keep]
    c = float(np.median(np.broadcast_to(c, keep.shape)[keep])) if keep.any() else 0.0
    if len(x) < 3 or len(set(x)) < 3:
        return None
    if np.all(z == z[0]):  # does not grow at all (trainable parameters over the sequence length): b = 0 exactly
        return {"a": float(z[0]), "exponent": 0.0, "exponent_ci_low": 0.0, "exponent_ci_high": 0.0, "r2": 1.0,
                "c": c, "points": len(x), "constant": True, "model": "static + a·x^b"}
    lx, lz = np.log(x), np.log(z)
    fit = stats.linregress(lx, lz)
    t = stats.t.ppf(0.975, len(x) - 2)
    return {"a": float(math.exp(fit.intercept)), "exponent": float(fit.slope),
            "exponent_ci_low": float(fit.slope - t * fit.stderr), "exponent_ci_high": float(fit.slope + t * fit.stderr),
            "r2": float(fit.rvalue ** 2), "c": c, "points": len(x), "model": "static + a·x^b"}


def poly_fit(x: np.ndarray, y: np.ndarray, static: np.ndarray) -> dict | None:
    """y ≈ static + a·x + b·x² by least squares on y − static (no fitted constant); 95 % t intervals on a and b;
    None with fewer than 3 distinct points."""
    from scipy import stats

    keep = np.isfinite(y) & np.isfinite(static)
    x, z = x[keep], (y - static)[keep]
    if len(set(x)) < 3:
        return None
    design = np.column_stack([x, x**2])
    coef, *_ = np.linalg.lstsq(design, z, rcond=None)
    resid = z - design @ coef
    dof = len(x) - 2
    sigma2 = float(resid @ resid) / dof
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(design.T @ design)))
    t = stats.t.ppf(0.975, dof)
    total = float(((z - z.mean()) ** 2).sum())
    scale = np.where(y[keep] != 0, np.abs(y[keep]), np.inf)
    return {"model": "static + a·s + b·s²", "a": float(coef[0]), "a_ci_low": float(coef[0] - t * se[0]),
            "a_ci_high": float(coef[0] + t * se[0]), "b": float(coef[1]), "b_ci_low": float(coef[1] - t * se[1]),
            "b_ci_high": float(coef[1] + t * se[1]), "r2": 1 - float(resid @ resid) / total if total else 1.0,
            "max_rel_residual": float(np.max(np.abs(resid) / scale)), "c": float(np.median(static[keep])),
            "points": len(x)}


def _static(g, col: str) -> np.ndarray:
    """The closed-form static part of `col` per cell (the peaks), else zeros: never fitted, the same for every method."""
    if col in PEAKS and "static_closed_form_bytes" in g.columns:
        return g.static_closed_form_bytes.to_numpy(dtype=float)
    return np.zeros(len(g))


def fits(df) -> list[dict]:
    """One row per (workload, method, metric): the fitted law, and the analytic count's difference where one exists."""
    pts, _ = points(df)
    out = []
    for (wl, method), g in pts.groupby(["workload", "method"], sort=False):
        g = g.sort_values("vary_value")
        x = g.vary_value.to_numpy(dtype=float)
        for col, label, unit in METRICS:
            if col not in g.columns:
                continue
            y = g[col].to_numpy(dtype=float)
            static = _static(g, col)
            f = poly_fit(x, y, static) if g.vary.iloc[0] == "seq_len" and unit == "B" else power_fit(x, y, static)
            if f is None:
                continue
            row = {"workload": wl, "method": method, "vary": g.vary.iloc[0], "metric": col, "label": label,
                   "unit": unit, **f, "x_min": float(x.min()), "x_max": float(x.max())}
            exact = ANALYTIC.get(col)
            if exact in g.columns:
                row["analytic"] = exact
                row["analytic_max_rel_diff"] = float(np.max(np.abs(y - g[exact].to_numpy(float)) / y))
                row["analytic_note"] = ("= closed form in every cell" if row["analytic_max_rel_diff"] == 0 else
                                        f"closed form differs by up to {row['analytic_max_rel_diff']:.2%}")
            elif col == "tensor_peak_bytes" and "static_matches_closed_form" in g.columns:
                # weights, every gradient and the AdamW state as the tracker saw them = their closed form, per cell
                same = g.static_matches_closed_form.astype(str).str.lower().eq("true")
                row["analytic"] = (f"static memory = closed form (weights + gradients + AdamW state) in "
                                   f"{int(same.sum())} of {len(same)} cells")
                row["analytic_max_rel_diff"] = 0.0 if same.all() else float("nan")
                row["analytic_note"] = row["analytic"]
            out.append(row)
    return out


def gpt_neo_saved_bytes_per_token_per_layer(hidden: int, heads: int, seq_len: int, element: int = 4) -> float:
    """What autograd saves for backward per token in one GPT-Neo block under full fine-tuning (every weight trains;
    dropout 0, as the published config), counted from transformers' GPT-Neo and PyTorch's saved tensors:

        ln_1: its input (h) and mean, rstd (2)      q, k, v projections: their shared input, ln_1's output (h)
        QKᵀ and ·V: contiguous copies of q, k, v (3h)     softmax: its output, one row per head (heads × seq_len)
        out_proj: its input, the merged heads (h)   ln_2: its input (h) and mean, rstd (2)
        c_fc: its input (h)                         gelu_new = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))): x for
        c_proj: its input (4h)                      x³, tanh's output, 0.5·x and 1 + tanh (4 × 4h)

    = (28h + heads·seq_len + 4) elements (mean and rstd are float32, as the rest here)."""
    return float(element * (28 * hidden + heads * seq_len + 4))


# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), §4.1:
# what one transformer layer saves for backward, per token (÷ s·b): (term, per h or per a·s, how many, kind). An
# activation takes the element size (2 bytes in the paper), a dropout mask 1 byte per value; in 16-bit the terms add
# up to h·(34 + 5·a·s/h) bytes — the paper's closed form (a test holds the transcription to it).
KORTHIKANTI = (("layer-norm inputs (2)", "h", 2, "act"), ("QKV projection input", "h", 1, "act"),
               ("QKᵀ inputs: Q and K", "h", 2, "act"), ("softmax output", "as", 1, "act"),
               ("softmax dropout mask", "as", 1, "mask"), ("attention over V: dropout output", "as", 1, "dropout"),
               ("attention over V: V", "h", 1, "act"), ("output projection input", "h", 1, "act"),
               ("attention dropout mask", "h", 1, "mask"), ("MLP first linear input", "h", 1, "act"),
               ("GeLU input (4h)", "h", 4, "act"), ("MLP second linear input (4h)", "h", 4, "act"),
               ("MLP dropout mask", "h", 1, "mask"))
# The same terms in GPT-Neo's blocks as written down from transformers' code (`gpt_neo_saved_bytes_per_token_per_layer`):
# elements per token as (× h, × a·s, constant); dropout is 0 in the published config: no masks, no dropout output.
GPT_NEO_TERMS = {"layer-norm inputs (2)": (2, 0, 4), "QKᵀ inputs: Q and K": (2, 0, 0), "attention over V: V": (1, 0, 0),
                 "QKV projection input": (1, 0, 0), "softmax output": (0, 1, 0), "output projection input": (1, 0, 0),
                 "MLP first linear input": (1, 0, 0), "GeLU input (4h)": (16, 0, 0),
                 "MLP second linear input (4h)": (4, 0, 0)}


def korthikanti_terms(hidden: int, heads: int, seq_len: int, element: int = 2, dropout: bool = True) -> list[dict]:
    """The paper's per-layer terms in bytes per token at `element` bytes per activation; without dropout the masks and
    the dropout output go (the attention-over-V matmul then saves the softmax output, counted once)."""
    out = []
    for term, unit, count, kind in KORTHIKANTI:
        if kind != "act" and not dropout:
            continue
        values = count * (hidden if unit == "h" else heads * seq_len)
        out.append({"term": term, "published_bytes": float(values * (1 if kind == "mask" else element))})
    return out


def gpt_neo_residuals(hidden: int, heads: int, seq_len: int, element: int = 4) -> list[dict]:
    """Per term: Korthikanti et al.'s count adapted to GPT-Neo (fp32, no dropout), this architecture's count, and the
    residual (this − published)."""
    rows = []
    for t in korthikanti_terms(hidden, heads, seq_len, element, dropout=False):
        h_count, as_count, const = GPT_NEO_TERMS[t["term"]]
        ours = element * (h_count * hidden + as_count * heads * seq_len + const)
        rows.append({**t, "architecture_bytes": float(ours), "residual_bytes": ours - t["published_bytes"]})
    return rows


def activation_per_token(df, arch: Callable[..., dict]) -> list[dict]:
    """Saved activations (most held during the step) per token per layer. Over depth: the slope of a straight line
    against the number of layers, divided by the tokens per step (batch × sequence length) — the head's share drops
    out; beside it, for full fine-tuning of GPT-Neo, the count from the architecture
    (`gpt_neo_saved_bytes_per_token_per_layer`). Over the sequence length or batch: the slope against tokens per
    step divided by the layers (the head's per-token share, e.g. the logits, included).

    `arch(workload, width, depth)` describes the model a cell built (`model_type`, `hidden_size`, `num_heads`,
    `layers`): the engine's answer, handed in, so that this module reads rows and never builds a model."""
    from scipy import stats

    pts, _ = points(df)
    out = []
    for (wl, method), g in pts.groupby(["workload", "method"], sort=False):
        kind = g.vary.iloc[0]
        if kind not in ("seq_len", "batch_size", "depth") or len(g) < 3:
            continue
        saved = g.saved_activations_max_bytes.to_numpy(float)
        first = g.iloc[0]
        row = {"workload": wl, "method": method, "vary": kind, "seq_len": int(first.seq_len)}
        if kind == "depth":
            fit = stats.linregress(g.vary_value.to_numpy(float), saved)
            tokens = float(first.batch_size * first.seq_len)
            row.update(bytes_per_token_per_layer=fit.slope / tokens, r2=fit.rvalue ** 2)
            a = arch(wl, first.get("width"), None)
            if method == "full" and a["model_type"] == "gpt_neo":
                row["analytic"] = gpt_neo_saved_bytes_per_token_per_layer(a["hidden_size"], a["num_heads"],
                                                                          int(first.seq_len))
        else:
            fit = stats.linregress((g.batch_size * g.seq_len).to_numpy(float), saved)
            layers = arch(wl, first.get("width"), first.get("depth"))["layers"]
            row.update(bytes_per_token_per_layer=fit.slope / layers, r2=fit.rvalue ** 2)
        if "analytic" in row:
            row["difference"] = row["bytes_per_token_per_layer"] / row["analytic"] - 1
        out.append(row)
    return out


def _curve(pts, refs, wl: str, method: str, col: str, xs: list[float]) -> np.ndarray | None:
    g = pts[(pts.workload == wl) & (pts.method == method)]
    if len(g):
        s = g.set_index("vary_value")[col]
        return np.array([float(s.get(x, np.nan)) for x in xs])
    r = refs[(refs.workload == wl) & (refs.method == method)]
    if len(r):  # a reference: the same value at every point
        return np.full(len(xs), float(r[col].iloc[0]))
    return None


def crossing(xs: list[float], diff: np.ndarray) -> float | None:
    """The x where `diff` changes sign, interpolated linearly in log x between the two points around it (equal
    values are no crossing: the sign must change)."""
    for i in range(len(xs) - 1):
        a, b = diff[i], diff[i + 1]
        if not (math.isfinite(a) and math.isfinite(b)):
            continue
        if a * b < 0:
            t = a / (a - b)
            return float(math.exp(math.log(xs[i]) + t * (math.log(xs[i + 1]) - math.log(xs[i]))))
    return None


def _apart(pts, refs, wl: str, pair: tuple[str, str], col: str, xs: list[float]) -> np.ndarray:
    """Per measured point: +1 / −1 where method a lies significantly above / below b, 0 where they cannot be told
    apart (step times: 95 % intervals overlap; memory and counts: within 1 %)."""
    a, b = (_curve(pts, refs, wl, m, col, xs) for m in pair)
    if col == "step_time_s" and "step_time_ci_low_s" in pts.columns:
        alo, bhi = (_curve(pts, refs, wl, m, c, xs) for m, c in zip(pair, ("step_time_ci_low_s", "step_time_ci_high_s")))
        ahi, blo = (_curve(pts, refs, wl, m, c, xs) for m, c in zip(pair, ("step_time_ci_high_s", "step_time_ci_low_s")))
        return np.where(alo > bhi, 1, np.where(ahi < blo, -1, 0))
    return np.where(a > 1.01 * b, 1, np.where(b > 1.01 * a, -1, 0))


def resolved_crossing(xs: list[float], diff: np.ndarray, apart: np.ndarray) -> tuple[float, float, float] | None:
    """(x, low, high): where `diff` changes sign between two measured points at which the curves differ
    significantly with opposite signs; the crossing interpolated in log x between the nearest such points."""
    signed = [(x, s) for x, s in zip(xs, apart) if s != 0]
    for (x0, s0), (x1, s1) in zip(signed, signed[1:]):
        if s0 != s1:
            i, j = xs.index(x0), xs.index(x1)
            x = crossing(xs[i:j + 1], diff[i:j + 1])
            return (x if x is not None else math.sqrt(x0 * x1)), x0, x1
    return None


def crossovers(df) -> list[dict]:
    pts, refs = points(df)
    out = []
    for wl, g in pts.groupby("workload", sort=False):
        xs = sorted(set(g.vary_value.astype(float)))
        methods = list(dict.fromkeys(list(g.method) + list(refs[refs.workload == wl].method)))
        for col in ("tensor_peak_bytes", "step_time_s", "tokens_per_s", "trainable_params"):
            curves = {m: _curve(pts, refs, wl, m, col, xs) for m in methods}
            for i, a in enumerate(methods):
                for b in methods[i + 1:]:
                    ya, yb = curves[a], curves[b]
                    if ya is None or yb is None:
                        continue
                    name = dict((c_, lab) for c_, lab, _ in METRICS).get(col, col)
                    if np.allclose(ya, yb, rtol=1e-6, atol=0):
                        out.append({"workload": wl, "metric": col, "a": a, "b": b, "x": None,
                                    "text": f"{name}: {a} and {b} equal at every point"})
                        continue
                    out.append(_pair_crossing(wl, col, name, (a, b), (xs, ya, yb, g.vary.iloc[0]),
                                              _apart(pts, refs, wl, (a, b), col, xs)))
        full = _curve(pts, refs, wl, "full", "tensor_peak_bytes", xs)
        if full is not None:
            for m in methods:
                if m == "full":
                    continue
                y = _curve(pts, refs, wl, m, "tensor_peak_bytes", xs)
                saving = 1 - y / full
                x = crossing(xs, saving - SAVING_THRESHOLD)
                kind = g.vary.iloc[0]
                if x is not None:
                    text = (f"{m}'s peak-memory saving over full fine-tuning falls under {SAVING_THRESHOLD:.0%} at "
                            f"{kind} ≈ {x:.3g} (saving {saving[0]:.0%} at {xs[0]:g}, {saving[-1]:.0%} at {xs[-1]:g})")
                else:
                    side = "above" if np.nanmin(saving) >= SAVING_THRESHOLD else "under"
                    text = (f"{m}'s peak-memory saving over full fine-tuning stays {side} {SAVING_THRESHOLD:.0%} in "
                            f"the measured range ({saving[0]:.0%} at {kind} {xs[0]:g}, {saving[-1]:.0%} at {xs[-1]:g})")
                out.append({"workload": wl, "metric": "saving_vs_full", "a": m, "b": "full", "x": x, "text": text})
    return out


def _pair_crossing(wl: str, col: str, name: str, pair: tuple[str, str], curves: tuple, apart: np.ndarray) -> dict:
    (a, b), (xs, ya, yb, kind) = pair, curves
    row = {"workload": wl, "metric": col, "a": a, "b": b, "x": None, "x_low": None, "x_high": None}
    found = resolved_crossing(xs, ya - yb, apart)
    if found:
        x, lo, hi = found
        first = a if ya[0] > yb[0] else b
        row.update(x=x, x_low=lo, x_high=hi, text=f"{name}: {a} and {b} cross at {kind} ≈ {x:.3g} (between the "
                   f"measured {lo:g} and {hi:g}, where they differ significantly; {first} higher below it)")
    elif crossing(xs, ya - yb) is not None:
        row["text"] = (f"{name}: {a} and {b} change order between measured points but do not differ significantly "
                       "on both sides (crossover not resolved)")
    elif (apart != 0).all():
        row["text"] = (f"{name}: {a} {'above' if np.nanmean(ya - yb) > 0 else 'below'} {b} throughout the measured "
                       "range (no crossover)")
    else:
        row["text"] = f"{name}: {a} and {b} not told apart at every point (no crossover claimed)"
    return row


def write(df, out: Path, arch: Callable[..., dict] | None) -> list[str]:
    """fits.csv, crossovers.csv, the log-log plots; return the summary section's lines."""
    import pandas as pd

    from .format import sig, table

    rows = fits(df)
    pd.DataFrame(rows).to_csv(out / "fits.csv", index=False)
    cross = crossovers(df)
    pd.DataFrame(cross).to_csv(out / "crossovers.csv", index=False)
    plot(df, rows, out / "sweep.png")
    pts, refs = points(df)
    kind = str(pts.vary.iloc[0]) if len(pts) else "?"
    lines = [f"## Sweep: {kind}", "",
             f"Values: {', '.join(f'{v:g}' for v in sorted(set(pts.vary_value.astype(float))))}"
             + (f"; run once (they have no {kind}): {', '.join(sorted(set(refs.method)))}" if len(refs) else "")
             + ". One model per metric for every method: memory over the sequence length as static + a·s + b·s² "
             "(activations linear, attention scores quadratic), anything else as static + a·x^b (least squares in "
             "log-log); static = the closed form of weights + gradients + AdamW state for the peaks, 0 otherwise — "
             "never fitted. 95 % t intervals; R² of the fit. `fits.csv` has every method × metric; plot "
             "`sweep.png`.", ""]
    shown = [r for r in rows if r["metric"] in ("tensor_peak_bytes", "saved_activations_max_bytes", "step_time_s",
                                                "trainable_params")]
    lines += table(["workload", "method", "metric", "model", "fitted (95% CI)", "R²", "static", "exact count vs measured"],
                   [[r["workload"], r["method"], r["label"], r["model"], _fitted(r), f"{r['r2']:.3f}",
                     sig(r["c"]) if r["c"] else "0", r.get("analytic_note", "–")] for r in shown]) + [""]
    act = activation_per_token(df, arch) if arch else []
    if act:
        pd.DataFrame(act).to_csv(out / "activations.csv", index=False)
        lines += ["Saved activations per token per layer (bytes; a straight-line fit against "
                  + ("the depth, ÷ tokens per step" if kind == "depth" else
                     "tokens per step, ÷ layers — the head's per-token share, e.g. the logits, included") + "; "
                  "the count from the architecture where one is written down — `activations.csv`):", ""]
        lines += table(["workload", "method", "fitted", "R²", "from the architecture", "difference"],
                       [[a["workload"], a["method"], sig(a["bytes_per_token_per_layer"]), f"{a['r2']:.4f}",
                         sig(a["analytic"]) if "analytic" in a else "–",
                         f"{a['difference']:+.1%}" if "difference" in a else "–"] for a in act]) + [""]
        lines += _published_formula(act, arch)
    lines += ["Crossovers:", ""] + [f"- {c['text']}" for c in cross if c["metric"] in ("tensor_peak_bytes",
                                                                                         "step_time_s",
                                                                                         "saving_vs_full")] + [""]
    return lines


def _fitted(r: dict) -> str:
    from .format import sig

    if r.get("constant"):
        return "constant"
    if r["model"].endswith("s²"):
        return (f"a = {sig(r['a'])} ({sig(r['a_ci_low'])} to {sig(r['a_ci_high'])}) B/token, b = {sig(r['b'])} "
                f"({sig(r['b_ci_low'])} to {sig(r['b_ci_high'])}) B/token²; largest miss {r['max_rel_residual']:.1%}")
    return f"b = {r['exponent']:.3f} ({r['exponent_ci_low']:.3f} to {r['exponent_ci_high']:.3f})"


def _published_formula(act: list[dict], arch: Callable[..., dict]) -> list[str]:
    """The tracker's count, the architecture's and Korthikanti et al.'s adapted formula, term by term, for GPT-Neo's
    full fine-tuning over depth (the three witnesses of the saved activations)."""
    from .format import sig, table

    rows = [a for a in act if "analytic" in a and a["vary"] == "depth"]
    if not rows:
        return []
    a = rows[0]
    d = arch(a["workload"], None, None)
    terms = gpt_neo_residuals(d["hidden_size"], d["num_heads"], a["seq_len"])
    published = sum(t["published_bytes"] for t in terms)
    lines = [f"The published formula as a third witness: Korthikanti et al. 2022 (arXiv:2205.05198, §4.1: "
             f"s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit) adapted term by term to GPT-Neo in float32 without "
             f"dropout (its published config's): {sig(published)} bytes per token per layer at h = "
             f"{d['hidden_size']}, a = {d['num_heads']}, s = {a['seq_len']}, against the tracker's fitted "
             f"{sig(a['bytes_per_token_per_layer'])} and the architecture's {sig(a['analytic'])}. Per term (bytes per "
             "token per layer; residual = the architecture's − the published):", ""]
    lines += table(["term", "published (adapted)", "this architecture", "residual"],
                   [[t["term"], sig(t["published_bytes"]), sig(t["architecture_bytes"]),
                     f"{t['residual_bytes']:+,.0f}"] for t in terms]) + [""]
    lines += ["The whole residual is GPT-Neo's own: its `gelu_new` (tanh form) keeps four 4h-wide tensors for backward "
              "(x for x³, tanh's output, 0.5·x, 1 + tanh) where the paper counts one GeLU input, and each LayerNorm "
              "keeps its mean and reciprocal deviation (2 values per token).", ""]
    return lines


def _axes(ax, xs: list[float], ys: list[float], kind: str, label: str) -> None:
    """Log axes where the data span a factor of 3 or more, linear ones otherwise (a log axis over 95–103 MiB only
    prints 9.5×10¹); every swept value is labelled, not only the powers of two."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ys = [y for y in ys if y == y and y > 0]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 0.0)
    if xs and max(xs) / max(min(xs), 1e-12) >= 3:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if lo > 0 and hi / lo >= 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels inside a decade too
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(kind)
    ax.set_ylabel(label)


def _fitted_curve(f: dict, x: np.ndarray, static: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fitted curve: static + the fitted growth. Where the static part is the same at every point (a sequence
    length or batch sweep) a smooth curve; where it changes with the swept value (width, depth: the weights grow) the
    curve through each point's own static part — never one median static under points whose static part differs."""
    def grow(v):
        return f["a"] * v + f["b"] * v**2 if "b_ci_low" in f else f["a"] * v ** f["exponent"]

    if np.ptp(static) == 0:
        xx = np.geomspace(x.min(), x.max(), 50)
        return xx, static[0] + grow(xx)
    return x, static + grow(x)


def plot(df, rows: list[dict], path: Path) -> None:
    """Log-log panels (peak memory, saved activations, step time, trainable parameters): measured points, fitted
    lines dashed, methods run once as horizontal dotted lines."""
    from . import plots

    plt = plots.plt
    pts, refs = points(df)
    if pts.empty:
        return
    methods = list(dict.fromkeys(list(pts.method) + list(refs.method)))
    looks = plots.style(methods)
    panels = [("tensor_peak_bytes", "tensor peak (MiB)", 2**20), ("saved_activations_max_bytes",
                                                                  "saved activations (MiB)", 2**20),
              ("step_time_s", "step time (ms)", 1e-3), ("trainable_params", "trainable parameters", 1)]
    fig, axes = plots._grid(len(panels), width=4.6, height=3.6)
    fitted = {(r["method"], r["metric"]): r for r in rows}
    kind = str(pts.vary.iloc[0])
    for ax, (col, label, scale) in zip(axes, panels):
        for m in methods:
            colour, marker = looks[m]
            g = pts[pts.method == m].sort_values("vary_value")
            if len(g):
                x = g.vary_value.to_numpy(float)
                ax.plot(x, g[col] / scale, marker=marker, ls="none", color=colour, label=m)
                f = fitted.get((m, col))
                if f:
                    xx, yy = _fitted_curve(f, x, _static(g, col))
                    ax.plot(xx, yy / scale, ls="--", lw=0.8, color=colour)
            else:
                r = refs[refs.method == m]
                if len(r):
                    ax.axhline(float(r[col].iloc[0]) / scale, ls=":", lw=1, color=colour, label=f"{m} (no {kind})")
        _axes(ax, sorted(set(pts.vary_value.astype(float))), [*pts[col].astype(float), *refs[col].astype(float)],
              kind, label)
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center", ncol=min(4, len(handles)))
    model = "static + a·s + b·s² for memory, static + a·x^b otherwise" if kind == "seq_len" else "static + a·x^b"
    fig.suptitle(f"How cost grows with {kind} (log axes where a panel spans 3× or more; dashed: fitted {model})",
                 fontsize=10)
    rows_ = -(-len(handles) // 4)
    fig.tight_layout(rect=(0, min(0.4, (0.17 * rows_ + 0.1) / fig.get_size_inches()[1]), 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)

"""summary.md and the plots of a results folder, rebuilt from its metrics.csv, repeats.csv and environment.json
alone: rows in, text and pictures out. Nothing here imports torch, a model or a method (a test holds it so).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import names, results
from ..errors import UserError
from ..measure import records
from ..measure.repeats import RUN_SLOW, floor_of, times_by_round, used
from ..results import COLUMNS, TEXT, read_rows
from .format import ci, sig, table
from .format import mib as _mib
from .format import ms as _ms
from .format import size as _size


# -- plots and summary --------------------------------------------------------------------------------------
def load_frame(out: Path):
    import pandas as pd

    rows = read_rows(out / "metrics.csv")
    if not rows:
        raise UserError(f"{out}/metrics.csv has no rows to report")
    df = pd.DataFrame(rows)
    for c in df.columns:
        if c not in TEXT:
            values = pd.to_numeric(df[c], errors="coerce")
            bad = values.isna() & df[c].notna() & ~df[c].astype(str).str.strip().isin(["", "nan", "NaN", "None", "inf",
                                                                                         "-inf"])
            if bad.any() and c in COLUMNS:
                i = int(bad.to_numpy().nonzero()[0][0])
                raise UserError(f"{out}/metrics.csv row {i + 2}, column {c}: {df[c].iloc[i]!r} is not a number; "
                                "fix or remove that row")
            df[c] = values
    if "replica" not in df.columns:
        df["replica"] = 0
    return df


def accuracy_only(df) -> bool:
    """A run of accuracy probes only (the accuracy suite, tune): no memory or timing probe ran."""
    return "tensor_peak_bytes" not in df.columns or df.loc[df.status == "ok", "tensor_peak_bytes"].isna().all()


def first_seed(df):
    """One row per (method, workload): the first seed's (tables and plots of cost; accuracy over seeds is apart)."""
    if "seed" not in df.columns or df.seed.nunique() <= 1:
        return df
    return df[df.seed == df.seed.min()]


SEED_COLUMNS = ["workload", "method", "lr", "train_steps", "seeds", "test_examples", "majority_rate", "accuracy_mean",
                "accuracy_ci_low", "accuracy_ci_high", "accuracy_sd", "accuracies", "base_accuracy", "learned_seeds",
                "forgetting_mean", "forgetting_ci_low", "forgetting_ci_high", "forgetting_tokens"]


def across_seeds(df):
    """Accuracy per (workload, method) over its training seeds, on pretrained workloads: mean with its Student-t
    95 % CI across seeds (the spread training randomness gives; each seed's own Wilson interval is in
    metrics.csv), how many seeds learned, and the forgetting likewise. Empty unless some cell has 2+ seeds."""
    import pandas as pd

    from ..measure.stats import mean_ci

    if "seed" not in df.columns or "accuracy" not in df.columns:
        return pd.DataFrame(columns=SEED_COLUMNS)
    ok = cells(df)
    ok = ok[(ok.status == "ok") & ok.apply(pretrained, axis=1)]
    out = []
    # Workloads in the order they first appear, methods in the registry's order (as every other table), rates rising.
    rank = names.rank()
    first = {w: i for i, w in enumerate(dict.fromkeys(ok.workload))}
    groups = sorted(ok.groupby(["workload", "method", "lr"], sort=False),
                    key=lambda kv: (first[kv[0][0]], rank.get(kv[0][1], len(rank)), kv[0][2]))
    for (wl, m, lr), g in groups:
        if g.seed.nunique() < 2:
            continue
        g = g.sort_values("seed")
        acc, forget = mean_ci(g.accuracy.tolist()), mean_ci(g.get("forgetting", pd.Series(dtype=float)).tolist())
        out.append({"workload": wl, "method": m, "lr": lr, "train_steps": int(g.train_steps.iloc[0]),
                    "seeds": ",".join(str(int(x)) for x in g.seed), "test_examples": int(g.test_examples.iloc[0]),
                    "majority_rate": _num(g.iloc[0], "majority_rate"), "accuracy_mean": acc.value,
                    "accuracy_ci_low": acc.low, "accuracy_ci_high": acc.high, "accuracy_sd": g.accuracy.std(),
                    "accuracies": json.dumps([round(float(x), 4) for x in g.accuracy]),
                    "base_accuracy": _base_of(ok, wl, g),
                    "learned_seeds": int(sum(learned(r) for _, r in g.iterrows())), "forgetting_mean": forget.value,
                    "forgetting_ci_low": forget.low, "forgetting_ci_high": forget.high,
                    "forgetting_tokens": _num(g.iloc[0], "forgetting_tokens")})
    return pd.DataFrame(out, columns=SEED_COLUMNS)


def seed_count(r) -> int:
    """Seeds behind one row of `across_seeds`."""
    return len(str(r.seeds).split(","))


def seed_verdict(r, with_steps: bool = False) -> str:
    """'did not learn (i of k seeds)' when the loss did not go down in some seed, else whether the interval across
    seeds lies above the majority rate."""
    k = seed_count(r)
    if r.learned_seeds < k:
        return f"did not learn ({k - int(r.learned_seeds)} of {k} seeds" + (
            f"; {int(r.train_steps)} steps)" if with_steps else ")")
    if r.accuracy_ci_low > r.majority_rate:
        return "above majority"
    # The loss went down, the accuracy did not clear the majority rate: said plainly, with the budget it had.
    below = r.accuracy_ci_high < r.base_accuracy  # worse than the base model it started from (e.g. zero-shot)
    return "not clear of majority" + (" and below the base model" if below else "") + (
        f" within {int(r.train_steps)} steps" if with_steps else "")


def _base_of(ok, workload: str, g) -> float:
    """The base model's accuracy: this method's rows, else any row of the workload (a pretrained base is scored
    once per run in accuracy-only runs)."""
    for frame in (g, ok[ok.workload == workload]):
        if "base_accuracy" in frame and frame.base_accuracy.notna().any():
            return float(frame.base_accuracy.dropna().mean())
    return float("nan")


def _base_line(ok, workload: str) -> str:
    """' Base model (zero-shot) accuracy …' for a pretrained workload, scored once per run; '' otherwise."""
    from ..measure.stats import wilson

    if not len(ok) or not pretrained(ok.iloc[0]):
        return ""
    base = _base_of(ok, workload, ok)
    n = _num(ok.iloc[0], "test_examples")
    if base != base or n != n:
        return ""
    lo, hi = wilson(round(base * n), n)
    return (f" Base model before training (zero-shot for a language model): accuracy {base:.3f} ({lo:.3f}–{hi:.3f}),"
            f" n={int(n):,}.")


SAME_MATH = ("lora", "lora-parametrize", "hf-lora")  # one parametrisation, three implementations


def seeds_section(seeds) -> list[str]:
    """Markdown: accuracy over seeds per workload, each method judged against the majority rate, and the LoRA
    implementations compared with each other."""
    from ..measure.stats import welch_difference

    if seeds is None or not len(seeds):
        return []
    lines = ["## Accuracy across training seeds", "",
             "Mean test accuracy over the seeds with its 95 % Student-t interval across seeds (training randomness: "
             "initialisation and batch order; the test split is the same for every seed). ‘above majority’: the "
             "interval lies above the majority-label rate; ‘did not learn’: the training loss did not go down "
             "beyond batch noise in at least one seed (see `loss_probe_drop_ci_low`), so the accuracy is not ranked.", ""]
    for wl, g in seeds.groupby("workload", sort=False):
        first = g.iloc[0]
        lines += [f"### {wl}", "", f"{int(first.train_steps)} training steps per seed; test n = "
                  f"{int(first.test_examples):,}; majority rate {first.majority_rate:.3f}"
                  + (f"; base model before training {first.base_accuracy:.3f} (zero-shot for a language model)"
                     if first.base_accuracy == first.base_accuracy else "")
                  + (f"; forgetting on {int(first.forgetting_tokens):,} tokens of general text" if
                     first.forgetting_tokens == first.forgetting_tokens and first.forgetting_tokens else "") + ".", ""]
        rows = []
        for _, r in g.iterrows():
            k = seed_count(r)
            verdict = seed_verdict(r, with_steps=True)
            forget = (ci(r.forgetting_mean, r.forgetting_ci_low, r.forgetting_ci_high) if r.forgetting_mean ==
                      r.forgetting_mean else "–")
            rows.append([r.method, f"{r.lr:g}", f"{r.accuracy_mean:.3f} ({r.accuracy_ci_low:.3f}–{r.accuracy_ci_high:.3f})",
                         ", ".join(f"{x:.3f}" for x in json.loads(r.accuracies)), verdict, forget])
        lines += table(["method", "lr", f"accuracy, mean of {k} seeds (95% CI)", "per seed", "verdict",
                        "forgetting Δ nats/token (95% CI)"], rows) + [""]
        per = {r.method: json.loads(r.accuracies) for _, r in g.iterrows()}
        same = [m for m in SAME_MATH if m in per]
        if "lora" in per and len(same) > 1:
            parts = []
            for m in same[1:]:
                d = welch_difference(per[m], per["lora"])
                word = "indistinguishable" if d.low <= 0 <= d.high else "DIFFERENT"
                parts.append(f"`{m}` − `lora` = {d.value:+.3f} ({d.low:+.3f} to {d.high:+.3f}): {word}")
            lines += ["The three LoRA implementations train the same function of the same numbers, so their "
                      "accuracies must agree (difference of means, 95 % Welch interval): " + "; ".join(parts) + ".", ""]
    return lines


def accuracy_summary(df, env: dict, seeds) -> str:
    """summary.md of an accuracy-only run (the accuracy suite)."""
    lines = ["# peft-bench accuracy", ""]
    if env:
        lines += [f"Made by `{env.get('command', '?')}` on {env.get('date_utc', '?')} at commit "
                  f"{str(env.get('git_commit', ''))[:10]}{' (dirty)' if env.get('git_dirty') else ''}; "
                  f"{_seeds_text(env)}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
                  f"peft {env.get('peft')}. Accuracy probes only (no memory, timing or checkpoint probes: see the "
                  "default suite for those).", ""]
    lines += seeds_section(seeds)
    ok = cells(df)
    rows = [[r.workload, r.method, str(int(r.seed)), f"{r.lr:g}", _accuracy_cell(r),
             f"{_num(r, 'forgetting'):+.4f}" if _num(r, "forgetting") == _num(r, "forgetting") else "–",
             f"{_num(r, 'loss_start'):.3f} → {_num(r, 'loss_end'):.3f}"]
            for _, r in ok.iterrows() if r.status == "ok"]
    rows += [[r.workload, r.method, str(int(r.seed)) if r.seed == r.seed else "", "", r.status, "", str(r.reason)]
             for _, r in ok.iterrows() if r.status != "ok"]
    lines += ["## Every cell", ""] + table(["workload", "method", "seed", "lr", "accuracy (95% Wilson CI), n; base",
                                            "forgetting Δ", "training loss first → last window"], rows) + [""]
    defs = records.definitions()
    lines += ["Definitions:", ""] + [f"- `{k}`: {defs[k]}" for k in (
        "accuracy", "accuracy_ci_low", "base_accuracy", "majority_rate", "forgetting", "loss_probe_drop_ci_low")] + [""]
    lines += ["Plot: `accuracy_seeds.png`. Per-seed rows: `metrics.csv`; across seeds: `summary_seeds.csv`.", ""]
    return "\n".join(lines)


def cells(df):
    """The measured cells, without the A/A replicas (those only give the noise floor)."""
    if "replica" not in df.columns:
        return df
    return df[df.replica.fillna(0) == 0]


# -- numbers as a paper prints them ---------------------------------------------------------------------------
MAIN = ["method", "options", "trainable params (% of total)", "tensor peak MiB",
        "weights / grads / optim / activations / temps MiB", "process peak MiB", "step ms (95% CI)",
        "step vs full (95% CI)", "fwd / bwd / opt ms", "samples/s", "% of matmul peak",
        "inference base / unmerged / merged ms", "accuracy (95% Wilson CI), n; base", "notes"]
CKPT = ["method", "checkpoint", "holds", "trainable tensors", "restore cold / warm ms",
        "whole-model load cold / warm ms", "round-trip max abs diff"]


def _ratio_cell(r, floor: float) -> str:
    from ..measure.stats import Estimate, verdict

    v = _num(r, "step_time_vs_full")
    if v != v:
        return ""
    est = Estimate(v, _num(r, "step_time_vs_full_ci_low"), _num(r, "step_time_vs_full_ci_high"), int(_num(r, "repeats") or 1))
    if r.method == "full" and v == 1.0:
        return "1 (reference)"
    if est.n <= 1:  # one repeat: no interval, so no ranking either
        return ci(v, est.low, est.high, suffix="×") + " †"
    same = verdict(est, floor) == "no measurable difference"
    return ("≈ " if same else "") + ci(v, est.low, est.high, suffix="×")


def _num(r, key: str) -> float:
    try:
        return float(r.get(key))
    except (TypeError, ValueError):
        return float("nan")


def _notes(r) -> str:
    notes = []
    if _num(r, "interference_repeats") > 0:
        cpu, steal = _num(r, "other_cpu_pct"), _num(r, "cpu_steal_pct")
        what = (f"others used up to {sig(cpu)}% CPU during the timed steps" if cpu > 10 else
                f"steal up to {sig(steal)}%" if steal > 10 else
                f"the whole run at {sig(_num(r, 'run_machine_speed'))}× the idle machine's speed"
                if _num(r, "run_machine_speed") < RUN_SLOW else
                f"machine at {sig(_num(r, 'machine_speed'))}× the run's usual speed")
        notes.append(f"interference in {int(_num(r, 'interference_repeats'))} repeat(s) ({what})")
    if not learned(r):
        notes.append(f"did not learn (training loss {sig(json.loads(r.first_losses)[0])} → {sig(_num(r, 'final_loss'))}"
                     "): not ranked")
    if _num(r, "remeasured") > 0:
        notes.append(f"{int(_num(r, 'remeasured'))} repeat(s) re-measured")
    return "; ".join(notes)


def _main_row(r, floor: float) -> list[str]:
    if r.status != "ok":
        return [r.method, str(r.get("method_config") or "")] + [""] * (len(MAIN) - 3) + [f"{r.status}: {r.reason}"]
    parts = " / ".join(_mib(r[c]) for c in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
                                            "temporaries_bytes"))
    return [r.method, str(r.get("method_config") or "") or "–",
            f"{int(r.trainable_params):,} ({sig(r.trainable_pct)}%)", _mib(r.tensor_peak_bytes), parts,
            _mib(r.process_peak_bytes),
            ci(r.step_time_s, _num(r, "step_time_ci_low_s"), _num(r, "step_time_ci_high_s"), scale=1e3),
            _ratio_cell(r, floor),
            f"{_ms(r.forward_s)} / {_ms(r.backward_s)} / {_ms(r.optimizer_s)}", sig(r.samples_per_s),
            sig(r.pct_of_matmul_peak),
            f"{_ms(r.inference_base_s)} / {_ms(r.inference_adapter_s)} / {_ms(r.inference_merged_s) or '–'}",
            _accuracy_cell(r), _notes(r) or "ok"]


def pretrained(r) -> bool:
    return str(r.get("pretrained", "")).lower() == "true"


def learned(r) -> bool:
    """Training lowered the loss beyond batch-to-batch noise: the paired interval of a fixed probe's loss before
    minus after lies above 0 (`loss_probe_drop_ci_low` > 0). Rows from before the probe: the last-window mean loss
    below the first window's (a point estimate). A method whose loss never moved learned nothing, whatever its
    accuracy."""
    drop = _num(r, "loss_probe_drop_ci_low")
    if drop == drop:
        return drop > 0
    start, end = _num(r, "loss_start"), _num(r, "loss_end")
    if start == start and end == end:
        return end < start
    try:
        first = json.loads(r.get("first_losses") or "[]")[0]
    except (ValueError, IndexError, TypeError):
        return True
    return _num(r, "final_loss") < first


def _accuracy_cell(r) -> str:
    """Accuracy with its 95 % Wilson interval and n; none on a random-weight base (it would be noise)."""
    from ..measure.stats import wilson

    n = _num(r, "test_examples")
    if not pretrained(r):
        return "n/a: random weights"
    if n != n:
        return ""
    lo, hi = _num(r, "accuracy_ci_low"), _num(r, "accuracy_ci_high")
    if lo != lo:  # rows from before the CI columns
        lo, hi = wilson(round(r.accuracy * n), n)
    base = f"; base {r.base_accuracy:.3f}" if _num(r, "base_accuracy") == _num(r, "base_accuracy") else ""
    text = f"{r.accuracy:.3f} ({lo:.3f}–{hi:.3f}), n={int(n):,}{base}"
    return text if learned(r) else f"did not learn: {text}"


def _ckpt_row(r) -> list[str]:
    return [r.method, _size(r.checkpoint_bytes), r.checkpoint_format, _size(r.trainable_state_bytes),
            f"{_ms(r.adapter_switch_cold_s)} / {_ms(r.adapter_switch_warm_s)}",
            f"{_ms(r.full_model_load_cold_s)} / {_ms(r.full_model_load_warm_s)}", f"{r.roundtrip_max_abs_diff:.2g}"]


MATRIX_MAX = 8  # methods beyond which the all-pairs matrix is unreadable: named pairs instead
GLANCE = ["method", "trainable params", "tensor peak ÷ full", "step time ÷ full (95% CI)", "merges",
          "accuracy (95% Wilson CI)"]


def in_registry_order(g):
    """Rows in the methods' registration order (then a sweep's value), whatever order the cells finished in."""
    rank = names.rank()
    key = g.method.map(lambda m: rank.get(str(m).split(" @ ")[0], len(rank)))
    cols = ["vary_value"] if "vary_value" in g.columns else []
    # a copy first: a frame built column by column is fragmented, and assign() on it warns (PerformanceWarning)
    return g.copy().assign(_order=key).sort_values(["_order", *cols], kind="stable").drop(columns="_order")


def glance(g, floor: float) -> list[str]:
    """One line per method, everything relative to full fine-tuning on the same workload (for many methods)."""
    ok = g[g.status == "ok"]
    full = ok[ok.method == "full"]
    if full.empty:
        return []
    peak = float(full.iloc[0].tensor_peak_bytes)
    rows = []
    for _, r in ok.iterrows():
        acc = _accuracy_cell(r).split(", n=")[0]
        if pretrained(r) and learned(r) and not _num(r, "accuracy_ci_low") > _num(r, "majority_rate"):
            acc = f"not clear of majority ({_num(r, 'majority_rate'):.3f}): {acc}"
        rows.append([r.method, f"{int(r.trainable_params):,}", f"{sig(r.tensor_peak_bytes / peak)}×",
                     _ratio_cell(r, floor) or "", "yes" if _num(r, "merge_max_abs_diff") == _num(
                         r, "merge_max_abs_diff") else "no", acc])
    return table(GLANCE, rows)


def counterparts(g, samples: list[dict], floor: float) -> list[str]:
    """Each hand-written method against the peft implementation it is tested against (`Method.reference`): the
    step-time ratio paired by round, with its CI."""
    from ..measure.stats import paired_ratio, verdict

    by_key = used(samples)
    ok = {r.method: r for _, r in g[g.status == "ok"].iterrows() if r.cell_key in by_key}
    body = []
    for name, r in ok.items():
        ref = names.REFERENCES.get(name)
        if ref in ok and min(len(by_key[r.cell_key]), len(by_key[ok[ref].cell_key])) >= 2:
            est = paired_ratio(times_by_round(by_key[r.cell_key]), times_by_round(by_key[ok[ref].cell_key]))
            word = verdict(est, floor)
            body.append([name, ref, ("≈ " if word == "no measurable difference" else "") +
                         ci(est.value, est.low, est.high, suffix="×"),
                         f"{int(r.trainable_params):,} = {int(ok[ref].trainable_params):,}"
                         if r.trainable_params == ok[ref].trainable_params else
                         f"{int(r.trainable_params):,} ≠ {int(ok[ref].trainable_params):,}"])
    return table(["hand-written", "peft", "step time hand-written ÷ peft (95% CI)", "trainable"], body) if body else []


def pairwise(g, samples: list[dict], floor: float) -> list[str]:
    """Step-time ratio of every pair of methods on one workload (row / column), paired by round, with its CI."""
    from ..measure.stats import paired_ratio, verdict

    by_key = used(samples)
    ok = [r for _, r in g[g.status == "ok"].iterrows() if r.cell_key in by_key]
    if len(ok) < 2 or max(len(by_key[r.cell_key]) for r in ok) < 2 or len(ok) > MATRIX_MAX:
        return []
    header = ["row / column"] + [r.method for r in ok]
    body = []
    for a in ok:
        cells_ = [a.method]
        for b in ok:
            if a.cell_key == b.cell_key:
                cells_.append("–")
                continue
            est = paired_ratio(times_by_round(by_key[a.cell_key]), times_by_round(by_key[b.cell_key]))
            word = verdict(est, floor)
            cells_.append(("≈ " if word == "no measurable difference" else "") + ci(est.value, est.low, est.high,
                                                                                   suffix="×"))
        body.append(cells_)
    return table(header, body)


def summary(df, env: dict, samples: list[dict] | None = None, per_method: bool = True) -> str:
    """`per_method`: one row per method and workload (not a sweep's points), so the hand-written-vs-peft table
    applies."""
    samples = samples or []
    rows = [r for _, r in df.iterrows()]
    floor, aa = floor_of_frame(df)
    lines = ["# peft-bench results", ""] + (made_by(env) if env else [])
    lines += ["Every cell runs in fresh processes and checks itself before its numbers count: the trainable count "
              "equals its closed form; after training the disabled adapter reproduces the base model, merged equals "
              "unmerged and unmerge restores (within the tolerance in `check_tolerance`); the checkpoint restored "
              "onto a freshly built base gives the trained model's output. Step times are the geometric mean of "
              "the repeats' medians (each repeat a fresh process, the cells run round-robin) with a 95 % Student-t "
              "interval on their logs; ratios are paired by round (a paired t-interval on the log ratios); the "
              "coverage of both is checked by simulation with this machine's measured noise "
              "(`tests/test_intervals.py`: ≥ 93 % at the stated 95 %). One repeat has no interval. **≈** marks a ratio "
              "whose CI includes 1 or that lies within the noise floor: no "
              "measurable difference, not a ranking. Numbers have 3 significant figures. Definitions of every "
              "column: `peft-bench list --metrics`; the ones used below are footnoted at the end.", ""]
    lines += noise_section(aa, floor, df) + repeats_section(df, env) + interference_lines(rows, env)
    main = first_seed(cells(df))
    if len(main) < len(cells(df)):
        lines += [f"Tables and plots of cost show seed {int(main.seed.min())}; accuracy over every seed is in its own "
                  "section below.", ""]
    for wl, g in main.groupby("workload", sort=False):
        lines += _workload_section(wl, in_registry_order(g), samples, floor, per_method,
                                   (env or {}).get("lr_sources", {}).get(wl, {}))
    lines += seeds_section(across_seeds(df)) + _footer(main)
    return "\n".join(lines)


def made_by(env: dict) -> list[str]:
    """Who made the results, on what, with what: the first paragraph of a summary."""
    return [f"Made by `{env.get('command', '?')}` on {env.get('date_utc', '?')}: {env.get('cpu', '?')}, "
            f"{env.get('cpu_count')} cores ({env.get('torch_threads')} torch threads), "
            f"{(env.get('memory_total_bytes') or 0) / 2**30:.0f} GiB"
            + (f", GPU {env['gpu']}" if env.get("gpu") else "")
            + f"; torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}; "
            f"commit {str(env.get('git_commit', ''))[:10]}{' (dirty)' if env.get('git_dirty') else ''}; "
            f"{_seeds_text(env)}; dtype {env.get('dtype', 'float32')}; {_plural(env.get('repeats', 1), 'repeat')} "
            f"per cell, round-robin. Measured matmul peak: "
            f"{sig((env.get('matmul_peak_flops_per_s') or float('nan')) / 1e9)} GFLOP/s "
            f"({env.get('dtype', 'float32')})"
            + (f"; the GPU's datasheet dense peak, for comparison only: "
               f"{sig(env['gpu_datasheet_dense_peak_flops_per_s'] / 1e9)} GFLOP/s"
               if env.get("gpu_datasheet_dense_peak_flops_per_s") else "") + "."
            + (f" The matmul peak and the idle canary were read again on the idle machine after the run by `peft-bench "
               f"report --reread-peaks` at commit {str(env['peaks_reread'].get('git_commit', ''))[:10]} (the run's own "
               f"readings, taken on a busy machine: matmul "
               f"{sig((env['peaks_reread'].get('run_matmul_peak_flops_per_s') or float('nan')) / 1e9)} GFLOP/s, "
               f"canary {sig((env['peaks_reread'].get('run_canary_idle_flops_per_s') or float('nan')) / 1e9)} "
               "GFLOP/s)." if env.get("peaks_reread") else "")
            + (f" Step times, intervals and ratios re-aggregated from `repeats.csv` by `peft-bench report --reaggregate` "
               f"at commit {str(env['reaggregated'].get('git_commit', ''))[:10]} (this version's estimator)."
               if env.get("reaggregated") else ""), ""]


def _rates(ok, sources: dict[str, str]) -> str:
    """The AdamW rates of a workload's cells, each marked untuned where it was not chosen on a validation split."""
    marks = {"conventional": " (untuned)", "asked": " (--lr)"}
    head = "AdamW learning rates" + (" (tuned on the validation split by `peft-bench tune`, unless marked)"
                                     if "tuned" in sources.values() else "")
    return head + ": " + ", ".join(f"{r.method} {r.lr:g}{marks.get(sources.get(r.method), '')}"
                                   for _, r in ok.iterrows()) + "."


def _unlearned(ok, sources: dict[str, str]) -> list[str]:
    """Which cells did not learn, and whether at a tuned rate (a method's limit at this budget) or not (maybe the
    rate's)."""
    missed = [r.method for _, r in ok.iterrows() if not learned(r)]
    if not missed or not sources:
        return []
    at = {"tuned": [], "other": []}
    for m in missed:
        at["tuned" if sources.get(m) == "tuned" else "other"].append(m)
    text = "; ".join(x for x in (f"at its tuned rate: {', '.join(at['tuned'])}" if at["tuned"] else "",
                                 f"at an untuned rate: {', '.join(at['other'])}" if at["other"] else "") if x)
    return [f"Did not learn within this budget {text}.", ""]


def _workload_section(wl: str, g, samples: list[dict], floor: float, per_method: bool,
                      sources: dict[str, str]) -> list[str]:
    """One workload's tables: at a glance (many methods), the main table, hand-written vs peft, pairwise step-time
    ratios, checkpoints."""
    ok = g[g.status == "ok"]
    first = ok.iloc[0] if len(ok) else g.iloc[0]
    pre = str(first.get("pretrained", "")).lower() == "true"
    lines = [f"## {wl}", "",
             f"{'pretrained' if pre else 'random-weight (pretrained=false)'} base; batch {_int(first, 'batch_size')}"
             + (f" × {_int(first, 'seq_len')} tokens" if _int(first, "seq_len") not in ("", "0") else "")
             + f"; {_int(first, 'train_steps')} training steps, {_int(first, 'timed_steps')} timed per repeat"
             + f"; device {first.get('device')}; dtype {first.get('dtype', '')}; tokenizer: "
             f"{first.get('tokenizer') or 'none'}; " + _rates(ok, sources)
             + _base_line(ok, wl), ""] + _unlearned(ok, sources)
    if len(g) > MATRIX_MAX and glance(g, floor):
        lines += ["At a glance, relative to full fine-tuning on this workload (details in the next table):", ""]
        lines += glance(g, floor) + [""]
    lines += table(MAIN, [_main_row(r, floor) for _, r in g.iterrows()]) + [""]
    pair = counterparts(g, samples, floor) if per_method and len(g) > MATRIX_MAX else []
    if pair:
        lines += ["Hand-written methods against their peft counterparts (same options, same workload):", ""]
        lines += pair + [""]
    pairs = pairwise(g, samples, floor)
    if pairs:
        lines += ["Step time, row ÷ column (median over rounds, 95 % CI; ≈ no measurable difference):", ""]
        lines += pairs + [""]
    saved = ok[ok.checkpoint_bytes.notna()] if "checkpoint_bytes" in ok.columns else ok.iloc[0:0]
    if len(saved):  # a sweep's `cost` cells save no checkpoint: no empty table
        lines += table(CKPT, [_ckpt_row(r) for _, r in saved.iterrows()]) + [""]
    return lines


def _footer(main) -> list[str]:
    """Definitions of the columns used, what accuracy means here, and the plots."""
    defs = records.definitions()
    lines = ["Definitions:", ""] + [f"- `{k}`: {defs[k]}" for k in (
        "tensor_peak_bytes", "weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
        "temporaries_bytes", "process_peak_bytes", "step_time_s", "step_time_ci_low_s", "step_time_vs_full",
        "step_time_split_s", "aa_ratio", "other_cpu_pct", "pct_of_matmul_peak", "inference_base_s",
        "checkpoint_bytes", "adapter_switch_cold_s", "full_model_load_cold_s", "check_tolerance")] + [""]
    lines += ["Accuracy is shown only on pretrained bases, with its 95 % Wilson interval and the number of held-out "
              "examples; a cell whose training loss did not go down is marked \"did not learn\", not ranked.", ""]
    lines += ["Plots: `trainable_params.png`, `peak_memory.png`, `step_time.png`"
              + (", `accuracy_vs_memory.png` (pretrained workloads)" if main.pretrained.astype(str).str.lower()
                 .eq("true").any() else "") + ". Every "
              "step time of every repeat: `repeats.csv`.", ""]
    return lines


README_BEGIN = "<!-- results:begin"
README_END = "<!-- results:end -->"
README_WORKLOAD = "gpt-neo-125m-arch"


ACCURACY_BEGIN = "<!-- accuracy:begin"
ACCURACY_END = "<!-- accuracy:end -->"


def readme_markers(out: Path) -> tuple[str, str]:
    """Which README section `out` regenerates: the accuracy one for an accuracy-only run, else the results one."""
    return (ACCURACY_BEGIN, ACCURACY_END) if accuracy_only(load_frame(out)) else (README_BEGIN, README_END)


def accuracy_readme_block(out: Path) -> str:
    """The README's accuracy section: mean accuracy over seeds per method and workload, from `out`."""
    df = load_frame(out)
    env = results.read_environment(out)
    seeds = across_seeds(df)
    if not len(seeds):
        raise UserError(f"{out}/metrics.csv has no method with two or more seeds on a pretrained workload")
    lines = [f"{ACCURACY_BEGIN} (generated by `peft-bench report {out} --readme README.md`; do not edit) -->", "",
             f"From `{out}` (commit {str(env.get('git_commit', ''))[:10]}, {_seeds_text(env)}): test accuracy, mean "
             "over seeds with its 95 % Student-t interval across seeds; verdicts as defined in its `summary.md`.", ""]
    rows = []
    for _, r in seeds.iterrows():
        verdict = seed_verdict(r)
        base = f"{r.base_accuracy:.3f}" if r.base_accuracy == r.base_accuracy else "–"
        forget = f"{r.forgetting_mean:+.3f}" if r.forgetting_mean == r.forgetting_mean else "–"
        rows.append([r.workload, r.method, f"{r.lr:g}", str(int(r.train_steps)),
                     f"{r.accuracy_mean:.3f} ({r.accuracy_ci_low:.3f}–{r.accuracy_ci_high:.3f})", base,
                     f"{r.majority_rate:.3f}", verdict, forget])
    lines += table(["workload", "method", "lr", "steps", "accuracy (95% CI over seeds)", "base", "majority",
                    "verdict", "forgetting Δ nats/token"], rows) + ["", ACCURACY_END]
    return "\n".join(lines)


def readme_block(out: Path, workload: str = README_WORKLOAD) -> str:
    """The README's results section: one workload's main numbers from `out`, generated (never typed by hand)."""
    df = load_frame(out)
    env = results.read_environment(out)
    floor, aa = floor_of_frame(df)
    g = cells(df)
    g = g[g.workload == workload]
    if g.empty:
        raise UserError(f"{out}/metrics.csv has no rows for {workload}")
    header = ["method", "options", "trainable params", "tensor peak MiB", "step ms (95% CI)", "step vs full (95% CI)",
              "checkpoint"]
    body = []
    for _, r in g.iterrows():
        if r.status != "ok":
            body.append([r.method, "", "", "", "", "", f"{r.status}"])
            continue
        body.append([r.method, str(r.get("method_config") or "") or "–", f"{int(r.trainable_params):,}",
                     _mib(r.tensor_peak_bytes),
                     ci(r.step_time_s, _num(r, "step_time_ci_low_s"), _num(r, "step_time_ci_high_s"), scale=1e3),
                     _ratio_cell(r, floor), _size(r.checkpoint_bytes)])
    first = g.iloc[0]
    lines = [f"{README_BEGIN} (generated by `peft-bench report {out} --readme README.md`; do not edit) -->", "",
             f"`{workload}` from `{out}` (commit {str(env.get('git_commit', ''))[:10]}, {env.get('cpu', '?')}, "
             f"{env.get('cpu_count', '?')} cores, torch {env.get('torch', '?')}): batch {_int(first, 'batch_size')} × "
             f"{_int(first, 'seq_len')} tokens, {_plural(env.get('repeats', 1), 'repeat')} per cell run round-robin, "
             "geometric means with 95 % t-intervals; ≈ = no measurable difference."
             + (f" Noise floor (A/A): identical cells land up to {sig(100 * floor)} % apart." if aa else ""), ""]
    lines += table(header, body) + ["", README_END]
    return "\n".join(lines)


def _seeds_text(env: dict) -> str:
    seeds = env.get("seeds") if env.get("seeds") is not None else [env.get("seed", 0)]
    return f"seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}"


def _plural(n, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def floor_of_frame(df):

    return floor_of([r.to_dict() for _, r in df.iterrows()])


def update_readme(readme: Path, block: str, markers: tuple[str, str] = (README_BEGIN, README_END)) -> None:
    """Replace the README's generated section between `markers` with `block`."""
    results.update_readme(readme, block, markers)


def repeats_section(df, env: dict) -> list[str]:
    """How many processes each cell took, the half-widths reached against --target-ci, and why the repeats stopped."""
    ok = df[(df.status == "ok")] if "ci_half_width_pct" in df.columns else df.iloc[0:0]
    if not len(ok) or ok.repeats.fillna(1).max() < 2:
        return []
    widths = ok.ci_half_width_pct.astype(float)
    why = ok.repeats_stopped.fillna("").astype(str).value_counts()
    lo, hi = int(ok.repeats.min()), int(ok.repeats.max())
    took = f"{lo} processes per cell" if lo == hi else f"{lo}–{hi} processes per cell (median {ok.repeats.median():g})"
    if env.get("target_ci_pct") is None:  # made before --target-ci: a fixed number of rounds
        return [f"**Repeats:** {took}, a fixed number of rounds (made before `--target-ci`); 95 % half-widths "
                f"{sig(widths.min())}–{sig(widths.max())} % (median {sig(widths.median())} %).", ""]
    return [f"**Repeats:** at least {env.get('repeats', '?')} processes per cell, then rounds added (each cell with "
            f"the cells it is paired with) while its 95 % interval was wider than ±{env.get('target_ci_pct', 5):g} % "
            f"(time budget {_duration(env.get('time_budget_s'))}): {took}; half-widths reached "
            f"{sig(widths.min())}–{sig(widths.max())} % (median {sig(widths.median())} %); stopped: "
            + ", ".join(f"{k or '?'} ({_plural(v, 'cell')})" for k, v in why.items()) + ".", ""]


def _duration(seconds) -> str:
    if not seconds or seconds != seconds:
        return "none"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def interference_lines(rows, env: dict) -> list[str]:
    """What the guard saw and what was done about it, in words that match what happened."""
    still = [r for r in rows if _num(r, "interference_repeats") > 0]
    again = [r for r in rows if _num(r, "remeasured") > 0]
    out = []
    if again and env.get("target_ci_pct") is None:
        out.append(f"{len(again)} cell(s) had a disturbed repeat measured again after the rounds (the procedure before "
                   "pairs: the re-measurement was paired with the reference's original round).")
    elif again:
        out.append(f"{len(again)} cell(s) had a disturbed repeat measured again, as a pair with the cells it is "
                   "compared with, in a new round; the disturbed one was set aside.")
    if still:
        one = int(env.get("repeats", 1) or 1) < 2
        out.append(f"{len(still)} cell(s) still count repeats during whose timed steps other processes used more "
                   "than 10 % of the CPU, or the canary ran below 0.55× the run's median, or the whole run below "
                   "0.7× the idle machine's speed (see the notes column)"
                   + ("; with one repeat nothing is measured again — their times are not comparable." if one else
                      "; their re-measurement was disturbed too, or not affordable in the time budget."))
    return [f"**Interference:** {' '.join(out)}", ""] if out else []


def noise_section(aa, floor: float, df) -> list[str]:
    if aa is None:
        return ["**Noise floor:** not measured (one repeat per cell). † marks a ratio from one process per cell: "
                "it has no confidence interval and between processes the same cell moves by about ±10 % on a small "
                "machine, so it is not a ranking; run with `--repeats 3` for CIs and an A/A noise floor.", ""]
    rep = df[df.replica.fillna(0) == 1].iloc[0] if "replica" in df.columns else None
    who = f"`{rep.method}` on `{rep.workload}`" if rep is not None else "one cell"
    return [f"**Noise floor (A/A):** {who} was measured a second time as an independent cell (its own processes, "
            f"in the same rounds). Its step time came out at {ci(aa.value, aa.low, aa.high, suffix='×')} the "
            f"original's over {aa.n} rounds: identical measurements land up to {sig(100 * floor)} % apart here, so "
            "smaller differences are reported as no measurable difference.", ""]


def _int(row, key: str) -> str:
    v = row.get(key)
    return "" if v is None or v != v else str(int(float(v)))

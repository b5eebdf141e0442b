"""The learning-rate sweep's verdict: per (method, workload) the rate with the highest validation accuracy, and the
summary listing every rate tried (`peft-bench tune` runs the cells; see `peft_bench.engine.tune`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..results import read_environment
from . import summary as report
from .format import table

SUITE = "accuracy"  # the budgets the chosen rates are for (the engine's tune.SUITE)


def choose(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{workload: {method: rate}}: the highest validation accuracy among the finished cells, the lower rate on a tie.
    (A rate that learned nothing scores the majority rate, so it wins only when no rate learned — the summary's
    'loss went down' column says when.)"""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("split") != "validation":
            continue
        key, score = (r["workload"], r["method"]), (float(r["accuracy"]), -float(r["lr"]))
        if key not in best or score > best[key]:
            best[key] = score
    chosen: dict[str, dict[str, float]] = {}
    for (w, m), (_, neg_lr) in sorted(best.items()):
        lr = -neg_lr
        chosen.setdefault(w, {})[m] = lr
    return chosen


def _earlier(env: dict) -> list[str]:
    """The runs this one resumed (`--resume` adds cells to a finished sweep): their commits and dates."""
    made = env.get("resumed_runs") or []
    if not made:
        return []
    return ["This sweep was resumed: cells were also made " + "; ".join(
        f"at commit {str(m.get('git_commit', ''))[:10]} ({m.get('date_utc', '?')}, `{m.get('command', '?')}`)"
        for m in made) + "; the commit above made the rest.", ""]


def summary(out: Path) -> str:
    df = report.load_frame(out)
    if df.empty:
        raise UserError(f"{out}/metrics.csv has no rows")
    env = read_environment(out)
    chosen = choose([r.to_dict() for _, r in df.iterrows()])
    lines = ["# Learning-rate sweep", "",
             f"Made by `{env.get('command', 'peft-bench tune')}` at commit {str(env.get('git_commit', ''))[:10]} "
             f"({env.get('date_utc', '?')}). Each rate trains once (seed 0) for the `{SUITE}` suite's budget on the "
             "training split minus a held-out validation split, and is scored on that validation split; the test "
             "split is never read. The highest validation accuracy is chosen (**bold**; the lower rate on a tie); "
             "intervals are 95 % Wilson. "
             "A chosen rate whose interval overlaps another's is a choice within the noise, not a ranking. "
             "`lora-parametrize` and `hf-lora` take `lora`'s rate, `dora` takes `hf-dora`'s (the same "
             "parametrisation; `tunes_like` in `peft-bench list`'s registry).", ""] + _earlier(env)
    if "loss_probe_drop_ci_low" not in df.columns or df.loss_probe_drop_ci_low.isna().any():
        lines += ["Cells made before the paired learning probe existed say \"lower (point estimate)\": only that the "
                  "last window's mean training loss is below the first window's, not that the drop exceeds batch "
                  "noise.", ""]
    for wl, g in df.groupby("workload", sort=False):
        ok = g[g.status == "ok"]
        first = ok.iloc[0] if len(ok) else g.iloc[0]
        lines += [f"## {wl}", "", f"{report._int(first, 'train_steps')} steps, batch {report._int(first, 'batch_size')}"
                  f", validation n = {report._int(first, 'test_examples')}.", ""]
        rows = []
        edges = []
        for m, gm in g[g.status == "ok"].groupby("method", sort=False):
            pick = chosen.get(wl, {}).get(m)
            if pick is not None and len(gm) > 1 and pick in (gm.lr.min(), gm.lr.max()):
                edges.append(f"`{m}` ({pick:g}, the {'highest' if pick == gm.lr.max() else 'lowest'} rate tried)")
        for _, r in g.sort_values(["method", "lr"]).iterrows():
            if r.status != "ok":
                rows.append([r.method, f"{r.lr:g}" if r.lr == r.lr else "", f"{r.status}: {r.reason}", "", ""])
                continue
            acc = f"{r.accuracy:.3f} ({r.accuracy_ci_low:.3f}–{r.accuracy_ci_high:.3f})"
            if chosen.get(wl, {}).get(r.method) == r.lr:
                acc = f"**{acc}**"
            trend = f"{r.loss_start:.3f} → {r.loss_end:.3f}"
            probed = report._num(r, "loss_probe_drop_ci_low") == report._num(r, "loss_probe_drop_ci_low")
            went = ("yes, beyond noise" if probed else "lower (point estimate)") if report.learned(r) else "no"
            rows.append([r.method, f"{r.lr:g}", acc, trend, went])
        lines += table(["method", "learning rate", "validation accuracy (95% CI)", "training loss first → last "
                               "window", "loss went down"], rows) + [""]
        if edges:
            lines += ["Chosen at the edge of the grid, so a rate beyond it may do better within this budget: "
                      + ", ".join(edges) + ".", ""]
    lines += ["Chosen (`chosen.json`, copied into `peft_bench/engine/suites.py` `TUNED`):", "", "```json",
              json.dumps(chosen, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)

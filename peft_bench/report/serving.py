"""The serving report (suite `inference`): serving.csv's rows, one per measurement and process, to tables and a plot.

A time is the geometric mean of the processes' values with the Student-t interval on their logs (`stats.log_t`,
the training step's procedure); unmerged ÷ merged and mixed ÷ adapter-by-adapter are paired within each process
(`stats.paired_ratio`, by repeat). Exact quantities — KV-cache bytes against their closed form, tokens against their
reference — are shown as they are, with a count of the processes where they held.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..measure.repeats import number as _num
from ..measure.stats import Estimate, log_t, paired_ratio, verdict
from .format import ci, sig, size, table

RATIO_LEVEL = "95 %"


def _true(x) -> bool:
    return str(x).lower() == "true"


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _timed(rows: list[dict]) -> list[dict]:
    """The rows whose times count: a disturbed repeat measured again is set aside (used=False) for its times; its
    exact checks (tokens, bytes, fidelity) still hold and are read from every row."""
    return [r for r in rows if str(r.get("used", "")).lower() != "false"]


def _per_repeat(rows: list[dict], col: str) -> dict[int, float]:
    return {int(r["repeat"]): _num(r[col]) for r in _timed(rows)}


def _est(rows: list[dict], col: str) -> Estimate:
    return log_t([_num(r[col]) for r in _timed(rows)])


def _ms(e: Estimate) -> str:
    return ci(e.value, e.low, e.high, 1e3)


def _ratio(e: Estimate) -> str:
    if e.n == 0 or e.value != e.value:
        return ""
    mark = "≈ " if verdict(e) == "no measurable difference" else ""
    return mark + ci(e.value, e.low, e.high, suffix="×")


def _held(rows: list[dict], col: str) -> str:
    """'yes' when the check held in every process, else how many of them."""
    vals = [r.get(col) for r in rows if str(r.get(col, "")) != ""]
    if not vals:
        return ""
    ok = sum(_true(v) for v in vals)
    return "yes" if ok == len(vals) else f"no ({ok}/{len(vals)})"


def generation_table(rows: list[dict]) -> list[str]:
    """Per method and (prompt, batch): TTFT and the decode step for base / unmerged / merged, unmerged ÷ merged."""
    gen = [r for r in rows if r["probe"] == "generation"]
    out = []
    for (method, prompt, batch), g in _by(gen, "method", "prompt_tokens", "batch").items():
        v = _by(g, "variant")
        cells = [method, f"{prompt} × {batch}"]
        for name in ("base", "unmerged", "merged"):
            cells.append(_ms(_est(v.get((name,), []), "ttft_s")))
        for name in ("base", "unmerged", "merged"):
            cells.append(_ms(_est(v.get((name,), []), "decode_token_s")))
        un, mg = v.get(("unmerged",), []), v.get(("merged",), [])
        cells.append(_ratio(paired_ratio(_per_repeat(un, "decode_token_s"), _per_repeat(mg, "decode_token_s"))))
        first = un[0] if un else {}
        cells += [f"{size(_num(first.get('kv_cache_bytes')))}"
                  + (" (= closed form)" if un and all(r["kv_cache_bytes"] == r["kv_cache_closed_form_bytes"]
                                                      for r in un) else " (≠ closed form)"),
                  first.get("virtual_tokens", ""), _held(mg, "tokens_equal"), _witness(un)]
        out.append(cells)
    header = ["method", "prompt × batch", "TTFT base ms", "TTFT unmerged ms", "TTFT merged ms",
              "decode base ms/token", "decode unmerged ms/token", "decode merged ms/token",
              "unmerged ÷ merged decode", "KV cache (unmerged)", "virtual tokens", "merged = unmerged tokens",
              "cached loop = no cache / generate"]
    return table(header, out) if out else []


def _witness(un: list[dict]) -> str:
    w = [r for r in un if str(r.get("no_cache_agrees", "")) != ""]
    if not w:
        return ""
    text = f"{_held(w, 'no_cache_agrees')} / {_held(w, 'generate_agrees')}"
    notes = {r.get("witness_note") for r in w if r.get("witness_note")}
    return text + (f" ({'; '.join(sorted(notes))})" if notes else "")


def adapters_table(rows: list[dict]) -> list[str]:
    got = [r for r in rows if r["probe"] == "adapters"]
    out = []
    for (n,), g in sorted(_by(got, "adapters_loaded").items(), key=lambda kv: int(kv[0][0])):
        r = g[0]
        out.append([n, f"{size(_num(r['adapter_bytes']))}"
                    + (" (= closed form)" if all(x["adapter_bytes"] == x["adapter_closed_form_bytes"] for x in g)
                       else " (≠ closed form)"),
                    size(int(n) * _num(r["adapter_bytes"])), _ms(_est(g, "ttft_s")), _ms(_est(g, "decode_token_s"))])
    # The process's RSS growth (rss_per_adapter_bytes in serving.csv) is no witness here: adapters land in memory
    # the allocator freed earlier in the process, and it read 0–5 KiB per 1.76 MiB adapter.
    header = ["adapters loaded", "bytes per adapter", "all adapters' tensors", "TTFT ms", "decode ms/token"]
    return table(header, out) if out else []


def mixed_table(rows: list[dict]) -> list[str]:
    got = [r for r in rows if r["probe"] == "mixed"]
    if not got:
        return []
    v = _by(got, "variant")
    mixed, alone = v.get(("mixed batch",), []), v.get(("adapter by adapter",), [])
    ratio = paired_ratio(_per_repeat(mixed, "seconds"), _per_repeat(alone, "seconds"))
    diffs = [_num(r["max_abs_diff"]) for r in mixed]
    r = mixed[0]
    return table(["rows × adapters", "one mixed batch s", "adapter by adapter s", "mixed ÷ adapter by adapter",
                  "same tokens", "prompt logits max abs diff"],
                 [[f"{r['batch']} rows, each its own adapter ({r['adapters_loaded']} loaded)",
                   ci(*_triple(_est(mixed, "seconds"))), ci(*_triple(_est(alone, "seconds"))), _ratio(ratio),
                   _held(mixed, "tokens_equal"), sig(max(diffs)) if diffs else ""]])


def _triple(e: Estimate) -> tuple[float, float, float]:
    return e.value, e.low, e.high


def switch_table(rows: list[dict]) -> list[str]:
    got = [r for r in rows if r["probe"] == "switch"]
    out = []
    for (name,), g in _by(got, "variant").items():
        diffs = [_num(r["max_abs_diff"]) for r in g if _num(r["max_abs_diff"]) == _num(r["max_abs_diff"])]
        out.append([name, _ms(_est(g, "seconds")), sig(max(diffs)) if diffs else "—"])
    return table(["switch (32 adapters held)", "ms", "logits vs the adapter loaded normally, max abs diff"], out) if out \
        else []


def fidelity_table(rows: list[dict]) -> list[str]:
    got = [r for r in rows if r["probe"] == "fidelity"]
    out = []
    for (method, dtype), g in _by(got, "method", "dtype").items():
        r = max(g, key=lambda x: _num(x["max_abs_diff"]))
        agree = min(int(_num(x["agree_tokens"])) for x in g)
        gap = [_num(x["logit_gap"]) for x in g if _num(x["logit_gap"]) == _num(x["logit_gap"])]
        out.append([method, dtype, sig(_num(r["max_abs_diff"])), f"{agree}/{r['new_tokens']}",
                    ("0 (a tie)" if max(gap) == 0 else sig(max(gap))) if gap else "—"])
    return table(["method", "dtype", "prompt logits max abs diff merged vs unmerged", "greedy tokens agreeing (fewest)",
                  "logit gap at the divergence"], out) if out else []


def sections(rows: list[dict]) -> list[str]:
    """The serving sections of summary.md, per workload."""
    lines = []
    for (wl,), g in _by(rows, "workload").items():
        n = len({r["repeat"] for r in _timed(g)})
        lines += [f"## {wl}: serving", "",
                  f"Each value: geometric mean over {n} process(es) with its {RATIO_LEVEL} Student-t interval on logs "
                  "(paired within each process for ratios); **≈**: the interval includes 1. A prompt is real test "
                  "reviews cut to exactly that many tokens; greedy decoding, KV cache on.", "",
                  "### Generation: time to first token and per-token decode", "", *generation_table(g), ""]
        for title, part in (("### Many LoRA adapters over one base (peft)", adapters_table(g)),
                            ("### One batch, a different adapter per row", mixed_table(g)),
                            ("### Switching adapters", switch_table(g)),
                            ("### Merge fidelity per dtype", fidelity_table(g))):
            if part:
                lines += [title, "", *part, ""]
    return lines


def plot(rows: list[dict], path: Path) -> bool:
    """Decode latency per token against adapters loaded (peft LoRA, unmerged), with the same shape's merged and
    base decode as lines, per workload. False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in rows if r["probe"] == "adapters"})
    if not workloads:
        return False
    fig, axes = plt.subplots(1, len(workloads), figsize=(max(6.4, 4.8 * len(workloads)), 3.9), squeeze=False)
    for ax, wl in zip(axes.flat, workloads):
        _panel(ax, [r for r in rows if r["workload"] == wl], wl)
    fig.suptitle("Decode latency per token vs LoRA adapters loaded (peft)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def _panel(ax, rows: list[dict], workload: str) -> None:
    got = _by([r for r in rows if r["probe"] == "adapters"], "adapters_loaded")
    keys = sorted(got, key=lambda k: int(k[0]))
    xs = [int(k[0]) for k in keys]
    ests = [_est(got[k], "decode_token_s") for k in keys]
    ys = [e.value * 1e3 for e in ests]
    err = [[(e.value - e.low) * 1e3 if e.has_interval else 0 for e in ests],
           [(e.high - e.value) * 1e3 if e.has_interval else 0 for e in ests]]
    level = "95 % CI" if any(e.has_interval for e in ests) else "one repeat, no interval"
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color="C0", label=f"unmerged, n loaded ({level})")
    first = next(iter(got.values()))[0]
    shape = [r for r in rows if r["probe"] == "generation" and r["method"] == first["method"]
             and str(r["prompt_tokens"]) == str(first["prompt_tokens"]) and str(r["batch"]) == str(first["batch"])]
    for name, color, style, text in (("merged", "C2", "--", "merged, one adapter"),
                                     ("base", "0.4", ":", "base (adapter disabled)")):
        e = _est([r for r in shape if r["variant"] == name], "decode_token_s")
        if e.value == e.value:
            ax.axhline(e.value * 1e3, color=color, linestyle=style, label=f"{text} (geometric mean)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("adapters loaded")
    ax.set_ylabel(f"ms per token (batch {first['batch']}, prompt {first['prompt_tokens']})")
    ax.set_title(workload, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")

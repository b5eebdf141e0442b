"""The summary of a run under torchrun (`--nproc`): communication per step, speed and scaling, memory per rank.

Rows only (metrics.csv, repeats.csv, environment.json): it can be rebuilt years later from the files.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..measure import records
from .format import ci, sig, table
from .format import mib as _mib
from .format import size as _size
from .summary import floor_of_frame, in_registry_order, interference_lines, noise_section, repeats_section


def is_distributed(df) -> bool:
    return "world_size" in df.columns and df.world_size.notna().any()


def _f(r, key: str) -> float:
    try:
        return float(r.get(key))
    except (TypeError, ValueError):
        return math.nan


def _label(r) -> str:
    return f"{r.parallel} × {int(_f(r, 'world_size'))}"


def _yes(x) -> str:
    return "yes" if str(x).lower() == "true" else "**no**"


def ordered(df):
    """Methods in registry order, then DDP before FSDP, then fewer ranks first; the A/A copy left out."""
    df = df[df.replica.fillna(0).astype(int) == 0] if "replica" in df.columns else df
    out = in_registry_order(df.copy()).copy()
    order = {m: i for i, m in enumerate(dict.fromkeys(out.method))}
    return out.assign(_m=out.method.map(order), _p=out.parallel.map({"ddp": 0, "fsdp": 1}).fillna(2),
                      _n=out.world_size.fillna(0)).sort_values(["workload", "_m", "_p", "_n"], kind="stable")


def comm_ratios(ok) -> list[str]:
    """Communication of each method against full fine-tuning's, per workload, mode and world size: every byte the
    process group carried, then the gradients alone (the part that scales with the trainable count)."""
    lines = []
    for (wl, mode, n), g in ok.groupby(["workload", "parallel", "world_size"], sort=False):
        full = g[g.method == "full"]
        if n < 2 or not len(full):
            continue
        ref, gref = _f(full.iloc[0], "comm_bytes_per_step"), _gradients(full.iloc[0])
        for _, r in g.iterrows():
            if r.method == "full" or not _f(r, "comm_bytes_per_step"):
                continue
            total = _f(r, "comm_bytes_per_step")
            lines.append(f"- {wl}, {mode} × {int(n)}{_buffers(r)}: full : {r.method} = **{sig(ref / total)} : 1** "
                         f"in every byte per step ({_size(ref)} vs {_size(total)}); gradients alone "
                         f"{sig(gref / _gradients(r))} : 1 ({_size(gref)} vs {_size(_gradients(r))}).")
    return lines


def _gradients(r) -> float:
    """The bytes that carried gradients: DDP's all-reduce; FSDP's reduce-scatter (an all-reduce on gloo)."""
    if r.parallel == "ddp":
        return _f(r, "allreduce_bytes_per_step")
    return _f(r, "reducescatter_bytes_per_step") + _f(r, "allreduce_bytes_per_step")


def _buffers(r) -> str:
    return "" if r.parallel != "ddp" else (", buffers broadcast" if str(r.get("broadcast_buffers")) == "True"
                                           else ", no buffer broadcast")


def fsdp_lines(ok) -> list[str]:
    """What sharding saved per rank against the same cell on one process."""
    lines = []
    f = ok[ok.parallel == "fsdp"]
    for (wl, m), g in f.groupby(["workload", "method"], sort=False):
        one = g[g.world_size == 1]
        for _, r in g[g.world_size > 1].iterrows():
            if not len(one):
                continue
            o = one.iloc[0]
            lines.append(f"- {wl}, {m}: weights held per rank {_mib(_f(r, 'rank_weights_max_bytes'))} MiB on "
                         f"{int(r.world_size)} ranks vs {_mib(_f(o, 'rank_weights_max_bytes'))} MiB on one "
                         f"(× {sig(_f(r, 'rank_weights_max_bytes') / _f(o, 'rank_weights_max_bytes'))}); gradients "
                         f"× {sig(_ratio(r, o, 'rank_gradients_max_bytes'))}, AdamW state × "
                         f"{sig(_ratio(r, o, 'rank_optimizer_max_bytes'))}; process peak × "
                         f"{sig(_ratio(r, o, 'rank_process_peak_max_bytes'))}.")
    return lines


def _payload(r, key: str) -> str:
    return _size(_f(r, key)) if _f(r, key) else "0"


def _wire(r) -> str:
    w = _f(r, "wire_bytes_per_step")
    if not math.isfinite(w):
        return "not read"
    return f"{_payload(r, 'wire_bytes_per_step')} ({_payload(r, 'wire_bytes_max_rank_per_step')})"


def _within(r) -> str:
    v = str(r.get("wire_within_15pct"))
    return "yes" if v == "True" else "**no**" if v == "False" else "–"


BUFFERS = ["DDP broadcasts the model's buffers from rank 0 before every forward unless told not to "
           "(`broadcast_buffers`, DDP's default on; `--broadcast-buffers off` here): on GPT-Neo those are the causal "
           "masks, constant through training, so the broadcast carries nothing a rank does not already hold — its "
           "cost is the buffer-broadcast column, and a model whose buffers never change can turn it off. The wire "
           "column is the second witness: the bytes each rank wrote to its sockets during the counted steps "
           "(`wchar` in `/proc/<pid>/io`), mean over ranks and the largest rank (a broadcast's root sends it all); "
           "the ring estimate is computed from the counted payload (all-reduce 2(N−1)/N, the others (N−1)/N).", ""]


def _efficiency(r) -> str:
    """The scaling efficiency with its CI; the one-process cell is the reference."""
    text = ci(_f(r, "scaling_efficiency"), _f(r, "scaling_efficiency_ci_low"), _f(r, "scaling_efficiency_ci_high"))
    return text or ("reference" if _f(r, "world_size") == 1 else "")


def _ratio(a, b, key: str) -> float:
    d = _f(b, key)
    return _f(a, key) / d if d else math.nan


COMM = ["workload", "method", "mode × ranks", "trainable params", "all-reduce", "all-gather", "reduce-scatter",
        "buffer broadcast", "total per step", "gradient payload = closed form", "collectives",
        "ring estimate per rank", "wire per rank, measured (max rank)", "within 15 %"]
SPEED = ["workload", "method", "mode × ranks", "step ms, slowest rank (95% CI)", "fastest rank ms", "samples/s (all ranks)",
         "tokens/s (all ranks)", "scaling efficiency (95% CI)"]
MEMORY = ["workload", "method", "mode × ranks", "process peak MiB, max / min over ranks", "weights held MiB, max / min",
          "gradients MiB", "AdamW state MiB", "shards add up to the model", "replicas max abs diff"]
USED = ("world_size", "parallel", "step_time_s", "fastest_rank_step_time_s", "allreduce_bytes_per_step",
        "allgather_bytes_per_step", "reducescatter_bytes_per_step", "broadcast_bytes_per_step", "broadcast_buffers",
        "comm_bytes_per_step", "comm_counted_steps", "ring_estimate_bytes_per_rank_per_step", "wire_bytes_per_step",
        "wire_bytes_max_rank_per_step", "comm_closed_form_bytes", "scaling_efficiency", "rank_process_peak_max_bytes",
        "rank_weights_max_bytes", "rank_gradients_max_bytes", "rank_optimizer_max_bytes", "shards_cover_model",
        "replicas_max_abs_diff", "unused_parameters", "threads_per_rank")


def summary(df, env: dict) -> str:
    """The distributed suite's summary: how it was measured, then communication, speed and memory per rank."""
    floor, aa = floor_of_frame(df)
    rows = ordered(df)
    ok = rows[rows.status == "ok"]
    first = ok.iloc[0] if len(ok) else rows.iloc[0]
    lines = ["# peft-bench distributed: data-parallel and sharded training", ""]
    if env:
        lines += [f"Made by `{env.get('command', '?')}` on {env.get('date_utc', '?')}: {env.get('cpu', '?')}, "
                  f"{env.get('cpu_count')} cores, {(env.get('memory_total_bytes') or 0) / 2**30:.0f} GiB"
                  + (f", GPU {env['gpu']}" if env.get("gpu") else "")
                  + f"; torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}; "
                  f"commit {str(env.get('git_commit', ''))[:10]}{' (dirty)' if env.get('git_dirty') else ''}; "
                  f"dtype {env.get('dtype', 'float32')}; {env.get('repeats', 1)} repeat(s) per cell, round-robin.", ""]
    lines += [f"Each cell runs under torchrun (`torch.distributed`, backend {first.get('backend', '')}), "
              f"{int(_f(first, 'threads_per_rank'))} thread(s) per rank in every cell, so the one-process cell is "
              f"the scaling reference of the same cell on more; every rank trains on its own batch of "
              f"{int(_f(first, 'batch_size'))}" + (f" × {int(_f(first, 'seq_len'))} tokens"
                                                   if math.isfinite(_f(first, "seq_len")) else "")
              + f" (its own shuffle); {int(_f(first, 'timed_steps'))} timed steps per repeat, after warm-up. "
              "A step's time is the slowest rank's, timed on DDP's and FSDP2's default paths with nothing installed. "
              f"Communication is counted on {int(_f(first, 'comm_counted_steps') or 0)} further steps, from the "
              "records the communication backend itself writes for every collective it runs (read through "
              "`torch.profiler`): DDP's bucket all-reduces and its buffer broadcasts, FSDP2's all-gathers and "
              "reduce-scatters, barriers — whatever the process group carried, C++ paths included — as the payload "
              "per rank: the whole tensor each collective acts on (gloo runs a reduce-scatter as an all-reduce of "
              "the whole input, and it is counted as one). Each cell checks itself: the trainable count equals its "
              "closed form; the gradient payload per step equals the element size × the trainable parameters "
              "(DDP's all-reduce; FSDP's reduce-scatter, each tensor padded to the world size); DDP's replicas are "
              "identical after training; FSDP's shards add up to the model; the bytes written to the sockets are "
              "within 15 % of the ring estimate.", ""]
    lines += noise_section(aa, floor, df) + repeats_section(df, env)
    lines += interference_lines([r for _, r in df.iterrows()], env)
    bad = rows[rows.status != "ok"]
    if len(bad):
        lines += ["Cells without numbers:", ""] + [f"- {r.workload} {r.method} {r.get('parallel', '')}: {r.status} — "
                                                   f"{r.reason}" for _, r in bad.iterrows()] + [""]
    ratios = comm_ratios(ok)
    if ratios:
        lines += ["## Communication ratio", ""] + ratios + [""]
    lines += _comm_and_speed(ok) + _memory(ok)
    return "\n".join(lines)


def _comm_and_speed(ok) -> list[str]:
    """Bytes per step and rank by collective against the closed form; step time, throughput, scaling efficiency."""
    lines = ["## Communication per training step, per rank", ""]
    lines += table(COMM, [[r.workload, r.method, _label(r), f"{int(_f(r, 'trainable_params')):,}",
                           _payload(r, "allreduce_bytes_per_step"),
                           _payload(r, "allgather_bytes_per_step"),
                           _payload(r, "reducescatter_bytes_per_step"),
                           _payload(r, "broadcast_bytes_per_step"),
                           _payload(r, "comm_bytes_per_step"),
                           f"{_yes(r.comm_matches_closed_form)} ({int(_f(r, 'comm_closed_form_bytes')):,} B)",
                           sig(_f(r, "collectives_per_step")),
                           _payload(r, "ring_estimate_bytes_per_rank_per_step"), _wire(r),
                           _within(r)]
                          for _, r in ok.iterrows()]) + [""] + BUFFERS
    lines += ["## Speed and scaling", "",
              "Scaling efficiency: the one-process cell's step time ÷ this cell's, paired by round (weak scaling: "
              "each rank keeps its batch, so 1.0 means N ranks process N× the examples per second). On this machine "
              "the ranks share two cores, memory bandwidth and caches, so it measures contention as much as "
              "communication.", ""]
    lines += table(SPEED, [[r.workload, r.method, _label(r),
                            ci(_f(r, "step_time_s"), _f(r, "step_time_ci_low_s"), _f(r, "step_time_ci_high_s"), 1e3),
                            sig(_f(r, "fastest_rank_step_time_s") * 1e3), sig(_f(r, "samples_per_s")),
                            sig(_f(r, "tokens_per_s")),
                            _efficiency(r)]
                           for _, r in ok.iterrows()]) + [""]
    return lines


def _memory(ok) -> list[str]:
    """What each rank holds between steps and its process peak; FSDP against one process; the definitions."""
    lines = ["## Memory per rank", "",
              "What each rank holds between steps (its shard under FSDP) and its process peak over the measured "
              "steps above its footprint before the model was built. Activations are not split out per rank: the "
              "tensor-level tracker of single-process cells does not see through DDP's buckets or FSDP's DTensors; "
              "they are inside the process peak.", ""]
    lines += table(MEMORY, [[r.workload, r.method, _label(r),
                             f"{_mib(_f(r, 'rank_process_peak_max_bytes'))} / {_mib(_f(r, 'rank_process_peak_min_bytes'))}",
                             f"{_mib(_f(r, 'rank_weights_max_bytes'))} / {_mib(_f(r, 'rank_weights_min_bytes'))}",
                             _mib(_f(r, "rank_gradients_max_bytes")), _mib(_f(r, "rank_optimizer_max_bytes")),
                             _yes(r.shards_cover_model),
                             sig(_f(r, "replicas_max_abs_diff")) if r.parallel == "ddp" else "–"]
                            for _, r in ok.iterrows()]) + [""]
    f = fsdp_lines(ok)
    if f:
        lines += ["FSDP against one process:", ""] + f + [""]
        lines += ["Buffers (GPT-Neo's causal masks, for one) are not sharded, so the weights a rank holds fall to a "
                  "little over 1/N. During a step each rank all-gathers the parameters of the unit it computes into "
                  "buffers beside its shard (FSDP2 keeps the root's — embeddings, final norm — gathered from forward to "
                  "backward), so the process peak falls by less than what is held, and can rise where frozen weights "
                  "dominate and gradients and AdamW state are small.", ""]
    lines += ["Plot: `distributed.png`. Every column: `metrics.csv`; each repeat's timing: `repeats.csv`.", "",
              "Definitions:", ""]
    defs = records.definitions()
    lines += [f"- `{k}`: {defs[k]}" for k in USED if k in defs] + [""]
    return lines


def plot(df, path: Path) -> None:
    """Communication per step (log scale) and the memory each rank holds, per method × mode × ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import style

    ok = ordered(df)
    ok = ok[ok.status == "ok"]
    if not len(ok):
        return
    labels = [f"{r.method}\n{_label(r)}" for _, r in ok.iterrows()]
    st = style(list(dict.fromkeys(ok.method)))
    colors = [st[m][0] for m in ok.method]
    hatches = ["//" if p == "fsdp" else "" for p in ok.parallel]
    fig, axes = plt.subplots(1, 3, figsize=(min(20, max(12, 0.45 * len(ok) * 3)), 4.8), constrained_layout=True)
    x = range(len(ok))
    comm = [_f(r, "comm_bytes_per_step") / 2**20 for _, r in ok.iterrows()]
    axes[0].bar(x, [c if c > 0 else math.nan for c in comm], color=colors, hatch=hatches)
    axes[0].set_yscale("log")
    low = min([c for c in comm if c > 0] or [1.0]) / 4
    axes[0].set_ylim(bottom=low)
    for i, c in enumerate(comm):
        if not c > 0:  # one rank: nothing crosses; said, not drawn as a tiny bar
            axes[0].text(i, low * 1.3, "none", ha="center", va="bottom", fontsize=7, rotation=90)
    axes[0].set_ylabel("MiB handed to collectives per step, per rank")
    axes[0].set_title("communication (counted)")
    held = [(_f(r, "rank_weights_max_bytes") + _f(r, "rank_gradients_max_bytes") + _f(r, "rank_optimizer_max_bytes"))
            / 2**20 for _, r in ok.iterrows()]
    peak = [_f(r, "rank_process_peak_max_bytes") / 2**20 for _, r in ok.iterrows()]
    axes[1].bar(x, peak, color="lightgrey", label="process peak (largest rank)")
    axes[1].bar(x, held, color=colors, hatch=hatches, label="weights + gradients + AdamW held")
    axes[1].set_ylabel("MiB per rank")
    axes[1].set_title("memory per rank")
    axes[1].legend(fontsize=8, loc="upper right")
    t = [_f(r, "step_time_s") * 1e3 for _, r in ok.iterrows()]
    lo = [max(0.0, v - _f(r, "step_time_ci_low_s") * 1e3) if _f(r, "step_time_ci_low_s") == _f(r, "step_time_ci_low_s")
          else 0 for v, (_, r) in zip(t, ok.iterrows())]
    hi = [max(0.0, _f(r, "step_time_ci_high_s") * 1e3 - v) if _f(r, "step_time_ci_high_s") == _f(r, "step_time_ci_high_s")
          else 0 for v, (_, r) in zip(t, ok.iterrows())]
    axes[2].bar(x, t, yerr=[lo, hi], color=colors, hatch=hatches, capsize=3)
    intervals = any(v > 0 for v in lo + hi)
    axes[2].set_ylabel("step time, slowest rank (ms" + ("; 95 % CI)" if intervals else "; one repeat, no interval)"))
    axes[2].set_title("speed")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7, rotation=90)
        ax.grid(axis="y", alpha=0.3)
    modes = set(ok.parallel)
    what = " and ".join(x for x, m in (("data-parallel (ddp, plain bars)", "ddp"),
                                        ("sharded (fsdp, hatched)", "fsdp")) if m in modes)
    disturbed = [i for i, (_, r) in enumerate(ok.iterrows()) if _f(r, "interference_repeats") > 0]
    for i in disturbed:  # a repeat disturbed by other processes: marked where its time is drawn
        axes[2].text(i, t[i] + hi[i], "!", ha="center", va="bottom", color="tab:red", fontsize=10, weight="bold")
    fig.suptitle(f"{', '.join(dict.fromkeys(ok.workload))}: {what} training"
                 + ("  (! : a repeat ran beside other processes)" if disturbed else ""))
    fig.savefig(path, dpi=150)
    plt.close(fig)

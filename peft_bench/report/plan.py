"""`peft-bench plan`'s output: the planned rows as a markdown table, CSV or JSON, with the measured rows' column
names (`tensor_peak_bytes`, `weights_bytes`, …) and, with `--memory-cap`, which fit."""

from __future__ import annotations

import csv
import io
import json

from .format import sig, size, table

PARTS = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "temporaries_bytes")
COLUMNS = ("method", "workload", "status", "reason", "device", "dtype", "batch_size", "seq_len", "trainable_params",
           "total_params", "trainable_state_bytes", "tensor_peak_bytes", *PARTS, "process_peak_predicted_bytes",
           "saved_activations_max_bytes", "flops_per_step", "attention_kernels", "scalar_reads", "planned_with",
           "memory_cap_bytes", "fits_memory_cap", "largest_fitting", "largest_fitting_note", "world_size", "parallel",
           "allreduce_bytes_per_step", "allgather_bytes_per_step", "reducescatter_bytes_per_step",
           "broadcast_bytes_per_step", "comm_bytes_per_step", "ring_estimate_bytes_per_rank_per_step",
           "rank_weights_max_bytes", "rank_gradients_max_bytes", "rank_optimizer_max_bytes",
           "tensor_peak_torch_fsdp_tracker_bytes")


def with_cap(rows: list[dict], cap: int | None) -> list[dict]:
    """Each row with the cap and whether its tensor peak fits under it (None without a cap, or without a peak)."""
    out = []
    for r in rows:
        fits = None if cap is None or r.get("status") != "ok" else r["tensor_peak_bytes"] <= cap
        out.append({**r, "memory_cap_bytes": cap, "fits_memory_cap": fits})
    return out


def with_largest(rows: list[dict], varied: str, found: dict) -> list[dict]:
    """Each row with the largest `varied` value its (model, method) fits under the cap, and how it was bounded."""
    return [{**r, "largest_fitting": found.get((r["workload"], r["method"]), (None, ""))[0],
             "largest_fitting_note": f"{varied}: " + found.get((r["workload"], r["method"]), (None, ""))[1]}
            for r in rows]


def render(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{k: r.get(k) for k in COLUMNS} for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    return "\n".join(_table(rows))


def _gib(x) -> str:
    return "" if x is None else sig(x / 2**30)


def _table(rows: list[dict]) -> list[str]:
    cap = next((r["memory_cap_bytes"] for r in rows if r.get("memory_cap_bytes")), None)
    first = next((r for r in rows if r.get("status") == "ok"), rows[0] if rows else {})
    cpu = first.get("device") == "cpu" and not first.get("world_size")  # the fitted process peak: one process
    head = ["model", "method", "batch × tokens", "trainable params", "checkpoint tensors", "tensor peak GiB",
            "weights / grads / optim / activations / temps GiB", "TFLOP per step", "attention"] + \
        (["process peak GiB (fitted)"] if cpu else []) + ([f"fits {_gib(cap)} GiB"] if cap else [])
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append([r["workload"], r["method"], "", f"{r['status']}: {r.get('reason', '')}"]
                        + [""] * (len(head) - 4))
            continue
        share = sig(100 * r["trainable_params"] / r["total_params"])
        cells = [r["workload"], r["method"], f"{r['batch_size']} × {r['seq_len']:,}",
                 f"{r['trainable_params']:,} ({share}%)",
                 size(r.get("trainable_state_bytes", float("nan"))), _gib(r["tensor_peak_bytes"]),
                 " / ".join(_gib(r[p]) for p in PARTS),
                 sig(r["flops_per_step"] / 1e12), r.get("attention_kernels", "")]
        cells += [_gib(r["process_peak_predicted_bytes"])] if cpu else []
        body.append(cells + (["yes" if r["fits_memory_cap"] else "**no**"] if cap else []))
    lines = [f"Planned on fake tensors (no memory, no weights): {first.get('device')}, {first.get('dtype')}; AdamW; "
             "the tensor peak of one training step in steady state (the optimizer's state held), as the cells' "
             "tracker counts it. " + (_FITTED if cpu else "" if first.get("device") == "cpu" else
                                       "Not in it: what the caching allocator reserves beyond the blocks, and the "
                                       "CUDA context. ") + f"{first.get('planned_with', '')}.", ""]
    return lines + table(head, body) + _largest_lines(rows, cap) + _comm_lines(rows)


_FITTED = ("Process peak: the tensor peak plus the runtime overhead fitted on this machine's cells "
           "(`measure/overhead.py`; within ±10 % for 93 % of committed cells with a tensor peak ≥ 256 MiB, each "
           "workload left out of its own fit: `results/plan/process-peak.md`), above the interpreter, torch and data "
           "loaded before the model. ")


def _comm_lines(rows: list[dict]) -> list[str]:
    mine = [r for r in rows if r.get("status") == "ok" and r.get("world_size")]
    if not mine:
        return []
    fsdp = mine[0]["parallel"] == "fsdp"
    out = ["", f"Collectives per training step, {mine[0]['parallel']} on {mine[0]['world_size']} ranks (payload: the "
           "tensor each acts on; the ring estimate: what one rank sends). The memory above is "
           + ("rank 0's, its model sharded as the cells shard it (held between steps, and torch's own FSDP memory "
              "tracker's peak on the same step, below):" if fsdp else "one process's (each rank holds a replica, and "
              "the reducer's gradient buckets, kept between steps, are not in it):"),
           ""]
    body = [[r["workload"], r["method"]] + [size(r[f"{k}_bytes_per_step"]) if r[f"{k}_bytes_per_step"] else "0" for k in
                                            ("allreduce", "allgather", "reducescatter", "broadcast")]
            + [size(r["ring_estimate_bytes_per_rank_per_step"]) if r["ring_estimate_bytes_per_rank_per_step"] else "0"]
            for r in mine]
    out += table(["model", "method", "all-reduce", "all-gather", "reduce-scatter", "broadcast",
                  "sent per rank (ring)"], body)
    if not fsdp:
        return out
    held = [[r["workload"], r["method"], size(r["rank_weights_max_bytes"]), size(r["rank_gradients_max_bytes"]),
             size(r["rank_optimizer_max_bytes"]), _gib(r["tensor_peak_bytes"]),
             _gib(r["tensor_peak_torch_fsdp_tracker_bytes"]) if r.get("tensor_peak_torch_fsdp_tracker_bytes") else ""]
            for r in mine]
    return out + [""] + table(["model", "method", "rank's weights", "gradients", "AdamW state", "tensor peak GiB",
                               "torch's FSDP tracker GiB"], held)


def _largest_lines(rows: list[dict], cap) -> list[str]:
    found = {(r["workload"], r["method"]): (r["largest_fitting"], r["largest_fitting_note"]) for r in rows
             if "largest_fitting" in r}
    if not found:
        return []
    out = ["", f"Largest that fits {_gib(cap)} GiB (searched on fake steps):", ""]
    for (model, method), (value, note) in found.items():
        varied, _, how = note.partition(": ")
        out.append(f"- {method} × {model}: {varied} " + (f"{value:,}" if value else "none") + f" ({how})")
    return out


def _int(x) -> int | None:
    try:
        return int(float(x))
    except (TypeError, ValueError):
        return None


def equal(r: dict) -> bool:
    """The planned tensor peak and each of its parts equal the measured ones, byte for byte."""
    return all(_int(r.get(k)) == _int(r.get(f"measured_{k}")) for k in ("tensor_peak_bytes", *PARTS))


def against_table(rows: list[dict], source: str, argv: list[str], commit: str = "") -> str:
    """Planned beside measured for every single-process CPU cell of a run: equal, or the difference per part."""
    body, same = [], 0
    for r in rows:
        where = r["workload"] + (f" ({r['vary']}={r['vary_value']})" if r.get("vary") else "")
        if r.get("status") != "ok":
            body.append([where, r["method"], f"{r['status']}: {r.get('reason', '')}", "", ""])
            continue
        same += equal(r)
        diff = "; ".join(f"{k.removesuffix('_bytes')} {r[k] - _int(r['measured_' + k]):+,} B" for k in PARTS
                         if r[k] != _int(r["measured_" + k]))
        body.append([where, r["method"], f"{r['tensor_peak_bytes']:,}", f"{_int(r['measured_tensor_peak_bytes']):,}",
                     "equal, every part" if equal(r) else diff or "peak differs"])
    planned = sum(r.get("status") == "ok" for r in rows)
    head = [f"# Planned against measured: `{source}`", "",
            f"Made by `peft-bench {' '.join(argv)}` at commit {commit or '?'}. Each single-process CPU cell of "
            f"`{source}/metrics.csv` planned on "
            "fake tensors as it was measured (its method and options, batch, length, dtype, width and depth, and the "
            "batch its tracked step saw), beside the tensor peak the cell measured. "
            f"**{same} of {planned} planned cells equal the measurement byte for byte, in every part**"
            + (f"; {len(rows) - planned} could not be planned (below)." if planned < len(rows) else "."), ""]
    return "\n".join(head + table(["workload", "method", "planned tensor peak B", "measured B", "verdict"], body)) + "\n"


def _err(planned: int, published: int | None) -> str:
    return f"{100 * (planned - published) / published:+.1f} %" if published else ""


def published_table(peft: list[dict], litgpt: list[dict], argv: list[str], commit: str = "") -> str:
    """Planned beside published — peft's method comparison, then litgpt's config hub — with the error, and what each
    published figure includes."""
    intro = ["# Planned against published GPU memory", "",
             f"Made by `peft-bench {' '.join(argv)}` at commit {commit or '?'}, on this CPU-only machine: each "
             "experiment planned with its publisher's settings on fake tensors with CUDA's choices "
             "(`peft_bench/engine/cuda_choices.py`: the attention kernel CUDA picks, foreach AdamW, 512-byte allocator "
             "blocks); settings and figures in `peft_bench/engine/published.py`.", ""]
    return "\n".join(intro + _peft_section(peft) + [""] + _why() + [""] + _litgpt_section(litgpt)) + "\n"


def _opts(r: dict) -> str:
    opts = ", ".join(f"{k}={','.join(v) if isinstance(v, (tuple, list)) else v}" for k, v in r["options"].items())
    return f"`{r['method']}`" + (f" ({opts})" if opts else "")


def _peft_section(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        quoted, filed = round(r["published_quoted"] * 2**30), r.get("published_file_bytes")
        left = [f"`{r['experiment']}`", _opts(r)]
        if r.get("status") != "ok":
            body.append(left + [f"{r['status']}: {r.get('reason', '')}", "", _gib(quoted), "", "", ""])
            continue
        peak = r["tensor_peak_bytes"]
        file_cell = f"{_gib(filed)} @ {r['published_commit']}" if filed else "not read"
        body.append(left + [f"{r['trainable_params']:,}", _gib(peak), _gib(quoted), _err(peak, quoted), file_cell,
                            _err(peak, filed)])
    head = ["experiment (peft)", "planned as", "trainable params", "planned tensor peak GiB", "published GiB (issue)",
            "error", "published GiB (results file)", "error (file)"]
    return ["## peft's method comparison (Llama-3.2-3B, MetaMathQA)", "",
            "Each experiment's settings (bfloat16 weights, batch 4 × 768 tokens padded, AdamW, adapter settings from "
            "its `adapter_config.json`; the memory-efficient attention kernel a padded batch gets). Published: "
            "`accelerator_memory_max`, torch's largest *reserved* memory over 5,000 steps and the evaluations between "
            "them, on an NVIDIA L40S; as quoted in issue 27, and as read from the results file at the commit named "
            "(the files were re-run over time).", "", *table(head, body)]


def _litgpt_section(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        left = [f"`{r['experiment']}`", r["workload"], _opts(r), f"{r.get('batch_size')} × {r.get('seq_len')}"]
        if r.get("status") != "ok":
            body.append(left + [f"{r['status']}: {r.get('reason', '')}", "", "", ""])
            continue
        peak, quoted, device = r["tensor_peak_bytes"], r["published_quoted"], r.get("published_out_of_memory_on")
        if device:  # published as out of memory on that device, with no figure
            gb = f"{device / 1e9:g} GB"
            verdict = f"agrees: over {gb}" if peak > device else f"**disagrees**: fits {gb}"
            body.append(left + [f"{r['trainable_params']:,}", sig(peak / 1e9), f"out of memory ({gb} A10G)", verdict])
            continue
        body.append(left + [f"{r['trainable_params']:,}", sig(peak / 1e9), sig(quoted),
                            _err(peak, round(quoted * 1e9))])
    head = ["config (litgpt)", "planned on", "planned as", "batch × tokens", "trainable params",
            "planned tensor peak GB", "published peak GB", "error"]
    return ["## litgpt's config hub (Alpaca2k, one 24 GB A10G)", "",
            "Each config's settings: bf16-true, AdamW, LoRA r 32, α 16, dropout 0.05 on query and value, "
            "`max_seq_length` 512, its micro batch, no attention mask (so CUDA's flash kernel). Published: the README's "
            "\"Peak memory\", which `litgpt/finetune/lora.py` prints as `torch.cuda.max_memory_allocated() / 1e9` "
            "over the whole run — *allocated*, as the plan is, in GB of 10⁹ bytes.", "", *table(head, body), "",
            "- **What differs besides the memory.** litgpt trains its own GPT, not transformers' model: one fused qkv "
            "projection (LoRA on its q and v slices: the same 13,631,488 trainable parameters on Llama-3.1-8B), the "
            "logits and the cross-entropy in 128-token bfloat16 chunks (transformers upcasts the whole logits to "
            "float32 for the loss), bf16-true adapters (peft keeps them in float32 on a bfloat16 base), and LoRA's "
            "dropout once, on the fused bfloat16 input — where peft drops out for q and for v, each on a float32 "
            "copy of the input, and keeps both masks. That dropout is most of the difference: the rows planned "
            "without it land within 0.5 % of litgpt's figures. Each of these differences makes the plan larger than "
            "litgpt's run, as every LoRA row is.",
            "- **The longest batch.** The peak is over the whole run, so over its longest batch: Alpaca2k's longest "
            "example exceeds 512 tokens with these tokenizers and is cut to 512 — the length planned."]


def _why() -> list[str]:
    return ["## Where they differ, and why", "",
            "- **What is compared.** The plan is the *allocated* peak of one training step on the longest batch. The "
            "published figure is the allocator's *reserved* peak over a whole run: it adds what the caching allocator "
            "keeps beyond live tensors (blocks freed and kept for reuse, split segments). With batches of every "
            "length between a few dozen and 768 tokens that excess is large: the same files log, every 250 steps, "
            "`mem reserved avg` ≈ 1.7 × `mem allocated avg` (LoRA: 11.9 GB reserved for 6.9 GB allocated). A plan "
            "within a few percent of the reserved peak therefore means the longest step's live tensors nearly fill "
            "what was reserved — not that the allocator added nothing.",
            "- **Evaluation is not the peak.** Every 250 steps the runs generate for 50 prompts up to 800 tokens; its "
            "KV cache is 2 × 28 layers × 8 KV heads × 128 × 2 bytes × 50 × 800 = 4.27 GiB beside 5.98 GiB of "
            "weights — about 10 GiB, well under every training peak planned here.",
            "- **Values a step reads** (LoHa's and LoKr's module-dropout draw, BOFT's dropout index, AdaLoRA's rank "
            "threshold): fake tensors have none; the planner answers with stand-ins (`scalar_reads`), which change no "
            "shape — on every committed CPU cell of these methods the plan equals the measurement byte for byte "
            "(`results/plan/against-methods.md`). AdaLoRA is planned in its masking phase (its tinit 200 / tfinal 500 "
            "only decide when that phase runs).",
            "- **BOFT, the one plan above its figure (+6.3 %).** This plan takes peft's pure-PyTorch path "
            "(`torch.block_diag` over the blocks): peft's `fbd_cuda` extension compiles only with CUDA_HOME and a "
            "compiler, which a CPU-only machine lacks; whether the published run used the extension is not recorded "
            "in its file — not settled here.",
            "- **Versions.** The published runs used torch 2.7–2.9 and transformers 4.52–4.57; this plan uses this "
            "checkout's versions (transformers' attention-mask and GQA handling decides whether keys and values are "
            "repeated per head before attention)."]

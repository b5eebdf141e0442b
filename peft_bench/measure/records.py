"""Typed records that the probes return: one frozen dataclass per probe, units in the field names.

Every field carries a one-line definition (what it includes and excludes) in its metadata; `metrics.csv`'s columns
are generated from these records (`columns()`), and `peft-bench list --metrics` prints the definitions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


def metric(doc: str, better: str | None = None) -> dataclasses.Field:
    """A record field with its one-sentence definition; `better` is 'lower' / 'higher' for ranked metrics."""
    return dataclasses.field(metadata={"doc": doc, "better": better})


@dataclass(frozen=True)
class ParamsRecord:
    trainable_params: int = metric("parameters the method trains (adapter weights, plus a trained head copy)", "lower")
    total_params: int = metric("all parameters of the model after the method is applied, tied weights once")
    trainable_pct: float = metric("100 × trainable_params / total_params")
    closed_form_trainable_params: int = metric("trainable count predicted from shapes and options alone")
    dtype: str = metric("element types of the model's parameters after apply, read from the tensors (a+b: mixed)")


@dataclass(frozen=True)
class MemoryRecord:
    tensor_peak_bytes: int = metric("most bytes of live tensor storages during a steady-state training step "
                                    "(model, gradients, optimizer state, everything the step allocates); "
                                    "excludes kernel-internal scratch and tensors the step never touches", "lower")
    weights_bytes: int = metric("at the tensor peak: parameters and buffers of the model")
    gradients_bytes: int = metric("at the tensor peak: .grad of trainable parameters already accumulated")
    optimizer_bytes: int = metric("at the tensor peak: AdamW state (exp_avg, exp_avg_sq, step)")
    activations_bytes: int = metric("at the tensor peak: storages autograd saved for backward, parameters excepted")
    temporaries_bytes: int = metric("at the tensor peak: every other storage (outputs, logits, loss, incoming "
                                    "gradients, optimizer scratch)")
    saved_activations_max_bytes: int = metric("most bytes autograd held saved for backward during the step "
                                              "(usually at the end of forward), whether or not at the peak")
    static_closed_form_bytes: int = metric("weights + gradients + AdamW state predicted from the closed-form "
                                           "trainable count and element sizes")
    static_matches_closed_form: bool = metric("the tracker's weights and optimizer bytes, and the gradients it saw "
                                              "accumulated, equal static_closed_form_bytes' parts")
    process_peak_bytes: int = metric("resident-set high-water mark (CPU) or max reserved (CUDA) over the measured "
                                     "steps, minus the process's footprint before the model was built", "lower")
    runtime_overhead_bytes: int = metric("process_peak_bytes − tensor_peak_bytes: allocator slack and "
                                         "fragmentation, kernel workspaces, library code and caches first touched "
                                         "in the fresh process, thread stacks, Python objects")
    process_baseline_bytes: int = metric("process footprint (RSS or CUDA reserved) after loading data, before the "
                                         "model was built")
    memory_source: str = metric("how the process peak was read")


@dataclass(frozen=True)
class TimingRecord:
    step_time_s: float = metric("median wall time of a whole timed training step (zero_grad, forward, backward, "
                                "optimizer; one device synchronisation at its end): the geometric mean over the "
                                "repeats of each fresh process's median; excludes batch building and host→device copies",
                                "lower")
    step_time_iqr_s: float = metric("interquartile range of the timed steps within the first repeat's process")
    step_time_split_s: float = metric("forward_s + backward_s + optimizer_s (the split, from marks between the "
                                      "parts: CUDA events on a GPU, so the parts add no synchronisation)")
    forward_s: float = metric("median time from the step's start to the loss (zero_grad and forward)")
    backward_s: float = metric("median backward time of the timed steps")
    optimizer_s: float = metric("median optimizer-step time of the timed steps")
    timed_steps: int = metric("number of timed steps per repeat")
    samples_per_s: float = metric("batch size / step_time_s", "higher")
    tokens_per_s: float = metric("non-padding tokens per second (attention mask sum / step time)", "higher")
    padded_tokens_per_s: float = metric("tokens per second as computed, padding included (batch × length)")
    first_losses: str = metric("training losses of the first three steps (JSON)")
    final_loss: float = metric("training loss of the last step")
    loss_start: float = metric("mean training loss over the first `loss_window` steps of the budget")
    loss_end: float = metric("mean training loss over the last `loss_window` steps")
    loss_probe_before: float = metric("mean loss of the model as applied, before any step, on a fixed probe of "
                                      "training-split examples, each scored alone (eval mode, no dropout)")
    loss_probe_after: float = metric("the same probe's mean loss after the whole budget")
    loss_probe_drop_ci_low: float = metric("lower end of the 95 % paired-t interval of before − after over the probe "
                                           "examples: > 0 means training lowered the loss beyond the noise (the cell "
                                           "learned)")
    loss_probe_examples: int = metric("examples in the probe (8 batches)")
    loss_window: int = metric("steps in each window: a fifth of the budget, at least 3 (when the budget allows)")
    canary_flops_per_s: float = metric("the slower of two readings, just before and just after the timed steps, of "
                                       "a fixed float32 1024² matmul probe (median of 15): how fast the machine ran")


@dataclass(frozen=True)
class RepeatsRecord:
    repeats: int = metric("fresh processes whose step times make step_time_s (run round-robin across the suite)")
    step_time_ci_low_s: float = metric("95 % Student-t interval of step_time_s on the log of each process's median "
                                       "step time, low end (empty with one repeat: no interval); coverage proven by "
                                       "simulation in tests/test_intervals.py")
    step_time_ci_high_s: float = metric("the same interval's high end")
    step_time_vs_full: float = metric("geometric mean over rounds of this cell's step time / full fine-tuning's on "
                                      "the same workload in the same round (empty without a full row)", "lower")
    step_time_vs_full_ci_low: float = metric("95 % paired-t interval of step_time_vs_full (logs of the per-round "
                                             "ratios), low end")
    step_time_vs_full_ci_high: float = metric("the same interval's high end")
    aa_ratio: float = metric("on the A/A replica's row: its step time / the original cell's, geometric mean over "
                             "rounds (two measurements of one thing; 1.0 is perfect agreement)")
    aa_ratio_ci_low: float = metric("95 % paired-t interval of aa_ratio over rounds, low end")
    aa_ratio_ci_high: float = metric("the same interval's high end")
    ci_half_width_pct: float = metric("half-width reached by the interval --target-ci judges (the ratio to full "
                                      "fine-tuning, the A/A ratio, or for a reference cell its step time), % of "
                                      "the value")
    repeats_stopped: str = metric("why no more repeats were added: 'target met', 'time budget spent', 'max rounds' "
                                  "or 'one repeat' (--target-ci PCT, --time-budget)")
    run_id: str = metric("the run whose repeats made these numbers (a --resume continues it; a new run into a used "
                         "--out is refused unless --overwrite)")
    replica: int = metric("0 for a cell; 1 for the A/A copy that measures the noise floor (same spec, separate "
                          "processes)")


@dataclass(frozen=True)
class InterferenceRecord:
    other_cpu_pct: float = metric("largest, over the repeats used, share of the machine's CPU capacity (wall × "
                                  "logical CPUs) that other processes used during the timed steps (system busy "
                                  "time − the cell's own CPU time, less two clock ticks; under torchrun over the "
                                  "whole cell, the ranks' CPU time subtracted)")
    cpu_steal_pct: float = metric("largest share of CPU capacity stolen by the hypervisor during a repeat's timed "
                                  "steps")
    load_avg_1m: float = metric("largest 1-minute load average at the end of a repeat")
    interference_repeats: int = metric("repeats used that saw other_cpu_pct or cpu_steal_pct above 10 % or a slow "
                                       "machine (flagged; with repeats > 1 each was re-measured once, as a pair "
                                       "with its reference, in a new round; what is still counted here was not)")
    machine_speed: float = metric("slowest canary_flops_per_s of the repeats used ÷ the run's median canary (below "
                                  "0.55 the repeat is flagged: a neighbour holding a core, or a slow period no process "
                                  "list shows; the canary scatters ±14 % on an idle machine)")
    run_machine_speed: float = metric("the run's median canary ÷ the idle machine's, read at the start of the run under "
                                      "the same sustained load (environment.json); below 0.7 the whole run ran slow "
                                      "and every repeat counts as disturbed (idle: about 0.9)")
    remeasured: int = metric("repeats used that are re-measurements of a disturbed one")
    interference_window_s: float = metric("seconds the guard watched: the timed steps (the whole cell under "
                                          "torchrun); below about 1 s the kernel's 10 ms ticks hide a neighbour, and "
                                          "the canary is the guard")


@dataclass(frozen=True)
class FlopsRecord:
    step_flops: int = metric("FLOPs of one training step counted by torch.utils.flop_counter on the real step "
                             "(matmuls, convolutions, attention kernels; elementwise work excluded)")
    step_flops_analytic: int = metric("the same step by formula: 2·rows·d_in·d_out per Linear × (1 forward + 1 "
                                      "input-gradient if its input needs one + 1 weight-gradient if trained), "
                                      "plus 4·B·H·Tq·Tk·Dh per attention × 3 (forward, two backward products)")
    flops_counted_vs_analytic: float = metric("step_flops / step_flops_analytic")
    achieved_flops_per_s: float = metric("step_flops / step_time_s")
    matmul_peak_flops_per_s: float = metric("best measured FLOP/s of square matmuls (1024–3072) in the run's dtype "
                                            "and device, measured once per run in a process like the cells'")
    pct_of_matmul_peak: float = metric("100 × achieved / matmul peak (a model-FLOPs-utilisation against a "
                                       "measured, not nominal, peak)", "higher")


@dataclass(frozen=True)
class InferenceRecord:
    inference_base_s: float = metric("median forward latency of the base model as built, without the method "
                                     "(rebuilt with the same seed at the end of the cell; torch.utils.benchmark "
                                     "blocked_autorange)", "lower")
    inference_base_iqr_s: float = metric("IQR of the base model's forward latency")
    inference_adapter_s: float = metric("median forward latency of the trained model, adapter unmerged", "lower")
    inference_adapter_iqr_s: float = metric("IQR of the unmerged forward latency")
    inference_merged_s: float = metric("median forward latency after merging the adapter (mergeable methods)", "lower")
    inference_merged_iqr_s: float = metric("IQR of the merged forward latency")


@dataclass(frozen=True)
class ChecksRecord:
    check_tolerance: float = metric("|Δ| allowed between two computations of the same output: 64·eps(dtype)·"
                                    "max(1, max|logits|) (CPU kernels do not promise bitwise reproducibility)")
    disabled_max_abs_diff: float = metric("after training: max |disabled-adapter output − base output|")
    merge_max_abs_diff: float = metric("after training: max |merged − unmerged output| (allowed 16 × tolerance: "
                                       "W+ΔW is rounded once)")
    unmerge_max_abs_diff: float = metric("after training, merge then unmerge: max of |output − output before| and "
                                         "|disabled output − base output| (the base weights themselves restored)")
    roundtrip_max_abs_diff: float = metric("max |output of a fresh base with the saved checkpoint loaded − output of "
                                           "the trained model|")


@dataclass(frozen=True)
class CheckpointRecord:
    checkpoint_bytes: int = metric("bytes on disk a user must keep to restore the trained model's outputs "
                                   "(peft-format adapter directory; the whole model for full)", "lower")
    checkpoint_format: str = metric("what the checkpoint holds and in which format")
    trainable_state_bytes: int = metric("bytes of the trainable tensors themselves (what resuming training needs; "
                                        "differs from checkpoint_bytes for prompt encoders, which export their output)")
    full_checkpoint_bytes: int = metric("bytes of the whole trained model as one safetensors file")
    full_model_load_cold_s: float = metric("read the whole-model file, evicted from the page cache, into a "
                                           "loaded model", "lower")
    full_model_load_warm_s: float = metric("the same load with the file in the page cache", "lower")
    adapter_switch_cold_s: float = metric("restore the checkpoint (evicted from the page cache) onto a base already "
                                          "in memory", "lower")
    adapter_switch_warm_s: float = metric("the same restore with the checkpoint in the page cache", "lower")
    cold_cache_resident_fraction: float = metric("share of the checkpoint pages still cached before the cold "
                                                 "reads (0 = truly cold)")


@dataclass(frozen=True)
class AccuracyRecord:
    accuracy: float = metric("share of the held-out test split labelled correctly after the training budget", "higher")
    accuracy_ci_low: float = metric("95 % Wilson score interval of `accuracy` over the test_examples (test-set "
                                    "sampling only; the spread across training seeds is in summary_seeds.csv)")
    accuracy_ci_high: float = metric("upper end of that interval")
    base_accuracy: float = metric("the same for the base model as built, before any training (the zero-shot "
                                  "accuracy of a pretrained LM; rebuilt with the same seed at the end of the cell)")
    base_accuracy_ci_low: float = metric("95 % Wilson interval of `base_accuracy`")
    base_accuracy_ci_high: float = metric("upper end of that interval")
    test_examples: int = metric("size of the held-out test split")
    majority_rate: float = metric("share of the test split's commonest label: what always answering it scores")

    @classmethod
    def of(cls, accuracy: float, base_accuracy: float, n: int, majority: float) -> AccuracyRecord:
        from .stats import wilson

        def interval(a: float) -> tuple[float, float]:
            return wilson(round(a * n), n) if a == a else (float("nan"), float("nan"))

        lo, hi = interval(accuracy)
        base_lo, base_hi = interval(base_accuracy)
        return cls(accuracy, lo, hi, base_accuracy, base_lo, base_hi, n, majority)


@dataclass(frozen=True)
class ForgettingRecord:
    """Causal-LM workloads only (NaN elsewhere): how much training moved the model away from general text."""

    forgetting: float = metric("language-model loss (nats per predicted token) on held-out general text after "
                               "training minus the base model's on the same text: > 0 means the model forgot; "
                               "for adapters this is enabled minus disabled", "lower")
    forgetting_base_loss: float = metric("the base model's loss on that text (nats per token)")
    forgetting_texts: int = metric("texts in the general-text sample (the workload's non-review rows)")
    forgetting_tokens: int = metric("tokens predicted in it (the n of both losses)")


@dataclass(frozen=True)
class DistributedRecord:
    """Cells run under torchrun (`--nproc`); empty for single-process cells. Step times of such a cell are the
    slowest rank's: each timed step's wall time is the maximum over the ranks, and step_time_s their median."""

    world_size: int = metric("processes (ranks) that trained the cell together, each on its own batch of batch_size")
    parallel: str = metric("ddp: DistributedDataParallel (every rank holds the whole model, gradients all-reduced); "
                           "fsdp: FSDP2 fully_shard per transformer block and the root (parameters, gradients and "
                           "optimizer state sharded, parameters all-gathered for compute)")
    backend: str = metric("torch.distributed backend: gloo (CPU) or nccl (CUDA)")
    threads_per_rank: int = metric("intra-op threads of each rank (torch.set_num_threads)")
    fastest_rank_step_time_s: float = metric("median over the timed steps of the fastest rank's wall time (the "
                                             "slowest rank's is step_time_s), scaled like the throughputs from the "
                                             "first repeat's process to the repeats' geometric mean")
    broadcast_buffers: bool = metric("ddp: the model's buffers broadcast from rank 0 before every forward (DDP's "
                                     "default; --broadcast-buffers off turns it off, right when buffers are "
                                     "constant, as causal masks are); fsdp: empty")
    comm_counted_steps: int = metric("training steps after the timed ones over which communication was counted "
                                     "(the profiler that counts stays out of the timed steps)")
    allreduce_bytes_per_step: int = metric("payload all-reduced per training step, per rank: the bytes of every "
                                           "tensor an all-reduce ran on (DDP's gradient buckets; on gloo also "
                                           "FSDP's gradients, which gloo reduce-scatters by all-reducing the whole "
                                           "input), from the backend's own records", "lower")
    allgather_bytes_per_step: int = metric("payload all-gathered per step, per rank: bytes of each all-gather's "
                                           "output, N × the shard (FSDP's parameter unsharding, forward and "
                                           "backward)", "lower")
    reducescatter_bytes_per_step: int = metric("payload reduce-scattered per step, per rank: bytes of each "
                                               "reduce-scatter's input, N × the shard (FSDP's gradient reduction on "
                                               "NCCL)", "lower")
    broadcast_bytes_per_step: int = metric("payload broadcast per step: DDP's buffer broadcast before each forward "
                                           "(broadcast_buffers), and any other broadcast", "lower")
    other_collective_bytes_per_step: int = metric("payload of any other collective in a step (barriers carry none)")
    comm_bytes_per_step: int = metric("sum of the payloads above: what one rank hands to collectives per step",
                                      "lower")
    collectives_per_step: float = metric("collectives the backend ran per training step, per rank")
    ring_estimate_bytes_per_rank_per_step: float = metric(
        "estimate from the counted payload: bytes one rank sends per step, mean over ranks, if every collective ran "
        "as a ring (all-reduce 2(N−1)/N × payload; all-gather, reduce-scatter and broadcast (N−1)/N)")
    wire_bytes_per_step: float = metric("measured, the second witness: bytes each rank wrote to its sockets per "
                                        "counted step (growth of wchar in /proc/<pid>/io), mean over ranks; gloo "
                                        "on Linux only (NCCL does not move data through sockets)", "lower")
    wire_bytes_max_rank_per_step: float = metric("the same, the rank that wrote most (a broadcast's root sends it "
                                                 "all)")
    wire_within_15pct: bool = metric("wire_bytes_per_step within 15 % of ring_estimate_bytes_per_rank_per_step")
    comm_closed_form_bytes: int = metric("gradient payload predicted from the trainable count: element size × "
                                         "trainable parameters (ddp: the all-reduce), × trainable parameters padded "
                                         "per tensor to a multiple of the world size on dim 0 (fsdp: the "
                                         "reduce-scatter, or on gloo the all-reduce it runs instead)")
    comm_matches_closed_form: bool = metric("the counted gradient payload equals comm_closed_form_bytes")
    rank_process_peak_max_bytes: int = metric("largest over ranks of process_peak_bytes (each rank's resident-set "
                                              "or CUDA-reserved high-water mark over its measured steps, minus its "
                                              "footprint before the model was built)", "lower")
    rank_process_peak_min_bytes: int = metric("smallest over ranks of the same")
    rank_weights_max_bytes: int = metric("largest over ranks of the parameter and buffer bytes the rank holds "
                                         "between steps (its shard under fsdp, local elements only)", "lower")
    rank_weights_min_bytes: int = metric("smallest over ranks of the same")
    rank_gradients_max_bytes: int = metric("largest over ranks of the gradient bytes held after a step (local "
                                           "shard under fsdp; DDP's gradients are views into its buckets)")
    rank_optimizer_max_bytes: int = metric("largest over ranks of the AdamW state bytes held (local shard under fsdp)")
    shards_cover_model: bool = metric("fsdp: the ranks' parameter shards add up to exactly the model's elements; "
                                      "ddp: every rank holds every element")
    replicas_max_abs_diff: float = metric("ddp, after training: max |trainable parameter on a rank − rank 0's| "
                                          "(0 when the all-reduce kept the replicas identical; empty for fsdp)")
    unused_parameters: int = metric("trainable tensors that received no gradient in a probe step before wrapping "
                                    "(> 0: DDP runs with find_unused_parameters)")
    scaling_efficiency: float = metric("weak scaling: step time of the same cell with one process ÷ this cell's, "
                                       "geometric mean over paired rounds (each rank keeps its batch, so 1.0 means N "
                                       "processes train N× the examples per second)", "higher")
    scaling_efficiency_ci_low: float = metric("95 % paired-t interval of scaling_efficiency over rounds, low end")
    scaling_efficiency_ci_high: float = metric("the same interval's high end")



def _serving(doc: str, default: object = None, better: str | None = None) -> dataclasses.Field:
    return dataclasses.field(default=default, metadata={"doc": doc, "better": better})


@dataclass(frozen=True)
class ServingRecord:
    """One serving measurement (a row of serving.csv, not of metrics.csv): `peft_bench.engine.serve`."""

    probe: str = _serving("generation | adapters | mixed | switch | fidelity", "")
    variant: str = _serving("base (adapter disabled) | unmerged | merged; for adapters: the batch's layout or the "
                            "switch", "")
    prompt_tokens: int = _serving("prompt length in tokens, exactly (real test reviews cut to it)", 0)
    batch: int = _serving("sequences decoded together", 0)
    new_tokens: int = _serving("tokens generated greedily after the prompt (the first from the prefill)", 0)
    virtual_tokens: int = _serving("prompt-learning tokens in front of the prompt (prefix: in the cache only)", 0)
    adapters_loaded: int = _serving("adapters held by the model while measured", 0)
    dtype: str = _serving("element type of the model while measured", "")
    ttft_s: float = _serving("time to first token: the prefill forward over the whole prompt and its argmax",
                             math.nan, "lower")
    decode_token_s: float = _serving("median time of one decode step (one new token for every sequence, KV cache "
                                     "in use)", math.nan, "lower")
    tokens_per_s: float = _serving("batch × new tokens ÷ (prefill + every decode step)", math.nan, "higher")
    kv_cache_bytes: int = _serving("bytes of the KV cache's key and value tensors after the last decode step", 0)
    kv_cache_closed_form_bytes: int = _serving("2 × layers × key/value heads × head size × batch × (virtual + "
                                               "prompt + new − 1) positions × element size, from the config", 0)
    no_cache_agrees: bool | None = _serving("the cached loop's first 8 tokens equal the model's own forward "
                                            "recomputed over the whole sequence for each token (no cache)")
    generate_agrees: bool | None = _serving("transformers' greedy generate gives the cached loop's first 8 tokens")
    witness_note: str = _serving("why a witness could not be read (generate raised)", "")
    tokens_equal: bool | None = _serving("merged (or mixed-batch, or hot-swapped) generates exactly the reference's "
                                         "tokens")
    first_divergence: int = _serving("first new-token position where the tokens differ (-1: none)", -1)
    logit_gap: float = _serving("at the first divergence: the reference's logit of its token minus of the other's",
                                math.nan)
    max_abs_diff: float = _serving("largest |Δ| between the two computations' prompt logits", math.nan)
    agree_tokens: int = _serving("greedy tokens equal before the first divergence (new_tokens when all agree)", 0)
    adapter_bytes: int = _serving("bytes of one adapter's tensors, read from the model", 0)
    adapter_closed_form_bytes: int = _serving("one adapter's bytes from the closed-form trainable count", 0)
    rss_per_adapter_bytes: float = _serving("process RSS growth while the adapters were added ÷ their number",
                                            math.nan)
    seconds: float = _serving("time of one operation (set_adapter, a hot-swap from disk, a whole batch's "
                              "generation)", math.nan, "lower")

RECORDS = (ParamsRecord, MemoryRecord, TimingRecord, RepeatsRecord, InterferenceRecord, FlopsRecord, InferenceRecord,
           ChecksRecord, CheckpointRecord, AccuracyRecord, ForgettingRecord, DistributedRecord)


def columns() -> list[str]:
    return [f.name for r in RECORDS for f in dataclasses.fields(r)]


def text_columns() -> set[str]:
    """The record fields that are not numbers (text and yes/no), from their declared types."""
    return {f.name for r in RECORDS for f in dataclasses.fields(r) if str(f.type).split(" ")[0] in ("str", "bool")}


def definitions() -> dict[str, str]:
    return {f.name: f.metadata["doc"] for r in RECORDS for f in dataclasses.fields(r)}


def better() -> dict[str, str]:
    return {f.name: f.metadata["better"] for r in RECORDS for f in dataclasses.fields(r) if f.metadata.get("better")}


def as_row(record: object) -> dict:
    return dataclasses.asdict(record)

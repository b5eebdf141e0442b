"""Published GPU memory figures, planned with the publishers' own settings (`peft-bench plan --published`).

peft's method comparison (huggingface/peft, `method_comparison/MetaMathQA`): Llama-3.2-3B in bfloat16, batch 4,
sequences up to 768 tokens (each batch padded to its longest), AdamW, no mixed precision, no gradient
checkpointing, one NVIDIA L40S (`default_training_params.json`; each experiment's `adapter_config.json`). Each run
publishes `accelerator_memory_max` (older files: `cuda_memory_max`): torch's largest *reserved* memory over 5,000
training steps and the evaluations between them. The plan predicts one step on the longest batch (4 × 768, padded,
so sdpa takes the memory-efficient kernel over keys and values repeated per head, as theirs did) with CUDA's choices.

`quoted` is the figure issue 27 quotes; `file` the one read from the results file named (path @ commit), where read —
the files have been re-run over time (torch 2.7 → 2.9), and the two differ by up to 4 %.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
LLAMA_QV = ("q_proj", "v_proj")
SOURCE = "huggingface/peft method_comparison/MetaMathQA/results"


@dataclasses.dataclass(frozen=True)
class Published:
    experiment: str  # the results file's stem
    method: str  # ours
    options: dict
    quoted: float | None  # the published figure in its table's unit: GiB as issue 27 quotes peft's, GB litgpt's
    file_bytes: int | None = None  # accelerator_memory_max in the results file, where read
    commit: str = ""  # of that file
    trainable: int | None = None  # num_trainable_params in that file: the settings' witness (tests/test_predict.py)
    model: str = "llama-3.2-3b"  # ours (peft_bench.models.PLANNED)
    batch_size: int = 4
    seq_len: int = 768  # the longest batch's length
    padded: bool = True  # the longest batch carries an attention mask (padding), as peft's runs do
    out_of_memory_on: int | None = None  # published as out of memory on a device of this many bytes (no figure)


PEFT_METAMATHQA = (
    Published("full-finetuning--llama-3.2-3B-lr_0.00001", "full", {}, 36.20, 37_241_225_216, "0a179c1e86",
              3_212_749_824),
    Published("lora--llama-3.2-3B-rank32", "hf-lora", {"r": 32, "alpha": 64, "targets": LLAMA_QV}, 20.76,
              22_273_851_392, "0a179c1e86", 9_175_040),
    Published("lora--llama-3.2-3B-rank32-dora", "hf-dora", {"r": 32, "alpha": 64, "targets": LLAMA_QV}, 22.85,
              24_540_872_704, "52903c83d9", 9_289_728),
    Published("ia3--llama-3.2-3B-default", "ia3", {}, 21.64, 23_137_878_016, "1948110ce6", 286_720),
    Published("vera--llama-3.2-3B-default", "vera", {"r": 256, "targets": LLAMA_QV}, 20.14, 21_596_471_296,
              "0a179c1e86", 129_024),
    Published("prefixtuning--llama-3.2-3B-tokens50-init_prefix-lr_0.005", "prefix", {"num_virtual_tokens": 50},
              19.17, 20_598_226_944, "623aad7d73", 2_867_200),
    Published("prompt_tuning--llama-3.2-3B-default", "prompt-tuning", {"num_virtual_tokens": 200}, 22.73,
              24_379_392_000, "1948110ce6", 614_400),
    Published("ptuning--llama-3.2-3B-default", "p-tuning", {"num_virtual_tokens": 20, "encoder_hidden_size": 3072},
              19.48, 20_937_965_568, "3a546ed24e", 28_382_208),
    Published("boft--llama-3.2-3B-default", "boft", {"block_size": 4, "targets": LLAMA_QV}, 23.00, 24_427_626_496,
              "06f76d8eba", 802_816),
    Published("ln_tuning--llama-3.2-3B-default", "ln-tuning", {}, 19.7, 21_179_138_048, "52903c83d9", 175_104),
    Published("oft--llama-3.2-3B-rank32", "oft", {"block_size": 96, "targets": LLAMA_QV}, 20.8, 22_328_377_344,
              "1948110ce6", 8_171_520),
    # AdaLoRA's tinit 200 / tfinal 500 / total_step 5000 only decide *when* ranks are masked; the planned step masks
    Published("adalora--llama-3.2-3B-rank32", "adalora", {"r": 32, "init_r": 64, "alpha": 8.0, "targets": LLAMA_QV},
              21.2, 22_793_945_088, "1948110ce6", 18_353_664),
    Published("loha--llama-3.2-3B-rank32", "loha", {"r": 32, "alpha": 64.0, "targets": LLAMA_QV}, 22.3,
              23_886_561_280, "1948110ce6", 18_350_080),
    Published("lokr--llama-3.2-3B-rank32", "lokr", {"r": 32, "alpha": 64.0, "targets": LLAMA_QV}, 22.0,
              23_571_988_480, "095a3f9670", 279_552),
)


# litgpt's config hub (Lightning-AI/litgpt `config_hub/finetune/README.md`, each config's yaml): Alpaca2k, bf16-true
# (weights, LoRA and AdamW state all bfloat16), AdamW, max_seq_length 512, micro batches of 1 or 2 with no attention
# mask (padding attended, its loss ignored), on one 24 GB NVIDIA A10G. "Peak memory" is printed by `finetune/lora.py`
# as torch.cuda.max_memory_allocated() / 1e9 over the whole run: *allocated*, not reserved, in GB (10⁹). Our model is
# transformers' Llama/Mistral, not litgpt's own GPT (fused qkv, logits in 128-token chunks, bf16 cross-entropy).
A10G_BYTES = 24 * 10**9  # the A10G's 24 GB
LITGPT_LORA = {"r": 32, "alpha": 16.0, "dropout": 0.05, "targets": LLAMA_QV}
LITGPT_ALPACA2K = (
    Published("llama-3.1-8b/lora.yaml", "hf-lora", LITGPT_LORA, 19.73, model="llama-3.1-8b", batch_size=1,
              seq_len=512, padded=False),
    # Llama-3-8B has Llama-3.1-8B's shapes (only the rotary scaling differs): planned on the same config
    Published("llama-3-8b/lora.yaml", "hf-lora", LITGPT_LORA, 19.73, model="llama-3.1-8b", batch_size=1,
              seq_len=512, padded=False),
    Published("mistral-7b/lora.yaml", "hf-lora", LITGPT_LORA, 20.66, model="mistral-7b", batch_size=2, seq_len=512,
              padded=False),
    Published("llama-3.1-8b/full.yaml", "full", {}, None, model="llama-3.1-8b", batch_size=4, seq_len=512,
              padded=False, out_of_memory_on=A10G_BYTES),
    # the same LoRA rows without dropout: what peft's dropout (on q and on v, each on a float32 copy of the input,
    # its mask kept) adds to the plan — litgpt drops out once, on the fused bfloat16 input
    Published("llama-3.1-8b/lora.yaml, planned without dropout", "hf-lora", {**LITGPT_LORA, "dropout": 0.0}, 19.73,
              model="llama-3.1-8b", batch_size=1, seq_len=512, padded=False),
    Published("mistral-7b/lora.yaml, planned without dropout", "hf-lora", {**LITGPT_LORA, "dropout": 0.0}, 20.66,
              model="mistral-7b", batch_size=2, seq_len=512, padded=False),
)


def plan_published(table: tuple[Published, ...] = PEFT_METAMATHQA) -> list[dict]:
    """Each published experiment planned with its settings (bfloat16, CUDA's choices): the planned row beside the
    published figures."""
    import sys

    from .predict import _Asked, isolated

    out = []
    for i, p in enumerate(table, 1):
        print(f"[{i}/{len(table)}] planning {p.experiment}", file=sys.stderr, flush=True)
        asked = _Asked(batch_size=p.batch_size, max_length=p.seq_len, dtype="bfloat16", device="cuda", padded=p.padded)
        row = isolated(p.method, p.model, asked, p.options)
        row.update(experiment=p.experiment, published_quoted=p.quoted, published_file_bytes=p.file_bytes,
                   published_commit=p.commit, published_out_of_memory_on=p.out_of_memory_on, options=p.options)
        out.append(row)
    return out

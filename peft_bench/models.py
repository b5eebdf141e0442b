"""Model builders: the tutorial's MLP and transformer architectures from their published configs.

The published configs are written out here (not fetched) so the architectures build offline; weights are
random unless a workload loads pretrained ones. `size="tiny"` gives a few-layer, narrow variant of the same
architecture for tests and the smoke suite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MLPOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class MLP(nn.Module):
    """The tutorial's digit classifier: 784 → 1000 → 2000 → 10 with ReLU (hidden sizes configurable)."""

    def __init__(self, hidden1: int = 1000, hidden2: int = 2000, in_features: int = 784, classes: int = 10) -> None:
        super().__init__()
        self.sizes = (in_features, hidden1, hidden2, classes)  # the configuration (closed forms read it, not tensors)
        self.linear1 = nn.Linear(in_features, hidden1)
        self.linear2 = nn.Linear(hidden1, hidden2)
        self.linear3 = nn.Linear(hidden2, classes)
        self.relu = nn.ReLU()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> MLPOutput:
        x = pixel_values.view(pixel_values.shape[0], -1)
        logits = self.linear3(self.relu(self.linear2(self.relu(self.linear1(x)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return MLPOutput(logits, loss)


def mlp(size: str = "full") -> MLP:
    return MLP() if size == "full" else MLP(hidden1=32, hidden2=48)


# EleutherAI/gpt-neo-125m config.json (published), the fields that shape the model.
GPT_NEO_125M = dict(
    model_type="gpt_neo",
    vocab_size=50257,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    attention_types=[[["global", "local"], 6]],
    max_position_embeddings=2048,
    window_size=256,
    intermediate_size=None,
    activation_function="gelu_new",
    bos_token_id=50256,
    eos_token_id=50256,
)
GPT_NEO_TINY = dict(
    GPT_NEO_125M,
    vocab_size=30522,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    attention_types=[[["global", "local"], 1]],
    max_position_embeddings=256,
    window_size=32,
    bos_token_id=101,
    eos_token_id=102,
)
# google-t5/t5-small config.json (published).
T5_SMALL = dict(
    vocab_size=32128,
    d_model=512,
    d_kv=64,
    d_ff=2048,
    num_layers=6,
    num_decoder_layers=6,
    num_heads=8,
    relative_attention_num_buckets=32,
    dropout_rate=0.1,
    feed_forward_proj="relu",
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
T5_TINY = dict(T5_SMALL, vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
# A two-layer Llama with grouped-query attention (4 query heads share 2 key/value heads), for tests.
LLAMA_TINY = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=101, eos_token_id=102,
                  pad_token_id=0, tie_word_embeddings=True)
BERT_TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# sentence-transformers/all-MiniLM-L6-v2 config.json (published): the minilm-sentiment encoder's sizes.
MINILM_L6 = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                 max_position_embeddings=512)
# HuggingFaceTB/SmolLM2-135M config.json (published): the smollm2-135m-sentiment decoder's sizes.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=True, rope_theta=100000.0)

# Published configs of models this machine cannot hold, for `peft-bench plan` (built on fake tensors only): the fields
# that shape the model, from each model's config.json on the Hugging Face hub.
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
               bos_token_id=128000, eos_token_id=128001, hidden_act="silu", attention_bias=False, mlp_bias=False)
_LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
PLANNED = {
    # meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B
    "llama-3.2-1b": ("llama", dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   tie_word_embeddings=True, rope_scaling=_LLAMA32_ROPE)),
    "llama-3.2-3b": ("llama", dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                   tie_word_embeddings=True, rope_scaling=_LLAMA32_ROPE)),
    "llama-3.1-8b": ("llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   tie_word_embeddings=False, rope_scaling=dict(_LLAMA32_ROPE, factor=8.0))),
    # Qwen/Qwen2.5-7B: biases on q, k, v
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                                 bos_token_id=151643, eos_token_id=151643)),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "smollm2-135m": ("llama", SMOLLM2_135M),
    "gpt-neo-125m": ("gpt_neo", GPT_NEO_125M),
    "t5-small": ("t5", T5_SMALL),
}


def planned(name: str, **overrides: object) -> nn.Module:
    """A model of `PLANNED` built from its published config (call under fake tensors: the weights are not wanted);
    `overrides`: config fields changed (e.g. num_hidden_layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kind, fields = PLANNED[name]
    cfg = AutoConfig.for_model(kind, **{k: v for k, v in {**fields, **overrides}.items() if k != "model_type"})
    return (AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM).from_config(cfg)


def gpt_neo(size: str = "full", **overrides: object) -> nn.Module:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    return GPTNeoForCausalLM(GPTNeoConfig(**{**(GPT_NEO_125M if size == "full" else GPT_NEO_TINY), **overrides}))


def t5(size: str = "full", **overrides: object) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(**{**(T5_SMALL if size == "full" else T5_TINY), **overrides}))


def bert_classifier(size: str = "tiny", num_labels: int = 2, **overrides: object) -> nn.Module:
    """A randomly initialised BERT classifier: "tiny" (the stand-in for MiniLM in tests) or "full" (MiniLM-L6 sizes)."""
    from transformers import BertConfig, BertForSequenceClassification

    sizes = MINILM_L6 if size == "full" else BERT_TINY
    return BertForSequenceClassification(BertConfig(**{**sizes, **overrides}, num_labels=num_labels))


def llama(size: str = "tiny", **overrides: object) -> nn.Module:
    """A randomly initialised Llama causal LM with grouped-query attention: "tiny" (tests) or "full" (SmolLM2-135M
    sizes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**(SMOLLM2_135M if size == "full" else LLAMA_TINY), **overrides}))


# -- scaled architectures (peft-bench sweep --vary width|depth) ------------------------------------------------
def scaled(kind: str, base: dict, width: int | None = None, depth: int | None = None) -> dict:
    """A published config (`base`) with its width and/or depth changed and everything else kept: the head size stays
    the published one (heads = width / head size), the feed-forward stays 4 × width where the config says so, GPT-Neo
    keeps its alternating global/local attention. Raises UserError when a width is not a multiple of the head size."""
    from .errors import UserError

    out = dict(base)
    if kind == "gpt-neo":
        head = base["hidden_size"] // base["num_heads"]
        if width is not None:
            if width % head:
                raise UserError(f"width {width} is not a multiple of GPT-Neo's head size {head}")
            out.update(hidden_size=width, num_heads=width // head)
        if depth is not None:
            out.update(num_layers=depth, attention_types=[[["global", "local"], depth // 2]] +
                       ([[["global"], 1]] if depth % 2 else []))
    elif kind == "t5":
        if width is not None:
            if width % base["d_kv"]:
                raise UserError(f"width {width} is not a multiple of T5's head size {base['d_kv']}")
            out.update(d_model=width, num_heads=width // base["d_kv"], d_ff=width * base["d_ff"] // base["d_model"])
        if depth is not None:
            out.update(num_layers=depth, num_decoder_layers=depth)
    else:
        raise UserError(f"no scalable architecture {kind!r}")
    return out

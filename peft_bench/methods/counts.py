"""Full fine-tuning's closed form, written from the configuration — never from the tensors it is checked against.

For the embedded architectures a formula per family, term by term (embeddings, blocks, norms, heads, tied weights
counted once); the published totals stay the outside reference (GPT-Neo-125M 125,198,592; T5-small 60,506,624; the
tutorial's MLP 2,807,010: tests/test_methods.py). For any other model (`--model`), a second, independent instance
built from the model's own config on the meta device (no memory, no weights read) and counted. Either way, a tensor
grown or added after the model was built changes the count from the tensors and not this one.
"""

from __future__ import annotations

from torch import nn

from ..arch import dims


def full_parameters(model: nn.Module) -> int:
    """Every parameter of `model`'s architecture, from its configuration (tied weights once)."""
    from ..models import MLP

    if isinstance(model, MLP):
        return mlp(model.sizes)
    config = getattr(model, "config", None)
    formula = FORMULAS.get((getattr(config, "model_type", None), type(model).__name__))
    return formula(config) if formula else twin_parameters(model)


def mlp(sizes: tuple[int, ...]) -> int:
    """Linear layers in → h1 → h2 → classes, each weight and bias."""
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def gpt_neo(c) -> int:
    """Token and position embeddings; per block two LayerNorms, q/k/v without bias, out_proj and the MLP with biases;
    the final LayerNorm; the LM head tied to the token embeddings."""
    h, i = c.hidden_size, c.intermediate_size or 4 * c.hidden_size
    block = 2 * h + 3 * h * h + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    return c.vocab_size * h + c.max_position_embeddings * h + c.num_layers * block + 2 * h


def llama(c) -> int:
    """Token embeddings; per block q/o over all heads, k/v over the key-value heads (grouped-query attention), the
    gated MLP (gate, up, down) and two RMSNorms (weight only); the final norm; the LM head unless tied."""
    d = dims(c)
    h, i, q, kv = c.hidden_size, c.intermediate_size, d.heads * d.head_dim, d.kv_heads * d.head_dim
    bias = (q + 2 * kv + h) if getattr(c, "attention_bias", False) else 0
    mlp_bias = (2 * i + h) if getattr(c, "mlp_bias", False) else 0
    block = h * q + 2 * h * kv + q * h + bias + 3 * h * i + mlp_bias + 2 * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return c.vocab_size * h + c.num_hidden_layers * block + h + head


def t5(c) -> int:
    """Shared embeddings; encoder blocks (self-attention q/k/v/o, feed-forward, two weight-only norms), decoder blocks
    (self- and cross-attention, feed-forward, three norms), one relative-position bias table per stack, a final norm
    per stack; the LM head unless tied."""
    d, inner = c.d_model, c.num_heads * c.d_kv
    ff = (3 if c.is_gated_act else 2) * d * c.d_ff
    attention = 4 * d * inner
    encoder = c.num_layers * (attention + ff + 2 * d)
    decoder = c.num_decoder_layers * (2 * attention + ff + 3 * d)
    stacks = 2 * (c.relative_attention_num_buckets * c.num_heads + d)
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    return c.vocab_size * d + encoder + decoder + stacks + head


def bert_classifier(c) -> int:
    """Word, position and token-type embeddings and their LayerNorm; per layer q/k/v/o with biases, two LayerNorms,
    the intermediate and output projections; the pooler; the classifier over num_labels."""
    h, i = c.hidden_size, c.intermediate_size
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return embeddings + c.num_hidden_layers * layer + (h * h + h) + (h * c.num_labels + c.num_labels)


FORMULAS = {("gpt_neo", "GPTNeoForCausalLM"): gpt_neo, ("llama", "LlamaForCausalLM"): llama,
            ("t5", "T5ForConditionalGeneration"): t5, ("bert", "BertForSequenceClassification"): bert_classifier}


def twin_parameters(model: nn.Module) -> int:
    """A second instance of the model's class built from its config on the meta device, its parameters counted
    (tied weights once): independent of the tensors `model` holds now."""
    import torch

    from .base import unique_named_parameters

    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has neither a known architecture nor a config to rebuild it from")
    with torch.device("meta"):
        twin = type(model)(config)
    return sum(p.numel() for _, p in unique_named_parameters(twin))


# -- the base model's bytes -------------------------------------------------------------------------------------
def gpt_neo_buffers(c) -> list[tuple[int, str]]:
    """One causal mask per block: max_position_embeddings² booleans."""
    return [(c.num_layers * c.max_position_embeddings ** 2, "bool")]


def llama_buffers(c) -> list[tuple[int, str]]:
    """The rotary embedding's inverse frequencies and their original copy: head_dim / 2 floats each."""
    return [(2 * (dims(c).head_dim // 2), "float")]


def bert_buffers(c) -> list[tuple[int, str]]:
    """The embeddings' position ids and token-type ids: max_position_embeddings int64 each."""
    return [(2 * c.max_position_embeddings, "int64")]


BUFFERS = {"gpt_neo": gpt_neo_buffers, "llama": llama_buffers, "bert": bert_buffers, "t5": lambda c: []}
SIZES = {"bool": 1, "int64": 8}


def base_bytes(model: nn.Module, element: int) -> int:
    """Bytes of the base model's parameters and buffers at `element` bytes per floating-point value, from its
    configuration (a formula per embedded family, else a twin on the meta device) — not a walk of its storages."""
    from ..models import MLP

    if isinstance(model, MLP):
        return mlp(model.sizes) * element
    config = model.config
    kind = (getattr(config, "model_type", None), type(model).__name__)
    if kind in FORMULAS and kind[0] in BUFFERS:
        buffers = sum(n * SIZES.get(dtype, element) for n, dtype in BUFFERS[kind[0]](config))
        return FORMULAS[kind](config) * element + buffers
    return _twin_bytes(model, element)


def _twin_bytes(model: nn.Module, element: int) -> int:
    """Parameters and buffers of a twin built from the config on the meta device, floating-point ones at `element`
    bytes, tied tensors once."""
    import torch

    from .base import unique_named_parameters

    with torch.device("meta"):
        twin = type(model)(model.config)
    tensors = [p for _, p in unique_named_parameters(twin)] + list(twin.buffers())
    return sum(t.numel() * (element if t.is_floating_point() else t.element_size()) for t in tensors)

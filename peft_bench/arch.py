"""What the benchmark needs to know about a model, kept in one place: its task and family, peft's task type,
default LoRA targets, the dimensions closed forms use, the layers LoRA can wrap, and its position limit.

Everything is read from `model.config` (Hugging Face models; a saved config before any weights load, for the
checks a run makes before it starts), with a fallback for plain `nn.Module`s (the tutorial's MLP), so methods
never special-case a workload by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Default LoRA targets per architecture, one table for every family: the attention query and value projections,
# as in the LoRA paper (Hu et al. 2021, section 7.1) and the tutorial; where one fused layer computes q, k and v
# (GPT-2's Conv1D `c_attn`, GPT-NeoX's `query_key_value`), that layer, as peft's own defaults do.
DEFAULT_TARGETS = {
    "gpt2": ("c_attn",),
    "gpt_neo": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "opt": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
}
SEQ2SEQ_TYPES = {"t5", "mt5", "bart", "mbart", "pegasus", "marian"}
DECODER_TYPES = {"gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3",
                 "gemma", "gemma2", "falcon", "bloom", "mpt", "smollm3", "olmo", "olmo2", "codegen"}
# Learned positions indexed from padding_idx + 1 (RoBERTa's offset): max_position_embeddings − (pad id + 1) usable.
PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer"}
RELATIVE_POSITION_TYPES = {"t5", "mt5"}  # relative position buckets: no hard limit
# A classifier's head: its top-level modules whose names end so (DistilBERT's `pre_classifier` and `classifier`),
# which is what peft's SEQ_CLS `modules_to_save` = ["classifier", "score"] trains, matching names by suffix.
_CLASSIFIER_HEADS = ("classifier", "score")

TASKS = ("classification", "causal-lm", "seq2seq")
FAMILY_OF_TASK = {"classification": "encoder", "causal-lm": "decoder", "seq2seq": "encoder-decoder"}
PEFT_TASK_TYPE = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def task_of(model_type: str, class_names: list[str] | tuple[str, ...] = ()) -> str:
    """classification / causal-lm / seq2seq, from the config's model type and its architecture class names (a loaded
    model's class, or `config.architectures` before loading). The one place that decides it."""
    names = " ".join(class_names)
    if "SequenceClassification" in names:
        return "classification"
    if model_type in SEQ2SEQ_TYPES or "ConditionalGeneration" in names or "Seq2Seq" in names:
        return "seq2seq"
    if "CausalLM" in names or "LMHead" in names or model_type in DECODER_TYPES:
        return "causal-lm"
    return "classification"


def family_of(model_type: str, task: str) -> str:
    """encoder / decoder / encoder-decoder: a classifier on a decoder (LlamaForSequenceClassification) is a decoder."""
    if task == "classification" and model_type in DECODER_TYPES:
        return "decoder"
    return FAMILY_OF_TASK[task]


def _first(config, *names: str):
    for n in names:
        v = getattr(config, n, None) if not isinstance(config, dict) else config.get(n)
        if v is not None:
            return v
    return None


@dataclass(frozen=True)
class Dims:
    """The sizes closed forms need, under every family's names. `layers` counts the encoder's layers for an
    encoder-decoder (the decoder's in `decoder_layers`); `kv_heads` equals `heads` without grouped-query attention;
    `head_dim` is the config's own when it has one."""

    layers: int
    decoder_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """Width of one layer's keys (= values): num_key_value_heads × head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim


def dims(config) -> Dims:
    layers = _first(config, "num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers")
    decoder = _first(config, "num_decoder_layers", "decoder_layers") or layers
    hidden = _first(config, "hidden_size", "d_model", "n_embd", "dim")
    heads = _first(config, "num_attention_heads", "num_heads", "n_head", "n_heads", "encoder_attention_heads")
    head_dim = _first(config, "head_dim", "d_kv") or hidden // heads
    kv = _first(config, "num_key_value_heads") or heads
    return Dims(int(layers), int(decoder), int(hidden), int(heads), int(kv), int(head_dim))


def prefix_width(config) -> int:
    """Width of one layer's prefix keys as peft sizes it (`_prepare_prompt_learning_config`): the hidden size, or
    under grouped-query attention num_key_value_heads × head_dim (huggingface/peft#1901), head_dim being the
    config's own or hidden / heads."""
    d = dims(config)
    if _first(config, "num_key_value_heads") is None:
        return d.hidden
    head_dim = _first(config, "head_dim") or d.hidden // d.heads
    return d.kv_heads * head_dim


def position_limit(config) -> int | None:
    """How many positions (input tokens plus any virtual ones) the model can embed: `max_position_embeddings` (or
    GPT-2's `n_positions`), less RoBERTa's padding offset; None for relative positions (T5)."""
    model_type = _first(config, "model_type")
    if model_type in RELATIVE_POSITION_TYPES:
        return None
    n = _first(config, "max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
    if n is None:
        return None
    if model_type in PADDING_OFFSET_TYPES:
        n -= (_first(config, "pad_token_id") or 0) + 1
    return int(n)


def takes_past_key_values(config) -> bool:
    """Whether the model accepts past key/values (how peft hands it a prefix). transformers' forwards take **kwargs,
    so the signature cannot say; a config without `use_cache` (DistilBERT, ALBERT) marks a model that has no cache
    and would ignore the prefix while its attention mask is lengthened."""
    return hasattr(config, "use_cache")


def checkpoint_dtype(config) -> str:
    """The element type a checkpoint was saved in (`dtype`, formerly `torch_dtype`, in config.json): float32,
    bfloat16 or float16; float32 when the config does not say or names another type."""
    value = str(_first(config, "dtype", "torch_dtype") or "float32").removeprefix("torch.")
    return value if value in ("float32", "bfloat16", "float16") else "float32"


def lora_layer_types() -> tuple[type, ...]:
    """Layers LoRA can wrap: `nn.Linear` and transformers' `Conv1D` (GPT-2: weight stored in × out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing: Linear only
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def layer_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, transposed) of a LoRA-wrappable layer; `transposed` for Conv1D, whose weight is d_in × d_out
    (peft's `fan_in_fan_out=True`). A peft tuner layer is measured by the layer it wraps (`base_layer`)."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if isinstance(module, lora_layer_types()):  # Conv1D
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out), True
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor Conv1D")


@dataclass(frozen=True)
class ArchInfo:
    """`family` is one of mlp / encoder / decoder / encoder-decoder; `task_type` is peft's TaskType name."""

    family: str
    model_type: str
    task_type: str | None
    default_targets: tuple[str, ...]
    head_modules: tuple[str, ...]
    position_limit: int | None = None


def default_targets(model_type: str) -> tuple[str, ...]:
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    return tuple(mapping.get(model_type, ("q_proj", "v_proj")))


def describe(model: nn.Module) -> ArchInfo:
    """Describe `model` (a Hugging Face `PreTrainedModel` or any `nn.Module`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return ArchInfo("mlp", "mlp", None, (), ())
    cls = type(model).__name__
    if cls.endswith("Model") and not any(k in cls for k in ("LMHead", "ConditionalGeneration")) \
            and model_type not in SEQ2SEQ_TYPES:  # a bare encoder/decoder stack (no head): features out
        family = "decoder" if model_type in DECODER_TYPES else "encoder"
        return ArchInfo(family, model_type, "FEATURE_EXTRACTION", default_targets(model_type), (),
                        position_limit(config))
    task = task_of(model_type, (cls,))
    heads = tuple(n for n, _ in model.named_children() if task == "classification" and n.endswith(_CLASSIFIER_HEADS))
    return ArchInfo(family_of(model_type, task), model_type, PEFT_TASK_TYPE[task], default_targets(model_type), heads,
                    position_limit(config))

"""What a PEFT method needs to know about a model: its family, peft task type, default targets, head.

Detection is by `model.config.model_type` (Hugging Face models) with a fallback for plain `nn.Module`s
(the tutorial's MLP), so methods never special-case a workload by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Default LoRA targets per architecture: the attention query/value projections, as in the LoRA paper
# (Hu et al. 2021, section 7.1) and the tutorial.
_DEFAULT_TARGETS = {
    "gpt_neo": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
    "bert": ("query", "value"),
}
_SEQ2SEQ = {"t5", "bart", "mt5", "mbart", "pegasus"}
_CLASSIFIER_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class ArchInfo:
    """`family` is one of mlp / encoder / decoder / encoder-decoder; `task_type` is peft's TaskType name."""

    family: str
    model_type: str
    task_type: str | None
    default_targets: tuple[str, ...]
    head_modules: tuple[str, ...]


def _task_type(model: nn.Module, model_type: str) -> str:
    cls = type(model).__name__
    if "SequenceClassification" in cls:
        return "SEQ_CLS"
    if model_type in _SEQ2SEQ or "ConditionalGeneration" in cls or "Seq2Seq" in cls:
        return "SEQ_2_SEQ_LM"
    if "CausalLM" in cls:
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def _default_targets(model_type: str) -> tuple[str, ...]:
    if model_type in _DEFAULT_TARGETS:
        return _DEFAULT_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    return tuple(mapping.get(model_type, ("q_proj", "v_proj")))


def describe(model: nn.Module) -> ArchInfo:
    """Describe `model` (a Hugging Face `PreTrainedModel` or any `nn.Module`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return ArchInfo("mlp", "mlp", None, (), ())
    task = _task_type(model, model_type)
    heads = tuple(h for h in _CLASSIFIER_HEADS if task == "SEQ_CLS" and hasattr(model, h))
    if task == "SEQ_2_SEQ_LM":
        family = "encoder-decoder"
    elif task == "CAUSAL_LM" or getattr(config, "is_decoder", False):
        family = "decoder"
    else:
        family = "encoder"
    return ArchInfo(family, model_type, task, _default_targets(model_type), heads)

"""Methods backed by Hugging Face `peft`: LoRA, prefix tuning and P-tuning.

`hf-lora` is the production LoRA that `lora` is checked against. `prefix` (Li & Liang 2021,
arXiv:2101.00190) learns key/value prefixes for every layer; `p-tuning` (Liu et al. 2021, arXiv:2103.10385)
learns virtual input tokens produced by an MLP prompt encoder.

Encoder classifiers and prefix tuning: with peft 0.21 / transformers 5.x, `PrefixTuningConfig(SEQ_CLS)`
refuses BERT ("Model does not support past key values"). P-tuning v2 (Liu et al. 2022, arXiv:2110.07602)
is exactly prefix tuning for NLU: deep prefixes on the encoder plus a trained classification head. So for a
`...ForSequenceClassification` model we prefix-tune its encoder as a FEATURE_EXTRACTION peft model and train
a copy of the head, which is what P-tuning v2 does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..arch import dims, layer_dims, prefix_width
from .base import (
    PROMPT_REASON,
    Method,
    MethodOptions,
    copy_heads,
    head_param_count,
    head_size,
    heads_disabled,
    opt,
    require,
    require_prompt_model,
    resolve_targets,
    set_trainable,
)
from .lora import PEFT_LORA_FORMAT, LoRAOptions, peft_lora_config
from .registry import register

HEADS = "heads.safetensors"


def _peft():
    import peft  # imported lazily: `import peft_bench` stays light

    return peft


class PeftAdapter(Method):
    """What every weight-adapter method run by peft shares: merging, disabling and checkpoints through peft."""

    def _merge(self, model: nn.Module) -> None:
        model.base_model.merge_adapter()

    def _unmerge(self, model: nn.Module) -> None:
        model.base_model.unmerge_adapter()

    def _disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.disable_adapter()

    def save(self, model: nn.Module, directory) -> int:
        return _save_peft(model, directory)

    # peft 0.21's AdaLoRA adds its orthogonal regulariser in every forward that has a loss, reading state that only a
    # trainable adapter has: such a method loads its checkpoint as trainable (the outputs are the same).
    load_trainable = False

    def restore(self, base: nn.Module, directory) -> nn.Module:
        from ..arch import describe

        self.arch = describe(base)
        return _peft().PeftModel.from_pretrained(base, str(directory), is_trainable=self.load_trainable)


@register
class HFLoRA(PeftAdapter):
    name = "hf-lora"
    what = "peft LoraConfig + get_peft_model"
    tunes_like = "lora"
    Options = LoRAOptions
    can_merge = True
    checkpoint_format = PEFT_LORA_FORMAT

    def _inject(self, model: nn.Module) -> nn.Module:
        self.targets = resolve_targets(model, self.options.targets, self.arch)
        self._head_count = head_size(model, self.arch)
        conv1d = any(layer_dims(model.get_submodule(n))[2] for n in self.targets)
        return _peft().get_peft_model(model, peft_lora_config(self.options, self.targets, self.arch,
                                                              fan_in_fan_out=conv1d))

    def closed_form_trainable(self, model: nn.Module) -> int:
        """r·(d_in + d_out) per targeted layer (Linear or Conv1D), plus the classifier head when there is one."""
        r = self.options.r
        base = model.get_base_model()
        lora = sum(r * sum(layer_dims(base.get_submodule(n))[:2]) for n in self.targets)
        return lora + self._head_count



def _save_peft(peft_model: nn.Module, directory) -> int:
    """peft's own `save_pretrained`: adapter_config.json + adapter_model.safetensors (no model card)."""
    from ..measure.files import size_bytes

    peft_model.save_pretrained(str(directory))
    Path(directory, "README.md").unlink(missing_ok=True)  # a generated model card, not part of the adapter
    return size_bytes(directory)


# -- prompt-learning methods ----------------------------------------------------------------------
@dataclass(frozen=True)
class PromptOptions(MethodOptions):
    num_virtual_tokens: int = opt(20, int, "number of virtual tokens (prefix length)")
    encoder_hidden_size: int | None = opt(None, int, "hidden size of the prompt encoder MLP; default: model width")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.num_virtual_tokens > 0,
            f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}",
        )
        if self.encoder_hidden_size is not None:
            require(self.encoder_hidden_size > 0, f"encoder_hidden_size must be > 0, got {self.encoder_hidden_size}")


@dataclass(frozen=True)
class PrefixOptions(PromptOptions):
    prefix_projection: bool = opt(False, bool, "reparametrize the prefix through an MLP (Li & Liang 2021)")


class _PromptMethod(Method):
    """Shared plumbing: build a peft prompt-learning config, wrap the model, disable exactly."""

    @classmethod
    def unsupported_reason(cls, family: str) -> str | None:
        return PROMPT_REASON.format(cls.name) if family == "mlp" else None

    # peft's adapter_config.json + adapter_model.safetensors; a trained head copy, if any, in heads.safetensors
    checkpoint_format = "peft prompt adapter: virtual-token embeddings (an encoder's output, exported)"

    def save(self, model: nn.Module, directory) -> int:
        """peft's format, which holds the prompt encoder's *output* (n virtual token embeddings, or the n prefix
        key/values): what inference needs. A trained head copy goes beside it in heads.safetensors."""
        from safetensors.torch import save_file

        from ..measure.files import size_bytes

        peft_model = model if hasattr(model, "peft_config") else self._encoder(model)
        _save_peft(peft_model, directory)
        if self.heads:
            heads = {f"{name}.{k}": v.detach().contiguous().cpu() for name, h in zip(self.arch.head_modules, self.heads)
                     for k, v in h.trained.state_dict().items()}
            save_file(heads, str(Path(directory) / HEADS))
        return size_bytes(directory)

    def restore(self, base: nn.Module, directory) -> nn.Module:
        """`peft.PeftModel.from_pretrained` (inference mode: the exported embeddings are used as they are)."""
        from ..arch import describe

        self.arch = describe(base)
        heads = Path(directory) / HEADS
        if not heads.exists():
            return _peft().PeftModel.from_pretrained(base, str(directory))
        from safetensors.torch import load_file

        prefix = base.base_model_prefix
        setattr(base, prefix, _peft().PeftModel.from_pretrained(getattr(base, prefix), str(directory)))
        missing = [k for k in base.load_state_dict(load_file(str(heads)), strict=False).unexpected_keys]
        if missing:
            raise ValueError(f"{heads} holds tensors this model has no place for: {missing[:3]}")
        return base

    def _config(self, task_type: str, config) -> object:
        raise NotImplementedError

    @staticmethod
    def _sizes(config) -> dict:
        """The sizes peft would look up under a few config names only (DistilBERT's `dim`, `n_layers`, `n_heads`
        are not among them), passed explicitly; grouped-query attention is still applied by peft on top."""
        d = dims(config)
        return {"num_layers": d.layers, "token_dim": d.hidden, "num_attention_heads": d.heads}

    def _inject(self, model: nn.Module) -> nn.Module:
        require_prompt_model(self.name, self.arch)
        self.hidden = self.options.encoder_hidden_size or dims(model.config).hidden
        self.heads = []
        self._n_head = head_size(model, self.arch)
        return _peft().get_peft_model(model, self._config(self.arch.task_type, model.config))

    def _disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return _all_disabled(model)

    def _encoder(self, model: nn.Module) -> nn.Module:
        return getattr(model, model.base_model_prefix)


@contextlib.contextmanager
def _all_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: bypass the prompt and switch off trained head copies (`modules_to_save`).

    peft 0.21's `disable_adapter()` for prompt learning swaps `forward` but also reads
    `prepare_inputs_for_generation`, which encoders do not have, and leaves head copies active; so we do the
    forward swap ourselves (`forward` as an instance attribute shadows the class method) and disable the copies.
    """
    peft = _peft()
    wrappers = [m for m in model.modules() if isinstance(m, peft.utils.other.ModulesToSaveWrapper)]
    for w in wrappers:
        w.enable_adapters(False)
    model.forward = model.get_base_model().forward
    try:
        yield
    finally:
        del model.forward
        for w in wrappers:
            w.enable_adapters(True)


@register
class PrefixTuning(_PromptMethod):
    name = "prefix"
    what = "peft prefix tuning (Li & Liang 2021, arXiv:2101.00190); P-tuning v2 on encoder classifiers"
    Options = PrefixOptions
    extra_inference = "n extra keys and values in every attention"

    @property
    def extra_key_tokens(self) -> int:
        return self.options.num_virtual_tokens

    def _config(self, task_type: str, config) -> object:
        return _peft().PrefixTuningConfig(
            task_type=task_type, **self._sizes(config),
            num_virtual_tokens=self.options.num_virtual_tokens,
            prefix_projection=self.options.prefix_projection,
            encoder_hidden_size=self.hidden,
        )

    def _inject(self, model: nn.Module) -> nn.Module:
        from ..arch import takes_past_key_values
        from ..errors import UnsupportedError

        if self.arch.family != "mlp" and not takes_past_key_values(model.config):
            raise UnsupportedError(f"prefix tuning hands the prefix to the model as past key/values, which "
                                   f"{type(model).__name__} does not take (its config has no use_cache)")
        if self.arch.task_type != "SEQ_CLS":
            return super()._inject(model)
        # P-tuning v2: prefix-tune the encoder (FEATURE_EXTRACTION) and train a copy of the head.
        require_prompt_model(self.name, self.arch)
        prefix = getattr(model, "base_model_prefix", "")
        if not prefix or not hasattr(model, prefix):
            raise _unsupported_prefix(type(model).__name__)
        self.hidden = self.options.encoder_hidden_size or dims(model.config).hidden
        encoder = _peft().get_peft_model(getattr(model, prefix), self._config("FEATURE_EXTRACTION", model.config))
        setattr(model, prefix, encoder)
        self.heads = copy_heads(model, self.arch.head_modules)
        self._n_head = head_param_count(self.heads)
        own = [p for n, p in encoder.named_parameters() if "prompt_encoder" in n]
        set_trainable(model, own + [p for h in self.heads for p in h.trained.parameters()])
        return model

    def _disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        if hasattr(model, "peft_config"):
            return _all_disabled(model)
        return _encoder_disabled(self._encoder(model), self.heads)

    def closed_form_trainable(self, model: nn.Module) -> int:
        """n·L·2·d for the prefix table; with projection: n·d + (d·h + h) + (h·2Ld + 2Ld). Plus the head.
        d is the width of one layer's keys: the hidden size, or num_key_value_heads × head_dim under grouped-query
        attention (Llama-3.2-3B, prefix of 50 tokens: 50·28·2·1024 = 2,867,200, as peft's method comparison)."""
        base = model.get_base_model() if hasattr(model, "peft_config") else self._encoder(model).get_base_model()
        layers, d = dims(base.config).layers, prefix_width(base.config)
        n, h, out = self.options.num_virtual_tokens, self.hidden, 2 * layers * d
        table = n * d + (d * h + h) + (h * out + out) if self.options.prefix_projection else n * out
        return table + self._n_head


@contextlib.contextmanager
def _encoder_disabled(encoder: nn.Module, heads: list) -> Iterator[None]:
    with _all_disabled(encoder), heads_disabled(heads):
        yield


def _unsupported_prefix(cls: str) -> Exception:
    from ..errors import UnsupportedError

    return UnsupportedError(f"prefix tuning needs a model with a base encoder to prefix; {cls} exposes none")


@register
class PTuning(_PromptMethod):
    name = "p-tuning"
    what = "peft P-tuning: virtual tokens from an MLP prompt encoder (Liu et al. 2021, arXiv:2103.10385)"
    Options = PromptOptions
    extra_inference = "n virtual tokens on every input"

    @property
    def extra_input_tokens(self) -> int:
        return self.options.num_virtual_tokens

    def _config(self, task_type: str, config) -> object:
        return _peft().PromptEncoderConfig(
            task_type=task_type, **self._sizes(config),
            num_virtual_tokens=self.options.num_virtual_tokens,
            encoder_hidden_size=self.hidden,
            encoder_reparameterization_type="MLP",
        )

    def closed_form_trainable(self, model: nn.Module) -> int:
        """Embedding n·S·d (S = 2 token streams for encoder-decoders) + 3-layer MLP d→h→h→d, plus the head."""
        d = dims(model.get_base_model().config).hidden
        h = self.hidden
        streams = 2 if self.arch.task_type == "SEQ_2_SEQ_LM" else 1
        mlp = (d * h + h) + (h * h + h) + (h * d + d)
        return self.options.num_virtual_tokens * streams * d + mlp + self._n_head

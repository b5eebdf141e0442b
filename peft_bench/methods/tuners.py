"""peft's tuner zoo behind the one Method interface, one table entry per method (issue 13, work in progress).

NOT YET REGISTERED: `methods/__init__.py` does not import this module, so nothing here runs in any suite or test.
It is a draft written while a results run held the CPU; the next step is to import it, add the `methods` suite,
pin the `smoke`/`default` suites to the six core methods, and test every entry against the contract in
tests/test_methods.py (count = closed form on MLP/GPT-Neo/Llama-GQA/BERT/T5, base intact, disabled = base,
merge = unmerged, checkpoint round trip) and against peft's published Llama-3.2-3B counts (IA3 286,720,
VeRA r256 129,024, prompt tuning 200 tokens 614,400).

Adding a tuner is one `Tuner(...)` entry: the peft config class, the options it takes, how the config is built from
them, its closed form per targeted layer (d_in, d_out), whether it can merge, and which layers it wraps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..arch import dims, layer_dims
from .base import Method, MethodOptions, opt, require, resolve_targets
from .hf import PeftAdapter


@dataclass(frozen=True)
class AdapterOptions(MethodOptions):
    r: int = opt(8, int, "rank (LoHa, LoKr, AdaLoRA initial rank, VeRA, DoRA, rsLoRA); OFT/BOFT: see block_size")
    alpha: float = opt(16.0, float, "scale numerator where the method has one")
    targets: tuple[str, ...] | None = opt(None, help="module name patterns; default per architecture")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.r > 0, f"r must be a positive integer, got {self.r}")
        require(math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be a finite number > 0, got {self.alpha}")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t))


@dataclass(frozen=True)
class BlockOptions(AdapterOptions):
    block_size: int = opt(0, int, "OFT / BOFT block size (0: the method's default: OFT 32, BOFT 4)")


@dataclass(frozen=True)
class FourierOptions(AdapterOptions):
    n_frequency: int = opt(1000, int, "FourierFT: learned spectral coefficients per layer")


LayerCount = Callable[[int, int, AdapterOptions, bool], int]  # (d_in, d_out, options, feed-forward?) -> trainable


@dataclass(frozen=True)
class Tuner:
    name: str
    config: str  # peft config class name
    Options: type[AdapterOptions]
    kwargs: Callable[[AdapterOptions], dict]  # the config's own fields from our options
    per_layer: LayerCount  # closed form: trainable parameters per targeted layer
    can_merge: bool
    paper: str
    targets: str = "attention"  # "attention": arch.default_targets (as LoRA); "ia3": peft's IA3 mapping
    conv1d: bool = False  # also wraps transformers' Conv1D (GPT-2)
    extra_inference: str = "none when merged"


def _oft_block(d_in: int, options: BlockOptions, default: int) -> int:
    """peft's OFT block size on a layer: the requested one if it divides d_in, else the nearest divisor (peft's
    `adjust_oft_parameters`)."""
    b = options.block_size or default
    if d_in % b == 0 and b <= d_in:
        return b
    divisors = [x for x in range(1, d_in + 1) if d_in % x == 0]
    return min(divisors, key=lambda x: (abs(x - b), x))


def _lokr(d_in: int, d_out: int, o: AdapterOptions, _ff: bool) -> int:
    from peft.tuners.lokr.layer import factorization  # peft's own split of a dimension into two factors

    out_l, out_k = factorization(d_out, -1)
    in_m, in_n = factorization(d_in, -1)
    w1 = out_l * in_m  # decompose_both=False: the first Kronecker factor is full
    w2 = out_k * in_n if o.r >= max(out_k, in_n) / 2 else o.r * (out_k + in_n)
    return w1 + w2


TUNERS = (
    Tuner("hf-dora", "LoraConfig", AdapterOptions, lambda o: {"r": o.r, "lora_alpha": o.alpha, "use_dora": True},
          lambda i, j, o, ff: o.r * (i + j) + j, True, "DoRA, Liu et al. 2024, arXiv:2402.09353", conv1d=True,
          extra_inference="none when merged; unmerged, a column norm of W + BA per forward"),
    Tuner("rslora", "LoraConfig", AdapterOptions, lambda o: {"r": o.r, "lora_alpha": o.alpha, "use_rslora": True},
          lambda i, j, o, ff: o.r * (i + j), True, "rsLoRA, Kalajdzievski 2023, arXiv:2312.03732", conv1d=True),
    Tuner("ia3", "IA3Config", AdapterOptions, lambda o: {},
          lambda i, j, o, ff: i if ff else j, True, "IA3, Liu et al. 2022, arXiv:2205.05638", targets="ia3",
          conv1d=True),
    Tuner("loha", "LoHaConfig", AdapterOptions, lambda o: {"r": o.r, "alpha": o.alpha},
          lambda i, j, o, ff: 2 * o.r * (i + j), True, "LoHa (FedPara), Hyeon-Woo et al. 2022, arXiv:2108.06098"),
    Tuner("lokr", "LoKrConfig", AdapterOptions, lambda o: {"r": o.r, "alpha": o.alpha}, _lokr, True,
          "LoKr, Edalati et al. 2022, arXiv:2212.10650"),
    Tuner("vera", "VeraConfig", AdapterOptions, lambda o: {"r": o.r},
          lambda i, j, o, ff: o.r + j, True, "VeRA, Kopiczko et al. 2024, arXiv:2310.11454", conv1d=True),
    Tuner("oft", "OFTConfig", BlockOptions, lambda o: {"r": 0, "oft_block_size": o.block_size or 32},
          lambda i, j, o, ff: (i // _oft_block(i, o, 32)) * (_oft_block(i, o, 32) * (_oft_block(i, o, 32) - 1) // 2),
          True, "OFT, Qiu et al. 2023, arXiv:2306.07280"),
    Tuner("boft", "BOFTConfig", BlockOptions,
          lambda o: {"boft_block_size": o.block_size or 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1},
          lambda i, j, o, ff: (i // (o.block_size or 4)) * (o.block_size or 4) ** 2 + j, True,
          "BOFT, Liu et al. 2024, arXiv:2311.06243"),
    Tuner("fourierft", "FourierFTConfig", FourierOptions, lambda o: {"n_frequency": o.n_frequency},
          lambda i, j, o, ff: o.n_frequency, True, "FourierFT, Gao et al. 2024, arXiv:2405.03003"),
)


class PeftTuner(PeftAdapter):
    """A peft tuner from the table: get_peft_model with its config on the architecture's targets."""

    tuner: Tuner
    checkpoint_format = "peft adapter (adapter_config.json + adapter_model.safetensors)"

    def _targets(self, model: nn.Module) -> tuple[list[str], set[str]]:
        if self.tuner.targets == "ia3" and self.options.targets is None:
            from peft.utils.constants import (
                TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
            )
            from peft.utils.constants import (
                TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3,
            )

            patterns = tuple(IA3.get(self.arch.model_type, ()))
            ff = tuple(FF.get(self.arch.model_type, ()))
            names = resolve_targets(model, patterns, self.arch)
            return names, {n for n in names if any(n == p or n.endswith("." + p) for p in ff)}
        return resolve_targets(model, self.options.targets, self.arch), set()

    def _inject(self, model: nn.Module) -> nn.Module:
        import peft

        self.targets, self.feedforward = self._targets(model)
        if not self.tuner.conv1d and any(layer_dims(model.get_submodule(n))[2] for n in self.targets):
            from ..errors import UnsupportedError

            raise UnsupportedError(f"{self.name} in peft wraps nn.Linear, not GPT-2's Conv1D layers")
        self._head_count = sum(p.numel() for h in self.arch.head_modules for p in getattr(model, h).parameters())
        extra = {"feedforward_modules": sorted(self.feedforward)} if self.tuner.targets == "ia3" else {}
        config = getattr(peft, self.tuner.config)(
            target_modules=list(self.targets), task_type=self.arch.task_type if self.arch.family != "mlp" else None,
            modules_to_save=list(self.arch.head_modules) or None, **self.tuner.kwargs(self.options), **extra)
        return peft.get_peft_model(model, config)

    def closed_form_trainable(self, model: nn.Module) -> int:
        base = model.get_base_model()
        total = 0
        for n in self.targets:
            d_in, d_out, _ = layer_dims(base.get_submodule(n))
            total += self.tuner.per_layer(d_in, d_out, self.options, n in self.feedforward)
        return total + self._head_count


def tuner_class(t: Tuner) -> type[Method]:
    """The Method subclass for one table entry (what `register` is given)."""
    return type(t.name.title().replace("-", ""), (PeftTuner,),
                {"name": t.name, "Options": t.Options, "can_merge": t.can_merge, "tuner": t, "__doc__": t.paper})


def prompt_tuning_count(model: nn.Module, n: int, seq2seq: bool) -> int:
    """Prompt tuning (Lester et al. 2021): n virtual token embeddings, one set per transformer stack peft prompts
    (two for an encoder-decoder). Llama-3.2-3B, 200 tokens: 200 · 3072 = 614,400 (peft's method comparison)."""
    return n * (2 if seq2seq else 1) * dims(model.config).hidden

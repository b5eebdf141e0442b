"""FLOPs of one training step, counted and by formula.

Counted: `torch.utils.flop_counter.FlopCounterMode` over the real step (matmuls, convolutions and the attention
kernels it knows; the CPU flash-attention kernel is registered here with torch's own SDPA formulas).

Analytic (independent of the dispatcher): every `nn.Linear` records, through a forward hook, how many rows it
processed and whether its input and weight need gradients; a Linear costs 2·rows·d_in·d_out forward, the same again
for the input gradient when its input needs one, and again for the weight gradient when its weight trains
(6·N·tokens for a fully trained stack). Attention adds 4·B·H·Tq·Tk·Dh forward (QKᵀ and AV) and twice that backward,
with Tq, Tk the padded lengths as computed (virtual tokens included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _register_cpu_flash() -> None:
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        @fc.register_flop_formula(fwd, get_raw=True)
        def _fwd(query, key, value, *args, out_val=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query.shape, key.shape, value.shape)
    if bwd is not None and bwd not in fc.flop_registry:
        @fc.register_flop_formula(bwd, get_raw=True)
        def _bwd(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs that one call of `step` executes, as torch's flop counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_flash()
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Attention:
    """One attention call per layer: queries of length tq attend over tk keys, width = heads × head_dim.
    Forward QKᵀ and AV: 4·B·tq·tk·width; backward twice that, when anything before it trains."""

    layers: int
    tq: int
    tk: int
    width: int
    backward: bool = True

    def flops(self, batch: int) -> int:
        return (3 if self.backward else 1) * 4 * batch * self.tq * self.tk * self.width * self.layers


class LinearFlops:
    """Forward hooks on every nn.Linear (and Conv1D): 2·rows·d_in·d_out × (1 + input grad + weight grad).

    A module that computes matmuls outside nn.Linear (a hand-written adapter) says what they cost through a method
    `analytic_flops(*forward_args) -> int` (forward and backward together); its forward calls are hooked too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.flops = 0
        self._handles = []
        from ..arch import lora_layer_types

        kinds = lora_layer_types()  # nn.Linear and transformers' Conv1D (GPT-2)
        for m in model.modules():
            if isinstance(m, kinds):
                self._handles.append(m.register_forward_hook(self._hook))
            elif callable(getattr(m, "analytic_flops", None)):
                self._handles.append(m.register_forward_hook(self._own))

    def _own(self, module: nn.Module, args: tuple, output: object) -> None:
        self.flops += module.analytic_flops(*args)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        from ..arch import layer_dims

        x = args[0]
        rows = x.numel() // x.shape[-1]
        d_in, d_out, _ = layer_dims(module)
        per = 2 * rows * d_in * d_out
        self.flops += per * (1 + int(x.requires_grad) + int(_weight_trains(module)))

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _weight_trains(module: nn.Linear) -> bool:
    """Whether the weight gets a gradient, read without touching `module.weight` (which, when parametrized,
    would compute the parametrization again and add FLOPs to the count being checked)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return any(p.requires_grad for p in module.parametrizations.weight.parameters())
    return module.weight.requires_grad


def attention_calls(config, batch: dict, extra_input_tokens: int, extra_key_tokens: int,
                    encoder_trains: bool = True) -> list[Attention]:
    """The attention calls of one forward pass, from the model config and the padded batch.

    Encoder-decoders: virtual input tokens (P-tuning) lengthen the encoder's input; a prefix reaches the decoder's
    self-attention only (peft hands T5 its prefix as the decoder's past key/values and empties the cross-attention
    cache; the encoder takes no past); the encoder's attention has a backward pass only when the encoder trains or
    its input does."""
    from ..arch import dims

    t = batch["input_ids"].shape[1]
    d = dims(config)
    width = d.attention_width  # queries' heads × head_dim (GQA shares keys, not query heads: same FLOPs)
    if getattr(config, "is_encoder_decoder", False):
        te, td = t + extra_input_tokens, batch["labels"].shape[1]
        return [Attention(d.layers, te, te, width, encoder_trains or extra_input_tokens > 0),
                Attention(d.decoder_layers, td, td + extra_key_tokens, width),
                Attention(d.decoder_layers, td, te, width)]
    tq = t + extra_input_tokens
    return [Attention(d.layers, tq, tq + extra_key_tokens, width)]


def analytic_flops(model: nn.Module, step: Callable[[], object], config, batch: dict, extra_input_tokens: int = 0,
                   extra_key_tokens: int = 0) -> int:
    """Run `step` once with Linear hooks installed; return the formula's FLOPs (see module docstring)."""
    lin = LinearFlops(model)
    try:
        step()
    finally:
        lin.close()
    if config is None:  # an MLP: linears only
        return lin.flops
    b = batch["input_ids"].shape[0]
    calls = attention_calls(config, batch, extra_input_tokens, extra_key_tokens, _encoder_trains(model))
    return lin.flops + sum(a.flops(b) for a in calls)


def _encoder_trains(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = base.get_encoder() if hasattr(base, "get_encoder") and getattr(base.config, "is_encoder_decoder",
                                                                              False) else None
    return encoder is None or any(p.requires_grad for p in encoder.parameters())

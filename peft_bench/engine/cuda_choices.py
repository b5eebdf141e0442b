"""What a training step does differently on CUDA, applied to a step planned on fake tensors (`predict.py`).

A step's tensors are the same on every device but for choices the device makes. Where torch lets fake CUDA tensors
run the whole step (a CUDA build with a GPU present), the plan uses them and CUDA makes its own choices. Where it does
not — the autograd engine needs a real CUDA device to run a backward pass over CUDA tensors, fake or not
(pytorch/pytorch#92627; on a GPU-less machine it fails with "hasPrimaryContext expects a valid device index") — the
step runs on fake CPU tensors and CUDA's choices are made here, each as CUDA makes it:

- **Attention.** `scaled_dot_product_attention` picks a kernel (torch's `sdp_utils.cpp`, Ampere or newer, in its
  priority order): FlashAttention-2 for fp16/bf16 with no explicit mask and a head size ≤ 256 (grouped-query
  attention native); else the memory-efficient kernel (any float dtype, additive masks; a boolean mask turned into
  an additive one first, as CUDA's `sdpa` does; no native grouped-query attention); else the math path. The chosen
  kernel's own aten operator runs, so its meta function gives its outputs and what autograd saves: a log-sum-exp
  per query row (fp32) for the fused kernels, the whole probability matrix for the math path. The CPU's own choice
  (its flash kernel) would not do: CUDA's math fallback and CPU's differ.
- **The optimizer.** `torch.optim.AdamW` defaults to its multi-tensor (`foreach`) implementation when every
  parameter is a CUDA tensor, and to the per-tensor loop on the CPU; the foreach step's scratch lists (one tensor per
  parameter for ‖v‖, the denominators, ...) are temporaries the per-tensor loop never holds at once.
- **The caching allocator's rounding.** Every block it hands out is a multiple of 512 bytes (a 4-byte scalar takes
  512); the tracker rounds each storage the same way (`GRANULE`). What it keeps reserved beyond the live blocks
  (segments of 2 or 20 MiB, freed blocks kept for reuse — fragmentation) depends on the history of allocations
  and is not predicted: torch's `max_memory_reserved` is at least the predicted peak, often well above it.
- Not counted: the CUDA context (driver, kernels' code; outside torch's allocator), cuBLAS/cuDNN workspaces.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

GRANULE = 512  # CUDACachingAllocator's kMinBlockSize: every block a multiple of it
HALF = (torch.float16, torch.bfloat16)


def fake_cuda_backward_works() -> bool:
    """A backward pass over fake CUDA tensors needs a CUDA build and a GPU (the autograd engine's device threads)."""
    return torch.backends.cuda.is_built() and torch.cuda.is_available()


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, attn_mask, enable_gqa: bool) -> str:
    """The kernel CUDA's `scaled_dot_product_attention` dispatches to on an Ampere or newer GPU."""
    same_heads = q.shape[-3] == k.shape[-3]
    if q.dtype in HALF and attn_mask is None and q.shape[-1] <= 256 and q.dim() == 4 and (same_heads or enable_gqa):
        return "flash"
    if q.dtype in (torch.float32, *HALF) and same_heads and q.dim() == 4:
        return "efficient"
    return "math"


SDPA_ARGS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def cuda_sdpa(q, k, v, *rest, **named):
    """`scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)` through the kernel
    CUDA would choose (its aten operator and meta function)."""
    a = {**SDPA_ARGS, **dict(zip(SDPA_ARGS, rest)), **named}
    ops = torch.ops.aten
    kernel = sdpa_kernel(q, k, a["attn_mask"], a["enable_gqa"])
    if kernel == "flash":
        return ops._scaled_dot_product_flash_attention(q, k, v, a["dropout_p"], a["is_causal"], False,
                                                       scale=a["scale"])[0]
    if kernel == "efficient":
        bias = a["attn_mask"]
        if bias is not None and bias.dtype == torch.bool:  # sdpa's convert_boolean_attn_mask
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
        lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return ops._scaled_dot_product_efficient_attention(q, k, v, bias, lse, a["dropout_p"], a["is_causal"],
                                                           scale=a["scale"])[0]
    return ops._scaled_dot_product_attention_math(q, k, v, a["attn_mask"], a["dropout_p"], a["is_causal"], None,
                                                  scale=a["scale"], enable_gqa=a["enable_gqa"])[0]


class CudaChoices(TorchFunctionMode):
    """Scaled-dot-product attention as CUDA would run it (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            return cuda_sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def described(fake_cuda: bool) -> str:
    """The `planned_with` text of a CUDA plan."""
    if fake_cuda:
        return "FakeTensorMode, fake CUDA tensors (CUDA's own kernel choices)"
    return ("FakeTensorMode on CPU with CUDA's choices (no GPU here: a CUDA backward needs one): SDPA kernel by "
            "CUDA's rules through its meta function, foreach AdamW, 512-byte allocator blocks")

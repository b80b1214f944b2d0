"""The CUDA entry of ``ism::attn_with_kvcache``: the dedicated kernel when asked for, else the composite.

The dedicated CUDA kernel (``ism::_attn_with_kvcache_cuda``, csrc/cuda/kvcache_*) is opt-in until its GPU
tests pass: `attn_with_kvcache_cuda` runs it when the kernel configuration asks for it
(``ism_ext.config``: ``kvcache_kernel``, default from ``ISM_EXT_KVCACHE_KERNEL``) and the
call is one it covers (`kernel_fallback_reason`), and the composite of verified pieces
(`kvcache_composite`) otherwise.
"""

from __future__ import annotations

import torch

from ..config import get_kernel_config
from ._library import CUDA_KERNEL_DTYPES, CUDA_KERNEL_HEAD_DIMS, op
from .kvcache_composite import attn_with_kvcache_composite

__all__ = ["KERNEL_OP", "attn_with_kvcache_cuda",
           "kernel_fallback_reason", "kernel_registered", "kernel_requested", "kernel_tensor_gap"]

KERNEL_OP = "_attn_with_kvcache_cuda"
KERNEL_MIN_CAPABILITY = (8, 0)



def kernel_requested() -> bool:
    """True when the kernel configuration (``ism_ext.config``) asks for the dedicated kernel."""
    return get_kernel_config().kvcache_kernel


def kernel_registered() -> bool:
    """True when this build has the dedicated kernel (CUDA builds define ``ism::_attn_with_kvcache_cuda``)."""
    return hasattr(torch.ops.ism, KERNEL_OP)


def _vector_aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])


def kernel_tensor_gap(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (dtype, head dim, cache alignment), or None.

    The caches are written in place, so the kernel needs them readable in 16-byte vectors; ``q``, ``k_new``
    and ``v_new`` it copies when they are not. Malformed arguments go to the composite, whose checks (the
    same C++ checks as the kernel's) name them.
    """
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k_cache, v_cache)):
        return "malformed arguments (the checks name them)"
    if q.dtype not in CUDA_KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernel runs {', '.join(str(d) for d in CUDA_KERNEL_DTYPES)})"
    if q.shape[-1] not in CUDA_KERNEL_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the kernel runs {', '.join(map(str, CUDA_KERNEL_HEAD_DIMS))})"
    if not (_vector_aligned(k_cache) and _vector_aligned(v_cache)):
        return "the caches are not 16-byte aligned with strides that are multiples of 8 elements"
    return None


def kernel_fallback_reason(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """None when the dedicated kernel runs this call, else why the composite runs it instead."""
    if not kernel_requested():
        return "the kernel configuration has kvcache_kernel=False"
    if not kernel_registered():
        return "this build has no CUDA KV-cache kernel"
    gap = kernel_tensor_gap(q, k_cache, v_cache)
    if gap is not None:
        return gap
    if q.device.type != "cuda":
        return f"q is on {q.device}"
    capability = torch.cuda.get_device_capability(q.device)
    if capability < KERNEL_MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} (the kernel needs 8.0)"
    return None


def attn_with_kvcache_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    kv_limit: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA implementation of ``ism::attn_with_kvcache``: the dedicated kernel when the kernel configuration
    asks for it and covers the call (`kernel_fallback_reason`), else the composite of verified pieces.

    Both run the op's checks before anything is written (the kernel op runs them itself, on one host copy of the
    index tensors), so the contract is the same on both paths.
    """
    args = (q, k_cache, v_cache, k_new, v_new, cache_seqlens, kv_limit, cache_batch_idx, block_table, softmax_scale)
    if kernel_fallback_reason(q, k_cache, v_cache) is None:
        return op(KERNEL_OP)(*args)
    return attn_with_kvcache_composite(*args)

"""`attn_with_kvcache`: append new keys/values into a KV cache in place and attend over it.

In the spirit of FlashAttention's `flash_attn_with_kvcache`, with the `kv_limit` rule per query.
The op is `torch.ops.ism.attn_with_kvcache`, one schema (csrc/ops.cpp; it mutates the caches) with one
implementation per device: the C++ kernel on the CPU (csrc/kvcache_op.cpp) and, on CUDA, the dispatcher
`kvcache_dispatch.attn_with_kvcache_cuda` registered here (dedicated kernel or composite). Here are also
its one fake kernel and the Python wrapper. The default ``kv_limit`` (causal new tokens) comes from
`ism_ext.masks.new_tokens`, the layer above this one (docs/design.md, "Layers").
"""

from __future__ import annotations

import math

import torch

from ..masks.new_tokens import kv_limit_causal_append
from ._library import op, qualname
from .kvcache_dispatch import attn_with_kvcache_cuda


@torch.library.register_fake(qualname("attn_with_kvcache"))
def _attn_with_kvcache_fake(q, k_cache, v_cache, k_new, v_new, cache_seqlens, kv_limit, cache_batch_idx,
                            block_table, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


# The one CUDA implementation: the dispatcher, which runs the dedicated kernel (an internal op called only
# there, so traced code never sees it and it needs no fake) when ism_ext.config has kvcache_kernel=True and
# the kernel covers the call, else the composite of verified pieces. Its checks (the internal op
# ism::_attn_with_kvcache_check) also run below the dispatcher, never traced.
torch.library.impl(qualname("attn_with_kvcache"), "CUDA")(attn_with_kvcache_cuda)


def attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor,
    kv_limit: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Writes `k_new`/`v_new` into the cache at `cache_seqlens[b]..` and attends `q` over the updated cache.

    Args:
        q: `[B, Lq, Hq, D]` new queries (`Lq = 1` to decode, or a whole new segment).
        k_cache, v_cache: contiguous `[B_cache, S_max, Hkv, D]` (sequence b uses row `cache_batch_idx[b]`,
            or row b), or paged `[num_pages, page_size, Hkv, D]` with `block_table` (page size a multiple of
            `PAGE_SIZE_MULTIPLE`, 16).
            Written in place.
        k_new, v_new: `[B, Lq, Hkv, D]` keys/values of the new tokens, or both None to attend without appending.
        cache_seqlens: int32 `[B]`, tokens in the cache before this call. Not modified: the caller advances it.
        kv_limit: int32 `[B, Lq]`: query i of sequence b sees cache positions `j < kv_limit[b, i]` (counted from
            the sequence's first token). Defaults to causal new tokens (`kv_limit_causal_append`).
        cache_batch_idx: int32 `[B]`, cache rows of the sequences (contiguous caches).
        block_table: int32 `[B, max_pages]`, page indices of each sequence (paged caches).
        softmax_scale: defaults to `D ** -0.5`.
        return_lse: also return the float32 log-sum-exp `[B, Hq, Lq]`.

    Devices: the CPU kernel (float32, float16, bfloat16; head dims 1 to 256). On CUDA, a composite of
    verified pieces (`ism_ext.ops.kvcache_composite`): the same checks, an in-place copy of the new rows,
    then the CUDA prefill kernel over the cache rows (float16, bfloat16; head dims 64 and 128). With
    ``kvcache_kernel=True`` in ``ism_ext.config`` the dedicated CUDA kernel (append and attention in one
    launch, split keys for decode) runs the calls it covers instead; it has not run on a GPU yet. Every
    index value is checked on every path (on CUDA through one copy of the index tensors to the host).

    Returns the output `[B, Lq, Hq, D]` (and lse). Errors (ValueError/TypeError naming the argument) are raised
    before anything is written: appending past capacity, `kv_limit` outside `[0, cache_seqlens + Lq]`, a cache
    row or page shared by two sequences of the call, wrong shapes/dtypes/devices.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attn_with_kvcache: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"attn_with_kvcache: q must be [B, Lq, Hq, D], got shape {tuple(q.shape)}")
    if kv_limit is None:
        kv_limit = kv_limit_causal_append(cache_seqlens, q.shape[1])
    if softmax_scale is None:
        # head_dim 0 gets a placeholder scale: the op's check then names head_dim (no ZeroDivisionError here).
        softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    out, lse = op("attn_with_kvcache")(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, kv_limit, cache_batch_idx, block_table, float(softmax_scale)
    )
    return (out, lse) if return_lse else out

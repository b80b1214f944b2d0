"""`attn_with_kvcache` composed of verified pieces: an in-place copy of the new rows, then the prefill op.

This is the CUDA implementation of `ism::attn_with_kvcache` until a dedicated kernel has passed its GPU
tests: the op's own checks (`ism::_attn_with_kvcache_check`, the C++ checks of the CPU op), an indexed
copy of ``k_new``/``v_new`` into the cache, then `ism::segment_attn_fwd` over the cache rows with the
caller's ``kv_limit``. Nothing here is specific to a device, so the CPU test suite runs it too.

Cost: a contiguous cache whose sequences are its first rows in order is attended in place (sequence ``b``
owns the whole row ``b``; ``kv_limit`` keeps the unwritten tail invisible, and the kernels skip key tiles
beyond it). Other row orders (``cache_batch_idx``) and paged caches are gathered into a contiguous copy of
the rows first: O(cache) per call, correct but slower than the dedicated kernel will be. The checks read
the small index tensors on the host: one device synchronisation per call.

The CUDA entry of the op (`kvcache_dispatch.attn_with_kvcache_cuda`) runs this composite unless the dedicated
kernel is asked for and covers the call.
"""

from __future__ import annotations

import torch

from ._library import op

__all__ = ["attn_with_kvcache_composite"]


def _positions(cache_seqlens: torch.Tensor, n_new: int) -> torch.Tensor:
    """int64 ``[B, n_new]``: the cache positions the new rows of each sequence go to."""
    steps = torch.arange(n_new, device=cache_seqlens.device)
    return cache_seqlens.long()[:, None] + steps[None, :]


def _append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
            cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None,
            block_table: torch.Tensor | None) -> None:
    """Writes ``k_new``/``v_new`` ``[B, n, Hkv, D]`` into the cache in place (one indexed copy each)."""
    batch, n_new = k_new.shape[:2]
    pos = _positions(cache_seqlens, n_new)
    if block_table is not None:
        page_size = k_cache.shape[1]
        pages = block_table.long().gather(1, torch.div(pos, page_size, rounding_mode="floor"))
        index = (pages, pos % page_size)
    else:
        rows = (cache_batch_idx.long() if cache_batch_idx is not None
                else torch.arange(batch, device=k_new.device))
        index = (rows[:, None].expand(-1, n_new), pos)
    k_cache.index_put_(index, k_new)
    v_cache.index_put_(index, v_new)


def _cache_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None,
                batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keys and values of the ``batch`` sequences as packed rows of ``row_len`` each: ``([B * row_len, Hkv, D]`` x 2,
    ``row_len``). Sequence ``b`` owns rows ``[b * row_len, (b + 1) * row_len)``, of which ``lengths[b]`` are written."""
    heads, dim = k_cache.shape[2:]
    if block_table is None and cache_batch_idx is None:  # the first rows, in order: attended in place
        row_len = k_cache.shape[1]
        return (k_cache[:batch].reshape(batch * row_len, heads, dim),
                v_cache[:batch].reshape(batch * row_len, heads, dim), row_len)
    longest = int(lengths.max()) if batch else 0  # a host read: the gathered copy is sized by it
    if block_table is None:
        rows = cache_batch_idx.long()
        keys, values = k_cache[rows, :longest], v_cache[rows, :longest]
    else:
        page_size = k_cache.shape[1]
        n_pages = -(-longest // page_size)
        # Slots past a sequence's length may hold -1 (no page): any page will do, kv_limit hides them.
        pages = block_table[:, :n_pages].long().clamp(0, k_cache.shape[0] - 1)
        keys = k_cache[pages].reshape(batch, n_pages * page_size, heads, dim)
        values = v_cache[pages].reshape(batch, n_pages * page_size, heads, dim)
    row_len = keys.shape[1]
    return keys.reshape(batch * row_len, heads, dim), values.reshape(batch * row_len, heads, dim), row_len


def attn_with_kvcache_composite(
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
    """The op's contract (`ism_ext.attn_with_kvcache`) from verified pieces; returns ``(out, lse [B, Hq, Lq])``.

    Raises the op's own errors before anything is written: a rejected call leaves the cache unchanged.
    """
    op("_attn_with_kvcache_check")(q, k_cache, v_cache, k_new, v_new, cache_seqlens, kv_limit, cache_batch_idx,
                                   block_table, softmax_scale)
    batch, seqlen_q, heads_q, dim = q.shape
    n_new = 0
    if k_new is not None:
        _append(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, block_table)
        n_new = k_new.shape[1]
    keys, values, row_len = _cache_rows(k_cache, v_cache, cache_seqlens + n_new, cache_batch_idx, block_table,
                                        batch)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * seqlen_q
    cu_k = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * row_len
    out, lse = op("segment_attn_fwd")(q.reshape(batch * seqlen_q, heads_q, dim), keys, values, kv_limit.reshape(-1),
                                      cu_q, cu_k, seqlen_q, row_len, float(softmax_scale), False)
    return out.view(batch, seqlen_q, heads_q, dim), lse.view(heads_q, batch, seqlen_q).permute(1, 0, 2).contiguous()

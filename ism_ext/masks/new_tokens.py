"""`kv_limit` of new tokens appended to a KV cache: one bidirectional segment, or causal tokens."""

from __future__ import annotations

import torch

__all__ = ["kv_limit_causal_append", "kv_limit_new_segment"]


def kv_limit_new_segment(cache_seqlens: torch.Tensor, seqlen_q: int) -> torch.Tensor:
    """`kv_limit` `[B, seqlen_q]` for new tokens that form one bidirectional segment: all see `cache + new`."""
    return (cache_seqlens.to(torch.int32) + seqlen_q)[:, None].expand(-1, seqlen_q).contiguous()


def kv_limit_causal_append(cache_seqlens: torch.Tensor, seqlen_q: int) -> torch.Tensor:
    """`kv_limit` `[B, seqlen_q]` for causal new tokens (decode is `seqlen_q = 1`): token i sees `cache + i + 1`."""
    steps = torch.arange(1, seqlen_q + 1, dtype=torch.int32, device=cache_seqlens.device)
    return (cache_seqlens.to(torch.int32)[:, None] + steps[None, :]).contiguous()

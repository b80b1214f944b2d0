"""The dense boolean mask of one sequence: for references, pictures and debugging only."""

from __future__ import annotations

import torch

__all__ = ["dense_mask"]


def dense_mask(kv_limit: torch.Tensor, seqlen_k: int | None = None) -> torch.Tensor:
    """Boolean ``[Lq, Lk]`` mask of one sequence: ``mask[i, j] = j < kv_limit[i]``.

    For references, pictures and debugging only: it is N x N, which is exactly what the ops avoid; they
    never build it.

    Args:
        kv_limit: integer 1-D ``[Lq]`` tensor, values in ``[0, Lk]``.
        seqlen_k: number of keys ``Lk``; defaults to ``Lq``. Pass it when the queries are the last ``Lq``
            tokens of a longer sequence (e.g. a new turn on top of a KV cache), whose ``kv_limit`` counts
            from the first cached key.

    Returns:
        bool tensor ``[Lq, Lk]`` on the device of ``kv_limit``.

    Raises:
        TypeError: non-integer ``kv_limit``.
        ValueError: not 1-D, negative ``seqlen_k``, or a value outside ``[0, Lk]``.
    """
    if kv_limit.dtype.is_floating_point or kv_limit.dtype.is_complex or kv_limit.dtype == torch.bool:
        raise TypeError(f"kv_limit must have an integer dtype, got {kv_limit.dtype}")
    if kv_limit.dim() != 1:
        raise ValueError(f"kv_limit must be 1-D [Lq] (one sequence), got shape {tuple(kv_limit.shape)}")
    lq = kv_limit.shape[0]
    lk = lq if seqlen_k is None else int(seqlen_k)
    if lk < 0:
        raise ValueError(f"seqlen_k must be >= 0, got {seqlen_k}")
    # A value past Lk means the caller mixed up coordinates (likely forgot seqlen_k): fail loudly rather
    # than drawing a silently clipped mask.
    if lq > 0 and (int(kv_limit.min().item()) < 0 or int(kv_limit.max().item()) > lk):
        raise ValueError(
            f"kv_limit values must lie in [0, seqlen_k={lk}], got range "
            f"[{int(kv_limit.min().item())}, {int(kv_limit.max().item())}]"
        )
    keys = torch.arange(lk, device=kv_limit.device)
    return keys.unsqueeze(0) < kv_limit.to(torch.int64).unsqueeze(1)

"""Per-token segment ids -> per-token ``kv_limit`` (the one masking rule of ``ism_ext``).

Every query token carries one int32, ``kv_limit``: it may attend keys at positions ``j < kv_limit`` of its
own sequence, positions counted from the sequence's first token (docs/design.md, "The rule").

Segment ids follow Hugging Face transformers' ``block_sequence_ids`` convention:

* ``-1`` marks a causal token: at position ``i`` its ``kv_limit`` is ``i + 1``;
* a contiguous run of one id ``>= 0`` is one bidirectional segment ``[s, e)``: each of its tokens gets
  ``kv_limit = e``.

This module has no dependency on the compiled extension, so it can be imported (and tested) before the
C++ ops are built.
"""

from __future__ import annotations

import torch

__all__ = ["kv_limit_from_segment_ids"]

# The ops take int32 metadata; a position that does not fit would silently wrap.
_INT32_MAX = torch.iinfo(torch.int32).max


def _check_ids(segment_ids: torch.Tensor) -> None:
    """Reject what cannot be a tensor of segment ids (type and dtype problems)."""
    if not isinstance(segment_ids, torch.Tensor):
        raise TypeError(f"segment_ids must be a torch.Tensor, got {type(segment_ids).__name__}")
    dtype = segment_ids.dtype
    # bool is not floating point either, but True/False are not ids: treat it as a wrong dtype too.
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"segment_ids must have an integer dtype, got {dtype}")
    if segment_ids.dim() not in (1, 2):
        raise ValueError(
            f"segment_ids must be 1-D [T] or 2-D [B, S], got {segment_ids.dim()}-D shape "
            f"{tuple(segment_ids.shape)}"
        )


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Validate packed-sequence offsets (FlashAttention varlen convention) against ``total`` tokens."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [B+1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must have at least one element (it starts at 0)")
    # These reductions synchronise with the device once; validation is worth it because a bad offset
    # would otherwise turn into an out-of-bounds read in a kernel much later.
    first = int(cu_seqlens[0].item())
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any().item()):
        raise ValueError("cu_seqlens must be non-decreasing")
    last = int(cu_seqlens[-1].item())
    if last != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens T={total}, got {last}")


def _raise_reused_id(keys: torch.Tensor, local_pos: torch.Tensor) -> None:
    """Raise a helpful error for the first (sequence, id) pair in ``keys`` that starts more than one run.

    ``keys`` is ``[n_runs, 2]`` (sequence index, id) and ``local_pos`` the run start positions within
    their sequence. Only runs on the error path, so it may use data-dependent indexing freely.
    """
    uniq, counts = torch.unique(keys, dim=0, return_counts=True)
    dup = uniq[counts > 1][0]
    seq, seg = int(dup[0].item()), int(dup[1].item())
    positions = local_pos[(keys[:, 0] == seq) & (keys[:, 1] == seg)].tolist()
    raise ValueError(
        f"segment id {seg} is reused after a gap in sequence {seq} (runs start at local positions "
        f"{positions}); a bidirectional segment must be one contiguous run, so give each run its own id"
    )


def _flat_ids_and_offsets(segment_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """The ids as one packed ``[T]`` tensor and their int64 sequence offsets ``[B+1]`` (rows of 2-D ids are
    sequences), with ``cu_seqlens`` checked."""
    device = segment_ids.device
    if segment_ids.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError(
                "cu_seqlens must be None when segment_ids is 2-D [B, S] (each row is a sequence)"
            )
        batch, seqlen = segment_ids.shape
        ids = segment_ids.reshape(-1)
        # Rows are sequences: their offsets are just multiples of S, so the packed path does the work.
        cu = (
            torch.arange(batch + 1, device=device, dtype=torch.int64) * seqlen
            if ids.numel() > 0
            else torch.zeros(1, device=device, dtype=torch.int64)
        )
        return ids, cu
    total = segment_ids.numel()
    if cu_seqlens is None:
        return segment_ids, torch.tensor([0, total], device=device, dtype=torch.int64)
    _check_cu_seqlens(cu_seqlens, total)
    return segment_ids, cu_seqlens.to(device=device, dtype=torch.int64)


def _causal_mask_checked(ids: torch.Tensor) -> torch.Tensor:
    """bool ``[T]``: which tokens are causal (id -1); raises ValueError for an id below -1."""
    # Unsigned dtypes cannot hold -1, so every token of such a tensor is in a segment; comparing them
    # against -1 would wrap around instead.
    if not ids.dtype.is_signed:
        return torch.zeros_like(ids, dtype=torch.bool)
    if bool((ids < -1).any().item()):
        bad = int(ids[ids < -1][0].item())
        raise ValueError(f"segment ids must be -1 (causal) or >= 0, got {bad}")
    return ids == -1


def _packed_kv_limit(ids: torch.Tensor, cu: torch.Tensor, is_causal: torch.Tensor) -> torch.Tensor:
    """int64 ``kv_limit`` ``[T]`` of packed ids with offsets ``cu``; raises for an id reused after a gap."""
    device, total = ids.device, ids.numel()
    # int64 keeps every id distinct (the uint64 -> int64 cast is a bijection) for the comparisons below.
    ids64 = ids.to(torch.int64)

    pos = torch.arange(total, device=device, dtype=torch.int64)
    # Sequence of each token: number of sequence ends <= pos. Empty sequences repeat an offset and are
    # skipped correctly by right=True.
    seq_idx = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
    seq_base = cu[seq_idx]

    # A sequence start flag table of size T+1 lets empty trailing sequences (start == T) scatter
    # harmlessly into the extra slot instead of needing a data-dependent filter.
    seq_start = torch.zeros(total + 1, dtype=torch.bool, device=device)
    seq_start[cu[:-1]] = True
    seq_start = seq_start[:total]

    # A run starts at a sequence start, where the id changes, and at every causal token (a causal
    # token is a run of length one, which makes its end i + 1 fall out of the same formula).
    new_run = seq_start | is_causal
    new_run[1:] |= ids64[1:] != ids64[:-1]
    run_idx = torch.cumsum(new_run.to(torch.int64), dim=0) - 1

    # End of each run = 1 + the largest position in it; amax needs no sort and works on any device.
    run_end = torch.zeros(total, dtype=torch.int64, device=device)
    run_end = run_end.scatter_reduce(0, run_idx, pos + 1, reduce="amax", include_self=True)
    kv_limit = run_end[run_idx] - seq_base

    # Reuse check: among segment runs, each (sequence, id) pair must start exactly one run.
    # torch.unique on the pair avoids an overflow-prone combined key for large ids.
    start_of_segment = new_run & ~is_causal
    keys = torch.stack((seq_idx[start_of_segment], ids64[start_of_segment]), dim=1)
    if keys.shape[0] > 1:
        uniq = torch.unique(keys, dim=0)
        if uniq.shape[0] != keys.shape[0]:
            _raise_reused_id(keys, (pos - seq_base)[start_of_segment])

    return kv_limit


def kv_limit_from_segment_ids(
    segment_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Compute the per-token ``kv_limit`` (int32) from per-token segment ids.

    Args:
        segment_ids: integer tensor, either 1-D ``[T]`` (one sequence, or several packed sequences when
            ``cu_seqlens`` is given) or 2-D ``[B, S]`` (one sequence per row). ``-1`` marks a causal
            token; a contiguous run of one id ``>= 0`` is one bidirectional segment. Runs never cross
            sequence boundaries: equal ids at the end of one sequence and the start of the next are two
            runs. The same id may be used again in a *different* sequence.
        cu_seqlens: optional int32/int64 ``[B+1]`` offsets of packed sequences in a 1-D ``segment_ids``
            (starts at 0, non-decreasing, ends at ``T``; empty sequences allowed). Must be ``None`` for
            2-D input.

    Returns:
        int32 tensor of the same shape and device as ``segment_ids``. A token may attend keys at
        positions ``j < kv_limit`` of its own sequence, counted from that sequence's first token:
        causal token at position ``i`` -> ``i + 1``; token of a run ``[s, e)`` -> ``e``.

    Raises:
        TypeError: ``segment_ids`` is not a tensor or has a non-integer dtype.
        ValueError: wrong rank, an id ``< -1``, an id ``>= 0`` used by two separate runs of the same
            sequence (not expressible by the rule), bad ``cu_seqlens``, or ``cu_seqlens`` with 2-D ids.
    """
    _check_ids(segment_ids)
    ids, cu = _flat_ids_and_offsets(segment_ids, cu_seqlens)
    total = ids.numel()
    if total > _INT32_MAX:
        raise ValueError(f"too many tokens for int32 kv_limit: {total}")
    if total == 0:
        return torch.zeros(segment_ids.shape, dtype=torch.int32, device=segment_ids.device)
    kv_limit = _packed_kv_limit(ids, cu, _causal_mask_checked(ids))
    return kv_limit.to(torch.int32).reshape(segment_ids.shape)

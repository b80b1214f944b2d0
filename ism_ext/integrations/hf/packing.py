"""From a transformers forward call's inputs to the varlen packing of `segment_attention`.

Words: a *layout* is what a chat-turn scheme makes of a dialogue (segment ids, docs/layouts.md); a
*packing* is how one forward's `[B, S]` grid becomes varlen sequences (`cu_seqlens` + `kv_limit`), this
module; how a tensor lies in memory is its *strides*.

A Hugging Face batch is a `[B, S]` grid with three ways of marking what belongs together:
  * `attention_mask` `[B, kv_len]` (1 = token, 0 = padding, left or right),
  * `position_ids` `[B, S]` restarting at 0 where a new dialogue starts (packed rows, no cache),
  * `block_sequence_ids` `[B, S]` (-1 causal, a run of one id >= 0 = one bidirectional block).
This module turns them into varlen sequences over the flattened grid (FlashAttention's
`cu_seqlens`) and one int32 `kv_limit` per query: O(B * S) integers, no `S x S` mask. Padding runs
become sequences of their own whose queries see nothing (`kv_limit = 0`).

With a KV cache the keys are `kv_len >= q_len` positions per row and the queries are the last `q_len`
of them; packing is then not detected (as in transformers, which only detects it without a cache).

The packing is data-dependent (how many sequences, where they start) and its checks read host values, so
the attention asks for it through one opaque op, `ism_hf::varlen_packing` (`varlen_packing_op`): under
`torch.compile(fullgraph=True)` the graph calls that op once per forward instead of breaking on the
`.item()` calls inside, and the number of sequences is an unbacked size there. The longest-sequence hints
are the row lengths (`q_len`, `kv_len`): a valid upper bound known without reading the offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...masks import kv_limit_from_segment_ids


@dataclass
class VarlenPacking:
    """Varlen packing of one forward call; shared by every attention layer of that call."""

    cu_seqlens_q: torch.Tensor  # int32 [n_seq + 1] over the B * q_len flattened queries
    cu_seqlens_k: torch.Tensor  # int32 [n_seq + 1] over the B * kv_len flattened keys
    kv_limit: torch.Tensor  # int32 [B * q_len]
    max_seqlen_q: int  # an upper bound of the longest query sequence (the row length q_len)
    max_seqlen_k: int  # an upper bound of the longest key sequence (the row length kv_len)


@dataclass(frozen=True)
class PromptBlockIds:
    """The block ids ``[batch, P]`` of a `generate` prompt: every position past them is a generated token (causal).

    `generate` hands the same keyword arguments to every step, so a step sees the prompt's ids while its
    input (without a cache: the whole sequence so far) is longer. Only this marked form may be shorter than
    the input; `generation.py` marks the ids after checking that they cover the prompt.
    """

    ids: torch.Tensor


def _bool_mask(attention_mask: torch.Tensor | None, batch: int, kv_len: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, kv_len):
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [batch, kv_len] = [{batch}, {kv_len}] for the ism attention, "
            f"got shape {tuple(attention_mask.shape)} (pass segments as block_sequence_ids, not as a dense mask)"
        )
    return attention_mask.to(device=device, dtype=torch.bool)


def _sequence_starts(real: torch.Tensor, position_ids: torch.Tensor | None, no_padding_mask: bool, batch: int,
                     q_len: int, kv_len: int) -> torch.Tensor:
    """bool ``[batch, kv_len]``: where a key sequence starts. That is the row start, every switch between
    padding and tokens, and (packed rows: no padding mask, no cache) every restart of ``position_ids``."""
    starts = torch.zeros(batch, kv_len, dtype=torch.bool, device=real.device)
    if kv_len > 0:
        starts[:, 0] = True
        starts[:, 1:] = real[:, 1:] != real[:, :-1]
    if position_ids is not None and no_padding_mask and q_len == kv_len and kv_len > 1:
        pos = position_ids.to(real.device).expand(batch, -1)
        if tuple(pos.shape) != (batch, q_len):
            raise ValueError(
                f"position_ids must have shape [batch, q_len] = [{batch}, {q_len}], got {tuple(pos.shape)}"
            )
        starts[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    return starts


def query_block_ids(block_sequence_ids: torch.Tensor | PromptBlockIds | None, batch: int, q_len: int, kv_len: int,
                    device: torch.device | str) -> torch.Tensor:
    """The block ids of a forward call's queries, ``[batch, q_len]`` (all causal when none are given).

    ``block_sequence_ids`` ``[batch, L]`` may hold the ids of the queries (``L == q_len``), of every key position
    of the rows (``L == kv_len``: the last ``q_len`` columns are taken), or of positions before the queries only
    (``L <= kv_len - q_len``): then every query is past them and causal. Ids that stop in the middle of the
    queries raise ValueError (the queries past them would silently become causal), unless they are a
    `PromptBlockIds`: the ids of a `generate` prompt, whose later positions are the generated tokens.
    """
    if block_sequence_ids is None:
        return torch.full((batch, q_len), -1, dtype=torch.long, device=device)
    prompt = isinstance(block_sequence_ids, PromptBlockIds)
    ids = (block_sequence_ids.ids if prompt else block_sequence_ids).to(device)
    if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] > kv_len:
        raise ValueError(
            f"block_sequence_ids must have shape [batch, L] with L = q_len ({q_len}) or L <= kv_len ({kv_len}) and "
            f"batch = {batch}, got {tuple(ids.shape)}"
        )
    length = ids.shape[1]
    if length == q_len:
        return ids
    if not prompt and kv_len - q_len < length < kv_len:
        raise ValueError(
            f"block_sequence_ids has {length} positions per row but the input has {q_len} tokens "
            f"({kv_len} with the cache): give an id for every input token (-1 for causal ones)"
        )
    if length < kv_len:
        ids = torch.nn.functional.pad(ids, (0, kv_len - length), value=-1)
    return ids[:, kv_len - q_len :]


def varlen_packing(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    block_sequence_ids: torch.Tensor | PromptBlockIds | None = None,
    device: torch.device | str = "cpu",
) -> VarlenPacking:
    """Builds the varlen packing of a `[batch, q_len]` query grid over a `[batch, kv_len]` key grid.

    Args:
        batch, q_len, kv_len: grid sizes; the queries of a row are its last `q_len` key positions.
        attention_mask: optional 2-D padding mask `[batch, kv_len]` (nonzero = real token).
        position_ids: optional `[batch or 1, q_len]`; where a row's positions do not continue by +1 a new
            (packed) sequence starts. Only used without padding mask and without cache (q_len == kv_len),
            like transformers' own packed-sequence detection.
        block_sequence_ids: optional `[batch, L]` ids (-1 causal, a run of one id >= 0 = one bidirectional
            block) of the queries, of all key positions, or of the first `L` positions (see `query_block_ids`).
            Missing means all causal.
        device: where the packing tensors live.

    Returns:
        The `VarlenPacking`. Raises ValueError for shapes that do not fit the grid, and (from
        `kv_limit_from_segment_ids`) for a block id reused after a gap.
    """
    if q_len > kv_len:
        raise ValueError(f"more queries ({q_len}) than keys ({kv_len}) per row")
    real = _bool_mask(attention_mask, batch, kv_len, device)
    starts = _sequence_starts(real, position_ids, attention_mask is None, batch, q_len, kv_len)

    flat_starts = starts.reshape(-1)
    seq_of_key = torch.cumsum(flat_starts, 0) - 1
    seq_start = torch.nonzero(flat_starts).flatten()  # flat key index of every sequence's first key
    n_seq = seq_start.numel()
    cu_k = torch.cat([seq_start, torch.tensor([batch * kv_len], device=device)])

    # Queries: the last q_len key positions of each row, in row order.
    q_key_index = (
        torch.arange(batch, device=device)[:, None] * kv_len + (kv_len - q_len) + torch.arange(q_len, device=device)
    ).reshape(-1)
    seq_of_query = seq_of_key[q_key_index]
    counts = torch.bincount(seq_of_query, minlength=n_seq)
    cu_q = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(counts, 0)])

    ids = query_block_ids(block_sequence_ids, batch, q_len, kv_len, device).reshape(-1)
    # kv_limit relative to the first query of each query sequence, then shifted to count from the first
    # key of the sequence (with a cache the first query is not the first key).
    local = kv_limit_from_segment_ids(ids, cu_q).long()
    first_query = q_key_index[cu_q[:-1].clamp(max=max(batch * q_len - 1, 0))] if q_len > 0 else cu_q[:-1]
    shift = first_query - seq_start
    len_k = cu_k[1:] - cu_k[:-1]
    # A block that runs on into right padding would reach past the sequence's last real key: cut it there.
    limit = torch.minimum(local + shift[seq_of_query], len_k[seq_of_query])
    # Padding queries see nothing: output 0, and no gradient flows from them.
    limit = torch.where(real.reshape(-1)[q_key_index], limit, torch.zeros_like(limit))

    return VarlenPacking(cu_q.to(torch.int32), cu_k.to(torch.int32), limit.to(torch.int32), q_len, kv_len)


@torch.library.custom_op("ism_hf::varlen_packing", mutates_args=())
def _varlen_packing_op(batch: int, q_len: int, kv_len: int, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None, block_sequence_ids: torch.Tensor | None, prompt_ids: bool,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = PromptBlockIds(block_sequence_ids) if prompt_ids else block_sequence_ids
    packing = varlen_packing(batch, q_len, kv_len, attention_mask=attention_mask, position_ids=position_ids,
                           block_sequence_ids=ids, device=device)
    return packing.cu_seqlens_q, packing.cu_seqlens_k, packing.kv_limit


@_varlen_packing_op.register_fake
def _varlen_packing_fake(batch, q_len, kv_len, attention_mask, position_ids, block_sequence_ids, prompt_ids, device):
    n_bounds = torch.library.get_ctx().new_dynamic_size(min=1)  # sequences + 1: known only when it runs
    cu = torch.empty(n_bounds, dtype=torch.int32, device=device)
    return cu, cu.clone(), torch.empty(batch * q_len, dtype=torch.int32, device=device)


def varlen_packing_op(batch: int, q_len: int, kv_len: int, *, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None, block_sequence_ids: torch.Tensor | PromptBlockIds | None,
                   device: torch.device) -> VarlenPacking:
    """`varlen_packing` through the opaque op `ism_hf::varlen_packing`: what the attention calls, so that a compiled
    model keeps the packing's host-side work and checks out of its graph (see the module docstring)."""
    prompt = isinstance(block_sequence_ids, PromptBlockIds)
    ids = block_sequence_ids.ids if prompt else block_sequence_ids
    cu_q, cu_k, kv_limit = _varlen_packing_op(batch, q_len, kv_len, attention_mask, position_ids, ids, prompt,
                                             torch.device(device))
    return VarlenPacking(cu_q, cu_k, kv_limit, q_len, kv_len)

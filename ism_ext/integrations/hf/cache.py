"""`IsmCache`: a transformers `Cache` whose keys and values live in the project's preallocated `KVCache`.

With it, an ``"ism"`` model's attention is one `attn_with_kvcache` call per layer: the new keys/values are
written into the cache in place and the queries attend over it with the `kv_limit` rule; nothing is ever
concatenated, so a decode step costs O(cache) and a new turn O(new tokens x cache).

How it meets transformers' protocol:

* `update` does not append: it returns, as the key, a `NewRows` (this cache and the layer's new rows), which
  transformers hands straight to the attention function; the ``"ism"`` attention appends and attends through
  `attend`. Another attention implementation cannot use a `NewRows` as a tensor and gets a clear error
  instead of attending over the new rows only. No state outside the call chain links the two.
* Lengths are those of transformers' grid (padding included), so positions and padding masks line up with
  `generate`. Inside, every row stores only its real tokens: a left-padded row's cache starts at its first
  token, so ``kv_limit`` (which has no lower bound) never reaches a padding key.
* Everything a forward could fail on (capacity, a bidirectional segment continued from the previous call,
  the model's layer count and sizes) is checked at its first layer, before anything is written.
* A forward that fails after its first layer appended (an exception in a later layer) leaves its layers
  uneven; the cache notices at its next use (`get_seq_length`, which every forward and `generate` step asks
  first, `truncate`, `crop`, a new forward's plan) and rolls back to where that forward began. Nothing of
  the cache runs after the last layer's attention, so a failure after it (last MLP, norm, head) leaves the
  forward's rows appended in every layer: consistent, and `truncate` removes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ...cache import KVCache
from ...masks import kv_limit_from_segment_ids
from .attention import NewRows
from .packing import query_block_ids

__all__ = ["IsmCache"]


class _IsmLayer(CacheLayerMixin):
    """One layer's view of an `IsmCache`, for the protocol's per-layer questions (lengths, capabilities)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: IsmCache, layer_idx: int) -> None:
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the storage is preallocated."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """See `IsmCache.update`."""
        return self.owner.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of a forward of ``query_length`` new positions."""
        return self.owner.get_seq_length(self.layer_idx) + query_length, 0

    def get_seq_length(self) -> int:
        """Grid positions this layer has seen."""
        return self.owner.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        """Tokens a row can hold."""
        return self.owner.kv.capacity

    @property
    def batch_size(self) -> int:
        """Rows of the cache."""
        return self.owner.kv.batch_size


@dataclass
class _Group:
    """Rows that append the same number of new real tokens: one op call per layer."""

    rows: list[int]
    positions: torch.Tensor  # int64 [G, n]: which of the forward's query positions are the rows' real tokens
    kv_limit: torch.Tensor  # int32 [G, n], in cache coordinates (the row's real tokens)


@dataclass
class _RowPlan:
    """One row's part of a forward: the positions of its new real tokens, their kv_limit, its last block id."""

    positions: torch.Tensor  # int64 [n]
    kv_limit: torch.Tensor  # int32 [n], cache coordinates
    last_block: int


@dataclass
class _Step:
    """What one forward appends, worked out (and checked) at its first layer."""

    q_len: int
    groups: list[_Group]
    dense: bool  # one group of every row with all q_len positions real: no gather or scatter needed
    lengths_after: list[int]
    last_block_after: list[int]


class IsmCache(Cache):
    """The keys/values of an ``"ism"`` model in a preallocated (contiguous or paged) `KVCache`.

    Pass it as the model's cache (``past_key_values=``, ``cache=`` from transformers 5.24); ``generate`` on an
    ``"ism"`` model uses one by default. Only the ``"ism"`` attention can use it.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        page_size: int | None = None,
        num_pages: int | None = None,
    ) -> None:
        """Allocates the storage (see `ism_ext.cache.KVCache` for the arguments); ``capacity`` is per row."""
        self.kv = KVCache(num_layers, batch_size, num_kv_heads, head_dim, capacity=capacity, dtype=dtype,
                          device=device, page_size=page_size, num_pages=num_pages)
        super().__init__(layers=[_IsmLayer(self, i) for i in range(num_layers)])
        self._grid = [0] * num_layers  # transformers' positions seen per layer (padding included)
        self._last_block = [-1] * batch_size  # block id of each row's last cached token (-1: causal or none)
        # Grid length at the end of every forward -> (real lengths, last block ids): where truncate may go.
        self._marks: dict[int, tuple[list[int], list[int]]] = {0: ([0] * batch_size, [-1] * batch_size)}
        self._open_start: int | None = None  # grid length where the forward in progress began (None: none is)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, capacity: int, **kwargs: Any) -> IsmCache:
        """A cache sized for ``model`` (its layers, kv heads, head dim, dtype and device)."""
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kwargs.setdefault("dtype", model.dtype)
        kwargs.setdefault("device", model.device)
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, head_dim, capacity=capacity,
                   **kwargs)

    # ------------------------------------------------------------------ transformers' protocol

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Returns ``(NewRows(self, key_states), value_states)``: the ``"ism"`` attention appends them (`attend`)."""
        return NewRows(self, key_states), value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Grid positions seen by ``layer_idx`` (padding included), as transformers counts them."""
        self._settle()
        return self._grid[layer_idx] if 0 <= layer_idx < len(self._grid) else 0

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, 0)``: every key position of the forward, cached ones included."""
        if isinstance(query_length, torch.Tensor):  # older releases pass cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length(layer_idx) + int(query_length), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Where this forward's queries start on the grid."""
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """Tokens a row can hold."""
        return self.kv.capacity

    def reset(self) -> None:
        """Empties every row."""
        self._open_start = None
        self.kv.reset()
        batch = self.kv.batch_size
        self._grid = [0] * self.kv.num_layers
        self._last_block = [-1] * batch
        self._marks = {0: ([0] * batch, [-1] * batch)}

    def truncate(self, length: int) -> None:
        """Drops every position from grid position ``length`` on, in every row and layer.

        ``length`` must be where an earlier forward ended (a chat round's end, a decode step); KVCache then
        refuses it if it would cut a bidirectional segment. Raises ValueError, changing nothing, otherwise.
        """
        self._settle()
        self._truncate(length)

    def _truncate(self, length: int) -> None:
        if length not in self._marks:
            raise ValueError(f"IsmCache: truncate to {length}: not the end of a forward call; possible lengths are "
                             f"{sorted(self._marks)}")
        lengths, last_blocks = self._marks[length]
        for row, n in enumerate(lengths):
            self.kv.truncate(row, n)
        self._grid = [length] * self.kv.num_layers
        self._last_block = list(last_blocks)
        self._marks = {g: m for g, m in self._marks.items() if g <= length}

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' crop: ``crop(-n)`` drops the last ``n`` positions (see `truncate`); ``crop(0)`` is a no-op."""
        if tokens_to_remove > 0:
            raise ValueError(f"IsmCache: crop takes 0 or a negative count, got {tokens_to_remove}")
        if tokens_to_remove < 0:
            self.truncate(self.get_seq_length() + tokens_to_remove)

    def _settle(self) -> None:
        """Rolls back a forward that began (its first layer appended) but never reached its last layer."""
        if self._open_start is not None:
            start, self._open_start = self._open_start, None
            self._truncate(start)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Not supported (beam search): raises NotImplementedError."""
        raise NotImplementedError("IsmCache does not support beam search; generate with cache_implementation='dynamic'")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Not supported (num_return_sequences > 1): raises NotImplementedError."""
        raise NotImplementedError("IsmCache does not expand its batch (num_return_sequences > 1); repeat the inputs")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Not supported: raises NotImplementedError."""
        raise NotImplementedError("IsmCache does not select batch rows; use KVCache.fork / reset per row")

    # ------------------------------------------------------------------ the attention of one layer

    def plan(self, padding_mask: torch.Tensor | None, block_sequence_ids: torch.Tensor | None, q_len: int,
             kv_len: int, num_layers: int) -> _Step:
        """What this forward appends to every row, checked before anything is written (its first layer calls it).

        Raises ValueError for a forward that does not continue the cache (its ``kv_length``), a model with
        another layer count, a row past capacity, or a bidirectional segment that would continue the previous
        call's last segment (a segment must be prefilled whole: its first tokens attend its last ones).
        """
        self._settle()
        batch = self.kv.batch_size
        if num_layers != self.kv.num_layers:
            raise ValueError(f"IsmCache has {self.kv.num_layers} layers but the model has {num_layers}")
        if kv_len != self._grid[0] + q_len:
            raise ValueError(f"IsmCache holds {self._grid[0]} positions, so a call of {q_len} new positions has "
                             f"{self._grid[0] + q_len} keys, not {kv_len}")
        real = (torch.ones(batch, q_len, dtype=torch.bool) if padding_mask is None
                else padding_mask[:, kv_len - q_len :].to("cpu", torch.bool))
        if tuple(real.shape) != (batch, q_len):
            raise ValueError(f"IsmCache has {batch} rows but the call's padding mask is {tuple(padding_mask.shape)}")
        ids = query_block_ids(block_sequence_ids, batch, q_len, kv_len, "cpu")
        lengths = self.kv.lengths(0)
        per_row = [self._row_plan(b, torch.nonzero(real[b]).flatten(), ids[b], lengths[b]) for b in range(batch)]
        step = self._group(per_row, q_len, lengths)
        self._open_start = self._grid[0]
        return step

    def _row_plan(self, row: int, positions: torch.Tensor, ids: torch.Tensor, length: int) -> _RowPlan:
        """One row's new real tokens; raises for capacity or a continued segment."""
        n = positions.numel()
        if length + n > self.kv.capacity:
            raise ValueError(f"IsmCache: row {row} holds {length} tokens; {n} more exceed its capacity of "
                             f"{self.kv.capacity}; nothing was written (reset, truncate or allocate a larger cache)")
        row_ids = ids[positions]
        if n and int(row_ids[0]) >= 0 and int(row_ids[0]) == self._last_block[row]:
            raise ValueError(
                f"IsmCache: row {row}: the call's first token continues block {int(row_ids[0])}, the bidirectional "
                f"segment the previous call ended with; a segment must be prefilled whole (its first tokens attend "
                f"its last), so give it in one call or give the new tokens another block id; nothing was written"
            )
        last_block = int(row_ids[-1]) if n else self._last_block[row]
        return _RowPlan(positions, kv_limit_from_segment_ids(row_ids) + length, last_block)

    def _group(self, per_row: list[_RowPlan], q_len: int, lengths: list[int]) -> _Step:
        """Rows with the same number of new real tokens share one op call."""
        device = self.kv.device
        by_count: dict[int, list[int]] = {}
        for row, plan in enumerate(per_row):
            if plan.positions.numel():
                by_count.setdefault(plan.positions.numel(), []).append(row)
        groups = [_Group(rows, torch.stack([per_row[r].positions for r in rows]).to(device),
                         torch.stack([per_row[r].kv_limit for r in rows]).to(device, torch.int32))
                  for _, rows in sorted(by_count.items())]
        dense = (len(groups) == 1 and groups[0].rows == list(range(self.kv.batch_size))
                 and groups[0].positions.shape[1] == q_len)
        after = [n + plan.positions.numel() for n, plan in zip(lengths, per_row, strict=True)]
        return _Step(q_len, groups, dense, after, [plan.last_block for plan in per_row])

    def attend(self, layer_idx: int, step: _Step, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               softmax_scale: float | None) -> torch.Tensor:
        """Appends this layer's new keys/values and attends its queries: ``[B, H, q_len, D]`` in (transformers'
        order), ``[B, q_len, Hq, D]`` out; padding queries get 0."""
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, q_len, H, D] views, no copy
        if step.dense:
            out = self.kv.append_and_attend(layer_idx, q, k, v, kv_limit=step.groups[0].kv_limit,
                                            softmax_scale=softmax_scale)
        else:
            out = q.new_zeros(q.shape)
            for group in step.groups:
                rows = torch.tensor(group.rows, device=q.device)[:, None]
                where = (rows, group.positions)
                out[where] = self.kv.append_and_attend(layer_idx, q[where], k[where], v[where],
                                                       kv_limit=group.kv_limit, seq_ids=group.rows,
                                                       softmax_scale=softmax_scale)
        self._advance(layer_idx, step)
        return out

    def _advance(self, layer_idx: int, step: _Step) -> None:
        """One more forward seen by ``layer_idx``; layer 0 also records where a later truncate may go."""
        self._grid[layer_idx] += step.q_len
        if all(g == self._grid[0] for g in self._grid):  # the last layer: the forward is complete
            self._open_start = None
        if layer_idx == 0:
            self._last_block = list(step.last_block_after)
            self._marks[self._grid[0]] = (list(step.lengths_after), list(step.last_block_after))

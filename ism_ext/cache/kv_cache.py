"""`KVCache`: the keys/values of a whole model kept across rounds of a multi-turn dialogue.

ISM and MAS make the cache reusable across rounds: the keys/values of earlier turns never depend on
later ones, so round k only prefills its new user segment (bidirectional, one call with
``segment=True``) and then decodes its answer causally. This module keeps the per-layer storage and
its bookkeeping around `ism.attn_with_kvcache`:

* **contiguous**: per layer ``k``/``v`` ``[batch_size, capacity, Hkv, D]``, one row per sequence;
* **paged**: per layer ``k``/``v`` ``[num_pages, page_size, Hkv, D]``. Which pages a sequence owns is the
  business of one `PagedAllocator` shared by all layers (block table, free list, reference counts), so
  a page index means the same token positions in every layer. ``fork`` shares pages; the first write
  into a shared page copies it (copy-on-write) for all layers.

Lengths live in Python lists (one per layer), so no call ever waits on the device to learn a length.

Segment boundaries are recorded per sequence, because KV reuse is only sound at a boundary: the
tokens of a bidirectional segment attended to each other, so (from layer 1 on) the keys/values of
its first half already depend on its second half. `truncate` refuses to cut inside a segment.

Thread safety: every method runs under the cache's own lock, so threads sharing one cache see each call
happen whole (two threads appending to one sequence both land, one after the other, in either order). The
storage returned by `key_cache` / `value_cache` is outside the lock. Objects built on a cache (the
transformers adapter, a chat session) keep state of their own and are for one thread at a time.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..masks import kv_limit_causal_append, kv_limit_new_segment
from ..ops import PAGE_SIZE_MULTIPLE, attn_with_kvcache
from .paged import PageCopy, PagedAllocator

__all__ = ["KVCache"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _locked(method: _Method) -> _Method:
    """Runs the method under the cache's lock (a re-entrant one: locked methods may call each other)."""
    @functools.wraps(method)
    def run(self: KVCache, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


def _check_positive_int(name: str, value: object) -> int:
    # bool is an int subclass, but True layers or heads is a caller bug, not a count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"KVCache: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"KVCache: {name} must be >= 1, got {value}")
    return value


@dataclass
class _Append:
    """One checked append: which sequences, where they start, how many tokens, and the op's index tensors."""

    seqs: list[int]
    starts: list[int]
    n_new: int
    cache_seqlens: torch.Tensor
    kv_limit: torch.Tensor
    every_position_a_boundary: bool


class KVCache:
    """Key/value cache of ``num_layers`` attention layers for ``batch_size`` sequences.

    Each layer's forward calls `append_and_attend` with its new queries/keys/values; the cache writes
    the new keys/values in place, attends the queries over everything cached so far (with the
    ``kv_limit`` rule) and advances that layer's lengths.
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
        """Allocates the caches (zero-filled).

        Args:
            num_layers, batch_size, num_kv_heads, head_dim: sizes of the model and the batch.
            capacity: the most tokens one sequence may hold.
            dtype: float32, float16 or bfloat16 (the dtype of the queries/keys/values it will get).
            device: where the caches live.
            page_size: give it for a paged cache (a multiple of `ism_ext.ops.PAGE_SIZE_MULTIPLE`, 16, the
                op's page granularity); None for a contiguous one.
            num_pages: pages of the paged cache; defaults to enough for every sequence at full capacity.
                Fewer pages over-commit memory: forks and short sequences share the pool.
        """
        self._lock = threading.RLock()
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.num_kv_heads = _check_positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _check_positive_int("head_dim", head_dim)
        self.capacity = _check_positive_int("capacity", capacity)
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"KVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.page_size, self.num_pages = self._check_paging(page_size, num_pages)
        shape = ((batch_size, capacity) if self.page_size is None else (self.num_pages, self.page_size))
        shape = (*shape, num_kv_heads, head_dim)
        # zeros rather than empty: unused slots are never read, but deterministic bytes make dumps and
        # byte-level comparisons in tests meaningful. Normal tensors even when built under inference mode
        # (a chat creates its cache there): they are written in place later, possibly outside it.
        with torch.inference_mode(False):
            self._k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self._v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # The concrete device of the storage ("cuda" -> "cuda:0"), so device checks compare like with like.
        self.device = self._k[0].device
        self._lengths: list[list[int]] = [[0] * batch_size for _ in range(num_layers)]
        self._boundaries: list[set[int]] = [{0} for _ in range(batch_size)]
        self._pages: PagedAllocator | None = None
        if self.page_size is not None:
            self._pages = PagedAllocator(batch_size, self.max_pages, self.num_pages, self.page_size, self.device)

    def _check_paging(self, page_size: int | None, num_pages: int | None) -> tuple[int | None, int | None]:
        """Page size and page count of a paged cache (None, None for a contiguous one); sets ``max_pages``."""
        if page_size is None:
            if num_pages is not None:
                raise ValueError("KVCache: num_pages is only for paged caches; give page_size too")
            return None, None
        _check_positive_int("page_size", page_size)
        if page_size % PAGE_SIZE_MULTIPLE != 0:
            raise ValueError(f"KVCache: page_size must be a multiple of {PAGE_SIZE_MULTIPLE} (the op's page "
                             f"granularity), got {page_size}")
        self.max_pages = math.ceil(self.capacity / page_size)
        num_pages = self.batch_size * self.max_pages if num_pages is None else num_pages
        return page_size, _check_positive_int("num_pages", num_pages)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry everything but the lock (each copy gets its own)."""
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ introspection

    @property
    def is_paged(self) -> bool:
        """True for a paged cache."""
        return self._pages is not None

    @property
    @_locked
    def seqlens(self) -> torch.Tensor:
        """int32 ``[batch_size]`` on the cache's device: layer 0's lengths (the tokens fully cached after a forward)."""
        return torch.tensor(self._lengths[0], dtype=torch.int32, device=self.device)

    @_locked
    def lengths(self, layer: int) -> list[int]:
        """The cached lengths of every sequence in ``layer`` (a copy, Python ints)."""
        self._check_layer(layer)
        return list(self._lengths[layer])

    @_locked
    def boundaries(self, seq: int) -> list[int]:
        """Sorted positions ``seq`` may be truncated to (recorded from layer 0's appends)."""
        self._check_seq(seq, "seq")
        return sorted(self._boundaries[seq])

    def key_cache(self, layer: int) -> torch.Tensor:
        """The key storage of ``layer`` (``[batch, capacity, Hkv, D]`` or ``[num_pages, page_size, Hkv, D]``).

        Returned as is, not copied: writing into it bypasses the bookkeeping.
        """
        self._check_layer(layer)
        return self._k[layer]

    def value_cache(self, layer: int) -> torch.Tensor:
        """The value storage of ``layer``; see `key_cache`."""
        self._check_layer(layer)
        return self._v[layer]

    @property
    @_locked
    def block_table(self) -> torch.Tensor:
        """int32 ``[batch_size, max_pages]``: page indices of each sequence (-1: none). Paged only; do not modify."""
        return self._paged("block_table").block_table

    @property
    @_locked
    def num_free_pages(self) -> int:
        """Pages not used by any sequence. Paged caches only."""
        return self._paged("num_free_pages").num_free

    @_locked
    def page_refcount(self, page: int) -> int:
        """How many sequences use ``page`` (paged caches only)."""
        pages = self._paged("page_refcount")
        if not 0 <= page < self.num_pages:
            raise ValueError(f"KVCache: page must be in [0, {self.num_pages}), got {page}")
        return pages.refcount(page)

    @_locked
    def get_kv(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the cached keys and values of ``seq`` in ``layer``: ``[length, Hkv, D]`` each."""
        self._check_layer(layer)
        self._check_seq(seq, "seq")
        n = self._lengths[layer][seq]
        if self._pages is None:
            return self._k[layer][seq, :n].clone(), self._v[layer][seq, :n].clone()
        pages = torch.tensor(self._pages.pages(seq, n), dtype=torch.long, device=self.device)
        shape = (-1, self.num_kv_heads, self.head_dim)
        return (self._k[layer][pages].reshape(shape)[:n].clone(), self._v[layer][pages].reshape(shape)[:n].clone())

    # ------------------------------------------------------------------ the forward step

    @_locked
    def append_and_attend(
        self,
        layer: int,
        q: torch.Tensor,
        k_new: torch.Tensor | None,
        v_new: torch.Tensor | None,
        *,
        kv_limit: torch.Tensor | None = None,
        segment: bool = False,
        seq_ids: Iterable[int] | None = None,
        softmax_scale: float | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Appends ``k_new``/``v_new`` to ``layer``'s cache and attends ``q`` over the cache.

        Args:
            layer: the layer index.
            q: ``[B', Lq, Hq, D]`` queries of the new tokens of the sequences ``seq_ids``; ``Hq`` a multiple of
                the cache's kv heads.
            k_new, v_new: ``[B', Lq, Hkv, D]``, or both None to attend over the cache without appending.
            kv_limit: int32 ``[B', Lq]``, query i of sequence b sees cache positions ``j < kv_limit[b, i]``
                (counted from the sequence's first token, in ``[0, length + Lq]``). Defaults to one
                bidirectional segment with ``segment=True`` and to causal tokens otherwise (without new
                tokens: every query sees the whole cache).
            segment: the new tokens form one bidirectional segment (a user or system turn).
            seq_ids: the sequences of the batch rows of ``q``; default all, in order. Pass Python ints: a device
                tensor is read back (a sync).
            softmax_scale: defaults to ``D ** -0.5``.
            return_lse: also return the float32 log-sum-exp ``[B', Hq, Lq]``.

        Returns the output ``[B', Lq, Hq, D]`` (and lse).

        Every check runs before any state changes: a ValueError/TypeError naming the argument for a bad layer,
        shape, dtype, device or sequence id, a ValueError when an append would exceed ``capacity``, and a
        RuntimeError when a paged cache is out of pages. If the op itself rejects the call (a ``kv_limit``
        value out of range), the page allocation is rolled back, so lengths, block table, reference counts
        and every cached token are as before (only bytes of free pages may differ).

        Boundaries (for `truncate`) are recorded on layer 0: after a segment (or an explicit ``kv_limit``,
        whose shape the cache cannot know without reading it) only the end of the new tokens; after causal
        tokens every new position.
        """
        self._check_layer(layer)
        seqs = self._check_seq_ids(seq_ids)
        self._check_step_tensors(q, k_new, v_new, len(seqs))
        self._check_kv_limit(kv_limit, segment, tuple(q.shape[:2]))
        step = self._plan_append(layer, seqs, q.shape[1], k_new is not None, kv_limit, segment)
        # Plan first (it can still fail: out of pages), change state only once everything is known to fit.
        plan = self._pages.plan(seqs, step.starts, step.n_new) if self._pages is not None and step.n_new else []
        journal = self._take_pages(plan)
        cache_batch_idx, block_table = self._indexing(seqs)
        try:
            out, lse = attn_with_kvcache(
                q, self._k[layer], self._v[layer], k_new, v_new, cache_seqlens=step.cache_seqlens,
                kv_limit=step.kv_limit, cache_batch_idx=cache_batch_idx, block_table=block_table,
                softmax_scale=softmax_scale, return_lse=True,
            )
        except Exception:
            # The op checks everything before writing, so the cache content is intact: undo the pages.
            if self._pages is not None:
                self._pages.undo(journal)
            raise
        self._advance(layer, step)
        return (out, lse) if return_lse else out

    def _check_step_tensors(self, q: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                            n_seqs: int) -> None:
        """Shapes, dtypes and devices of one step's queries and new keys/values."""
        self._check_float("q", q, 4)
        bsz, lq, hq, d = q.shape
        if bsz != n_seqs:
            raise ValueError(f"KVCache: q has batch {bsz} but seq_ids names {n_seqs} sequences")
        if d != self.head_dim:
            raise ValueError(f"KVCache: q has head_dim {d} but the cache has head_dim {self.head_dim}")
        if hq % self.num_kv_heads != 0:
            raise ValueError(f"KVCache: q has {hq} heads, not a multiple of the cache's {self.num_kv_heads} kv heads")
        if (k_new is None) != (v_new is None):
            raise ValueError("KVCache: give both k_new and v_new, or neither")
        if k_new is None:
            return
        expect = (bsz, lq, self.num_kv_heads, self.head_dim)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            self._check_float(name, t, 4)
            if tuple(t.shape) != expect:
                raise ValueError(f"KVCache: {name} must have shape [B', Lq, Hkv, D] = {expect}, got {tuple(t.shape)}")

    def _check_kv_limit(self, kv_limit: torch.Tensor | None, segment: bool, shape: tuple[int, int]) -> None:
        """An explicit ``kv_limit``: int32 ``[B', Lq]`` on the cache's device, and not with ``segment=True``."""
        if kv_limit is None:
            return
        if segment:
            raise ValueError("KVCache: give kv_limit or segment=True, not both (segment=True builds kv_limit)")
        if not isinstance(kv_limit, torch.Tensor):
            raise TypeError(f"KVCache: kv_limit must be a torch.Tensor, got {type(kv_limit).__name__}")
        if kv_limit.dtype != torch.int32:
            raise TypeError(f"KVCache: kv_limit must be int32, got {kv_limit.dtype}")
        if tuple(kv_limit.shape) != shape:
            raise ValueError(f"KVCache: kv_limit must have shape [B', Lq] = {shape}, got {tuple(kv_limit.shape)}")
        if kv_limit.device != self.device:
            raise ValueError(f"KVCache: kv_limit is on {kv_limit.device} but the cache is on {self.device}")

    def _plan_append(self, layer: int, seqs: list[int], lq: int, appending: bool, kv_limit: torch.Tensor | None,
                     segment: bool) -> _Append:
        """Start positions (capacity checked) and the op's ``cache_seqlens`` and ``kv_limit``."""
        n_new = lq if appending else 0
        starts = [self._lengths[layer][s] for s in seqs]
        for s, start in zip(seqs, starts, strict=True):
            if start + n_new > self.capacity:
                raise ValueError(
                    f"KVCache: appending {n_new} tokens to sequence {s} of length {start} in layer {layer} exceeds the "
                    f"capacity of {self.capacity} tokens; nothing was changed (truncate, reset or use a larger cache)"
                )
        cache_seqlens = torch.tensor(starts, dtype=torch.int32, device=self.device)
        # Only the default causal layout makes every new position a boundary; an explicit kv_limit could be
        # bidirectional anywhere, and reading it back would cost a device sync.
        every_position_a_boundary = kv_limit is None and not segment
        if kv_limit is None:
            if not appending:
                kv_limit = cache_seqlens[:, None].expand(-1, lq).contiguous()
            elif segment:
                kv_limit = kv_limit_new_segment(cache_seqlens, lq)
            else:
                kv_limit = kv_limit_causal_append(cache_seqlens, lq)
        return _Append(seqs, starts, n_new, cache_seqlens, kv_limit, every_position_a_boundary)

    def _take_pages(self, plan: list[tuple[int, int, int]]) -> list[PageCopy]:
        """Allocates the planned pages and copies shared ones (all layers: the block table is shared)."""
        if self._pages is None or not plan:
            return []
        journal = self._pages.apply(plan)
        for _, _, old, new in journal:
            if old >= 0:
                for layer in range(self.num_layers):
                    self._k[layer][new] = self._k[layer][old]
                    self._v[layer][new] = self._v[layer][old]
        return journal

    def _indexing(self, seqs: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(cache_batch_idx, block_table) of the op for the batch rows ``seqs``."""
        if self._pages is not None:
            table = self._pages.block_table
            if seqs == list(range(self.batch_size)):
                return None, table
            return None, table[torch.tensor(seqs, dtype=torch.long, device=self.device)]
        if seqs == list(range(len(seqs))):
            return None, None
        return torch.tensor(seqs, dtype=torch.int32, device=self.device), None

    def _advance(self, layer: int, step: _Append) -> None:
        """The new lengths of ``layer``, and on layer 0 the new truncation boundaries."""
        if not step.n_new:
            return
        lengths = self._lengths[layer]
        for s, start in zip(step.seqs, step.starts, strict=True):
            lengths[s] = start + step.n_new
            if layer == 0:
                # Layer 0 runs first in a forward, so it is the one place that sees every append once.
                if step.every_position_a_boundary:
                    self._boundaries[s].update(range(start + 1, start + step.n_new + 1))
                else:
                    self._boundaries[s].add(start + step.n_new)

    # ------------------------------------------------------------------ history edits

    @_locked
    def truncate(self, seq: int, length: int) -> None:
        """Drops the tokens of ``seq`` from position ``length`` on, in every layer.

        ``length`` must be a recorded boundary (see `boundaries`; 0 always is). Cutting inside a bidirectional
        segment raises ValueError: its kept tokens attended to the dropped ones, so their keys/values (from
        layer 1 on) would not be those of the shorter history. Paged caches free the pages no longer used.
        """
        self._check_seq(seq, "seq")
        if not isinstance(length, int) or isinstance(length, bool):
            raise TypeError(f"KVCache: length must be an int, got {type(length).__name__}")
        current = self._lengths[0][seq]
        if not 0 <= length <= current:
            raise ValueError(f"KVCache: length must be in [0, {current}] (sequence {seq}'s length), got {length}")
        bounds = self._boundaries[seq]
        if length not in bounds:
            before = max(b for b in bounds if b < length)
            after = min((b for b in bounds if b > length), default=current)
            raise ValueError(
                f"KVCache: cannot truncate sequence {seq} to {length}: it is inside the bidirectional segment "
                f"[{before}, {after}), and a bidirectional segment cannot be cut (its tokens attended to each other, "
                f"so the kept part's keys/values depend on the dropped part); truncate to a boundary such as "
                f"{before} or {after}"
            )
        for layer_lengths in self._lengths:
            # min: a layer may be behind layer 0 when called in the middle of a forward.
            layer_lengths[seq] = min(layer_lengths[seq], length)
        self._boundaries[seq] = {b for b in bounds if b <= length}
        if self._pages is not None:
            used = max(layer_lengths[seq] for layer_lengths in self._lengths)
            self._pages.release(seq, math.ceil(used / self.page_size))

    @_locked
    def reset(self, seq: int | None = None) -> None:
        """Empties sequence ``seq`` (every sequence when None) in every layer; paged caches free its pages."""
        seqs = range(self.batch_size) if seq is None else [self._check_seq(seq, "seq")]
        for s in seqs:
            for layer_lengths in self._lengths:
                layer_lengths[s] = 0
            self._boundaries[s] = {0}
            if self._pages is not None:
                self._pages.release(s, 0)

    @_locked
    def fork(self, src: int, dst: int) -> None:
        """Makes ``dst`` a copy of ``src`` (every layer, lengths and boundaries); ``dst``'s old content is dropped.

        Contiguous caches copy the cached rows. Paged caches share the pages (reference counts go up), so a fork
        costs no copy; the first later write into a shared page, by either sequence, copies that page for all
        layers (copy-on-write).
        """
        self._check_seq(src, "src")
        self._check_seq(dst, "dst")
        if src == dst:
            raise ValueError(f"KVCache: fork needs two different sequences, got src = dst = {src}")
        if self._pages is not None:
            self._pages.release(dst, 0)
            self._pages.share(src, dst)
        else:
            for layer in range(self.num_layers):
                n = self._lengths[layer][src]
                self._k[layer][dst, :n] = self._k[layer][src, :n]
                self._v[layer][dst, :n] = self._v[layer][src, :n]
        for layer_lengths in self._lengths:
            layer_lengths[dst] = layer_lengths[src]
        self._boundaries[dst] = set(self._boundaries[src])

    # ------------------------------------------------------------------ checks

    def _paged(self, what: str) -> PagedAllocator:
        if self._pages is None:
            raise ValueError(f"KVCache: {what} exists only for paged caches (give page_size)")
        return self._pages

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"KVCache: layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"KVCache: layer must be in [0, {self.num_layers}), got {layer}")

    def _check_seq(self, seq: int, name: str) -> int:
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise TypeError(f"KVCache: {name} must be an int, got {type(seq).__name__}")
        if not 0 <= seq < self.batch_size:
            raise ValueError(f"KVCache: {name} must be a sequence in [0, {self.batch_size}), got {seq}")
        return seq

    def _check_seq_ids(self, seq_ids: Iterable[int] | None) -> list[int]:
        if seq_ids is None:
            return list(range(self.batch_size))
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()  # documented sync; Python ints are the cheap way
        seqs = [self._check_seq(_as_index(s), "seq_ids entry") for s in seq_ids]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"KVCache: seq_ids must not repeat a sequence, got {seqs}")
        return seqs

    def _check_float(self, name: str, t: object, dim: int) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"KVCache: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"KVCache: {name} must be {dim}-D, got shape {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise TypeError(f"KVCache: {name} has dtype {t.dtype} but the cache holds {self.dtype}")
        if t.device != self.device:
            raise ValueError(f"KVCache: {name} is on {t.device} but the cache is on {self.device}")


def _as_index(value: object) -> object:
    """An integer-like sequence id (int, numpy or 0-d tensor integer) as an int; anything else as is, for
    `_check_seq` to reject by type (a float 1.7 must not become sequence 1)."""
    if isinstance(value, int):  # bools included: `_check_seq` rejects them
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value

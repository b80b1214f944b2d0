"""A vLLM request's bidirectional ranges: parsing and checks, ``kv_limit``, chunk ends, prefix-cache keys.

A request carries its layout in ``SamplingParams.extra_args["ism_ranges"]`` (the OpenAI server fills
``extra_args`` from ``vllm_xargs``): a flat list ``[s0, e0, s1, e1, ...]`` of half-open prompt spans
``[s, e)``, sorted and disjoint. A token inside a span sees the whole span (``kv_limit = e``), every other
token is causal (``kv_limit = i + 1``), generated tokens included: the project's one rule
(docs/design.md). Flat, because ``vllm_xargs`` admits lists of numbers but not lists of lists.

Everything here is plain Python on the ranges, with no vLLM import, so the scheduler rule, the cache keys
and the attention metadata all read one parsed form, and the tests run without vLLM.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["RANGES_KEY", "Ranges", "block_hash_keys", "chunk_tokens", "flatten", "kv_limit_for_chunk",
           "parse_ranges", "ranges_from_block_ids", "request_ranges"]

RANGES_KEY = "ism_ranges"
# ((s0, e0), (s1, e1), ...): sorted, disjoint, each at least two tokens long (a one-token span is causal).
Ranges = tuple[tuple[int, int], ...]


def _pairs(value: Any) -> list[tuple[Any, Any]]:
    """``[s0, e0, s1, e1, ...]`` or ``[[s0, e0], ...]`` as a list of pairs (values not checked yet)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{RANGES_KEY} must be a list [s0, e0, s1, e1, ...], got {type(value).__name__}")
    if all(isinstance(v, (list, tuple)) for v in value):
        if any(len(v) != 2 for v in value):
            raise ValueError(f"{RANGES_KEY}: every [start, end] pair must have two numbers, got {list(value)}")
        return [tuple(v) for v in value]
    if len(value) % 2:
        raise ValueError(f"{RANGES_KEY} must hold pairs [s0, e0, s1, e1, ...], got an odd count ({len(value)})")
    return [(value[i], value[i + 1]) for i in range(0, len(value), 2)]


def parse_ranges(value: Any, prompt_len: int) -> Ranges:
    """Checks ``value`` (flat ``[s0, e0, ...]`` or ``[[s0, e0], ...]``) against a prompt of ``prompt_len`` tokens
    and returns the canonical `Ranges` (one-token spans dropped: they are causal).

    Raises ValueError naming ``ism_ranges`` for anything else: not integers, ``s >= e``, a span outside the
    prompt, spans out of order or overlapping.
    """
    ranges: list[tuple[int, int]] = []
    previous_end = 0
    for start, end in _pairs(value):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise ValueError(f"{RANGES_KEY}: span bounds must be integers, got [{start!r}, {end!r}]")
        if not 0 <= start < end <= prompt_len:
            raise ValueError(f"{RANGES_KEY}: span [{start}, {end}) is empty or outside the prompt's "
                             f"{prompt_len} tokens (need 0 <= start < end <= {prompt_len})")
        if start < previous_end:
            raise ValueError(f"{RANGES_KEY}: span [{start}, {end}) starts before the previous one ends "
                             f"({previous_end}); spans must be sorted and disjoint")
        previous_end = end
        if end - start > 1:
            ranges.append((start, end))
    return tuple(ranges)


def request_ranges(extra_args: Mapping[str, Any] | None) -> Ranges:
    """The ranges of a request whose ``extra_args`` were checked at admission (`parse_ranges`), else ``()``."""
    if not extra_args or RANGES_KEY not in extra_args:
        return ()
    value = extra_args[RANGES_KEY]
    return tuple((int(value[i]), int(value[i + 1])) for i in range(0, len(value), 2))


def flatten(ranges: Sequence[tuple[int, int]]) -> list[int]:
    """``[(s0, e0), (s1, e1)]`` -> ``[s0, e0, s1, e1]``, the form ``extra_args`` carries."""
    return [bound for span in ranges for bound in span]


def ranges_from_block_ids(block_ids: Sequence[int]) -> Ranges:
    """Spans of the project's ``block_sequence_ids`` (-1 causal, a run of one id >= 0 one bidirectional block)."""
    ranges: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(block_ids) + 1):
        if i == len(block_ids) or block_ids[i] != block_ids[start]:
            if block_ids[start] >= 0 and i - start > 1:
                ranges.append((start, i))
            start = i
    return tuple(ranges)


def chunk_tokens(ranges: Ranges, computed: int, scheduled: int) -> int:
    """How many of ``scheduled`` tokens after ``computed`` may run in one step without splitting a span.

    A chunk may end anywhere except strictly inside a span: a span's tokens attend to its last token, so
    they must all be in the cache or in the same step. Returns ``scheduled`` or less, possibly 0 (the request
    waits for a step with budget for the whole span).
    """
    end = computed + scheduled
    for start, stop in ranges:
        if start < end < stop:
            return max(start - computed, 0)
        if start >= end:
            break
    return scheduled


def kv_limit_for_chunk(ranges: Ranges, computed: int, length: int) -> torch.Tensor:
    """int32 ``kv_limit`` of the queries at positions ``computed .. computed + length - 1``."""
    limits = torch.arange(computed + 1, computed + length + 1, dtype=torch.int32)
    stop_at = computed + length
    for start, end in ranges:
        if end <= computed:
            continue
        if start >= stop_at:
            break
        limits[max(start, computed) - computed: min(end, stop_at) - computed] = end
    return limits


def block_hash_keys(ranges: Ranges, token_ids: Sequence[int], block_start: int, block_end: int) -> tuple | None:
    """What a prefix-cache block's hash must add for its keys/values to be reusable, or None (causal block).

    vLLM chains block hashes, so everything before ``block_start`` is already in the parent's hash. A block's
    keys/values also depend on the spans that overlap it and, through a span that runs past the block, on
    that span's later tokens: both go into the key (the later tokens as a digest).
    """
    keys: list[tuple] = []
    for start, end in ranges:
        if end <= block_start:
            continue
        if start >= block_end:
            break
        key: tuple = ("ism", start, end)
        if end > block_end:
            tail = array("q", token_ids[block_end:end]).tobytes()
            key += (hashlib.sha256(tail).hexdigest(),)
        keys.append(key)
    return tuple(keys) or None

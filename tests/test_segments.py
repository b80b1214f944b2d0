"""Tests of ``ism_ext.masks.kv_limit_from_segment_ids`` against a plain-Python reference."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ism_ext.masks import kv_limit_from_segment_ids

SIGNED_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64]


class Reused(Exception):
    """Raised by the reference when an id >= 0 starts a second run in the same sequence."""


def reference_one(ids: list[int]) -> list[int]:
    """Obviously-correct kv_limit of one sequence: scan each token's run token by token."""
    out = []
    for i, seg in enumerate(ids):
        if seg == -1:
            out.append(i + 1)
            continue
        end = i
        while end < len(ids) and ids[end] == seg:
            end += 1
        out.append(end)
    # Reuse: an id that shows up again after a token with a different id.
    for i, seg in enumerate(ids):
        if seg >= 0 and i > 0 and ids[i - 1] != seg and seg in ids[:i]:
            raise Reused(seg)
    return out


def reference_packed(seqs: list[list[int]]) -> list[int]:
    """Reference for packed sequences: each sequence on its own, concatenated."""
    out: list[int] = []
    for s in seqs:
        out.extend(reference_one(s))
    return out


def cu_from(seqs: list[list[int]], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """cu_seqlens for a list of sequences."""
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    return torch.tensor(cu, dtype=dtype)


def valid_sequence(rng: random.Random, length: int, causal_p: float = 0.4) -> list[int]:
    """Random sequence without reuse: every run gets a fresh id (ids shuffled so they are not sorted)."""
    ids: list[int] = []
    fresh = rng.sample(range(1000), 1000)
    while len(ids) < length:
        run = rng.randint(1, 8)
        if rng.random() < causal_p:
            ids.extend([-1] * run)
        else:
            ids.extend([fresh.pop()] * run)
    return ids[:length]


# --- strategies ---------------------------------------------------------------------------------------

# Small alphabet: lots of adjacent equal ids (runs), causal tokens, and reuse after a gap.
any_ids = st.lists(st.integers(min_value=-1, max_value=3), max_size=40)


@st.composite
def valid_ids(draw: st.DrawFn, max_runs: int = 10) -> list[int]:
    """Sequences built from runs with fresh ids, so they never reuse an id."""
    n_runs = draw(st.integers(0, max_runs))
    ids: list[int] = []
    next_id = draw(st.integers(0, 5))
    for _ in range(n_runs):
        length = draw(st.integers(1, 6))
        if draw(st.booleans()):
            ids.extend([-1] * length)
        else:
            ids.extend([next_id] * length)
            next_id += draw(st.integers(1, 3))
    return ids


# --- matches the reference ----------------------------------------------------------------------------


def test_hand_written_example() -> None:
    ids = torch.tensor([0, 0, 0, 1, 1, -1, -1, -1, 2, 2, -1, -1])
    expected = [3, 3, 3, 5, 5, 6, 7, 8, 10, 10, 11, 12]
    out = kv_limit_from_segment_ids(ids)
    assert out.tolist() == expected
    assert out.dtype == torch.int32
    assert out.shape == ids.shape


def test_all_causal_and_all_one_segment() -> None:
    assert kv_limit_from_segment_ids(torch.full((5,), -1)).tolist() == [1, 2, 3, 4, 5]
    assert kv_limit_from_segment_ids(torch.full((5,), 7)).tolist() == [5] * 5


def test_adjacent_different_ids_are_separate_segments() -> None:
    assert kv_limit_from_segment_ids(torch.tensor([4, 4, 2, 9, 9, 9])).tolist() == [2, 2, 3, 6, 6, 6]


@settings(max_examples=300, deadline=None, database=None)
@given(ids=any_ids, dtype=st.sampled_from(SIGNED_DTYPES))
def test_matches_reference_any_ids(ids: list[int], dtype: torch.dtype) -> None:
    t = torch.tensor(ids, dtype=dtype)
    try:
        expected = reference_one(ids)
    except Reused:
        with pytest.raises(ValueError, match="reused after a gap"):
            kv_limit_from_segment_ids(t)
        return
    out = kv_limit_from_segment_ids(t)
    assert out.dtype == torch.int32
    assert out.tolist() == expected


@settings(max_examples=200, deadline=None, database=None)
@given(ids=valid_ids())
def test_matches_reference_valid_ids(ids: list[int]) -> None:
    out = kv_limit_from_segment_ids(torch.tensor(ids, dtype=torch.int64))
    assert out.tolist() == reference_one(ids)


@settings(max_examples=200, deadline=None, database=None)
@given(
    seqs=st.lists(st.one_of(valid_ids(max_runs=4), any_ids), max_size=6),
    cu_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_matches_reference_packed(seqs: list[list[int]], cu_dtype: torch.dtype) -> None:
    flat = torch.tensor([x for s in seqs for x in s], dtype=torch.int64)
    cu = cu_from(seqs, cu_dtype)
    try:
        expected = reference_packed(seqs)
    except Reused:
        with pytest.raises(ValueError, match="reused after a gap"):
            kv_limit_from_segment_ids(flat, cu)
        return
    assert kv_limit_from_segment_ids(flat, cu).tolist() == expected


@settings(max_examples=150, deadline=None, database=None)
@given(
    batch=st.integers(1, 5),
    seqlen=st.integers(1, 20),
    data=st.data(),
)
def test_matches_reference_batched(batch: int, seqlen: int, data: st.DataObject) -> None:
    rows = [data.draw(st.lists(st.integers(-1, 3), min_size=seqlen, max_size=seqlen)) for _ in range(batch)]
    t = torch.tensor(rows, dtype=torch.int32)
    try:
        expected = [reference_one(r) for r in rows]
    except Reused:
        with pytest.raises(ValueError, match="reused after a gap"):
            kv_limit_from_segment_ids(t)
        return
    out = kv_limit_from_segment_ids(t)
    assert out.shape == (batch, seqlen)
    assert out.tolist() == expected


@pytest.mark.parametrize("seed", range(5))
def test_seeded_random_large_packed(seed: int) -> None:
    rng = random.Random(seed)
    # Many sequences, some empty, some length 1: exercises all boundary cases at once.
    seqs = [valid_sequence(rng, rng.choice([0, 0, 1, 2, rng.randint(3, 400)])) for _ in range(60)]
    flat = torch.tensor([x for s in seqs for x in s], dtype=torch.int64)
    out = kv_limit_from_segment_ids(flat, cu_from(seqs, torch.int64))
    assert out.tolist() == reference_packed(seqs)


@pytest.mark.parametrize("seed", range(3))
def test_seeded_random_batched_same_as_packed(seed: int) -> None:
    rng = random.Random(100 + seed)
    rows = [valid_sequence(rng, 128) for _ in range(7)]
    t = torch.tensor(rows, dtype=torch.int16)
    batched = kv_limit_from_segment_ids(t)
    packed = kv_limit_from_segment_ids(t.reshape(-1), cu_from(rows))
    assert batched.tolist() == [reference_one(r) for r in rows]
    assert torch.equal(batched.reshape(-1), packed)


# --- sequence boundaries ------------------------------------------------------------------------------


def test_runs_do_not_cross_sequence_boundaries() -> None:
    ids = torch.tensor([0, 0, 0, 0, 0])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    # Same id in consecutive sequences is two runs, and positions restart at each sequence.
    assert kv_limit_from_segment_ids(ids, cu).tolist() == [2, 2, 3, 3, 3]


def test_positions_are_local_to_each_sequence() -> None:
    ids = torch.tensor([-1, -1, 5, 5, -1])
    cu = torch.tensor([0, 2, 5])
    assert kv_limit_from_segment_ids(ids, cu).tolist() == [1, 2, 2, 2, 3]


def test_same_id_in_different_sequences_is_not_reuse() -> None:
    ids = torch.tensor([[1, 1, -1, 2], [2, -1, 1, 1]])
    assert kv_limit_from_segment_ids(ids).tolist() == [[2, 2, 3, 4], [1, 2, 4, 4]]


def test_empty_sequences_at_both_ends() -> None:
    ids = torch.tensor([3, 3, -1])
    cu = torch.tensor([0, 0, 3, 3, 3])
    assert kv_limit_from_segment_ids(ids, cu).tolist() == [2, 2, 3]


# --- dtypes, shapes, empties --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", SIGNED_DTYPES + [torch.uint8])
def test_integer_dtypes(dtype: torch.dtype) -> None:
    if dtype == torch.uint8:
        # Unsigned ids cannot express -1: every token is in a segment.
        ids, expected = torch.tensor([1, 1, 200, 0], dtype=dtype), [2, 2, 3, 4]
    else:
        ids, expected = torch.tensor([1, 1, -1, 0], dtype=dtype), [2, 2, 3, 4]
    out = kv_limit_from_segment_ids(ids)
    assert out.dtype == torch.int32
    assert out.tolist() == expected


def test_large_ids_do_not_collide() -> None:
    big = 2**62
    ids = torch.tensor([big, big, big + 1, -1, 0], dtype=torch.int64)
    assert kv_limit_from_segment_ids(ids).tolist() == [2, 2, 3, 4, 5]


def test_input_not_modified() -> None:
    ids = torch.tensor([0, 0, -1, 1])
    before = ids.clone()
    kv_limit_from_segment_ids(ids)
    assert torch.equal(ids, before)


def test_non_contiguous_batched_input() -> None:
    base = torch.tensor([[0, -1], [0, 1], [-1, 1]])
    t = base.t()  # [[0, 0, -1], [-1, 1, 1]], not contiguous
    assert not t.is_contiguous()
    assert kv_limit_from_segment_ids(t).tolist() == [[2, 2, 3], [1, 3, 3]]


@pytest.mark.parametrize(
    ("ids", "cu"),
    [
        (torch.zeros(0, dtype=torch.int64), None),
        (torch.zeros(0, dtype=torch.int32), torch.tensor([0], dtype=torch.int32)),
        (torch.zeros(0, dtype=torch.int32), torch.tensor([0, 0, 0], dtype=torch.int64)),
        (torch.zeros((0, 4), dtype=torch.int64), None),
        (torch.zeros((3, 0), dtype=torch.int64), None),
    ],
)
def test_empty_inputs(ids: torch.Tensor, cu: torch.Tensor | None) -> None:
    out = kv_limit_from_segment_ids(ids, cu)
    assert out.shape == ids.shape
    assert out.dtype == torch.int32
    assert out.numel() == 0


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "reused"),
    [([0, 1, 0], 0), ([-1, 2, 2, -1, 2], 2), ([5, 5, 3, 3, 5], 5), ([1, 0, -1, 0], 0)],
)
def test_reuse_after_gap_raises(ids: list[int], reused: int) -> None:
    with pytest.raises(ValueError, match=rf"segment id {reused} is reused after a gap"):
        kv_limit_from_segment_ids(torch.tensor(ids))


def test_reuse_within_one_packed_sequence_raises_and_names_it() -> None:
    ids = torch.tensor([0, 0, 1, -1, 1])
    cu = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match=r"segment id 1 is reused after a gap in sequence 1"):
        kv_limit_from_segment_ids(ids, cu)


def test_reuse_in_batched_row_raises() -> None:
    with pytest.raises(ValueError, match=r"segment id 3 is reused after a gap in sequence 1"):
        kv_limit_from_segment_ids(torch.tensor([[3, 3, -1], [3, -1, 3]]))


@pytest.mark.parametrize("bad", [-2, -100])
def test_ids_below_minus_one_raise(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"got {bad}"):
        kv_limit_from_segment_ids(torch.tensor([0, bad, -1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bool])
def test_non_integer_dtype_raises(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="integer dtype"):
        kv_limit_from_segment_ids(torch.zeros(3, dtype=dtype))


def test_non_tensor_raises() -> None:
    with pytest.raises(TypeError):
        kv_limit_from_segment_ids([0, 0, -1])  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(), (2, 2, 2)])
def test_wrong_rank_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="1-D"):
        kv_limit_from_segment_ids(torch.zeros(shape, dtype=torch.int64))


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        (torch.tensor([0.0, 2.0, 4.0]), "int32 or int64"),
        (torch.tensor([0, 2, 4], dtype=torch.int16), "int32 or int64"),
        (torch.tensor([[0, 2, 4]]), "1-D"),
        (torch.zeros(0, dtype=torch.int32), "at least one"),
        (torch.tensor([1, 2, 4]), "start at 0"),
        (torch.tensor([0, 3, 2, 4]), "non-decreasing"),
        (torch.tensor([0, 2, 3]), "end at"),
        (torch.tensor([0, 2, 5]), "end at"),
        ([0, 2, 4], "torch.Tensor"),
    ],
)
def test_bad_cu_seqlens_raise(cu: object, match: str) -> None:
    with pytest.raises(ValueError, match="cu_seqlens") as info:
        kv_limit_from_segment_ids(torch.zeros(4, dtype=torch.int64), cu)  # type: ignore[arg-type]
    assert match in str(info.value)


def test_cu_seqlens_with_batched_ids_raises() -> None:
    with pytest.raises(ValueError, match="cu_seqlens"):
        kv_limit_from_segment_ids(torch.zeros((2, 2), dtype=torch.int64), torch.tensor([0, 2, 4]))


def test_bad_cu_seqlens_checked_even_for_empty_input() -> None:
    with pytest.raises(ValueError, match="cu_seqlens"):
        kv_limit_from_segment_ids(torch.zeros(0, dtype=torch.int64), torch.tensor([0, 1]))


# --- devices ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    rng = random.Random(7)
    seqs = [valid_sequence(rng, rng.randint(0, 300)) for _ in range(40)]
    flat = torch.tensor([x for s in seqs for x in s], dtype=torch.int64)
    cu = cu_from(seqs)
    out = kv_limit_from_segment_ids(flat.cuda(), cu.cuda())
    assert out.device.type == "cuda"
    assert out.cpu().tolist() == reference_packed(seqs)
    with pytest.raises(ValueError, match="reused after a gap"):
        kv_limit_from_segment_ids(torch.tensor([0, 1, 0], device="cuda"))

"""`attn_with_kvcache` (the op) against the float64 reference, and `KVCache` against recomputation.

The op tests check outputs, log-sum-exp and the cache bytes after every call (new rows written
exactly, nothing else touched); rejected calls must leave the cache byte-identical. The KVCache
tests run multi-round dialogues (bidirectional user segments, causal answers) and compare every
step with `segment_attention` over the whole history so far.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import threading

import pytest
import torch
from reference import assert_close_scaled, reference_attention

import ism_ext
from ism_ext.cache import KVCache
from ism_ext.masks import kv_limit_causal_append, kv_limit_new_segment
from ism_ext.ops import attn_with_kvcache
from ism_ext.ops.kvcache_composite import attn_with_kvcache_composite


def _composite(q, k_cache, v_cache, k_new=None, v_new=None, *, cache_seqlens, kv_limit=None, cache_batch_idx=None,
               block_table=None, softmax_scale=None, return_lse=False):
    """`attn_with_kvcache`'s wrapper, running the composite implementation (the CUDA path) on the CPU."""
    kv_limit = kv_limit_causal_append(cache_seqlens, q.shape[1]) if kv_limit is None else kv_limit
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = attn_with_kvcache_composite(q, k_cache, v_cache, k_new, v_new, cache_seqlens, kv_limit,
                                           cache_batch_idx, block_table, scale)
    return (out, lse) if return_lse else out


@pytest.fixture(params=["op", "composite"])
def impl(request, monkeypatch):
    """Runs an op test on the CPU kernel and on the composite path (what CUDA runs until its kernel lands)."""
    if request.param == "composite":
        monkeypatch.setattr(sys.modules[__name__], "attn_with_kvcache", _composite)
    return request.param


# Forward atol relative to the reference's magnitude, as in test_segment_attention.py.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
I32 = torch.int32


def _reference(q, keys, values, kv_limit, scale):
    """float64 reference of the op: q [B, Lq, Hq, D], keys/values lists of [len_b, Hkv, D] -> out, lse [B, Hq, Lq]."""
    b, lq, hq, d = q.shape
    cu_q = torch.arange(b + 1, dtype=I32) * lq
    cu_k = torch.tensor([0] + [int(x) for x in torch.tensor([k.shape[0] for k in keys]).cumsum(0)], dtype=I32)
    out, lse = reference_attention(q.reshape(b * lq, hq, d), torch.cat(keys), torch.cat(values),
                                   kv_limit.reshape(-1), cu_q, cu_k, scale)
    return out.reshape(b, lq, hq, d), lse.reshape(hq, b, lq).permute(1, 0, 2)


def _check_against_reference(out, lse, ref_out, ref_lse, dtype):
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == ref_lse.shape
    assert_close_scaled(out, ref_out, tol, "out")
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly on the empty rows"
    assert_close_scaled(lse[~empty], ref_lse[~empty], tol, "lse")
    assert torch.all(out[empty.permute(0, 2, 1)] == 0), "rows that see nothing must output 0"


def _limits(kind: str, lens: list[int], lq: int, rng: random.Random) -> torch.Tensor:
    seqlens = torch.tensor(lens, dtype=I32)
    if kind == "segment":
        return kv_limit_new_segment(seqlens, lq)
    if kind == "causal":
        return kv_limit_causal_append(seqlens, lq)
    # random in range, with empty and full rows among them
    return torch.tensor([[rng.choice([0, n + lq, rng.randint(0, n + lq)]) for _ in range(lq)] for n in lens],
                        dtype=I32)


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


# ---------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("kind", ["segment", "causal", "random"])
@pytest.mark.parametrize("lq", [1, 37])
@pytest.mark.usefixtures("impl")
def test_op_contiguous_with_cache_batch_idx(lq, kind, group, head_dim, dtype):
    rng = random.Random(f"{lq}{kind}{group}{head_dim}{dtype}")
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    s_max, hkv, b, rows = 80, 2, 4, 6
    # Random lengths per sequence, including an empty cache and one that the append fills exactly.
    lens = [0, s_max - lq, rng.randint(0, s_max - lq), rng.randint(0, s_max - lq)]
    idx = rng.sample(range(rows), b)  # a permutation using only some rows
    q = _randn(gen, b, lq, hkv * group, head_dim, dtype=dtype)
    k_new, v_new = (_randn(gen, b, lq, hkv, head_dim, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (_randn(gen, rows, s_max, hkv, head_dim, dtype=dtype) for _ in range(2))
    kv_limit = _limits(kind, lens, lq, rng)
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    for i, (row, n) in enumerate(zip(idx, lens, strict=True)):
        exp_k[row, n:n + lq] = k_new[i]
        exp_v[row, n:n + lq] = v_new[i]

    out, lse = attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(lens, dtype=I32),
                                 kv_limit=kv_limit, cache_batch_idx=torch.tensor(idx, dtype=I32), return_lse=True)

    # New rows written exactly, every other byte (including the unused rows) untouched.
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    keys = [exp_k[row, :n + lq] for row, n in zip(idx, lens, strict=True)]
    values = [exp_v[row, :n + lq] for row, n in zip(idx, lens, strict=True)]
    ref_out, ref_lse = _reference(q, keys, values, kv_limit, head_dim**-0.5)
    _check_against_reference(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("rows", [3, 5])
@pytest.mark.usefixtures("impl")
def test_op_contiguous_without_cache_batch_idx(rows):
    # Sequence b uses cache row b; extra rows stay untouched. Default kv_limit is causal.
    gen = torch.Generator().manual_seed(rows)
    b, lq, s_max, hkv, d = 3, 6, 40, 2, 64
    lens = [0, 17, s_max - lq]
    q = _randn(gen, b, lq, 4, d)
    k_new, v_new = (_randn(gen, b, lq, hkv, d) for _ in range(2))
    k_cache, v_cache = (_randn(gen, rows, s_max, hkv, d) for _ in range(2))
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    for i, n in enumerate(lens):
        exp_k[i, n:n + lq], exp_v[i, n:n + lq] = k_new[i], v_new[i]
    seqlens = torch.tensor(lens, dtype=I32)
    out, lse = attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, softmax_scale=0.2,
                                 return_lse=True)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    assert torch.equal(seqlens, torch.tensor(lens, dtype=I32)), "cache_seqlens must not be modified"
    ref_out, ref_lse = _reference(q, [exp_k[i, :n + lq] for i, n in enumerate(lens)],
                                  [exp_v[i, :n + lq] for i, n in enumerate(lens)],
                                  kv_limit_causal_append(seqlens, lq), 0.2)
    _check_against_reference(out, lse, ref_out, ref_lse, torch.float32)


def _paged_copy(k_cache, v_cache, page_size, extra_pages, gen):
    """The same content as a contiguous cache, in pages at a random permutation (plus random spare pages)."""
    b, s_max, hkv, d = k_cache.shape
    max_pages = s_max // page_size
    num_pages = b * max_pages + extra_pages
    perm = torch.randperm(num_pages, generator=gen)
    table = perm[: b * max_pages].reshape(b, max_pages).to(I32)
    kp = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(k_cache.dtype)
    vp = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(k_cache.dtype)
    kp[table.long()] = k_cache.reshape(b, max_pages, page_size, hkv, d)
    vp[table.long()] = v_cache.reshape(b, max_pages, page_size, hkv, d)
    return kp, vp, table


def _unpage(pages, table):
    b, max_pages = table.shape
    return pages[table.long()].reshape(b, max_pages * pages.shape[1], *pages.shape[2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["segment", "random"])
@pytest.mark.parametrize("lq", [1, 20])
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.usefixtures("impl")
def test_op_paged_identical_to_contiguous(page_size, lq, kind, dtype):
    rng = random.Random(f"paged{page_size}{lq}{kind}")
    gen = torch.Generator().manual_seed(page_size + lq)
    b, s_max, hkv, hq, d = 3, 96, 2, 4, 64
    lens = [0, s_max - lq, rng.randint(1, s_max - lq)]
    q = _randn(gen, b, lq, hq, d, dtype=dtype)
    k_new, v_new = (_randn(gen, b, lq, hkv, d, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (_randn(gen, b, s_max, hkv, d, dtype=dtype) for _ in range(2))
    kp, vp, table = _paged_copy(k_cache, v_cache, page_size, 3, gen)
    spare = sorted(set(range(kp.shape[0])) - set(table.flatten().tolist()))
    spare_k, spare_v = kp[spare].clone(), vp[spare].clone()
    kv_limit = _limits(kind, lens, lq, rng)
    seqlens = torch.tensor(lens, dtype=I32)

    out_c, lse_c = attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, kv_limit=kv_limit,
                                     return_lse=True)
    out_p, lse_p = attn_with_kvcache(q, kp, vp, k_new, v_new, cache_seqlens=seqlens, kv_limit=kv_limit,
                                     block_table=table, return_lse=True)
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c), "paged must give the contiguous result exactly"
    assert torch.equal(_unpage(kp, table), k_cache) and torch.equal(_unpage(vp, table), v_cache)
    assert torch.equal(kp[spare], spare_k) and torch.equal(vp[spare], spare_v), "pages outside the table touched"
    ref_out, ref_lse = _reference(q, [k_cache[i, :n + lq] for i, n in enumerate(lens)],
                                  [v_cache[i, :n + lq] for i, n in enumerate(lens)], kv_limit, d**-0.5)
    _check_against_reference(out_p, lse_p, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.usefixtures("impl")
def test_op_attend_without_new_tokens(paged):
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    b, lq, s_max, hkv, d = 3, 9, 64, 1, 32
    lens = [0, 20, s_max]
    q = _randn(gen, b, lq, 4, d)
    k_cache, v_cache = (_randn(gen, b, s_max, hkv, d) for _ in range(2))
    kv_limit = torch.tensor([[rng.randint(0, n) for _ in range(lq)] for n in lens], dtype=I32)
    kv_limit[1, 0], kv_limit[1, 1] = 0, 20
    extra = {}
    if paged:
        k_cache, v_cache, table = _paged_copy(k_cache, v_cache, 16, 2, gen)
        extra["block_table"] = table
    before = k_cache.clone(), v_cache.clone()
    out, lse = attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lens, dtype=I32),
                                 kv_limit=kv_limit, return_lse=True, **extra)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    kc = _unpage(k_cache, table) if paged else k_cache
    vc = _unpage(v_cache, table) if paged else v_cache
    ref_out, ref_lse = _reference(q, [kc[i, :n] for i, n in enumerate(lens)], [vc[i, :n] for i, n in enumerate(lens)],
                                  kv_limit, d**-0.5)
    _check_against_reference(out, lse, ref_out, ref_lse, torch.float32)


# ---------------------------------------------------------------------------------- op: rejected calls


def _assert_rejected(call, tensors, exc, match):
    """The call raises `exc` matching `match`, and every tensor in `tensors` is byte-identical afterwards."""
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        call()
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b), "a rejected call wrote into the cache"


def _contiguous_call(**overrides):
    gen = torch.Generator().manual_seed(0)
    b, lq, hkv, d = 2, 4, 2, 32
    args = dict(q=_randn(gen, b, lq, 4, d), k_cache=_randn(gen, 3, 32, hkv, d), v_cache=_randn(gen, 3, 32, hkv, d),
                k_new=_randn(gen, b, lq, hkv, d), v_new=_randn(gen, b, lq, hkv, d),
                cache_seqlens=torch.tensor([5, 10], dtype=I32), kv_limit=None, cache_batch_idx=None)
    args.update(overrides)
    if args["kv_limit"] is None and isinstance(args["cache_seqlens"], torch.Tensor) and \
            args["cache_seqlens"].dtype == I32:
        args["kv_limit"] = kv_limit_causal_append(args["cache_seqlens"], args["q"].shape[1])
    caches = [args["k_cache"], args["v_cache"]]

    def call():
        a = dict(args)
        return attn_with_kvcache(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("k_new"), a.pop("v_new"), **a)

    return call, caches


@pytest.mark.usefixtures("impl")
def test_op_contiguous_call_is_valid_as_built():
    call, _ = _contiguous_call()
    assert call().shape == (2, 4, 4, 32)


@pytest.mark.parametrize("overrides, exc, match", [
    # Sequence 0 would be written first; sequence 1 fails: nothing at all may be written.
    (dict(cache_seqlens=torch.tensor([5, 29], dtype=I32)), ValueError, "capacity"),
    (dict(cache_seqlens=torch.tensor([5, -1], dtype=I32)), ValueError, "negative"),
    (dict(kv_limit=torch.tensor([[1, 2, 3, 4], [1, 2, 3, 15]], dtype=I32)), ValueError, r"kv_limit\[1, 3\]"),
    (dict(kv_limit=torch.tensor([[1, 2, 3, 4], [-1, 2, 3, 4]], dtype=I32)), ValueError, "kv_limit"),
    (dict(cache_batch_idx=torch.tensor([1, 1], dtype=I32)), ValueError, "cache row 1 would be written for two"),
    (dict(cache_batch_idx=torch.tensor([0, 3], dtype=I32)), ValueError, "cache_batch_idx"),
    (dict(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int64)), TypeError, "cache_batch_idx must be int32"),
    (dict(cache_seqlens=torch.tensor([5, 10])), TypeError, "cache_seqlens must be int32"),
    (dict(kv_limit=torch.ones(2, 4, dtype=torch.int64)), TypeError, "kv_limit must be int32"),
    (dict(kv_limit=torch.ones(2, 3, dtype=I32)), ValueError, "kv_limit must have shape"),
    (dict(k_new=torch.zeros(2, 4, 2, 32, dtype=torch.float64)), TypeError, "k_new has dtype"),
    (dict(v_new=torch.zeros(2, 4, 2, 32, dtype=torch.bfloat16)), TypeError, "v_new has dtype"),
    (dict(k_new=torch.zeros(2, 5, 2, 32)), ValueError, "k_new must have shape"),
    (dict(v_new=torch.zeros(2, 4, 1, 32)), ValueError, "v_new must have shape"),
    (dict(v_new=None), ValueError, "both k_new and v_new"),
    (dict(q=torch.zeros(2, 4, 3, 32)), ValueError, "multiple"),
    (dict(q=torch.zeros(2, 4, 4, 16)), ValueError, "head_dim"),
    (dict(q=torch.zeros(2, 4, 4, 32, dtype=torch.bfloat16)), TypeError, "dtype"),
    (dict(q=torch.zeros(4, 4, 4, 32), cache_seqlens=torch.zeros(4, dtype=I32)), ValueError, "k_new must have shape"),
    # Finite as a double, inf as the float32 the kernel uses.
    (dict(softmax_scale=1e39), ValueError, "softmax_scale must be finite as a float32"),
])
@pytest.mark.usefixtures("impl")
def test_op_rejects_before_writing(overrides, exc, match):
    call, caches = _contiguous_call(**overrides)
    _assert_rejected(call, caches, exc, match)


def _paged_call(table, lens, page_size=16, num_pages=6, lq=4, **overrides):
    gen = torch.Generator().manual_seed(1)
    b, hkv, d = len(lens), 2, 32
    args = dict(q=_randn(gen, b, lq, 2, d), k_cache=_randn(gen, num_pages, page_size, hkv, d),
                v_cache=_randn(gen, num_pages, page_size, hkv, d), k_new=_randn(gen, b, lq, hkv, d),
                v_new=_randn(gen, b, lq, hkv, d), cache_seqlens=torch.tensor(lens, dtype=I32),
                block_table=torch.tensor(table, dtype=I32))
    args["kv_limit"] = kv_limit_causal_append(args["cache_seqlens"], lq)
    args.update(overrides)
    caches = [args["k_cache"], args["v_cache"]]

    def call():
        a = dict(args)
        return attn_with_kvcache(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("k_new"), a.pop("v_new"), **a)

    return call, caches


@pytest.mark.usefixtures("impl")
def test_op_paged_valid_call_and_shared_reads():
    # Two sequences may share a page they both only read (a forked prefix) while writing their own pages.
    call, caches = _paged_call([[0, 1], [0, 2]], [16, 16])
    call()
    call, caches = _paged_call([[0, 1], [0, 2]], [20, 18])
    call()


@pytest.mark.parametrize("table, lens, kwargs, exc, match", [
    # Both sequences write page 0.
    ([[0, 1], [0, 2]], [5, 3], {}, ValueError, "page 0 would be written twice in one call"),
    # Sequence 0 writes page 0, which sequence 1 reads as its shared prefix: copy-on-write was needed.
    ([[0, 1], [0, 2]], [5, 20], {}, ValueError, "copy-on-write"),
    # One page at two slots of a row: the new tokens (slot 1) would overwrite the history (slot 0).
    ([[3, 3, 5]], [16], {}, ValueError, r"page 3 appears twice in block_table row 0 \(slots 0 and 1\)"),
    # The same when the repeated page is only read, and in the second row of the call.
    ([[0, 1], [2, 2]], [5, 20], dict(lq=0), ValueError, "page 2 appears twice in block_table row 1"),
    ([[4, 1, 4], [2, 3, 5]], [40, 5], {}, ValueError, "page 4 appears twice in block_table row 0"),
    ([[0, 1], [2, 3]], [5, 30], {}, ValueError, "capacity"),
    ([[0, 1], [2, 9]], [5, 20], {}, ValueError, r"block_table\[1, 1\] = 9"),
    ([[0, 1], [2, -1]], [5, 20], {}, ValueError, r"block_table\[1, 1\] = -1"),
    ([[0, 1], [2, 3]], [5, 20], dict(page_size=24), ValueError, "multiple of 16"),
    ([[0, 1], [2, 3]], [5, 20], dict(cache_batch_idx=torch.tensor([0, 1], dtype=I32)), ValueError,
     "cache_batch_idx is for contiguous"),
    ([[0, 1], [2, 3]], [5, 20], dict(block_table=torch.tensor([[0, 1], [2, 3]])), TypeError, "block_table"),
    ([[0, 1], [2, 3]], [5, 20], dict(block_table=torch.tensor([[0, 1]], dtype=I32)), ValueError, "block_table"),
])
@pytest.mark.usefixtures("impl")
def test_op_paged_rejects_before_writing(table, lens, kwargs, exc, match):
    call, caches = _paged_call(table, lens, **kwargs)
    _assert_rejected(call, caches, exc, match)


def test_op_head_dim_zero_names_head_dim():
    # The default scale D ** -0.5 must not divide by zero before the op's own check speaks.
    q, cache = torch.zeros(1, 1, 2, 0), torch.zeros(1, 16, 2, 0)
    with pytest.raises(ValueError, match=r"head_dim must be in \[1, 256\], got 0"):
        attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=torch.zeros(1, dtype=I32))


def test_op_sizes_are_checked_before_their_int_casts():
    # A page size of 2^32 (a multiple of 16) became 0 as an int: the paged cache was taken for a contiguous one.
    # Zero-stride views: no memory behind the huge sizes, and nothing is written (the call is rejected).
    d = 16
    q = torch.zeros(1, 1, 2, d)
    cache = torch.zeros(1, 1, 2, d).expand(1, 2**32, 2, d)
    lens, table = torch.zeros(1, dtype=I32), torch.zeros(1, 1, dtype=I32)
    with pytest.raises(ValueError, match=r"k_cache.size\(1\) \(positions per row, or the page size\)"):
        attn_with_kvcache(q, cache, cache, cache_seqlens=lens, kv_limit=torch.zeros(1, 1, dtype=I32), block_table=table)
    with pytest.raises(ValueError, match="seqlen_q and heads must each be below 2"):
        attn_with_kvcache(torch.zeros(1, 1, 1, d).expand(1, 2**31, 2, d), cache[:, :16], cache[:, :16],
                          cache_seqlens=lens, kv_limit=torch.zeros(1, 1, dtype=I32))


# ------------------------------------------------------------------------------------------- KVCache

HKV, HQ, D = 2, 4, 32


def _make_cache(paged: bool, *, num_layers=2, batch=2, capacity=256, num_pages=None):
    return KVCache(num_layers, batch, HKV, D, capacity=capacity, page_size=16 if paged else None, num_pages=num_pages)


class History:
    """Everything fed to a cache, kept to recompute each step with `segment_attention` over all tokens so far."""

    def __init__(self, num_layers: int, batch: int):
        self.k = [[torch.zeros(0, HKV, D) for _ in range(batch)] for _ in range(num_layers)]
        self.v = [[torch.zeros(0, HKV, D) for _ in range(batch)] for _ in range(num_layers)]
        self.ids: list[list[int]] = [[] for _ in range(batch)]

    def clone_seq(self, src: int, dst: int) -> None:
        for layer in range(len(self.k)):
            self.k[layer][dst], self.v[layer][dst] = self.k[layer][src], self.v[layer][src]
        self.ids[dst] = list(self.ids[src])

    def truncate(self, seq: int, length: int) -> None:
        for layer in range(len(self.k)):
            self.k[layer][seq], self.v[layer][seq] = self.k[layer][seq][:length], self.v[layer][seq][:length]
        self.ids[seq] = self.ids[seq][:length]

    def recompute(self, layer: int, seqs: list[int], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """segment_attention for the last Lq tokens of each sequence over all its tokens; out [B', Lq, Hq, D]."""
        b, lq = q.shape[:2]
        lens = [len(self.ids[s]) for s in seqs]
        cu_k = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(b)], dtype=I32)
        cu_q = torch.arange(b + 1, dtype=I32) * lq
        ids = torch.tensor([i for s in seqs for i in self.ids[s]], dtype=torch.int64)
        lim_all = ism_ext.kv_limit_from_segment_ids(ids, cu_k)
        lim = torch.cat([lim_all[int(cu_k[i + 1]) - lq:int(cu_k[i + 1])] for i in range(b)])
        out, lse = ism_ext.segment_attention(
            q.reshape(b * lq, HQ, D), torch.cat([self.k[layer][s] for s in seqs]),
            torch.cat([self.v[layer][s] for s in seqs]), lim, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
        return out.reshape(b, lq, HQ, D), lse.reshape(HQ, b, lq).permute(1, 0, 2)


class Step:
    """One forward step: new tokens for some sequences, with the q/k/v of every layer (replayable)."""

    def __init__(self, seqs: list[int], lq: int, segment: bool, seg_id: int, num_layers: int, gen):
        self.seqs, self.lq, self.segment, self.seg_id = seqs, lq, segment, seg_id
        b = len(seqs)
        self.qkv = [(torch.randn(b, lq, HQ, D, generator=gen), torch.randn(b, lq, HKV, D, generator=gen),
                     torch.randn(b, lq, HKV, D, generator=gen)) for _ in range(num_layers)]


def _feed(cache: KVCache, hist: History | None, step: Step) -> list[torch.Tensor]:
    """Runs one step through every layer; with a history, checks each output against recomputation."""
    if hist is not None:
        for s in step.seqs:
            hist.ids[s] += [step.seg_id if step.segment else -1] * step.lq
    outs = []
    for layer, (q, k, v) in enumerate(step.qkv):
        out, lse = cache.append_and_attend(layer, q, k, v, segment=step.segment, seq_ids=step.seqs, return_lse=True)
        outs.append(out)
        if hist is None:
            continue
        for i, s in enumerate(step.seqs):
            hist.k[layer][s] = torch.cat([hist.k[layer][s], k[i]])
            hist.v[layer][s] = torch.cat([hist.v[layer][s], v[i]])
        ref_out, ref_lse = hist.recompute(layer, step.seqs, q)
        assert_close_scaled(out, ref_out, TOL[torch.float32], f"layer {layer} out")
        assert_close_scaled(lse, ref_lse, TOL[torch.float32], f"layer {layer} lse")
        assert cache.lengths(layer) == [len(ids) for ids in hist.ids]
    return outs


def _check_state(cache: KVCache, hist: History) -> None:
    """Lengths, cached keys/values and page accounting agree with the history."""
    lens = [len(ids) for ids in hist.ids]
    assert torch.equal(cache.seqlens, torch.tensor(lens, dtype=I32))
    for layer in range(cache.num_layers):
        assert cache.lengths(layer) == lens
        for s in range(cache.batch_size):
            k, v = cache.get_kv(layer, s)
            assert torch.equal(k, hist.k[layer][s]) and torch.equal(v, hist.v[layer][s])
    if cache.is_paged:
        table = cache.block_table.tolist()
        for s, n in enumerate(lens):
            used = math.ceil(n / cache.page_size)
            assert all(p >= 0 for p in table[s][:used]) and all(p == -1 for p in table[s][used:])
        distinct = {p for row in table for p in row if p >= 0}
        assert cache.num_free_pages == cache.num_pages - len(distinct)
        for p in distinct:
            assert cache.page_refcount(p) == sum(row.count(p) for row in table)


def _round(cache, hist, gen, rng, r, seqs=(0, 1), max_user=30):
    """One round: a bidirectional user segment per sequence (its own length), then 3..6 causal answer tokens."""
    for s in seqs:
        _feed(cache, hist, Step([s], rng.randint(1, max_user), True, r, cache.num_layers, gen))
    answer = {s: rng.randint(3, 6) for s in seqs}
    for t in range(max(answer.values())):
        _feed(cache, hist, Step([s for s in seqs if t < answer[s]], 1, False, -1, cache.num_layers, gen))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kvcache_multi_round_matches_recompute(paged):
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    cache, hist = _make_cache(paged), History(2, 2)
    expected_bounds: list[set[int]] = [{0}, {0}]
    for r in range(4):
        starts = [len(ids) for ids in hist.ids]
        _round(cache, hist, gen, rng, r)
        for s in range(2):
            # user segment end, then every answer position
            user_end = starts[s] + hist.ids[s][starts[s]:].count(r)
            expected_bounds[s] |= {user_end} | set(range(user_end + 1, len(hist.ids[s]) + 1))
        _check_state(cache, hist)
    assert [cache.boundaries(s) for s in range(2)] == [sorted(b) for b in expected_bounds]
    assert len(hist.ids[0]) != len(hist.ids[1])


@pytest.mark.parametrize("where", ["round_end", "mid_answer", "user_end", "zero"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kvcache_truncate_then_continue_equals_fresh_cache(paged, where):
    gen = torch.Generator().manual_seed(2)
    # Sequence 0: user 21, answer 4, user 25, answer 3. Sequence 1 gets its own round in between.
    steps = [Step([0], 21, True, 0, 2, gen)] + [Step([0], 1, False, -1, 2, gen) for _ in range(4)]
    steps += [Step([1], 30, True, 0, 2, gen), Step([0, 1], 1, False, -1, 2, gen)]
    steps += [Step([0], 25, True, 1, 2, gen)] + [Step([0], 1, False, -1, 2, gen) for _ in range(3)]
    keep_steps = {"round_end": 5, "mid_answer": 3, "user_end": 8, "zero": 0}[where]
    kept = [st for st in steps[:keep_steps] if 0 in st.seqs]
    length = sum(st.lq for st in kept)
    # Continue: a new user segment and 3 answer tokens for sequence 0.
    cont = [Step([0], 17, True, 5, 2, gen)] + [Step([0], 1, False, -1, 2, gen) for _ in range(3)]

    cache = _make_cache(paged)
    for st in steps:
        _feed(cache, None, st)
    cache.truncate(0, length)
    assert cache.lengths(0)[0] == cache.lengths(1)[0] == length
    assert cache.boundaries(0)[-1] == length
    if paged:
        table = cache.block_table.tolist()
        assert table[0][math.ceil(length / 16):] == [-1] * (len(table[0]) - math.ceil(length / 16))
        assert cache.num_free_pages == cache.num_pages - math.ceil(length / 16) - math.ceil(31 / 16)

    fresh, hist = _make_cache(paged), History(2, 2)
    for st in kept:
        # Replay only sequence 0's part of the kept steps (a step for [0, 1] has sequence 0 in row 0).
        row = st.seqs.index(0)
        one = Step([0], st.lq, st.segment, st.seg_id, 0, gen)
        one.qkv = [tuple(t[row:row + 1] for t in qkv) for qkv in st.qkv]
        _feed(fresh, hist, one)
    for st in cont:
        a = _feed(cache, None, st)
        b = _feed(fresh, hist, st)  # also checked against recomputation
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), "truncate + continue must equal a fresh cache fed the same history"
    for layer in range(2):
        assert all(torch.equal(x, y) for x, y in zip(cache.get_kv(layer, 0), fresh.get_kv(layer, 0), strict=True))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kvcache_truncate_inside_segment_raises(paged):
    gen = torch.Generator().manual_seed(3)
    cache = _make_cache(paged)
    _feed(cache, None, Step([0], 20, True, 0, 2, gen))
    _feed(cache, None, Step([0], 1, False, -1, 2, gen))
    _feed(cache, None, Step([0], 1, False, -1, 2, gen))
    assert cache.boundaries(0) == [0, 20, 21, 22]
    before = (cache.lengths(0), cache.lengths(1), cache.boundaries(0),
              cache.block_table.clone() if paged else None, cache.num_free_pages if paged else None)
    with pytest.raises(ValueError, match=r"inside the bidirectional segment \[0, 20\).*cannot be cut"):
        cache.truncate(0, 10)
    with pytest.raises(ValueError, match="length must be in"):
        cache.truncate(0, 23)
    after = (cache.lengths(0), cache.lengths(1), cache.boundaries(0),
             cache.block_table.clone() if paged else None, cache.num_free_pages if paged else None)
    assert before[:3] == after[:3] and (not paged or (torch.equal(before[3], after[3]) and before[4] == after[4]))
    # An explicit kv_limit records only the end (the cache cannot see its shape), so its inside is refused too.
    q, k, v = torch.randn(1, 5, HQ, D), torch.randn(1, 5, HKV, D), torch.randn(1, 5, HKV, D)
    lim = kv_limit_causal_append(torch.tensor([22], dtype=I32), 5)
    cache.append_and_attend(0, q, k, v, kv_limit=lim, seq_ids=[0])
    assert cache.boundaries(0) == [0, 20, 21, 22, 27]
    cache.truncate(0, 20)  # a boundary: fine, even with layer 1 behind (22) and layer 0 at 27
    assert cache.lengths(0)[0] == cache.lengths(1)[0] == 20 and cache.boundaries(0) == [0, 20]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kvcache_fork_copy_on_write(paged):
    gen = torch.Generator().manual_seed(4)
    cache, hist = _make_cache(paged, batch=3), History(2, 3)
    # Source: 21 user tokens + 2 answer tokens = 23, so its second page (slot 1) is partly filled.
    _feed(cache, hist, Step([0], 21, True, 0, 2, gen))
    _feed(cache, hist, Step([0], 1, False, -1, 2, gen))
    _feed(cache, hist, Step([0], 1, False, -1, 2, gen))
    # dst already had content of its own: fork drops it (and frees its pages).
    _feed(cache, hist, Step([1], 40, True, 0, 2, gen))
    cache.fork(0, 1)
    hist.clone_seq(0, 1)
    _check_state(cache, hist)
    src_kv = [cache.get_kv(layer, 0) for layer in range(2)]
    if paged:
        table = cache.block_table.tolist()
        assert table[1] == table[0] and cache.page_refcount(table[0][0]) == 2 == cache.page_refcount(table[0][1])
        src_pages = table[0][:2]
        src_bytes = [(cache.key_cache(layer)[src_pages].clone(), cache.value_cache(layer)[src_pages].clone())
                     for layer in range(2)]
        free = cache.num_free_pages

    # The fork diverges: it decodes 3 tokens, writing into the shared page slot 1.
    for _ in range(3):
        _feed(cache, hist, Step([1], 1, False, -1, 2, gen))
    _check_state(cache, hist)
    for layer in range(2):
        assert all(torch.equal(x, y) for x, y in zip(cache.get_kv(layer, 0), src_kv[layer], strict=True))
    if paged:
        table = cache.block_table.tolist()
        assert table[1][0] == table[0][0], "the untouched first page stays shared"
        assert table[1][1] != table[0][1], "the written page must have been copied"
        assert cache.num_free_pages == free - 1
        for layer in range(2):
            # copy-on-write really copies: the source's pages are byte-identical.
            assert torch.equal(cache.key_cache(layer)[src_pages], src_bytes[layer][0])
            assert torch.equal(cache.value_cache(layer)[src_pages], src_bytes[layer][1])

    # The source goes on with a user segment (its page slot 1 is its own again: written in place).
    fork_kv = [cache.get_kv(layer, 1) for layer in range(2)]
    _feed(cache, hist, Step([0], 20, True, 1, 2, gen))
    for layer in range(2):
        assert all(torch.equal(x, y) for x, y in zip(cache.get_kv(layer, 1), fork_kv[layer], strict=True))
    if paged:
        assert cache.block_table[0, 1].item() == src_pages[1]
    # Both decode together, then a second fork in which both sharers write the same shared page in one call.
    _feed(cache, hist, Step([0, 1], 1, False, -1, 2, gen))
    cache.fork(1, 2)
    hist.clone_seq(1, 2)
    _feed(cache, hist, Step([1, 2], 1, False, -1, 2, gen))
    _feed(cache, hist, Step([0, 1, 2], 3, True, 2, 2, gen))
    _check_state(cache, hist)
    # Dropping the fork releases only what nobody else uses.
    cache.truncate(1, 0)
    hist.truncate(1, 0)
    _check_state(cache, hist)
    cache.reset()
    if paged:
        assert cache.num_free_pages == cache.num_pages
        assert all(cache.page_refcount(p) == 0 for p in range(cache.num_pages))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kvcache_reset(paged):
    rng, gen = random.Random(6), torch.Generator().manual_seed(6)
    cache, hist = _make_cache(paged), History(2, 2)
    _round(cache, hist, gen, rng, 0)
    cache.reset(0)
    hist.truncate(0, 0)
    assert cache.boundaries(0) == [0] and cache.lengths(1)[0] == 0
    _check_state(cache, hist)
    _round(cache, hist, gen, rng, 1)  # sequence 0 starts afresh, sequence 1 goes on
    _check_state(cache, hist)
    cache.reset()
    assert cache.lengths(0) == cache.lengths(1) == [0, 0]
    if paged:
        assert cache.num_free_pages == cache.num_pages


def _snapshot(cache: KVCache):
    snap = [cache.lengths(layer) for layer in range(cache.num_layers)] + [cache.boundaries(s)
                                                                           for s in range(cache.batch_size)]
    kv = [cache.get_kv(layer, s) for layer in range(cache.num_layers) for s in range(cache.batch_size)]
    raw = [t.clone() for layer in range(cache.num_layers) for t in (cache.key_cache(layer), cache.value_cache(layer))]
    paged = (cache.block_table.clone(), cache.num_free_pages,
             [cache.page_refcount(p) for p in range(cache.num_pages)]) if cache.is_paged else None
    return snap, kv, raw, paged


def _assert_same_state(a, b, *, raw: bool = True):
    assert a[0] == b[0]
    for (k1, v1), (k2, v2) in zip(a[1], b[1], strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    if raw:
        assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))
    if a[3] is not None:
        assert torch.equal(a[3][0], b[3][0]) and a[3][1:] == b[3][1:]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kvcache_errors_change_nothing(paged):
    gen = torch.Generator().manual_seed(7)
    cache = _make_cache(paged, capacity=64)
    _feed(cache, None, Step([0, 1], 10, True, 0, 2, gen))
    _feed(cache, None, Step([0], 1, False, -1, 2, gen))
    q, k, v = torch.randn(2, 3, HQ, D), torch.randn(2, 3, HKV, D), torch.randn(2, 3, HKV, D)
    bad = [
        (dict(layer=2), ValueError, r"layer must be in \[0, 2\), got 2"),
        (dict(layer=-1), ValueError, "layer must be in"),
        (dict(q=q.bfloat16()), TypeError, "q has dtype torch.bfloat16 but the cache holds torch.float32"),
        (dict(k_new=k.double()), TypeError, "k_new has dtype"),
        (dict(q=torch.randn(2, 3, 3, D)), ValueError, "3 heads, not a multiple of the cache's 2 kv heads"),
        (dict(q=torch.randn(2, 3, HQ, 16)), ValueError, "q has head_dim 16 but the cache has head_dim 32"),
        (dict(q=torch.randn(3, HQ, D)), ValueError, "q must be 4-D"),
        (dict(v_new=torch.randn(2, 3, 1, D)), ValueError, "v_new must have shape"),
        (dict(v_new=None), ValueError, "both k_new and v_new"),
        (dict(seq_ids=[0, 0]), ValueError, "seq_ids must not repeat"),
        (dict(seq_ids=[0, 2]), ValueError, r"seq_ids entry must be a sequence in \[0, 2\)"),
        (dict(seq_ids=[0]), ValueError, "q has batch 2 but seq_ids names 1"),
        (dict(segment=True, kv_limit=torch.ones(2, 3, dtype=I32)), ValueError, "not both"),
        (dict(kv_limit=torch.ones(2, 3)), TypeError, "kv_limit must be int32"),
        (dict(kv_limit=torch.ones(2, 4, dtype=I32)), ValueError, "kv_limit must have shape"),
        # Out of range for the op: the pages it allocated (paged) are rolled back.
        (dict(kv_limit=torch.tensor([[1, 2, 3], [1, 2, 14]], dtype=I32)), ValueError, "kv_limit"),
    ]
    for overrides, exc, match in bad:
        args = dict(layer=0, q=q, k_new=k, v_new=v)
        args.update(overrides)
        before = _snapshot(cache)
        with pytest.raises(exc, match=match):
            cache.append_and_attend(args.pop("layer"), args.pop("q"), args.pop("k_new"), args.pop("v_new"), **args)
        _assert_same_state(before, _snapshot(cache))
    # Capacity: sequence 0 would fit, sequence 1 (11 + 54 > 64)... nothing changes.
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="exceeds the capacity of 64 tokens"):
        cache.append_and_attend(0, torch.randn(2, 54, HQ, D), torch.randn(2, 54, HKV, D), torch.randn(2, 54, HKV, D))
    _assert_same_state(before, _snapshot(cache))
    # Rolled back copy-on-write: fork, then a rejected write into the shared page.
    cache.fork(0, 1)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="kv_limit"):
        cache.append_and_attend(0, q[:1], k[:1], v[:1], kv_limit=torch.tensor([[1, 2, 99]], dtype=I32), seq_ids=[1])
    _assert_same_state(before, _snapshot(cache), raw=not paged)  # (a free page may hold a discarded copy)
    # Other entry points.
    with pytest.raises(ValueError, match="two different sequences"):
        cache.fork(1, 1)
    with pytest.raises(ValueError, match="seq must be a sequence"):
        cache.truncate(5, 0)
    with pytest.raises(ValueError, match="layer must be in"):
        cache.lengths(3)


def test_kvcache_out_of_pages():
    gen = torch.Generator().manual_seed(8)
    cache = _make_cache(True, capacity=64, num_pages=4)
    _feed(cache, None, Step([0], 40, True, 0, 2, gen))  # 3 pages
    _feed(cache, None, Step([1], 16, True, 0, 2, gen))  # the 4th
    assert cache.num_free_pages == 0
    before = _snapshot(cache)
    with pytest.raises(RuntimeError, match="out of pages: this append needs 1 new pages but only 0 of 4 are free"):
        cache.append_and_attend(0, torch.randn(1, 1, HQ, D), torch.randn(1, 1, HKV, D), torch.randn(1, 1, HKV, D),
                                seq_ids=[1])
    _assert_same_state(before, _snapshot(cache))
    # Within its last page a sequence still appends; freeing pages makes room again.
    _feed(cache, None, Step([0], 8, True, 1, 2, gen))
    cache.truncate(0, 0)
    assert cache.num_free_pages == 3
    _feed(cache, None, Step([1], 1, False, -1, 2, gen))


def test_kvcache_constructor_errors():
    with pytest.raises(ValueError, match="page_size must be a multiple of 16"):
        KVCache(1, 1, 1, 32, capacity=64, page_size=24)
    with pytest.raises(ValueError, match="num_pages is only for paged caches"):
        KVCache(1, 1, 1, 32, capacity=64, num_pages=4)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        KVCache(1, 1, 1, 32, capacity=64, dtype=torch.int32)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        KVCache(1, 1, 1, 32, capacity=0)
    cache = KVCache(3, 2, 1, 32, capacity=40, page_size=32)
    assert cache.block_table.shape == (2, 2) and cache.num_pages == 4 and cache.key_cache(2).shape == (4, 32, 1, 32)
    with pytest.raises(ValueError, match="only for paged caches"):
        _ = KVCache(1, 1, 1, 32, capacity=8).block_table


def test_kvcache_bf16_and_attend_only():
    # bf16 cache against the float64 reference, and attending without appending.
    gen = torch.Generator().manual_seed(9)
    cache = KVCache(1, 2, HKV, D, capacity=48, dtype=torch.bfloat16, page_size=16)
    q, k, v = (torch.randn(2, 12, h, D, generator=gen).bfloat16() for h in (HQ, HKV, HKV))
    out, lse = cache.append_and_attend(0, q, k, v, segment=True, return_lse=True)
    ref_out, ref_lse = _reference(q, list(k), list(v), torch.full((2, 12), 12, dtype=I32), D**-0.5)
    _check_against_reference(out, lse, ref_out, ref_lse, torch.bfloat16)
    q2 = torch.randn(2, 3, HQ, D, generator=gen).bfloat16()
    out = cache.append_and_attend(0, q2, None, None)
    ref_out, _ = _reference(q2, list(k), list(v), torch.full((2, 3), 12, dtype=I32), D**-0.5)
    assert_close_scaled(out, ref_out, TOL[torch.bfloat16], "attend only")
    assert cache.lengths(0) == [12, 12] and cache.boundaries(0) == [0, 12]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kvcache_causal_chunk_every_position_is_a_boundary(paged):
    # Several causal tokens in one call (e.g. a forced answer prefix): each of their positions is a boundary.
    gen = torch.Generator().manual_seed(10)
    cache, hist = _make_cache(paged), History(2, 2)
    _feed(cache, hist, Step([0, 1], 18, True, 0, 2, gen))
    _feed(cache, hist, Step([0, 1], 5, False, -1, 2, gen))
    assert cache.boundaries(0) == cache.boundaries(1) == [0, 18, 19, 20, 21, 22, 23]
    cache.truncate(1, 20)
    hist.truncate(1, 20)
    _check_state(cache, hist)
    _feed(cache, hist, Step([1], 7, True, 1, 2, gen))
    _feed(cache, hist, Step([0, 1], 1, False, -1, 2, gen))
    _check_state(cache, hist)


def test_contiguous_rows_may_be_shared_for_reading():
    # Attending without appending writes nothing, so two sequences may read one cache row.
    gen = torch.Generator().manual_seed(11)
    kc = torch.randn(2, 32, 1, 16, generator=gen)
    vc = torch.randn(2, 32, 1, 16, generator=gen)
    q = torch.randn(1, 1, 1, 16, generator=gen).expand(2, 1, 1, 16).contiguous()
    lens = torch.tensor([9, 9], dtype=I32)
    out = ism_ext.attn_with_kvcache(q, kc, vc, cache_seqlens=lens, kv_limit=lens[:, None].contiguous(),
                                    cache_batch_idx=torch.tensor([1, 1], dtype=I32))
    assert torch.equal(out[0], out[1])
    single = ism_ext.attn_with_kvcache(q[:1], kc[1:], vc[1:], cache_seqlens=lens[:1], kv_limit=lens[:1, None])
    torch.testing.assert_close(out[:1], single)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kvcache_built_under_inference_mode_is_writable_outside_it(paged):
    with torch.inference_mode():
        cache = _make_cache(paged, num_layers=1, batch=1, capacity=64)
    q, k, v = (torch.randn(1, 3, h, D) for h in (2 * HKV, HKV, HKV))
    cache.append_and_attend(0, q, k, v)
    cache.truncate(0, 2)
    assert cache.lengths(0) == [2]


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("lq", [0, 1, 5])
def test_op_empty_batch(lq):
    k_cache = torch.randn(2, 32, 2, 16)
    v_cache = torch.randn_like(k_cache)
    q, k_new, v_new = (torch.randn(0, lq, h, 16) for h in (4, 2, 2))
    out, lse = attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.zeros(0, dtype=I32),
                                 return_lse=True)
    assert out.shape == (0, lq, 4, 16) and lse.shape == (0, 4, lq)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_two_threads_appending_to_one_sequence_both_land(paged):
    # Each call happens whole under the cache's lock: all 2 x 200 single-token appends land, none is lost or
    # overwritten, and each thread's tokens keep their order.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    n, threads = 200, 2
    cache = KVCache(1, 1, 1, 16, capacity=threads * n, page_size=16 if paged else None)
    errors: list[BaseException] = []

    def append(tag: int) -> None:
        try:
            for i in range(n):
                k = torch.full((1, 1, 1, 16), float(tag * 1000 + i))
                cache.append_and_attend(0, k, k, k)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    workers = [threading.Thread(target=append, args=(t,)) for t in range(threads)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors
    assert cache.lengths(0) == [threads * n]
    keys = cache.get_kv(0, 0)[0][:, 0, 0].tolist()
    for t in range(threads):
        assert [k for k in keys if t * 1000 <= k < (t + 1) * 1000] == [float(t * 1000 + i) for i in range(n)]


def test_kvcache_seq_ids_must_be_integers_not_floats():
    cache = _make_cache(False)
    q = torch.zeros(1, 1, HQ, D)
    kv = torch.zeros(1, 1, HKV, D)
    with pytest.raises(TypeError, match="seq_ids entry must be an int, got float"):
        cache.append_and_attend(0, q, kv, kv, seq_ids=[1.7])
    cache.append_and_attend(0, q, kv, kv, seq_ids=[torch.tensor(1)])  # integer-like ids are fine
    assert cache.lengths(0) == [0, 1]
    copied = copy.deepcopy(cache)  # the lock is not copied: each copy has its own
    assert copied.lengths(0) == [0, 1] and copied._lock is not cache._lock

"""Checks of every CPU kernel path (forward, backward, KV cache) against the float64 reference, for one run.

`test_cpu_kernels.py` runs `main()` in a subprocess per instruction-set level the machine has (the level is
chosen once per process from ATEN_CPU_CAPABILITY), so each build of the kernels is tested where it can run.
"""

from __future__ import annotations

import sys

import torch
from reference import assert_close_scaled, make_case, reference_attention

import ism_ext

TOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-2, 4e-2), torch.float16: (3e-3, 6e-3)}


def check_prefill(dtype: torch.dtype, head_dim: int, group: int, limits: str, seed: int) -> None:
    """Forward and backward of a random packed batch against the reference."""
    fwd_tol, grad_tol = TOL[dtype]
    case = make_case([130, 1, 97, 250], heads_q=4, heads_kv=4 // group, head_dim=head_dim, dtype=dtype,
                     limits=limits, seed=seed)
    q, k, v = (t.clone().requires_grad_(True) for t in (case.q, case.k, case.v))
    out, lse = ism_ext.segment_attention(q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q,
                                         cu_seqlens_k=case.cu_seqlens_k, softmax_scale=case.softmax_scale,
                                         return_lse=True)
    qr, kr, vr = (t.double().requires_grad_(True) for t in (case.q, case.k, case.v))
    ref_out, ref_lse = reference_attention(qr, kr, vr, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k,
                                           case.softmax_scale)
    what = f"{dtype} d={head_dim} group={group} {limits}"
    assert_close_scaled(out, ref_out, fwd_tol, f"out ({what})")
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"lse -inf only on empty rows ({what})"
    assert_close_scaled(lse[~empty], ref_lse[~empty], fwd_tol, f"lse ({what})")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out.backward(g)
    ref_out.backward(g.double())
    for name, mine, ref in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
        assert_close_scaled(mine, ref, grad_tol, f"{name} ({what})")


def check_kvcache(dtype: torch.dtype, head_dim: int, paged: bool, new_tokens: int, seed: int) -> None:
    """attn_with_kvcache (append + attend) against the reference over the cache's rows."""
    fwd_tol, _ = TOL[dtype]
    gen = torch.Generator().manual_seed(seed)
    batch, hq, hkv, page = 3, 8, 2, 16
    lens = torch.tensor([0, 37, 300], dtype=torch.int32)
    capacity = 512
    q = torch.randn(batch, new_tokens, hq, head_dim, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(batch, new_tokens, hkv, head_dim, generator=gen).to(dtype) for _ in range(2))
    history_k = torch.randn(batch, capacity, hkv, head_dim, generator=gen).to(dtype)
    history_v = torch.randn(batch, capacity, hkv, head_dim, generator=gen).to(dtype)
    limit = lens[:, None] + torch.arange(1, new_tokens + 1, dtype=torch.int32)[None, :]
    if paged:
        pages = capacity // page
        perm = torch.randperm(batch * pages, generator=gen).to(torch.int32)
        table = perm.view(batch, pages)
        k_cache = torch.empty(batch * pages, page, hkv, head_dim, dtype=dtype)
        v_cache = torch.empty_like(k_cache)
        k_cache[table.long()] = history_k.view(batch, pages, page, hkv, head_dim)
        v_cache[table.long()] = history_v.view(batch, pages, page, hkv, head_dim)
        out, lse = ism_ext.attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, kv_limit=limit,
                                             block_table=table, return_lse=True)
    else:
        k_cache, v_cache = history_k.clone(), history_v.clone()
        out, lse = ism_ext.attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, kv_limit=limit,
                                             return_lse=True)
    for b in range(batch):
        n = int(lens[b])
        keys = torch.cat([history_k[b, :n], k_new[b]])
        values = torch.cat([history_v[b, :n], v_new[b]])
        cu_q = torch.tensor([0, new_tokens], dtype=torch.int32)
        cu_k = torch.tensor([0, n + new_tokens], dtype=torch.int32)
        ref_out, ref_lse = reference_attention(q[b], keys, values, limit[b], cu_q, cu_k, head_dim**-0.5)
        what = f"{dtype} d={head_dim} paged={paged} new={new_tokens} seq {b}"
        assert_close_scaled(out[b], ref_out, fwd_tol, f"out ({what})")
        assert_close_scaled(lse[b], ref_lse, fwd_tol, f"lse ({what})")


def _paged(cache: torch.Tensor, page: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache` [b, capacity, h, d] scattered over shuffled pages: (pages [n, page, h, d], block table [b, n / b])."""
    batch, capacity = cache.shape[:2]
    per_seq = capacity // page
    table = torch.randperm(batch * per_seq, generator=gen).to(torch.int32).view(batch, per_seq)
    pages = torch.empty(batch * per_seq, page, *cache.shape[2:], dtype=cache.dtype)
    pages[table.long()] = cache.view(batch, per_seq, page, *cache.shape[2:])
    return pages, table


def check_decode_rows(dtype: torch.dtype, head_dim: int, group: int, lq: int, page: int, lens: list[int],
                      limits: str, seed: int) -> None:
    """Attention over a cache with few query rows per K/V head (decode; the row path of attend_rows.h up to
    its row limit, the transposed tile past it) against the reference: `page` 0 for a contiguous cache,
    cache lengths across key-tile ends, per-row limits ("causal": row i sees the cache and new rows <= i,
    "segment": every new row sees all of them, "random": anything up to the end, 0 included)."""
    fwd_tol, _ = TOL[dtype]
    gen = torch.Generator().manual_seed(seed)
    batch, hkv = len(lens), 2
    hq = group * hkv
    lens_t = torch.tensor(lens, dtype=torch.int32)
    unit = page or 1
    capacity = (max(lens) + lq + unit - 1) // unit * unit
    q = torch.randn(batch, lq, hq, head_dim, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(batch, lq, hkv, head_dim, generator=gen).to(dtype) for _ in range(2))
    history = [torch.randn(batch, capacity, hkv, head_dim, generator=gen).to(dtype) for _ in range(2)]
    ends = lens_t[:, None] + lq
    if limits == "causal":
        limit = lens_t[:, None] + torch.arange(1, lq + 1, dtype=torch.int32)[None, :]
    elif limits == "segment":
        limit = ends.expand(batch, lq).contiguous()
    else:
        limit = (torch.rand(batch, lq, generator=gen) * (ends + 1)).to(torch.int32)
    kwargs = dict(cache_seqlens=lens_t, kv_limit=limit, return_lse=True)
    if page:
        k_cache, table = _paged(history[0], page, torch.Generator().manual_seed(seed))
        v_cache, _ = _paged(history[1], page, torch.Generator().manual_seed(seed))  # the same shuffle
        kwargs["block_table"] = table
    else:
        k_cache, v_cache = history[0].clone(), history[1].clone()
    out, lse = ism_ext.attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kwargs)
    what = f"{dtype} d={head_dim} group={group} lq={lq} page={page} {limits}"
    for b, n in enumerate(lens):
        keys = torch.cat([history[0][b, :n], k_new[b]])
        values = torch.cat([history[1][b, :n], v_new[b]])
        cu_q = torch.tensor([0, lq], dtype=torch.int32)
        cu_k = torch.tensor([0, n + lq], dtype=torch.int32)
        ref_out, ref_lse = reference_attention(q[b], keys, values, limit[b], cu_q, cu_k, head_dim**-0.5)
        assert_close_scaled(out[b], ref_out, fwd_tol, f"out ({what}, seq {b})")
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isneginf(lse[b]), empty), f"lse -inf exactly on rows that see nothing ({what})"
        assert_close_scaled(lse[b][~empty], ref_lse[~empty], fwd_tol, f"lse ({what}, seq {b})")


# Decode shapes: 1 to 16 rows per K/V head (both sides of every build's row-path limit: 3, 6 and 12 rows),
# head dims with and without a vector tail, contiguous and paged caches (pages of 16, 32, 48 and 80 rows, so
# key tiles of 128 break into runs), cache lengths at key-tile ends.
DECODE_ROW_CASES = [
    (torch.float32, 128, 1, 1, 0, [0, 127, 128, 129], "segment"),
    (torch.float32, 64, 3, 1, 16, [300, 5, 256], "segment"),
    (torch.float32, 40, 4, 1, 80, [1, 131, 250], "segment"),
    (torch.float32, 100, 2, 3, 0, [383, 126], "causal"),
    (torch.float32, 3, 5, 2, 32, [70, 129], "random"),
    (torch.float32, 256, 6, 1, 48, [400, 47], "segment"),
    (torch.float32, 17, 7, 1, 0, [255, 256, 257], "segment"),
    (torch.float32, 72, 4, 3, 16, [200, 0], "random"),
    (torch.float32, 128, 8, 1, 16, [600, 33], "segment"),
    (torch.float32, 64, 12, 1, 0, [513, 2], "segment"),
    (torch.float32, 64, 13, 1, 80, [140, 64], "segment"),
    (torch.float32, 32, 16, 1, 0, [129, 300], "causal"),
    (torch.bfloat16, 128, 4, 1, 16, [300, 128], "segment"),
    (torch.bfloat16, 40, 1, 2, 80, [77, 200], "random"),
    # bfloat16 head dims that are not whole vectors: the row path converts to float32 even where the CPU has the
    # bfloat16 dot product (72 even, 33 odd); 128 above takes the dot product there
    (torch.bfloat16, 72, 2, 3, 0, [200, 1, 128], "causal"),
    (torch.bfloat16, 33, 3, 1, 16, [100, 47], "segment"),
    (torch.float16, 64, 3, 1, 0, [129, 1000], "segment"),
    (torch.float16, 136, 7, 2, 48, [96, 300], "causal"),
]


def main() -> None:
    """Runs every check; prints the kernel build that ran and "ok"."""
    for seed, (dtype, head_dim, group, limits) in enumerate([
        (torch.float32, 64, 1, "causal"), (torch.float32, 128, 2, "ism"), (torch.float32, 80, 4, "random"),
        (torch.float32, 16, 1, "mas"), (torch.float32, 256, 2, "empty"), (torch.bfloat16, 64, 2, "ism"),
        (torch.float16, 128, 1, "random"), (torch.float16, 40, 4, "causal"),
        # bfloat16 converted tile by tile: head dims with and without a vector tail, tiny and odd
        (torch.bfloat16, 128, 1, "causal"), (torch.bfloat16, 40, 4, "random"), (torch.bfloat16, 80, 2, "mas"),
        (torch.bfloat16, 2, 1, "ism"), (torch.bfloat16, 33, 1, "causal"), (torch.bfloat16, 256, 2, "empty"),
    ]):
        check_prefill(dtype, head_dim, group, limits, seed)
    for seed, (dtype, head_dim, paged, new_tokens) in enumerate([
        (torch.float32, 128, False, 1), (torch.float32, 64, True, 1), (torch.float32, 96, True, 33),
        (torch.bfloat16, 128, True, 1), (torch.float16, 64, False, 200),
        (torch.bfloat16, 64, True, 33), (torch.bfloat16, 96, False, 70),
    ]):
        check_kvcache(dtype, head_dim, paged, new_tokens, seed)
    for seed, case in enumerate(DECODE_ROW_CASES):
        check_decode_rows(*case, seed=seed)
    print(torch.ops.ism.cpu_kernel_isa(), "ok")


if __name__ == "__main__":
    sys.exit(main())

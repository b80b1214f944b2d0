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


def main() -> None:
    """Runs every check; prints the kernel build that ran and "ok"."""
    for seed, (dtype, head_dim, group, limits) in enumerate([
        (torch.float32, 64, 1, "causal"), (torch.float32, 128, 2, "ism"), (torch.float32, 80, 4, "random"),
        (torch.float32, 16, 1, "mas"), (torch.float32, 256, 2, "empty"), (torch.bfloat16, 64, 2, "ism"),
        (torch.float16, 128, 1, "random"), (torch.float16, 40, 4, "causal"),
    ]):
        check_prefill(dtype, head_dim, group, limits, seed)
    for seed, (dtype, head_dim, paged, new_tokens) in enumerate([
        (torch.float32, 128, False, 1), (torch.float32, 64, True, 1), (torch.float32, 96, True, 33),
        (torch.bfloat16, 128, True, 1), (torch.float16, 64, False, 200),
    ]):
        check_kvcache(dtype, head_dim, paged, new_tokens, seed)
    print(torch.ops.ism.cpu_kernel_isa(), "ok")


if __name__ == "__main__":
    sys.exit(main())

"""A reduced run of the KV-cache kernels (ism::_attn_with_kvcache_cuda) for compute-sanitizer.

    compute-sanitizer --tool memcheck  python tests/cuda/kvcache_sanitize_case.py
    compute-sanitizer --tool racecheck python tests/cuda/kvcache_sanitize_case.py

Small calls that still cover both tilings (decode's group tile, the rows tile of a new segment), split keys
with the combine and unsplit ones, contiguous caches with and without cache_batch_idx and paged caches (page
sizes 16 and 48), empty rows and an empty cache, both dtypes and head dims. Every call goes through the
dedicated kernel (the script sets kvcache_kernel=True in ism_ext.config and checks that no call fell back),
and prints the
largest error against the float64 reference, so a run under the sanitizer is also a check.
"""

from __future__ import annotations

import os
import random
import sys

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cuda_utils import count_dispatch  # noqa: E402
from reference import reference_attention  # noqa: E402

import ism_ext  # noqa: E402

ism_ext.config.set_kernel_config(kvcache_kernel=True)

# (batch, new rows, GQA group, longest cache, paged page size or None, cache_batch_idx)
CASES = [(2, 1, 4, 150, None, False),   # decode, group tile, too few keys to split
         (1, 1, 8, 700, 16, False),     # decode on a paged cache: split keys + combine
         (2, 3, 4, 300, None, True),    # 12 packed rows: group tile, cache rows out of order
         (2, 40, 2, 200, 48, False),    # a new segment: rows tile, paged with a page size of 48
         (1, 70, 4, 900, None, False)]  # rows tile, several row tiles, split keys


def run_case(batch, lq, group, longest, page_size, use_idx, head_dim, dtype, seed) -> float:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    hkv, cap = 2, 1008  # 63 pages of 16, 21 of 48
    lens = [rng.randint(0, longest) for _ in range(batch)]
    lens[0] = longest
    if batch > 1:
        lens[1] = 0  # an empty cache
    q = torch.randn(batch, lq, hkv * group, head_dim, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(batch, lq, hkv, head_dim, generator=gen).to(dtype) for _ in range(2))
    contig_k, contig_v = (torch.randn(batch, cap, hkv, head_dim, generator=gen).to(dtype) for _ in range(2))
    lim = torch.tensor([[rng.choice([0, n + lq, rng.randint(0, n + lq)]) for _ in range(lq)] for n in lens],
                       dtype=torch.int32)
    keys = [torch.cat([contig_k[i, :n], k_new[i]]) for i, n in enumerate(lens)]
    values = [torch.cat([contig_v[i, :n], v_new[i]]) for i, n in enumerate(lens)]
    cu_q = torch.arange(batch + 1, dtype=torch.int32) * lq
    cu_k = torch.tensor([0] + [sum(len(k) for k in keys[:i + 1]) for i in range(batch)], dtype=torch.int32)
    ref, _ = reference_attention(q.reshape(-1, hkv * group, head_dim), torch.cat(keys), torch.cat(values),
                                 lim.reshape(-1), cu_q, cu_k, head_dim**-0.5)

    kwargs = {}
    k_cache, v_cache = contig_k, contig_v
    if page_size is not None:
        pages = cap // page_size
        table = torch.randperm(batch * pages, generator=gen).reshape(batch, pages).to(torch.int32)
        k_cache, v_cache = (torch.zeros(batch * pages, page_size, hkv, head_dim, dtype=dtype) for _ in range(2))
        k_cache[table.long()] = contig_k.reshape(batch, pages, page_size, hkv, head_dim)
        v_cache[table.long()] = contig_v.reshape(batch, pages, page_size, hkv, head_dim)
        kwargs["block_table"] = table.cuda()
    elif use_idx:
        rows = torch.tensor(list(range(batch))[::-1], dtype=torch.int32) + 1
        k_cache, v_cache = (torch.zeros(batch + 1, cap, hkv, head_dim, dtype=dtype) for _ in range(2))
        k_cache[rows.long()], v_cache[rows.long()] = contig_k, contig_v
        kwargs["cache_batch_idx"] = rows.cuda()
    out = ism_ext.attn_with_kvcache(q.cuda(), k_cache.cuda(), v_cache.cuda(), k_new.cuda(), v_new.cuda(),
                                    cache_seqlens=torch.tensor(lens, dtype=torch.int32).cuda(), kv_limit=lim.cuda(),
                                    **kwargs)
    err = (out.cpu().double().reshape(ref.shape) - ref).abs().max().item()
    return err / max(1.0, ref.abs().max().item())


def main() -> None:
    worst, calls = 0.0, 0
    counts = count_dispatch(setattr)
    for head_dim in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            for i, case in enumerate(CASES):
                worst = max(worst, run_case(*case, head_dim, dtype, seed=100 * i + head_dim))
                calls += 1
    torch.cuda.synchronize()
    assert counts == {"kernel": calls, "composite": 0}, f"some calls did not run on the kernel: {counts}"
    print(f"kvcache_sanitize_case: {calls} kernel calls; largest relative error {worst:.3g}")
    if worst > 3e-2:
        raise SystemExit(f"kvcache_sanitize_case: error {worst:.3g} above the bf16 tolerance")


if __name__ == "__main__":
    main()

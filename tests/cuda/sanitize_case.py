"""A reduced run of every CUDA kernel for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck  python tests/cuda/sanitize_case.py
    compute-sanitizer --tool racecheck python tests/cuda/sanitize_case.py

Small packed batches that still cover several query and key tiles, a partial last tile, GQA, empty
rows, more keys than queries, both dtypes and head dims, both backward modes, and max_seqlen hints below
the longest sequence (wrong numbers allowed, no access out of bounds). Prints the largest
gradient error against the float64 reference so that a run under the sanitizer is also a check.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reference import make_case, reference_attention  # noqa: E402

import ism_ext  # noqa: E402


def main() -> None:
    worst = 0.0
    for head_dim in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            for deterministic in (False, True):
                case = make_case([200, 3, 130], [260, 3, 130], heads_q=4, heads_kv=2, head_dim=head_dim, dtype=dtype,
                                 limits="ism", seed=head_dim)
                case.kv_limit[5:9] = 0
                q, k, v = (t.cuda().requires_grad_() for t in (case.q, case.k, case.v))
                out = ism_ext.segment_attention(q, k, v, case.kv_limit.cuda(), cu_seqlens_q=case.cu_seqlens_q.cuda(),
                                                cu_seqlens_k=case.cu_seqlens_k.cuda(), deterministic=deterministic)
                grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
                out.backward(grad.cuda())
                qr, kr, vr = (t.double().requires_grad_() for t in (case.q, case.k, case.v))
                ref, _ = reference_attention(qr, kr, vr, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k,
                                             case.softmax_scale)
                ref.backward(grad.double())
                for mine, expected in ((out, ref), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
                    err = (mine.detach().cpu().double() - expected).abs().max().item()
                    worst = max(worst, err / max(1.0, expected.abs().max().item()))
    too_small_hints()
    torch.cuda.synchronize()
    print(f"sanitize_case: every kernel ran; largest relative error {worst:.3g}")


def too_small_hints() -> None:
    """max_seqlen hints below the longest sequence: wrong numbers are allowed, accesses out of bounds not."""
    case = make_case([300, 40], [300, 40], heads_q=2, heads_kv=2, head_dim=64, dtype=torch.bfloat16,
                     limits="ism", seed=7)
    q, k, v = (t.cuda().requires_grad_() for t in (case.q, case.k, case.v))
    out = ism_ext.segment_attention(q, k, v, case.kv_limit.cuda(), cu_seqlens_q=case.cu_seqlens_q.cuda(),
                                    cu_seqlens_k=case.cu_seqlens_k.cuda(), max_seqlen_q=64, max_seqlen_k=64)
    out.float().sum().backward()


if __name__ == "__main__":
    main()

"""A reduced run of the Hopper forward kernel for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck  python tests/cuda/hopper_sanitize_case.py
    compute-sanitizer --tool racecheck python tests/cuda/hopper_sanitize_case.py

hopper_fwd=True is set here (ism_ext.config). Small packed batches that still cover several query and key tiles
(the K/V pipelines wrap around their stages), a partial last tile, rows read past a sequence's end, GQA,
empty rows, more keys than queries, a negative scale (Q negated in shared memory), both dtypes and head
dims. Checks every output against the float64 reference and that the Hopper kernel ran each time, so a
run under the sanitizer is also a test; exits non-zero on a wrong result.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reference import make_case, reference_attention  # noqa: E402

import ism_ext  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def main() -> None:
    ism_ext.config.set_kernel_config(hopper_fwd=True)
    worst, runs = 0.0, 0
    failures = []
    for head_dim in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            for scale in (None, -0.1):
                case = make_case([300, 3, 130], [420, 3, 130], heads_q=4, heads_kv=2, head_dim=head_dim, dtype=dtype,
                                 limits="ism", seed=head_dim, scale=scale)
                case.kv_limit[5:9] = 0
                args = [t.cuda() for t in (case.q, case.k, case.v, case.kv_limit, case.cu_seqlens_q,
                                           case.cu_seqlens_k)]
                before = torch.ops.ism._cuda_hopper_fwd_launches()
                out, lse = torch.ops.ism.segment_attn_fwd(*args, 300, 420, case.softmax_scale)
                torch.cuda.synchronize()
                if torch.ops.ism._cuda_hopper_fwd_launches() != before + 1:
                    failures.append(f"d={head_dim} {dtype}: the Hopper kernel did not run")
                ref, ref_lse = reference_attention(case.q, case.k, case.v, case.kv_limit, case.cu_seqlens_q,
                                                   case.cu_seqlens_k, case.softmax_scale)
                err = (out.cpu().double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
                finite = torch.isfinite(ref_lse)
                lse_err = (lse.cpu().double()[finite] - ref_lse[finite]).abs().max().item()
                lse_tol = TOL[dtype] * max(1.0, ref_lse[finite].abs().max().item())
                worst, runs = max(worst, err), runs + 1
                empty_ok = torch.equal(torch.isneginf(lse.cpu()), ~finite)
                if not err <= TOL[dtype] or not lse_err <= lse_tol or not empty_ok:
                    failures.append(f"d={head_dim} {dtype} scale={scale}: out error {err:.3g}, lse error {lse_err:.3g}")
    print(f"hopper_sanitize_case: {runs} forward calls; largest relative error {worst:.3g}")
    if failures:
        print("\n".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()

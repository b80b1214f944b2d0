"""Per-kernel GPU time of one forward and one backward of the ism op (torch.profiler), both backward modes.

    python benchmarks/profile_kernels_gpu.py --tokens 8192 --batch 2 --head-dim 128

Shows where the time of a call goes (pre-pass, dK/dV kernel, dQ kernel or dQ conversion, memsets)
and each kernel's share; the timings of record are bench_prefill_gpu.py's.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from common import layout_kv_limit
from torch.profiler import ProfilerActivity, profile

import ism_ext  # noqa: F401  (registers torch.ops.ism)


def kernel_times(fn, repeats: int) -> dict[str, float]:
    """Mean GPU milliseconds per call of each kernel that `fn` launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1e3 / repeats
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--scheme", default="ism")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_kernels_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    heads, d, n, b = 2048 // args.head_dim, args.head_dim, args.tokens, args.batch
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b * n, heads, d, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    lim = layout_kv_limit(args.scheme, n).to("cuda").repeat(b)
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device="cuda")
    scale = d**-0.5
    out, lse = torch.ops.ism.segment_attn_fwd(q, k, v, lim, cu, cu, n, n, scale)
    calls = {
        "forward": lambda: torch.ops.ism.segment_attn_fwd(q, k, v, lim, cu, cu, n, n, scale),
        "backward (atomic dQ)": lambda: torch.ops.ism.segment_attn_bwd(dout, None, q, k, v, out, lse, lim, cu, cu, n, n,
                                                                       scale, False),
        "backward (deterministic)": lambda: torch.ops.ism.segment_attn_bwd(dout, None, q, k, v, out, lse, lim, cu, cu,
                                                                           n, n, scale, True),
    }
    print(f"{torch.cuda.get_device_name()}: {args.scheme}, {b} x {n} tokens, {heads} heads, head dim {d}")
    for name, fn in calls.items():
        times = kernel_times(fn, args.repeats)
        total = sum(times.values())
        print(f"\n{name}: {total:.3f} ms of kernels per call")
        for kernel, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  {kernel[:110]}")


if __name__ == "__main__":
    main()

"""CPU benchmark: segment_attention vs SDPA with a dense boolean mask (and FlexAttention) on ISM layouts.

    python benchmarks/bench_cpu.py                 # full sweep -> results/cpu_attention.{json,png}
    python benchmarks/bench_cpu.py --quick         # a small sweep, to try it out

Every record: bench (cpu_fwd | cpu_fwd_bwd), impl (ism | sdpa_dense | flex), dtype, head_dim, tokens,
ms_median, tflops (visible pairs only, docs/performance.md), peak_mem_mb (resident memory the call adds on top of
its inputs), device, torch, commit, plus heads, scheme, threads and mask_build_ms (time to build the
dense or block mask from kv_limit, not included in ms_median).
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import CpuPeakMemory, attention_flops, environment, layout_kv_limit, median_ms, write_records
from tqdm import tqdm

import ism_ext
from ism_ext.masks import dense_mask


def _inputs(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, grad: bool):
    gen = torch.Generator().manual_seed(0)
    # [1, heads, tokens, D] storage so that SDPA/Flex get their native layout and ISM a strided view.
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=gen, dtype=dtype).requires_grad_(grad)
               for _ in range(3))
    return q, k, v


def _ism(q, k, v, kv_limit):
    return ism_ext.segment_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kv_limit[None])


def _flex_factory(kv_limit: torch.Tensor, tokens: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Each shape compiles anew; past dynamo's recompile limit flex_attention would silently fall back to
    # its eager (dense, unfused) path and the numbers would be meaningless, so start from a clean slate.
    torch._dynamo.reset()
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < kv_limit[q_idx]

    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device="cpu")
    build_ms = (time.perf_counter() - t0) * 1e3
    compiled = torch.compile(flex_attention, dynamic=False)
    return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask)), build_ms


def _sdpa_with(mask: torch.Tensor):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _step(fn, q, k, v, backward: bool):
    """One timed call: forward, or forward + backward of the output's sum."""
    if backward:
        return lambda: fn(q, k, v).sum().backward()
    return lambda: fn(q, k, v)


def run_config(tokens: int, head_dim: int, dtype: torch.dtype, heads: int, impls: list[str], repeats: int,
               mem: CpuPeakMemory, env: dict[str, Any]) -> list[dict[str, Any]]:
    """All impls x {fwd, fwd_bwd} for one shape; returns the records."""
    kv_limit = layout_kv_limit("ism", tokens)
    records = []
    for impl in impls:
        build_ms = 0.0
        if impl == "ism":
            fn = lambda q, k, v: _ism(q, k, v, kv_limit)  # noqa: E731
        elif impl == "sdpa_dense":
            t0 = time.perf_counter()
            mask = dense_mask(kv_limit)
            build_ms = (time.perf_counter() - t0) * 1e3
            fn = _sdpa_with(mask)
        else:
            fn, build_ms = _flex_factory(kv_limit, tokens)
        for backward in (False, True):
            q, k, v = _inputs(tokens, heads, head_dim, dtype, backward)
            step = _step(fn, q, k, v, backward)
            base = dict(bench="cpu_fwd_bwd" if backward else "cpu_fwd", impl=impl, dtype=str(dtype).split(".")[-1],
                        head_dim=head_dim, tokens=tokens, heads=heads, scheme="ism", mask_build_ms=build_ms)
            if impl == "flex" and backward:
                # torch raises NotImplementedError for FlexAttention's backward on CPU; trying it anyway
                # leaves a failed compile behind that slowed later shapes down tenfold in our runs.
                records.append({**base, **env, "error": "FlexAttention has no backward on CPU"})
                continue
            try:
                ms = median_ms(step, repeats)
                peak = mem.measure_mb(step)
            except Exception as exc:  # e.g. a FlexAttention path this torch cannot compile on CPU
                records.append({**base, **env, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            flops = attention_flops(kv_limit, heads, head_dim, "fwd_bwd" if backward else "fwd")
            records.append({**base, "ms_median": ms, "tflops": flops / (ms * 1e-3) / 1e12, "peak_mem_mb": peak,
                            "repeats": repeats, **env})
    return records


def plot(records: list[dict[str, Any]], path) -> None:
    """Time per token count for each impl (columns: dtype x bench) and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "ms_median" in r]
    dtypes = sorted({r["dtype"] for r in ok})
    benches = ["cpu_fwd", "cpu_fwd_bwd"]
    fig, axes = plt.subplots(1, len(dtypes) * 2 + 1, figsize=(5 * (len(dtypes) * 2 + 1), 4.2), squeeze=False)
    colors = {"ism": "tab:blue", "sdpa_dense": "tab:red", "flex": "tab:green"}
    styles = {64: "--", 128: "-"}
    for col, (dtype, bench) in enumerate(itertools.product(dtypes, benches)):
        ax = axes[0][col]
        for impl, hd in itertools.product(colors, styles):
            pts = sorted((r["tokens"], r["ms_median"]) for r in ok
                         if r["impl"] == impl and r["head_dim"] == hd and r["dtype"] == dtype and r["bench"] == bench)
            if pts:
                ax.plot(*zip(*pts, strict=True), styles[hd], marker="o", color=colors[impl], label=f"{impl} d={hd}")
        ax.set(xscale="log", yscale="log", xlabel="tokens (8-round ISM dialogue)", ylabel="ms (median)",
               title=f"{bench} {dtype}")
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[0][-1]
    for impl, hd in itertools.product(colors, styles):
        pts = sorted((r["tokens"], r["peak_mem_mb"]) for r in ok if r["impl"] == impl and r["head_dim"] == hd
                     and r["bench"] == "cpu_fwd" and r["dtype"] == dtypes[0] and r["peak_mem_mb"] is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), styles[hd], marker="o", color=colors[impl], label=f"{impl} d={hd}")
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="MB", title=f"peak memory added, cpu_fwd {dtypes[0]}")
    ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    env = ok[0] if ok else {}
    fig.suptitle(f"segment attention on CPU: {env.get('device', '?')}, {env.get('cpu_threads', '?')} threads, "
                 f"torch {env.get('torch', '?')}, commit {env.get('commit', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Runs the sweep, writes JSON and PNG, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--impls", nargs="+", default=["ism", "sdpa_dense", "flex"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="cpu_attention", help="results/<name>.json and .png")
    parser.add_argument("--quick", action="store_true", help="512 and 1024 tokens, head dim 64, float32")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.head_dims, args.dtypes, args.repeats = [512, 1024], [64], ["float32"], 3

    env = environment()
    mem = CpuPeakMemory()
    configs = list(itertools.product(args.tokens, args.head_dims, args.dtypes))
    records: list[dict[str, Any]] = []
    for tokens, hd, dt in tqdm(configs, desc="cpu benchmark", unit="shape"):
        records += run_config(tokens, hd, getattr(torch, dt), args.heads, args.impls, args.repeats, mem, env)
    path = write_records(args.name, records)
    plot(records, path.with_suffix(".png"))

    print(f"\n{'bench':<12}{'dtype':<10}{'d':>4}{'tokens':>7}  " + "".join(f"{i:>22}" for i in args.impls))
    for (bench, dt, hd, tokens), group in itertools.groupby(
            sorted(records, key=lambda r: (r["bench"], r["dtype"], r["head_dim"], r["tokens"])),
            key=lambda r: (r["bench"], r["dtype"], r["head_dim"], r["tokens"])):
        by_impl = {r["impl"]: r for r in group}
        cells = []
        for impl in args.impls:
            r = by_impl.get(impl, {})
            cells.append(f"{r['ms_median']:9.1f}ms {r['peak_mem_mb']:7.1f}MB" if "ms_median" in r else f"{'n/a':>22}")
        print(f"{bench:<12}{dt:<10}{hd:>4}{tokens:>7}  " + "".join(f"{c:>22}" for c in cells))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

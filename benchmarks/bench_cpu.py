"""CPU benchmark of the op against PyTorch on the same machine, in one process: the goals of docs/performance.md.

    python benchmarks/bench_cpu.py            # full sweep -> results/cpu_attention_<torch capability>.{json,png}
    python benchmarks/bench_cpu.py --dtype bfloat16   # -> results/cpu_attention_<capability>_bfloat16.*
    python benchmarks/bench_cpu.py --quick    # a small sweep, to try it out
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_cpu.py
                                              # an AVX-512 machine run as an AVX2 one: torch and the op both

The op and its baseline take turns inside every repeat (`interleaved_median_ms`), so a machine whose speed
drifts (a shared virtual machine) slows both sides of a ratio alike.

What runs (float32 unless --dtype):
- prefill forward and forward + backward, causal layout: `segment_attention` against SDPA `is_causal=True`
  (PyTorch's CPU flash kernel, the same work);
- the same on the 8-round ISM layout against SDPA with the dense boolean mask (what users do today);
- decode on a KV cache (one token per sequence, GQA 32/8 heads x 128): `attn_with_kvcache` (appends the token
  and attends) against SDPA over the same cache;
- torch's float32 matmul (2048^3) at the same thread count: the machine's ceiling, once at the start and again in
  the turns of every forward shape (`matmul_gflops` on its records), so the op's share of it is taken against
  the machine as fast as it was then.

Every record: bench (cpu_fwd | cpu_fwd_bwd | cpu_decode | cpu_matmul), impl, layout, dtype, head_dim, tokens (or
batch and cache), ms_median, gflops (visible pairs, FlashAttention's convention), repeats, and the environment:
device, threads, torch, commit, cpu_capability (torch's ISA), kernel_isa (the op's CPU build that ran).
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from common import attention_flops, environment, interleaved_median_ms, layout_kv_limit, median_ms, write_records
from tqdm import tqdm

import ism_ext
from ism_ext.masks import dense_mask

# impl -> baseline it is compared with, per layout
BASELINE = {"causal": "sdpa_causal", "ism": "sdpa_dense"}
MATMUL_N = 2048  # torch's float32 matmul of this size is the machine's ceiling


def _qkv(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, grad: bool):
    gen = torch.Generator().manual_seed(0)
    # [1, heads, tokens, D] storage: SDPA's native layout; the op takes the [1, tokens, heads, D] view.
    return [torch.randn(1, heads, tokens, head_dim, generator=gen, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def _prefill_fn(impl: str, kv_limit: torch.Tensor):
    """The call of `impl` on (q, k, v) in SDPA's layout."""
    if impl == "ism":
        return lambda q, k, v: ism_ext.segment_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         kv_limit[None])
    if impl == "sdpa_causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "sdpa_dense":
        mask = dense_mask(kv_limit)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    raise ValueError(f"unknown impl {impl!r}")


def prefill_records(layout: str, tokens: int, head_dim: int, dtype: torch.dtype, heads: int, backward: bool,
                    repeats: int, env: dict[str, Any]) -> list[dict[str, Any]]:
    """The op and its baseline on one shape: forward, or forward + backward of the output's sum."""
    kv_limit = layout_kv_limit(layout, tokens)
    bench = "cpu_fwd_bwd" if backward else "cpu_fwd"
    flops = attention_flops(kv_limit, heads, head_dim, "fwd_bwd" if backward else "fwd")
    steps = {}
    for impl in ("ism", BASELINE[layout]):
        fn = _prefill_fn(impl, kv_limit)
        q, k, v = _qkv(tokens, heads, head_dim, dtype, backward)

        def step(fn=fn, q=q, k=k, v=v):
            out = fn(q, k, v)
            if backward:
                out.sum().backward()

        steps[impl] = step
    if not backward:  # the forward's ceiling, timed in the same turns (a drifting machine moves it too)
        a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
        steps["torch_matmul"] = lambda: a @ b
    medians = interleaved_median_ms(steps, repeats)
    matmul_ms = medians.pop("torch_matmul", None)
    same_turns = {} if matmul_ms is None else {"matmul_gflops": 2 * MATMUL_N**3 / (matmul_ms * 1e-3) / 1e9}
    return [{"bench": bench, "impl": impl, "layout": layout, "dtype": str(dtype).split(".")[-1], "head_dim": head_dim,
             "heads": heads, "tokens": tokens, "ms_median": ms, "gflops": flops / (ms * 1e-3) / 1e9,
             "repeats": repeats, **same_turns, **env}
            for impl, ms in medians.items()]


def decode_records(batch: int, cache: int, dtype: torch.dtype, repeats: int,
                   env: dict[str, Any]) -> list[dict[str, Any]]:
    """One decode step (a token per sequence, appended and attended) against SDPA over the same cache."""
    hq, hkv, d = 32, 8, 128
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(batch, cache + 1, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(batch, cache + 1, hkv, d, generator=gen).to(dtype)
    q, k1, v1 = (torch.randn(batch, 1, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    lens = torch.full((batch,), cache, dtype=torch.int32)
    limit = (lens + 1)[:, None]
    keys = k_cache.permute(0, 2, 1, 3)  # [b, hkv, cache + 1, d] views of the same storage
    values = v_cache.permute(0, 2, 1, 3)
    q_sdpa = q.permute(0, 2, 1, 3)

    def ours():
        return ism_ext.attn_with_kvcache(q, k_cache, v_cache, k1, v1, cache_seqlens=lens, kv_limit=limit)

    def sdpa():
        return F.scaled_dot_product_attention(q_sdpa, keys, values, enable_gqa=True)

    flops = 4.0 * d * hq * batch * (cache + 1)
    records = []
    for impl, ms in interleaved_median_ms({"ism": ours, "sdpa_cache": sdpa}, repeats, warmup=2).items():
        records.append({"bench": "cpu_decode", "impl": impl, "layout": "decode", "dtype": str(dtype).split(".")[-1],
                        "head_dim": d,
                        "heads": hq, "kv_heads": hkv, "batch": batch, "cache": cache, "ms_median": ms,
                        "gflops": flops / (ms * 1e-3) / 1e9, "kv_gb_per_s": 2 * batch * (cache + 1) * hkv * d * 4
                        / (ms * 1e-3) / 1e9, "repeats": repeats, **env})
    return records


def matmul_record(repeats: int, env: dict[str, Any]) -> dict[str, Any]:
    """torch's float32 matmul rate (2048^3) at the benchmark's thread count: the ceiling of the ratios."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    ms = median_ms(lambda: a @ b, repeats, warmup=2)
    return {"bench": "cpu_matmul", "impl": "torch_matmul", "ms_median": ms,
            "gflops": 2 * MATMUL_N**3 / (ms * 1e-3) / 1e9, "repeats": repeats, **env}


def ratios(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], float]]:
    """(bench, record of the op, speedup over its baseline) for every shape that has both."""
    out = []
    key = lambda r: (r["bench"], r.get("layout"), r.get("head_dim"), r.get("tokens"), r.get("batch"), r.get("cache"))  # noqa: E731
    for _, group in itertools.groupby(sorted(records, key=lambda r: str(key(r))), key=lambda r: str(key(r))):
        by_impl = {r["impl"]: r for r in group}
        ours = by_impl.get("ism")
        base = next((r for i, r in by_impl.items() if i != "ism"), None)
        if ours and base:
            out.append((ours["bench"], ours, base["ms_median"] / ours["ms_median"]))
    return out


def plot(records: list[dict[str, Any]], path) -> None:
    """Speedups over the baselines (forward, forward + backward, decode) and the forward's GFLOP/s vs matmul."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    rows = ratios(records)
    styles = {("causal", 64): ("tab:blue", "--"), ("causal", 128): ("tab:blue", "-"),
              ("ism", 64): ("tab:red", "--"), ("ism", 128): ("tab:red", "-")}
    for ax, bench in zip(axes[:2], ("cpu_fwd", "cpu_fwd_bwd"), strict=True):
        for (layout, hd), (color, ls) in styles.items():
            pts = sorted((r["tokens"], s) for b, r, s in rows if b == bench and r["layout"] == layout
                         and r["head_dim"] == hd)
            if pts:
                ax.plot(*zip(*pts, strict=True), ls, marker="o", color=color,
                        label=f"{layout} d={hd} vs {BASELINE[layout]}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="tokens", ylabel="speedup (x)", title=f"{bench}: op vs PyTorch")
    ax = axes[2]
    for batch in sorted({r["batch"] for b, r, _ in rows if b == "cpu_decode"}):
        pts = sorted((r["cache"], s) for b, r, s in rows if b == "cpu_decode" and r["batch"] == batch)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"batch {batch}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="cache tokens", ylabel="speedup (x)", title="decode: op vs SDPA over the cache")
    ax = axes[3]
    for (layout, hd), (color, ls) in styles.items():
        pts = sorted((r["tokens"], r["gflops"] / r["matmul_gflops"]) for r in records if r["bench"] == "cpu_fwd"
                     and r["impl"] == "ism" and r["layout"] == layout and r["head_dim"] == hd and "matmul_gflops" in r)
        if pts:
            ax.plot(*zip(*pts, strict=True), ls, marker="o", color=color, label=f"op {layout} d={hd}")
    ax.axhline(1.0, color="k", lw=0.8, label="torch fp32 matmul")
    ax.axhline(0.6, color="k", lw=0.8, ls=":", label="0.6 x matmul")
    ax.set(xscale="log", xlabel="tokens", ylabel="op GFLOP/s (visible pairs) / matmul GFLOP/s",
           title="forward rate / matmul timed in the same turns")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    env = records[0] if records else {}
    fig.suptitle(f"CPU: {env.get('device', '?')}, {env.get('cpu_threads', '?')} threads, kernel "
                 f"{env.get('kernel_isa', '?')} (torch {env.get('cpu_capability', '?')}), "
                 f"torch {env.get('torch', '?')}, commit {env.get('commit', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Runs the sweep, writes JSON and PNG, prints the speedups."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--bwd-tokens", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="token counts of the forward + backward runs")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--layouts", nargs="+", default=["causal", "ism"], choices=sorted(BASELINE))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--decode-caches", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--name", default=None,
                        help="results/<name>.json and .png (default cpu_attention_<torch capability>, _<dtype> added "
                        "unless float32)")
    parser.add_argument("--quick", action="store_true", help="1024 tokens, head dim 64, two decode shapes")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.bwd_tokens, args.head_dims, args.repeats = [1024], [1024], [64], 3
        args.decode_batches, args.decode_caches = [1, 4], [512]

    env = environment()
    dtype = getattr(torch, args.dtype)
    jobs = [("prefill", layout, t, hd, bwd) for bwd in (False, True) for layout in args.layouts
            for t in (args.bwd_tokens if bwd else args.tokens) for hd in args.head_dims]
    jobs += [("decode", b, c) for b in args.decode_batches for c in args.decode_caches]
    records: list[dict[str, Any]] = [matmul_record(args.repeats, env)]
    for job in tqdm(jobs, desc=f"cpu benchmark ({env['kernel_isa']}, {env['cpu_threads']} threads)", unit="shape"):
        if job[0] == "prefill":
            _, layout, tokens, hd, bwd = job
            records += prefill_records(layout, tokens, hd, dtype, args.heads, bwd, args.repeats, env)
        else:
            records += decode_records(job[1], job[2], dtype, args.repeats, env)
    # Named by torch's capability (the level torch and the op were capped at), and the dtype unless float32.
    suffix = "" if dtype == torch.float32 else f"_{args.dtype}"
    path = write_records(args.name or f"cpu_attention_{env['cpu_capability'].lower()}{suffix}", records)
    plot(records, path.with_suffix(".png"))

    ceiling = records[0]["gflops"]
    print(f"\ntorch fp32 matmul: {ceiling:.1f} GFLOP/s ({env['cpu_threads']} threads, kernel {env['kernel_isa']})")
    print(f"{'bench':<13}{'shape':<30}{'op ms':>10}{'baseline':>14}{'base ms':>10}{'speedup':>9}{'op GF/s':>9}"
          f"{'/ matmul':>10}")
    for bench, r, speedup in ratios(records):
        if bench == "cpu_decode":
            shape, base = f"batch {r['batch']}, cache {r['cache']}", "sdpa_cache"
        else:
            shape, base = f"{r['layout']} d={r['head_dim']} {r['tokens']} tok", BASELINE[r["layout"]]
        print(f"{bench:<13}{shape:<30}{r['ms_median']:>10.2f}{base:>14}{r['ms_median'] * speedup:>10.2f}"
              f"{speedup:>8.2f}x{r['gflops']:>9.1f}"
              + (f"{r['gflops'] / r['matmul_gflops']:>10.2f}" if "matmul_gflops" in r else ""))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

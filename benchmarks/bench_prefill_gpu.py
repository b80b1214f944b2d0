"""GPU prefill/training attention: the ism CUDA kernels against SDPA (causal: cuDNN and flash), FlexAttention
and SDPA with a dense mask, forward, backward and forward + backward.

    python benchmarks/bench_prefill_gpu.py                      # forward sweep -> results/gpu_prefill_fwd.*
    python benchmarks/bench_prefill_gpu.py --bench bwd fwd_bwd  # -> results/gpu_prefill_bwd.*, gpu_prefill_fwd_bwd.*
    python benchmarks/bench_prefill_gpu.py --quick              # two lengths, head dim 128, to try it out

Layouts (one per sequence, every sequence of the batch the same):
  ism   an 8-round dialogue: system prompt, then (user, assistant) rounds; user/system turns
        bidirectional, answers causal (ism_ext.masks.rounds_dialogue)
  mas   a MAS prefill: a system block (1/4), a user block (1/2), both bidirectional, then the
        answer (1/4), causal
Impls:
  ism          torch.ops.ism.segment_attn_fwd on the packed batch (max_seqlen given: no sync), the
               default kernel (FA2-class, sm_80)
  ism_hopper   the same with ism_ext.config hopper_fwd=True: the Hopper forward kernel (TMA, wgmma,
               warp-specialised); forward only (the backward is the same as ism's); an error record
               where the build or the GPU has no Hopper kernel
  sdpa_cudnn   SDPA with is_causal=True on the cuDNN backend (FA3 class on Hopper): the speed to reach
  sdpa_causal  SDPA with is_causal=True, flash backend (FlashAttention-2): the causal mask, not the
               same mask, but the same amount of work within a few percent
  flex         FlexAttention with mask_mod kv_idx < kv_limit[q_idx]; block mask built once (its build
               time is mask_build_ms, not in ms_median), compiled once per shape
  sdpa_dense   SDPA with the dense boolean [L, L] mask (what users do today); mask_build_ms is the
               time to build it
Sizes: bfloat16, head dims 64/128, 2k-16k tokens per sequence; batch = total_tokens // tokens and
heads = 2048 // head_dim (FlashAttention's benchmark convention), so every shape fills the GPU.

The bf16 matmul ceiling of the GPU is measured once per run (an 8192^3 bf16 product, random data, the
median of repeats) and every record carries it as matmul_tflops, so each TFLOP/s figure can be read as a
fraction of what the tensor cores gave in the same run.

Benches: fwd (the forward alone), bwd (the backward alone: autograd.grad of a retained graph), fwd_bwd
(both, as one training step of the layer). Every record: bench=prefill_fwd | prefill_bwd |
prefill_fwd_bwd, impl, scheme, dtype, head_dim, tokens, batch, heads, ms_median (CUDA events, median
after warm-up), pairs (visible (query, key) pairs of the mask the impl computes, all sequences and one
head), tflops (forward 4 * head_dim * heads * pairs, backward 2.5x that, docs/performance.md, over the time),
mask_build_ms, and the environment (gpu, torch, cuda, commit, matmul_tflops). ism and ism_hopper records
also carry max_abs_diff_vs_flex and max_rel_diff_vs_flex (the output's, or for bwd the largest of dq, dk
and dv; relative to the largest magnitude of flex's).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import FLOP_FACTOR, attention_flops, environment, layout_kv_limit, median_ms, visible_pairs, write_records
from tqdm import tqdm

import ism_ext  # noqa: F401  (registers torch.ops.ism)
from ism_ext.config import kernel_config
from ism_ext.masks import dense_mask, kv_limit_for_turns

IMPLS = ["ism", "ism_hopper", "sdpa_cudnn", "sdpa_causal", "flex", "sdpa_dense"]
MINE = ["ism", "ism_hopper"]
BASELINES = ["sdpa_cudnn", "sdpa_causal", "flex"]
BENCHES = list(FLOP_FACTOR)


def matmul_ceiling_tflops(size: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of one size^3 bf16 matrix product on random data (median of repeats): the ceiling the
    attention figures are read against."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    mats = [torch.randn(size, size, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ms = median_ms(lambda: mats[0] @ mats[1], repeats, warmup=3, device="cuda")
    mats.clear()
    torch.cuda.empty_cache()
    return 2.0 * size**3 / (ms * 1e-3) / 1e12


def scheme_kv_limit(scheme: str, tokens: int) -> torch.Tensor:
    """kv_limit [tokens] of one sequence under the benchmark's layout `scheme`."""
    if scheme == "ism":
        return layout_kv_limit("ism", tokens)
    if scheme == "mas":
        system, user = tokens // 4, tokens // 2
        return kv_limit_for_turns([("system", system), ("user", user), ("assistant", tokens - system - user)], "mas")
    raise ValueError(f"unknown scheme {scheme!r}")


def timed_build(build: Callable[[], Any]) -> tuple[Any, float]:
    """Runs `build` once and returns (result, wall milliseconds including the GPU work)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = build()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def compiled_flex(kv_limit: torch.Tensor, tokens: int) -> tuple[Callable[..., torch.Tensor], Any, float]:
    """(compiled flex_attention, block mask of kv_idx < kv_limit[q_idx], mask build milliseconds)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per shape: past dynamo's recompile limit flex_attention would fall back to its
    # unfused eager path and the numbers would mean nothing.
    torch._dynamo.reset()

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < kv_limit[q_idx]

    block_mask, build_ms = timed_build(
        lambda: create_block_mask(mask_mod, None, None, tokens, tokens, device=kv_limit.device))
    return torch.compile(flex_attention, dynamic=False), block_mask, build_ms


def make_impl(impl: str, kv_limit: torch.Tensor, batch: int, tokens: int, scale: float):
    """Returns (fn(q, k, v) -> out, mask_build_ms, kv_limit of the mask it computes) for q/k/v [B, L, H, D]."""
    dev = kv_limit.device
    if impl in ("ism", "ism_hopper"):
        lim = kv_limit.repeat(batch)
        cu = torch.arange(0, (batch + 1) * tokens, tokens, dtype=torch.int32, device=dev)
        op = torch.ops.ism.segment_attn_fwd
        hopper = impl == "ism_hopper"

        def fn(q, k, v):
            b, n, h, d = q.shape
            # The kernel choice for this call only, so that "ism" keeps the default.
            with kernel_config(hopper_fwd=hopper):
                out, _ = op(q.view(b * n, h, d), k.view(b * n, -1, d), v.view(b * n, -1, d), lim, cu, cu, n, n,
                            scale)
            return out.view(b, n, h, d)

        return fn, 0.0, kv_limit
    if impl == "sdpa_cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn(q, k, v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, scale=scale)
            return out.transpose(1, 2)

        return fn, 0.0, torch.arange(1, tokens + 1, dtype=torch.int32)
    if impl == "sdpa_causal":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, scale=scale)
            return out.transpose(1, 2)

        return fn, 0.0, torch.arange(1, tokens + 1, dtype=torch.int32)
    if impl == "flex":
        compiled, block_mask, build_ms = compiled_flex(kv_limit, tokens)

        def fn(q, k, v):
            out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           scale=scale)
            return out.transpose(1, 2)

        return fn, build_ms, kv_limit
    if impl == "sdpa_dense":
        mask, build_ms = timed_build(lambda: dense_mask(kv_limit)[None, None])

        def fn(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, scale=scale)
            return out.transpose(1, 2)

        return fn, build_ms, kv_limit
    raise ValueError(f"unknown impl {impl!r}")


def timed_call(fn, q, k, v, bench: str, repeats: int, warmup: int) -> tuple[float, Any]:
    """(median ms, results) of one bench on fn: the forward, the backward of a retained graph, or both.

    results: (out,) for fwd, (dq, dk, dv) otherwise."""
    if bench == "fwd":
        with torch.no_grad():
            return median_ms(lambda: fn(q, k, v), repeats, warmup=warmup, device="cuda"), (fn(q, k, v),)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    # The same output gradient for every impl (a fixed seed), so that their gradients compare.
    grad = torch.randn(q.shape, generator=torch.Generator(device=q.device).manual_seed(2), device=q.device,
                       dtype=q.dtype)
    if bench == "bwd":
        out = fn(*leaves)
        ms = median_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), repeats, warmup=warmup,
                       device="cuda")
        return ms, torch.autograd.grad(out, leaves, grad)

    def step():
        return torch.autograd.grad(fn(*leaves), leaves, grad)

    return median_ms(step, repeats, warmup=warmup, device="cuda"), step()


def run_config(scheme: str, tokens: int, head_dim: int, total_tokens: int, impls: list[str], benches: list[str],
               repeats: int, warmup: int, env: dict[str, Any]) -> list[dict[str, Any]]:
    """Every impl on one shape, for each bench; returns the records."""
    batch, heads = max(1, total_tokens // tokens), max(1, 2048 // head_dim)
    dtype = torch.bfloat16
    kv_limit = scheme_kv_limit(scheme, tokens).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=gen, device="cuda", dtype=dtype)
               for _ in range(3))
    scale = head_dim**-0.5
    base = dict(scheme=scheme, dtype="bfloat16", head_dim=head_dim, tokens=tokens, batch=batch, heads=heads)
    records = []
    results: dict[str, dict[str, Any]] = {b: {} for b in benches}
    for impl in impls:
        try:
            fn, build_ms, computed = make_impl(impl, kv_limit, batch, tokens, scale)
        except (RuntimeError, NotImplementedError) as exc:
            fn, build_ms, computed, setup_error = None, 0.0, None, f"{type(exc).__name__}: {str(exc)[:300]}"
        for bench in benches:
            rec: dict[str, Any] = {**base, "bench": f"prefill_{bench}", "impl": impl}
            try:
                if fn is None:
                    raise RuntimeError(setup_error)
                if impl == "ism_hopper" and bench != "fwd":
                    raise NotImplementedError("ism_hopper is a forward kernel: its backward is ism's")
                ms, results[bench][impl] = timed_call(fn, q, k, v, bench, repeats, warmup)
                flops = attention_flops(computed, heads, head_dim, bench) * batch
                rec.update(ms_median=ms, tflops=flops / (ms * 1e-3) / 1e12, pairs=visible_pairs(computed) * batch,
                           mask_build_ms=build_ms, repeats=repeats)
            except (torch.OutOfMemoryError, RuntimeError, NotImplementedError) as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            finally:
                torch.cuda.empty_cache()
            records.append({**rec, **env})
    for bench, res in results.items():
        for mine in MINE:
            if mine not in res or "flex" not in res:
                continue
            # Largest over the outputs (out, or dq/dk/dv): the absolute difference, and relative to
            # the largest magnitude of flex's tensor.
            diffs = [((a.float() - b.float()).abs().max().item(), b.float().abs().max().item())
                     for a, b in zip(res[mine], res["flex"], strict=True)]
            diff = max(d for d, _ in diffs)
            rel = max(d / max(scale, 1e-30) for d, scale in diffs)
            for r in records:
                if r["impl"] == mine and r["bench"] == f"prefill_{bench}":
                    r["max_abs_diff_vs_flex"], r["max_rel_diff_vs_flex"] = diff, rel
    return records


def plot(records: list[dict[str, Any]], path, what: str = "prefill forward") -> None:
    """TFLOP/s over tokens per sequence: one panel per (scheme, head dim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "tflops" in r]
    schemes = sorted({r["scheme"] for r in ok}) or ["ism"]
    dims = sorted({r["head_dim"] for r in ok}) or [128]
    fig, axes = plt.subplots(len(schemes), len(dims), figsize=(max(8.0, 5.5 * len(dims)), 4.2 * len(schemes)),
                             squeeze=False)
    colors = {"ism": "tab:blue", "ism_hopper": "tab:purple", "sdpa_cudnn": "black", "sdpa_causal": "tab:gray",
              "flex": "tab:green", "sdpa_dense": "tab:red"}
    for (i, scheme), (j, hd) in itertools.product(enumerate(schemes), enumerate(dims)):
        ax = axes[i][j]
        for impl, color in colors.items():
            pts = sorted((r["tokens"], r["tflops"]) for r in ok
                         if r["impl"] == impl and r["scheme"] == scheme and r["head_dim"] == hd)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=impl)
        ax.set(xscale="log", xlabel="tokens per sequence", ylabel="TFLOP/s (visible pairs)",
               title=f"{scheme} layout, head dim {hd}, bf16")
        ax.set_xscale("log", base=2)
        ceiling = next((r.get("matmul_tflops") for r in ok), None)
        if ceiling:
            ax.axhline(ceiling, color="tab:orange", linestyle="--", linewidth=1, label=f"bf16 matmul {ceiling:.0f}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    env = ok[0] if ok else {}
    fig.suptitle(f"{what} on {env.get('gpu', '?')}: torch {env.get('torch', '?')}, CUDA "
                 f"{env.get('cuda', '?')}, commit {env.get('commit', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(records: list[dict[str, Any]], impls: list[str]) -> None:
    """One line per (scheme, head dim, tokens): ms and TFLOP/s of each impl, the speed ratios of ism and
    ism_hopper to the baselines, and their share of the measured bf16 matmul ceiling."""
    key = lambda r: (r["scheme"], r["head_dim"], r["tokens"])  # noqa: E731
    mine = [m for m in MINE if m in impls]
    pairs = [(m, b) for m in mine for b in BASELINES if b in impls]
    short = {"ism": "ism", "ism_hopper": "hop", "sdpa_cudnn": "cudnn", "sdpa_causal": "fa2", "flex": "flex"}
    print(f"{'scheme':<7}{'d':>4}{'tokens':>7}{'batch':>6}  " + "".join(f"{i:>20}" for i in impls) + "  " +
          "".join(f"{short[m] + '/' + short[b]:>10}" for m, b in pairs) +
          "".join(f"{short[m] + '/mm':>9}" for m in mine))
    for (scheme, hd, tokens), group in itertools.groupby(sorted(records, key=key), key=key):
        by_impl = {r["impl"]: r for r in group}
        first = next(iter(by_impl.values()))
        cells = [f"{by_impl[i]['ms_median']:8.3f} {by_impl[i]['tflops']:6.1f}" if "tflops" in by_impl.get(i, {})
                 else "error" for i in impls]
        ratios = []
        for m, b in pairs:
            a, c = by_impl.get(m, {}), by_impl.get(b, {})
            ratios.append(f"{a['tflops'] / c['tflops']:10.2f}" if "tflops" in a and "tflops" in c else f"{'-':>10}")
        ceiling = first.get("matmul_tflops")
        for m in mine:
            a = by_impl.get(m, {})
            ratios.append(f"{a['tflops'] / ceiling:9.2f}" if "tflops" in a and ceiling else f"{'-':>9}")
        print(f"{scheme:<7}{hd:>4}{tokens:>7}{first['batch']:>6}  " + "".join(f"{c:>20}" for c in cells) + "  " +
              "".join(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", nargs="+", default=["fwd"], choices=BENCHES)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--schemes", nargs="+", default=["ism", "mas"])
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--total-tokens", type=int, default=16384, help="batch = total_tokens // tokens")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--suffix", default="", help="results/gpu_prefill_<bench><suffix>.json and .png")
    parser.add_argument("--quick", action="store_true", help="2k and 8k tokens, head dim 128")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_prefill_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ism::segment_attn_fwd", "CUDA") and "ism" in args.impls:
        sys.exit("ism_ext was built without its CUDA kernels: rebuild with nvcc available (pip install -e .)")
    if args.quick:
        args.tokens, args.head_dims, args.repeats = [2048, 8192], [128], 10

    env = environment()
    env["matmul_tflops"] = matmul_ceiling_tflops()
    records: list[dict[str, Any]] = []
    configs = list(itertools.product(args.schemes, args.head_dims, args.tokens))
    for scheme, hd, tokens in tqdm(configs, desc="shapes", unit="shape"):
        records += run_config(scheme, tokens, hd, args.total_tokens, args.impls, args.bench, args.repeats,
                              args.warmup, env)
    print(f"\n{env.get('gpu')}  torch {env['torch']}  CUDA {env['cuda']}  bf16 matmul ceiling "
          f"{env['matmul_tflops']:.0f} TFLOP/s  (ms median / TFLOP/s)")
    titles = {"fwd": "prefill forward", "bwd": "backward", "fwd_bwd": "forward + backward"}
    for bench in args.bench:
        mine = [r for r in records if r["bench"] == f"prefill_{bench}"]
        path = write_records(f"gpu_prefill_{bench}{args.suffix}", mine)
        plot(mine, path.with_suffix(".png"), titles[bench])
        print(f"\n{titles[bench]}  -> {path} (+ .png)")
        print_table(mine, args.impls)


if __name__ == "__main__":
    main()

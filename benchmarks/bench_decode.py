"""Decode and new-turn benchmark of `attn_with_kvcache` (one attention layer).

    python benchmarks/bench_decode.py                      # CPU sweep (small), results/decode_cpu.{json,png}
    python benchmarks/bench_decode.py --device cuda        # the GPU sweep of the issue, results/decode_gpu.{json,png}
    python benchmarks/bench_decode.py --device cuda --batch 8 --cache 8192 --history 4096 --impls ism_kernel sdpa

decode: one new token per sequence appended and attended over a cache of `cache_len` tokens (bf16, head dim
128, 32 q heads / 8 kv heads by default). gbps = K/V bytes read / time; copy_gbps = the device's measured
copy bandwidth (bytes read + written by `Tensor.copy_` of a large buffer / time) in the same run, the ceiling
to compare with. impls:
  ism          attn_with_kvcache as it runs by default (CPU: the CPU kernel; CUDA: the composite of verified
               pieces, an indexed copy of the new rows then the prefill kernel)
  ism_kernel   CUDA only: the dedicated kernel (ism_ext.config kvcache_kernel=True: append and attention in one launch,
               keys split over thread blocks when the batch cannot fill the GPU). Its records also carry
               kernel_ms / kernel_gbps: the device time of its kernels alone (torch.profiler), without the
               host's per-call work (the checks copy the index tensors to the host, one sync per call)
  sdpa         SDPA over the cache slice (GQA)
  flex         CUDA only: FlexAttention (compiled: its decoding kernel for short queries) over the cache
               slice with a length mask

new_turn: a `--turn`-token user segment appended on top of a history of `cache` tokens, as one bidirectional
segment (ism, ism_kernel), versus recomputing attention over history + turn as a prefix LM must (recompute:
segment_attention over all tokens with the prefix-LM layout).

Every record: bench ("decode" or "new_turn"), impl, batch, cache_len (decode) or history and turn (new_turn),
ms_median, dtype, head_dim, heads; decode also gbps and copy_gbps. JSON and PNG go to benchmarks/results/.
On CUDA the end of the run prints the issue's goal (batch >= 8 and cache >= 8k: >= 85% of the copy bandwidth
and >= 1.5x SDPA) against the measured figures.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import environment, median_ms, write_records
from tqdm import tqdm

import ism_ext
from ism_ext.config import kernel_config
from ism_ext.masks import kv_limit_causal_append, kv_limit_new_segment
from ism_ext.ops import attn_with_kvcache

CPU_IMPLS = ("ism", "sdpa")
GPU_IMPLS = ("ism", "ism_kernel", "sdpa", "flex")


def copy_bandwidth_gbps(device: str, nbytes: int) -> float:
    """(bytes read + bytes written) / time of a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 5, warmup=2, device=device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def kernel_device_ms(fn: Callable[[], Any], repeats: int, name: str = "kvcache_") -> float | None:
    """Device time per call of the CUDA kernels whose name contains `name` (torch.profiler), or None."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if name in e.key]
        total_us = sum(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) for e in events)
        return total_us / repeats / 1e3 if total_us > 0 else None
    except Exception as exc:  # noqa: BLE001 - a profiler that cannot run leaves the figure out
        print(f"kernel_device_ms: {exc}")
        return None


_COMPILED: dict[str, Callable[..., Any]] = {}


def flex_decode(q, k_cache, v_cache, lens):
    """FlexAttention over the cache slice: query b sees keys j < lens[b] (compiled once per process)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = _COMPILED.setdefault("flex", torch.compile(flex_attention))
    qh, kh, vh = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lens[b], q.shape[0], None, q.shape[1],
                             k_cache.shape[1], device=q.device)
    return lambda: flex(qh, kh, vh, block_mask=mask, enable_gqa=True)


def time_impl(impl: str, fn: Callable[[], Any], args, *, warmup: int) -> float:
    with kernel_config(kvcache_kernel=impl == "ism_kernel"):
        return median_ms(fn, args.repeats, warmup=warmup, device=args.device)


def decode_records(batch: int, cache: int, args, copy_gbps: float, env) -> list[dict[str, Any]]:
    dt, dev = getattr(torch, args.dtype), args.device
    hq, hkv, d = args.heads_q, args.heads_kv, args.head_dim
    gen = torch.Generator(device=dev).manual_seed(0)
    k_cache = torch.randn(batch, cache + 1, hkv, d, dtype=dt, device=dev, generator=gen)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, 1, hq, d, dtype=dt, device=dev, generator=gen)
    k_new = torch.randn(batch, 1, hkv, d, dtype=dt, device=dev, generator=gen)
    v_new = torch.randn_like(k_new)
    lens = torch.full((batch,), cache, dtype=torch.int32, device=dev)
    lim = kv_limit_causal_append(lens, 1)
    kv_bytes = 2 * batch * (cache + 1) * hkv * d * k_cache.element_size()

    def ism():
        return attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, kv_limit=lim)

    fns = {"ism": ism, "ism_kernel": ism,
           "sdpa": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2),
                                                          v_cache.transpose(1, 2), enable_gqa=True)}
    out = []
    for impl in args.impls:
        try:
            fn = flex_decode(q, k_cache, v_cache, lens + 1) if impl == "flex" else fns[impl]
            ms = time_impl(impl, fn, args, warmup=2)
        except Exception as exc:  # noqa: BLE001 - one failing impl must not lose the others' figures
            print(f"decode {impl} batch {batch} cache {cache}: {type(exc).__name__}: {exc}")
            continue
        rec = dict(bench="decode", impl=impl, batch=batch, cache_len=cache, cache=cache, dtype=args.dtype,
                   head_dim=d, heads_q=hq, heads_kv=hkv, ms_median=ms, gbps=kv_bytes / (ms * 1e-3) / 1e9,
                   copy_gbps=copy_gbps, **env)
        if impl == "ism_kernel":
            with kernel_config(kvcache_kernel=True):
                kms = kernel_device_ms(fn, args.repeats)
            if kms is not None:
                rec.update(kernel_ms=kms, kernel_gbps=kv_bytes / (kms * 1e-3) / 1e9)
        out.append(rec)
    return out


def new_turn_records(history: int, args, env) -> list[dict[str, Any]]:
    dt, dev = getattr(torch, args.dtype), args.device
    hq, hkv, d, turn = args.heads_q, args.heads_kv, args.head_dim, args.turn
    gen = torch.Generator(device=dev).manual_seed(0)
    total = history + turn
    k_all = torch.randn(1, total, hkv, d, dtype=dt, device=dev, generator=gen)
    v_all = torch.randn_like(k_all)
    q_all = torch.randn(1, total, hq, d, dtype=dt, device=dev, generator=gen)
    k_cache, v_cache = k_all.clone(), v_all.clone()
    lens = torch.full((1,), history, dtype=torch.int32, device=dev)
    lim_new = kv_limit_new_segment(lens, turn)
    prefix = torch.full((1, total), total, dtype=torch.int32, device=dev)  # prefix LM: the whole prompt sees itself

    def ism():
        return attn_with_kvcache(q_all[:, history:], k_cache, v_cache, k_all[:, history:], v_all[:, history:],
                                 cache_seqlens=lens, kv_limit=lim_new)

    fns = {"ism": ism, "ism_kernel": ism, "recompute": lambda: ism_ext.segment_attention(q_all, k_all, v_all, prefix)}
    impls = list(dict.fromkeys([i for i in args.impls if i in fns] + ["recompute"]))
    out = []
    for impl in impls:
        try:
            ms = time_impl(impl, fns[impl], args, warmup=1)
        except Exception as exc:  # noqa: BLE001
            print(f"new_turn {impl} history {history}: {type(exc).__name__}: {exc}")
            continue
        out.append(dict(bench="new_turn", impl=impl, history=history, turn=turn, dtype=args.dtype, head_dim=d,
                        heads_q=hq, heads_kv=hkv, ms_median=ms, **env))
    return out


def plot(records, path) -> None:
    """Decode bandwidth per cache length (one line per impl and batch) and new-turn time per history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    dec = [r for r in records if r["bench"] == "decode"]
    styles = {"ism": "--", "ism_kernel": "-", "sdpa": ":", "flex": "-."}
    for (impl, batch), group in itertools.groupby(sorted(dec, key=lambda r: (r["impl"], r["batch"], r["cache_len"])),
                                                  key=lambda r: (r["impl"], r["batch"])):
        pts = [(r["cache_len"], r["gbps"]) for r in group]
        axes[0].plot(*zip(*pts, strict=True), marker="o", ls=styles.get(impl, "-"), label=f"{impl} b={batch}")
    if dec:
        axes[0].axhline(dec[0]["copy_gbps"], color="k", lw=1, label="copy bandwidth")
    axes[0].set(xscale="log", xlabel="cache tokens", ylabel="GB/s (K/V bytes read)", title="decode")
    axes[0].legend(fontsize=6, ncol=2)
    for impl in ("ism", "ism_kernel", "recompute"):
        pts = sorted((r["history"], r["ms_median"]) for r in records if r["bench"] == "new_turn" and r["impl"] == impl)
        if pts:
            axes[1].plot(*zip(*pts, strict=True), marker="o", label=impl)
    axes[1].set(xscale="log", yscale="log", xlabel="history tokens", ylabel="ms",
                title="new user turn: append on the cache vs recompute")
    axes[1].legend()
    env = records[0]
    fig.suptitle(f"{env.get('gpu') or env['device']}, torch {env['torch']}, commit {env['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goal_lines(records) -> list[str]:
    """The issue's goal for the dedicated kernel: batch >= 8, cache >= 8k: >= 85% of copy and >= 1.5x SDPA."""
    by = {(r["impl"], r["batch"], r["cache_len"]): r for r in records if r["bench"] == "decode"}
    lines = []
    for (impl, batch, cache), r in sorted(by.items()):
        if impl != "ism_kernel" or batch < 8 or cache < 8192:
            continue
        sdpa = by.get(("sdpa", batch, cache))
        vs = f", {r['gbps'] / sdpa['gbps']:.2f}x sdpa" if sdpa else ""
        kernel = f", kernels alone {100 * r['kernel_gbps'] / r['copy_gbps']:.0f}%" if "kernel_gbps" in r else ""
        lines.append(f"goal batch {batch:>3} cache {cache:>6}: {100 * r['gbps'] / r['copy_gbps']:.0f}% of copy"
                     f"{kernel}{vs} (goal 85% and 1.5x)")
    return lines


def main() -> None:
    """Runs both benchmarks, writes JSON and PNG, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="CPU: 1 8; CUDA: 1 8 16 32 64")
    parser.add_argument("--cache", type=int, nargs="+", default=None,
                        help="CPU: 1024 4096; CUDA: 1024 4096 8192 16384 32768")
    parser.add_argument("--history", type=int, nargs="+", default=None, help="CPU: 1024 2048 4096; CUDA: 4k to 32k")
    parser.add_argument("--turn", type=int, default=256)
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--impls", nargs="+", default=None, help=f"CPU: {' '.join(CPU_IMPLS)}; CUDA: "
                        f"{' '.join(GPU_IMPLS)}")
    parser.add_argument("--name", default=None, help="decode_cpu or decode_gpu")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.batch = args.batch or ([1, 8, 16, 32, 64] if on_gpu else [1, 8])
    args.cache = args.cache or ([1024, 4096, 8192, 16384, 32768] if on_gpu else [1024, 4096])
    args.history = args.history or ([4096, 8192, 16384, 32768] if on_gpu else [1024, 2048, 4096])
    args.impls = args.impls or list(GPU_IMPLS if on_gpu else CPU_IMPLS)
    args.name = args.name or ("decode_gpu" if on_gpu else "decode_cpu")
    env = environment()
    copy_gbps = copy_bandwidth_gbps(args.device, (1 << 30) if on_gpu else (256 << 20))
    records: list[dict[str, Any]] = []
    for batch, cache in tqdm(list(itertools.product(args.batch, args.cache)), desc="decode", unit="shape"):
        records += decode_records(batch, cache, args, copy_gbps, env)
        if on_gpu:
            torch.cuda.empty_cache()
    for history in tqdm(args.history, desc="new turn", unit="shape"):
        records += new_turn_records(history, args, env)
    path = write_records(args.name, records)
    plot(records, path.with_suffix(".png"))
    print(f"\ncopy bandwidth {copy_gbps:.1f} GB/s")
    for r in records:
        if r["bench"] == "decode":
            kernel = f", kernels {r['kernel_ms']:.3f} ms {r['kernel_gbps']:.0f} GB/s" if "kernel_ms" in r else ""
            print(f"decode   {r['impl']:>10} batch {r['batch']:>3} cache {r['cache_len']:>6}: {r['ms_median']:8.3f} ms "
                  f"{r['gbps']:7.1f} GB/s ({100 * r['gbps'] / copy_gbps:.0f}% of copy){kernel}")
        else:
            print(f"new_turn {r['impl']:>10} history {r['history']:>6} + {r['turn']}: {r['ms_median']:8.2f} ms")
    for line in goal_lines(records):
        print(line)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

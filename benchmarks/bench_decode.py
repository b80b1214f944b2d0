"""Decode and new-turn benchmark of `attn_with_kvcache` (one attention layer).

    python benchmarks/bench_decode.py                      # CPU sweep (small), results/decode_cpu.{json,png}
    python benchmarks/bench_decode.py --device cuda --batch 1 8 16 64 --cache 1024 4096 8192 16384 32768 \\
        --name decode_gpu                                  # the GPU sweep

decode: one new token per sequence appended and attended over a cache of `cache` tokens (bf16, head dim
128, 32 q heads / 8 kv heads by default). gbps = K/V bytes read / time; copy_gbps = the device's measured
copy bandwidth (bytes read + written by `Tensor.copy_` of a large buffer / time), the ceiling to compare
with. impl: ism (attn_with_kvcache, in-place append + attention), sdpa (SDPA over the cache slice, GQA).

new_turn: a `--turn`-token user segment appended on top of a history of `cache` tokens, as one
bidirectional segment (ism), versus recomputing attention over history + turn as a prefix LM must
(recompute: segment_attention over all tokens with the prefix-LM layout).
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from common import environment, median_ms, write_records
from tqdm import tqdm

import ism_ext
from ism_ext.masks import kv_limit_causal_append, kv_limit_new_segment
from ism_ext.ops import attn_with_kvcache


def copy_bandwidth_gbps(device: str, nbytes: int) -> float:
    """(bytes read + bytes written) / time of a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 5, warmup=2, device=device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


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
    fns = {
        "ism": lambda: attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, kv_limit=lim),
        "sdpa": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2),
                                                       v_cache.transpose(1, 2), enable_gqa=True),
    }
    out = []
    for impl, fn in fns.items():
        ms = median_ms(fn, args.repeats, warmup=2, device=dev)
        out.append(dict(bench="decode", impl=impl, batch=batch, cache=cache, dtype=args.dtype, head_dim=d,
                        heads_q=hq, heads_kv=hkv, ms_median=ms, gbps=kv_bytes / (ms * 1e-3) / 1e9,
                        copy_gbps=copy_gbps, **env))
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
    fns = {
        "ism": lambda: attn_with_kvcache(q_all[:, history:], k_cache, v_cache, k_all[:, history:],
                                         v_all[:, history:], cache_seqlens=lens, kv_limit=lim_new),
        "recompute": lambda: ism_ext.segment_attention(q_all, k_all, v_all, prefix),
    }
    return [dict(bench="new_turn", impl=impl, history=history, turn=turn, dtype=args.dtype, head_dim=d,
                 heads_q=hq, heads_kv=hkv, ms_median=median_ms(fn, args.repeats, warmup=1, device=args.device), **env)
            for impl, fn in fns.items()]


def plot(records, path) -> None:
    """Decode bandwidth per cache length (one line per impl and batch) and new-turn time per history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dec = [r for r in records if r["bench"] == "decode"]
    for (impl, batch), group in itertools.groupby(sorted(dec, key=lambda r: (r["impl"], r["batch"], r["cache"])),
                                                  key=lambda r: (r["impl"], r["batch"])):
        pts = [(r["cache"], r["gbps"]) for r in group]
        axes[0].plot(*zip(*pts, strict=True), marker="o", ls="-" if impl == "ism" else "--", label=f"{impl} b={batch}")
    if dec:
        axes[0].axhline(dec[0]["copy_gbps"], color="k", lw=1, label="copy bandwidth")
    axes[0].set(xscale="log", xlabel="cache tokens", ylabel="GB/s (K/V bytes read)", title="decode")
    axes[0].legend(fontsize=7)
    for impl in ("ism", "recompute"):
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


def main() -> None:
    """Runs both benchmarks, writes JSON and PNG, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cache", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--history", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--turn", type=int, default=256)
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--name", default="decode_cpu")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    env = environment()
    copy_gbps = copy_bandwidth_gbps(args.device, (1 << 30) if on_gpu else (256 << 20))
    records: list[dict[str, Any]] = []
    for batch, cache in tqdm(list(itertools.product(args.batch, args.cache)), desc="decode", unit="shape"):
        records += decode_records(batch, cache, args, copy_gbps, env)
    for history in tqdm(args.history, desc="new turn", unit="shape"):
        records += new_turn_records(history, args, env)
    path = write_records(args.name, records)
    plot(records, path.with_suffix(".png"))
    print(f"\ncopy bandwidth {copy_gbps:.1f} GB/s")
    for r in records:
        if r["bench"] == "decode":
            print(f"decode   {r['impl']:>9} batch {r['batch']:>3} cache {r['cache']:>6}: {r['ms_median']:8.3f} ms "
                  f"{r['gbps']:7.1f} GB/s ({100 * r['gbps'] / copy_gbps:.0f}% of copy)")
        else:
            print(f"new_turn {r['impl']:>9} history {r['history']:>6} + {r['turn']}: {r['ms_median']:8.2f} ms")
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

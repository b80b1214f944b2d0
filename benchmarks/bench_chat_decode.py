"""Decode speed of a real model on the project's KV cache against transformers' DynamicCache.

    python benchmarks/bench_chat_decode.py                       # SmolLM2-135M on the CPU -> results/chat_decode.*
    python benchmarks/bench_chat_decode.py --device cuda --name chat_decode_gpu

For every cache size, one prompt of that many tokens (the same random tokens for every impl) is prefilled
into an `IsmCache` once; a `DynamicCache` is filled with the very same keys/values. Then each impl decodes
`--steps` tokens one forward at a time, and a step's time is the median over those steps after
`--warmup` untimed ones (`ism_ext.perf.median_ms`).

impls: `ism_cache` (the "ism" attention appends into the preallocated cache in place, one
`attn_with_kvcache` per layer), `hf_dynamic` (the same model and attention on a DynamicCache, which
concatenates every layer's keys/values at every step), `sdpa_dynamic` (the stock model with SDPA on a
DynamicCache: what transformers does on its own). Records: bench="chat_decode", impl, cache_tokens,
tokens_per_s, ms_per_token, plus model, device, torch, commit. A PNG beside the JSON.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from common import environment, median_ms, write_records
from tqdm import tqdm
from transformers import DynamicCache

from ism_ext.integrations.hf import IsmCache, cache_argument_name
from ism_ext.integrations.hf.models import load_smollm2

IMPLS = ("ism_cache", "hf_dynamic", "sdpa_dynamic")


def prefill(model, tokens: torch.Tensor, capacity: int) -> IsmCache:
    """The prompt's keys/values in an IsmCache with room for `capacity` tokens."""
    cache = IsmCache.for_model(model, 1, capacity)
    with torch.inference_mode():
        model(tokens, use_cache=True, **{cache_argument_name(model): cache})
    return cache


def dynamic_copy(cache: IsmCache, config) -> DynamicCache:
    """A DynamicCache holding the same keys/values as `cache` (layout [B, H, L, D])."""
    dynamic = DynamicCache(config=config)
    for layer in range(cache.kv.num_layers):
        keys, values = cache.kv.get_kv(layer, 0)
        dynamic.update(keys.transpose(0, 1)[None], values.transpose(0, 1)[None], layer)
    return dynamic


def decode_ms(model, cache, steps: int, warmup: int, device: str) -> float:
    """Median milliseconds of one decode forward on `cache` (which grows by one token per call)."""
    token = torch.tensor([[5]], device=device)
    name = cache_argument_name(model)

    def step() -> None:
        with torch.inference_mode():
            model(token, use_cache=True, **{name: cache})

    return median_ms(step, steps, warmup=warmup, device=device)


def run_size(models: dict[str, Any], tokens: int, args, env: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of every impl at one cache size."""
    ism = models["ism_cache"]
    gen = torch.Generator().manual_seed(tokens)
    prompt = torch.randint(100, ism.config.vocab_size, (1, tokens), generator=gen).to(args.device)
    cache = prefill(ism, prompt, tokens + args.steps + args.warmup + 1)
    caches = {"ism_cache": cache, "hf_dynamic": dynamic_copy(cache, ism.config),
              "sdpa_dynamic": dynamic_copy(cache, ism.config)}
    records = []
    for impl in IMPLS:
        ms = decode_ms(models[impl], caches[impl], args.steps, args.warmup, args.device)
        records.append(dict(bench="chat_decode", impl=impl, cache_tokens=tokens, tokens_per_s=1e3 / ms,
                            ms_per_token=ms, steps=args.steps, model="SmolLM2-135M-Instruct",
                            torch_threads=torch.get_num_threads(), **env))
    return records


def plot(records: list[dict[str, Any]], path) -> None:
    """tokens/s against cache size, one line per impl."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    from ism_ext.viz import save_figure

    fig = Figure(figsize=(6.5, 4.2), dpi=110)
    ax = fig.add_subplot()
    for impl in IMPLS:
        rows = sorted((r for r in records if r["impl"] == impl), key=lambda r: r["cache_tokens"])
        ax.plot([r["cache_tokens"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="tokens in the cache", ylabel="decode tokens / s",
           title=f"SmolLM2-135M decode\n{records[0].get('gpu') or records[0]['device']}")
    ax.set_xticks(sorted({r["cache_tokens"] for r in records}))
    ax.set_xticklabels([str(t) for t in sorted({r["cache_tokens"] for r in records})])
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    """Runs every size, writes JSON and PNG, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per impl and size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="chat_decode")
    args = parser.parse_args()

    ism, _ = load_smollm2("ism")
    sdpa = copy.deepcopy(ism)
    sdpa.set_attn_implementation("sdpa")
    models = {"ism_cache": ism.to(args.device), "hf_dynamic": ism, "sdpa_dynamic": sdpa.to(args.device)}
    env = environment()
    records: list[dict[str, Any]] = []
    for tokens in tqdm(args.cache, desc="chat decode", unit="size"):
        records += run_size(models, tokens, args, env)
    path = write_records(args.name, records)
    plot(records, path.with_suffix(".png"))

    print(f"\n{'cache':>6} " + " ".join(f"{impl + ' tok/s':>18}" for impl in IMPLS) + f" {'ism / hf_dynamic':>17}")
    for tokens in args.cache:
        row = {r["impl"]: r["tokens_per_s"] for r in records if r["cache_tokens"] == tokens}
        print(f"{tokens:>6} " + " ".join(f"{row[impl]:>18.1f}" for impl in IMPLS)
              + f" {row['ism_cache'] / row['hf_dynamic']:>16.2f}x")
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

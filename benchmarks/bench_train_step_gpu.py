"""GPU training step of a small Llama-style decoder on 8-round dialogues with the ISM mask.

    python benchmarks/bench_train_step_gpu.py            # -> results/gpu_train_step.{json,png}
    python benchmarks/bench_train_step_gpu.py --quick

The same model (RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP, bfloat16 weights) and the same
batch of dialogues (each sequence an 8-round dialogue of `tokens` tokens: a system prompt, then
user/assistant rounds, ism_ext.masks.rounds_dialogue) train one step (forward, loss, backward, AdamW)
with the attention swapped:
  ism          ism_ext.segment_attention with the ISM kv_limit (packed batch, max_seqlen given)
  sdpa_causal  SDPA with is_causal=True and enable_gqa (torch's backend choice): the causal mask, not
               the ISM one; the speed the ISM model should reach
  flex         FlexAttention with mask_mod kv_idx < kv_limit[q_idx] (block mask built once, compiled)
Records: bench=train_step, impl, layers, hidden, heads, kv_heads, head_dim, tokens, batch, step_ms
(CUDA events, median after warm-up), tokens_per_s, peak_mem_gb, mask_build_ms, and the environment.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
from bench_prefill_gpu import compiled_flex
from common import environment, layout_kv_limit, median_ms, write_records
from torch import nn
from tqdm import tqdm

import ism_ext

IMPLS = ["ism", "sdpa_causal", "flex"]


class Attention(nn.Module):
    """GQA self-attention whose core is a function (q, k, v [B, T, H, D]) -> [B, T, H, D]."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, core) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.core = core

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return self.out(self.core(q, k, v.contiguous()).reshape(b, t, -1))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (half-split convention) of x [B, T, H, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).contiguous()


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, mlp: int, core) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.attn = Attention(hidden, heads, kv_heads, core)
        self.gate_up = nn.Linear(hidden, 2 * mlp, bias=False)
        self.down = nn.Linear(mlp, hidden, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, core) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, kv_heads, mlp, core) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head_dim = hidden // heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, device=tokens.device) / self.head_dim))
        ang = torch.arange(t, device=tokens.device)[:, None] * inv[None]
        cos = torch.cat((ang.cos(), ang.cos()), -1)[None, :, None].to(self.embed.weight.dtype)
        sin = torch.cat((ang.sin(), ang.sin()), -1)[None, :, None].to(self.embed.weight.dtype)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def make_core(impl: str, kv_limit: torch.Tensor, batch: int, tokens: int):
    """(attention core (q, k, v) -> out, mask build ms) for q [B, T, H, D], k/v [B, T, Hkv, D]."""
    dev = kv_limit.device
    if impl == "ism":
        lim = kv_limit.repeat(batch)
        cu = torch.arange(0, (batch + 1) * tokens, tokens, dtype=torch.int32, device=dev)

        def core(q, k, v):
            b, t, h, d = q.shape
            out = ism_ext.segment_attention(q.reshape(b * t, h, d), k.reshape(b * t, -1, d), v.reshape(b * t, -1, d),
                                            lim, cu_seqlens_q=cu, max_seqlen_q=t)
            return out.view(b, t, h, d)

        return core, 0.0
    if impl == "sdpa_causal":

        def core(q, k, v):  # torch's own backend choice for causal GQA (FlashAttention-2 or cuDNN on Hopper)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)

        return core, 0.0
    if impl == "flex":
        compiled, block_mask, build_ms = compiled_flex(kv_limit, tokens)

        def core(q, k, v):
            out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           enable_gqa=True)
            return out.transpose(1, 2)

        return core, build_ms
    raise ValueError(f"unknown impl {impl!r}")


def run(impl: str, args, env: dict[str, Any]) -> dict[str, Any]:
    """One impl: builds the model and the batch, times the training step; returns the record."""
    heads, kv_heads = args.hidden // args.head_dim, args.hidden // args.head_dim // args.gqa
    rec: dict[str, Any] = dict(bench="train_step", impl=impl, layers=args.layers, hidden=args.hidden, heads=heads,
                               kv_heads=kv_heads, head_dim=args.head_dim, tokens=args.tokens, batch=args.batch,
                               scheme="ism", dtype="bfloat16")
    try:
        kv_limit = layout_kv_limit("ism", args.tokens).to("cuda")
        core, build_ms = make_core(impl, kv_limit, args.batch, args.tokens)
        torch.manual_seed(0)
        model = Decoder(args.vocab, args.hidden, args.layers, heads, kv_heads, 4 * args.hidden, core)
        model = model.to("cuda", torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        gen = torch.Generator(device="cuda").manual_seed(1)
        tokens = torch.randint(0, args.vocab, (args.batch, args.tokens + 1), device="cuda", generator=gen)

        def step():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, args.repeats, warmup=args.warmup, device="cuda")
        rec.update(step_ms=ms, tokens_per_s=args.batch * args.tokens / (ms * 1e-3), mask_build_ms=build_ms,
                   peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30, repeats=args.repeats)
    except (torch.OutOfMemoryError, RuntimeError, NotImplementedError) as exc:
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        torch.cuda.empty_cache()
    return {**rec, **env}


def plot(records: list[dict[str, Any]], path) -> None:
    """Bar chart of tokens/s per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"ism": "tab:blue", "sdpa_causal": "tab:gray", "flex": "tab:green"}
    ax.bar([r["impl"] for r in ok], [r["tokens_per_s"] / 1e3 for r in ok],
           color=[colors.get(r["impl"], "tab:red") for r in ok])
    for i, r in enumerate(ok):
        ax.text(i, r["tokens_per_s"] / 1e3, f"{r['tokens_per_s'] / 1e3:.1f}k", ha="center", va="bottom")
    env = ok[0] if ok else {}
    ax.set(ylabel="training tokens / s (thousands)",
           title=f"train step, {env.get('layers', '?')} layers, hidden {env.get('hidden', '?')}, "
                 f"{env.get('batch', '?')} x {env.get('tokens', '?')} tokens (ISM, 8 rounds)\n"
                 f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, commit {env.get('commit', '?')}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--gqa", type=int, default=2, help="query heads per K/V head")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per dialogue")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 layers, 4k tokens")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_step_gpu.py needs a CUDA GPU")
    if args.quick:
        args.layers, args.tokens, args.repeats = 2, 4096, 5
    env = environment()
    records = [run(impl, args, env) for impl in tqdm(args.impls, desc="impls")]
    path = write_records("gpu_train_step", records)
    plot(records, path.with_suffix(".png"))
    print(f"\n{env.get('gpu')}  torch {env['torch']}  CUDA {env['cuda']}")
    print(f"{'impl':<12}{'step ms':>10}{'tokens/s':>12}{'peak GB':>9}")
    for r in records:
        if "step_ms" in r:
            print(f"{r['impl']:<12}{r['step_ms']:10.2f}{r['tokens_per_s']:12.0f}{r['peak_mem_gb']:9.2f}")
        else:
            print(f"{r['impl']:<12} error: {r['error']}")
    print(f"wrote {path} (+ .png)")


if __name__ == "__main__":
    main()

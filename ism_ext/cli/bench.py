"""`python -m ism_ext bench`: the quick benchmarks that apply to this machine, printed as one table.

It measures the op against SDPA with the dense boolean mask (forward, and forward + backward), decode
and a new turn on the KV cache, and the chat's time to first token (SmolLM2, when installed). The full
sweeps with JSON and plots are the scripts in `benchmarks/` (see README); this command writes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..masks import dense_mask, kv_limit_causal_append, kv_limit_for_turns, kv_limit_new_segment, rounds_dialogue
from ..ops import attn_with_kvcache, segment_attention
from ..perf import median_ms

Row = tuple[str, str, float, str, float]  # (benchmark, shape, ism ms, baseline name, baseline ms)


def prefill_rows(device: str, repeats: int) -> list[Row]:
    """The op on an 8-round ISM layout against SDPA with the dense boolean mask (forward, forward + backward)."""
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for tokens, backward in ((1024, False), (2048, False), (1024, True)):
        lim = kv_limit_for_turns(rounds_dialogue(tokens), "ism").to(device)
        mask = dense_mask(lim)
        q, k, v = (torch.randn(1, 8, tokens, 64, device=device, dtype=dtype, requires_grad=backward)
                   for _ in range(3))

        def ours(q=q, k=k, v=v, lim=lim, backward=backward):
            out = segment_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lim[None])
            return out.sum().backward() if backward else out

        def sdpa(q=q, k=k, v=v, mask=mask, backward=backward):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return out.sum().backward() if backward else out

        name = "prefill fwd+bwd" if backward else "prefill fwd"
        rows.append((name, f"ISM 8 rounds, {tokens} tok, 8x64", median_ms(ours, repeats, device=device),
                     "sdpa+dense mask", median_ms(sdpa, repeats, device=device)))
    return rows


def cache_rows(device: str, repeats: int) -> list[Row]:
    """Decode and a 256-token new turn on the KV cache against SDPA over the cache and prefix-LM recompute."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, cache, hq, hkv, d = 4, 2048, 32, 8, 128
    kc = torch.randn(batch, cache + 256, hkv, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.full((batch,), cache, dtype=torch.int32, device=device)
    q1, k1, v1 = (torch.randn(batch, 1, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))

    def decode():
        return attn_with_kvcache(q1, kc, vc, k1, v1, cache_seqlens=lens, kv_limit=kv_limit_causal_append(lens, 1))

    def sdpa_decode():
        keys, values = kc[:, : cache + 1].transpose(1, 2), vc[:, : cache + 1].transpose(1, 2)
        return F.scaled_dot_product_attention(q1.transpose(1, 2), keys, values, enable_gqa=True)

    turn = 256
    qt, kt, vt = (torch.randn(1, turn, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    qa, ka, va = (torch.randn(1, cache + turn, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    lens1 = lens[:1]
    prefix = torch.full((1, cache + turn), cache + turn, dtype=torch.int32, device=device)

    def new_turn():
        return attn_with_kvcache(qt, kc[:1], vc[:1], kt, vt, cache_seqlens=lens1,
                                 kv_limit=kv_limit_new_segment(lens1, turn))

    return [
        ("decode", f"b={batch}, cache {cache}, {hq}/{hkv}x{d}", median_ms(decode, repeats, device=device),
         "sdpa over cache", median_ms(sdpa_decode, repeats, device=device)),
        ("new turn", f"{turn} tok on {cache} history", median_ms(new_turn, repeats, device=device),
         "recompute (prefix LM)", median_ms(lambda: segment_attention(qa, ka, va, prefix), repeats, device=device)),
    ]


def chat_rows(device: str) -> list[Row]:
    """Round-4 time to first token: ISM reuse vs prefix-LM recompute and causal reuse (SmolLM2)."""
    try:
        from ..inference.chat import ChatSession
        from ..integrations.hf.models import load_smollm2

        model, tok = load_smollm2("ism")
    except (ImportError, FileNotFoundError) as exc:
        print(f"(chat TTFT skipped: {exc})")
        return []
    model.to(device)
    turns = [" ".join(["tell me about the river and the old city"] * 20)] * 4
    ttft = {}
    ChatSession(model, tok, "causal", max_new_tokens=2).send("Hi")  # warm-up
    for scheme in ("ism", "prefix_lm", "causal"):
        session = ChatSession(model, tok, scheme, max_new_tokens=8)
        for k, text in enumerate(turns):  # round 4 is the one timed: median of 5 runs after a warm-up
            session.send(text, ttft_repeats=5 if k == len(turns) - 1 else 0)
        ttft[scheme] = 1e3 * session.stats[-1].ttft_s
    shape = "SmolLM2-135M, round 4, ~200-tok turns"
    return [("chat TTFT", shape, ttft["ism"], "prefix-LM recompute", ttft["prefix_lm"]),
            ("chat TTFT", shape, ttft["ism"], "causal reuse", ttft["causal"])]


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the quick benchmarks and prints the table."""
    parser = argparse.ArgumentParser(prog="python -m ism_ext bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-chat", action="store_true", help="skip the model-level chat benchmark")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = (torch.cuda.get_device_name() if device == "cuda" else
             f"CPU, {torch.get_num_threads()} threads, kernels {torch.ops.ism.cpu_kernel_isa()} "
             f"(torch {torch.backends.cpu.get_cpu_capability()})")
    print(f"ism_ext bench on {where}, torch {torch.__version__} (median of {args.repeats})\n")
    rows = prefill_rows(device, args.repeats) + cache_rows(device, args.repeats)
    rows += [] if args.no_chat else chat_rows(device)
    print(f"{'benchmark':<16} {'shape':<38} {'ism ms':>9}  {'baseline':<22} {'base ms':>9} {'speedup':>8}")
    for name, shape, ours, base_name, base in rows:
        print(f"{name:<16} {shape:<38} {ours:>9.2f}  {base_name:<22} {base:>9.2f} {base / ours:>7.2f}x")

"""`python -m ism_ext bench`: the quick benchmarks that apply to this machine, printed as one table.

It measures the op against SDPA with the dense boolean mask (forward, and forward + backward), decode
and a new turn on the KV cache, one ISM training pass against triplet expansion, and the chat's time to
first token (SmolLM2, when installed). The full sweeps with JSON and plots are the scripts in
`benchmarks/` (see README); this command writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ._kvcache_ops import attn_with_kvcache, kv_limit_causal_append, kv_limit_new_segment
from ._ops import segment_attention
from .layouts import dense_mask, kv_limit_for_turns


def _ms(fn: Callable[[], object], repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _ism_layout(tokens: int) -> torch.Tensor:
    unit = tokens // 17
    turns = [("system", unit)] + [("user", unit), ("assistant", unit)] * 8
    turns[-1] = ("assistant", tokens - 16 * unit)
    return kv_limit_for_turns(turns, "ism")


def attention_rows(device: str, repeats: int) -> list[tuple[str, str, float, str, float]]:
    """(benchmark, shape, ism ms, baseline name, baseline ms) for the attention ops."""
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for tokens, backward in ((1024, False), (2048, False), (1024, True)):
        lim = _ism_layout(tokens).to(device)
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
        rows.append((name, f"ISM 8 rounds, {tokens} tok, 8x64", _ms(ours, repeats, device), "sdpa+dense mask",
                     _ms(sdpa, repeats, device)))

    batch, cache, hq, hkv, d = 4, 2048, 32, 8, 128
    kc = torch.randn(batch, cache + 256, hkv, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.full((batch,), cache, dtype=torch.int32, device=device)
    q1, k1, v1 = (torch.randn(batch, 1, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    rows.append(("decode", f"b={batch}, cache {cache}, {hq}/{hkv}x{d}",
                 _ms(lambda: attn_with_kvcache(q1, kc, vc, k1, v1, cache_seqlens=lens,
                                               kv_limit=kv_limit_causal_append(lens, 1)), repeats, device),
                 "sdpa over cache", _ms(lambda: F.scaled_dot_product_attention(
                     q1.transpose(1, 2), kc[:, :cache + 1].transpose(1, 2), vc[:, :cache + 1].transpose(1, 2),
                     enable_gqa=True), repeats, device)))
    turn = 256
    qt, kt, vt = (torch.randn(1, turn, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    qa, ka, va = (torch.randn(1, cache + turn, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    lens1 = lens[:1]
    prefix = torch.full((1, cache + turn), cache + turn, dtype=torch.int32, device=device)
    rows.append(("new turn", f"{turn} tok on {cache} history",
                 _ms(lambda: attn_with_kvcache(qt, kc[:1], vc[:1], kt, vt, cache_seqlens=lens1,
                                               kv_limit=kv_limit_new_segment(lens1, turn)), repeats, device),
                 "recompute (prefix LM)", _ms(lambda: segment_attention(qa, ka, va, prefix), repeats, device)))
    return rows


def chat_rows(device: str) -> list[tuple[str, str, float, str, float]]:
    """Round-4 time to first token: ISM reuse vs prefix-LM recompute and causal reuse (SmolLM2)."""
    try:
        from .chat import ChatSession
        from .models import load_smollm2

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
        for text in turns:
            session.send(text)
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
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ism_ext bench on {where}, torch {torch.__version__} (median of {args.repeats})\n")
    rows = attention_rows(device, args.repeats) + ([] if args.no_chat else chat_rows(device))
    print(f"{'benchmark':<16} {'shape':<38} {'ism ms':>9}  {'baseline':<22} {'base ms':>9} {'speedup':>8}")
    for name, shape, ours, base_name, base in rows:
        print(f"{name:<16} {shape:<38} {ours:>9.2f}  {base_name:<22} {base:>9.2f} {base / ours:>7.2f}x")

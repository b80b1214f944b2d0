"""A tiny, offline chat tokenizer for tests (not a test module).

`make_tokenizer()` trains the package's toy byte-level BPE (`ism_ext.training.toy.build_toy_tokenizer`,
vocabulary of about 500) on a few hundred generated sentences; it has a ChatML chat template (the Qwen /
SmolLM2 style). Nothing is downloaded; building takes a few milliseconds and the result is cached.
`sample_dialogues()` produces random multi-round chats from the same word list.
"""

from __future__ import annotations

import functools
import random

from transformers import PreTrainedTokenizerFast

from ism_ext.training.toy import CHATML_TEMPLATE, IM_END, build_toy_tokenizer

__all__ = ["CHATML_DEFAULT_SYSTEM_TEMPLATE", "CHATML_TEMPLATE", "IM_END", "LLAMA3_TEMPLATE", "build_tokenizer",
           "make_llama3_tokenizer", "make_tokenizer", "sample_dialogues"]

WORDS = (
    "the a cat dog sat on mat and ran fast slow red blue green big small house tree river sun moon star "
    "what is why how when where who can you tell me about please thanks yes no maybe answer question "
    "one two three four five six seven eight nine ten plus minus equals number word sentence model token "
    "attention mask segment turn user assistant system round history query data train test learn read write"
).split()


def _corpus(n: int, seed: int) -> list[str]:
    """`n` random sentences over `WORDS` plus the chat role names, so BPE learns merges for them."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!") for _ in range(n)]
    # Sentence-initial words without a leading space, and a few digits and punctuation.
    lines += [w.capitalize() + " " + w + "." for w in WORDS] + ["0 1 2 3 4 5 6 7 8 9 , ; : ( ) \n"]
    return lines


def build_tokenizer(chat_template: str | None = CHATML_TEMPLATE, vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """Trains and returns a fresh tiny byte-level BPE chat tokenizer (uncached: safe to modify).

    Special tokens: `<|endoftext|>` (id 0, pad), `<|im_start|>` (id 1), `<|im_end|>` (id 2, eos, as in
    instruct models where the end-of-turn token stops generation). Digits are not split (as in GPT-2 style BPE).
    """
    fast = build_toy_tokenizer(_corpus(400, seed=0), vocab_size, split_digits=False)
    fast.chat_template = chat_template
    return fast


@functools.lru_cache(maxsize=1)
def make_tokenizer() -> PreTrainedTokenizerFast:
    """The shared tiny ChatML tokenizer (cached: do not modify it; use `build_tokenizer()` for variants)."""
    return build_tokenizer()


def sample_dialogues(n: int, rounds: int, seed: int) -> list[list[dict]]:
    """`n` random chats of `rounds` (user, assistant) rounds each, about half with a leading system message."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        return " ".join(words).capitalize() + rng.choice(".?!")

    dialogues = []
    for _ in range(n):
        messages: list[dict] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": text(3, 10)})
        for _ in range(rounds):
            messages.append({"role": "user", "content": text(2, 15)})
            messages.append({"role": "assistant", "content": text(1, 20)})
        dialogues.append(messages)
    return dialogues


# ChatML with a default system prompt when the dialogue has none, as SmolLM2's template writes.
CHATML_DEFAULT_SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a small helpful model.<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML_TEMPLATE
)

# A Llama-3 style template: BOS, header tokens, <|eot_id|> ends a turn, a default system prompt.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nYou are a small helpful model.<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@functools.lru_cache(maxsize=1)
def make_llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny tokenizer with Llama 3's special tokens and a Llama-3 style template (cached: do not modify)."""
    fast = build_toy_tokenizer(_corpus(400, seed=0), 500, split_digits=False, extra_special_tokens=LLAMA3_SPECIALS,
                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    return fast

"""Toy model and tokenizer for `python -m ism_ext train --model tiny`: offline, built in code, in well under a second.

* :func:`build_toy_tokenizer` trains a small byte-level BPE (the `tokenizers` library) on the text of the
  dialogues to train on and wraps it in a `transformers.PreTrainedTokenizerFast` with a ChatML chat template
  (the Qwen / SmolLM2 style), so :class:`ism_ext.training.ChatCollator` finds the role boundaries exactly as
  it does for real instruct models. Digits are split one per token, so ``12 + 7`` is learnable digit by digit.
  The test suite builds its tokenizers with it too.
* :func:`build_tiny_llama` builds a randomly initialised Llama of about 0.1 M parameters with
  ``attn_implementation="ism"``.

Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["CHATML_TEMPLATE", "EOT", "IM_END", "IM_START", "build_tiny_llama", "build_toy_tokenizer",
           "dialogue_texts"]

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML as used by Qwen2.5 / SmolLM2 instruct models (without a default system prompt):
# `<|im_start|>{role}\n{content}<|im_end|>\n` per message, generation prompt `<|im_start|>assistant\n`.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def dialogue_texts(dialogues: Iterable[Mapping[str, Any] | Sequence[Mapping[str, Any]]]) -> list[str]:
    """The strings a toy tokenizer is trained on: every message's content, and every role name once.

    Items are message lists or ``{"messages": [...]}`` rows, as in the JSONL training files.
    """
    texts: list[str] = []
    roles: dict[str, None] = {}  # insertion-ordered set: the corpus order must not depend on hashing
    for item in dialogues:
        messages = item["messages"] if isinstance(item, Mapping) else item
        for message in messages:
            roles.setdefault(str(message["role"]), None)
            texts.append(str(message.get("content", "")))
    # The template writes "\n" after role names and between turns; train on it so merges stay ChatML-friendly.
    texts.extend(f"{role}\n" for role in roles)
    return texts


def build_toy_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    split_digits: bool = True,
    extra_special_tokens: Sequence[str] = (),
    bos_token: str | None = None,
    eos_token: str = IM_END,
) -> Any:
    """Trains a byte-level BPE chat tokenizer on ``texts`` (deterministic for the same texts).

    ``split_digits`` makes every digit a token of its own (numbers are then learnable digit by digit).
    ``extra_special_tokens`` (ids 3, 4, ...) and ``bos_token`` / ``eos_token`` (one of the special tokens)
    give other template families, e.g. Llama 3's headers.

    Special tokens: ``<|endoftext|>`` (id 0, pad), ``<|im_start|>`` (id 1), ``<|im_end|>`` (id 2, eos: in instruct
    models the end-of-turn token is what stops generation). Every byte is in the vocabulary, so any text
    (not only ``texts``) tokenises. Returns a `transformers.PreTrainedTokenizerFast` with a ChatML template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one per token (as Llama 3 / Qwen do for numbers): a tiny model then learns arithmetic per digit
    # instead of memorising one token per number.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: the offsets must cover every character (ism_ext.turns maps characters to tokens).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, IM_START, IM_END, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos_token, pad_token=EOT, bos_token=bos_token,
        additional_special_tokens=[IM_START, IM_END, *extra_special_tokens],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 2048,
    pad_token_id: int | None = 0,
    eos_token_id: int | None = 2,
    attn_implementation: str = "ism",
) -> torch.nn.Module:
    """A randomly initialised `LlamaForCausalLM` (GQA, untied embeddings), float32, initialised from ``seed``.

    The defaults give about 0.1 M parameters plus the embeddings: a forward + backward step over a batch of toy
    dialogues takes milliseconds on a CPU, which keeps ``--model tiny`` runs and their tests fast.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    if attn_implementation == "ism":
        from ..integrations import hf  # noqa: F401  (registers attn_implementation="ism")

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    # The initialisation draws from torch's global generator: seed a private fork of it so the model is a
    # function of `seed` alone and the caller's random stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model

"""The prefix-LM baseline of the ISM paper: one sample per answer ("triplet expansion")."""

from __future__ import annotations

from typing import Any

from ..turns.render import TokenizedDialogue, render_and_tokenize

__all__ = ["tokenize_triplet", "triplet_expansion"]


def triplet_expansion(messages: list[dict]) -> list[list[dict]]:
    """The prefix-LM baseline's samples of a dialogue (the "triplet expansion" of the ISM paper).

    An n-round dialogue ``[system] q1 a1 ... qn an`` becomes n samples; sample k is the history of rounds
    ``< k``, query k and answer k, i.e. ``messages`` truncated right after the k-th assistant message. A
    prefix LM needs them because a bidirectional prefix can only serve one answer per forward pass, which
    costs about ``(n + 1) / 2`` times the tokens of the one-pass ISM dialogue.

    Returns:
        One message list per assistant message (shallow copies of the dicts' list, in order).
    """
    return [list(messages[: i + 1]) for i, message in enumerate(messages) if message.get("role") == "assistant"]


def tokenize_triplet(
    tokenizer: Any,
    messages: list[dict],
    max_length: int | None = None,
    *,
    chat_template_kwargs: dict | None = None,
) -> TokenizedDialogue:
    """Tokenise one triplet-expansion sample for the prefix-LM baseline.

    ``messages`` must end with the answer to train (as produced by :func:`triplet_expansion`). The layout is
    ``prefix_lm`` (everything before the last answer, its generation prompt included, is one bidirectional
    block) and only the last answer is labelled.

    Raises:
        ValueError: as :func:`ism_ext.turns.tokenize_dialogue`; also when ``messages`` does not end with an
            assistant message or the sample is longer than ``max_length`` (dropping rounds would drop the
            answer that defines the sample, so it is refused rather than silently becoming another sample).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a triplet must end with the assistant message to train")
    dialogue = render_and_tokenize(tokenizer, messages, "prefix_lm", None, {len(messages) - 1}, chat_template_kwargs)
    if max_length is not None and len(dialogue) > max_length:
        raise ValueError(f"triplet of {len(dialogue)} tokens does not fit max_length={max_length}")
    return dialogue

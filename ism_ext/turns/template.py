"""What the renderer needs from a tokenizer: its chat template's text and its character offsets.

Role boundaries are found on the template's own text (never on guessed token ids) and mapped to
tokens through the fast tokenizer's offsets mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..masks import ROLES


def check_tokenizer(tokenizer: Any) -> None:
    """Rejects tokenizers the boundary mapping cannot work with, with a message that says what to do."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template (tokenizer.chat_template is None); role boundaries are taken "
            "from the template's own rendering, so set one (e.g. tokenizer.chat_template = '...') first"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"a fast (Rust `tokenizers`) tokenizer is required for character offsets "
            f"(return_offsets_mapping), got {type(tokenizer).__name__} with is_fast=False; load it with "
            f"AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Validates the message list and returns the roles."""
    if len(messages) == 0:
        raise ValueError("messages is empty")
    roles = []
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"message {k} must be a dict with a 'role' key, got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {k}: unknown role {message['role']!r}; expected one of {ROLES}")
        roles.append(message["role"])
    if roles[0] == "assistant":
        # The generation prompt of a first answer would be the rendering of an empty conversation, which
        # transformers refuses to render; a dialogue to train on starts with input anyway.
        raise ValueError("the dialogue must start with a system, user or tool message, not an assistant message")
    return roles


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """Regex matching any special token string (the end-of-turn token is one of them)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added.content))
    specials.discard("")
    if not specials:
        return None
    # Longest first so that a token which is a prefix of another does not win the alternation.
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def render_text(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool, kwargs: dict) -> str:
    """The chat template's text for ``messages`` (never tokenised here: boundaries are found on the text)."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt, **kwargs
    )
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (int64 ``[L]``) and character spans (int64 ``[L, 2]``) of ``text``; no special tokens added."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
    offsets = torch.tensor(enc["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
    return ids, offsets


def map_boundaries(offsets: torch.Tensor, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Character boundaries -> token boundaries.

    Args:
        offsets: int64 ``[L, 2]`` character span of every token of the text.
        bounds: int64 ``[K]`` character positions in ``[0, len(text)]``.

    Returns:
        ``(tok, inside)``: ``tok[k]`` = number of tokens that start before ``bounds[k]`` (the token index of the
        boundary), and ``inside[k]`` = the boundary falls strictly inside a token, i.e. the text does not
        tokenise as the concatenation of the pieces on both sides.
    """
    if offsets.shape[0] == 0:
        return torch.zeros_like(bounds), torch.zeros_like(bounds, dtype=torch.bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    # Tokenizers that trim offsets drop a token's leading whitespace from its span; a gap between two tokens
    # is attributed to the following token (where GPT-2 style pre-tokenisation puts spaces), so a boundary in
    # such a gap is still detected as inside that token. Both sequences are non-decreasing, so is this one.
    eff_starts = starts.clone()
    eff_starts[1:] = torch.minimum(starts[1:], ends[:-1])
    eff_starts[0] = 0
    tok = torch.searchsorted(eff_starts, bounds, side="left")
    inside = (tok > 0) & (ends[(tok - 1).clamp(min=0)] > bounds)
    return tok, inside

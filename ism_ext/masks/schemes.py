"""Attention layouts of chat dialogues: which turns are bidirectional segments under each scheme.

A dialogue is a sequence of ``(role, n_tokens)`` turns; roles are ``"system"``, ``"user"``,
``"assistant"`` and ``"tool"`` (a tool result is input to the model), and ``"template"``: text the chat
template writes around a message (headers, the glue between turns, BOS) when a scheme separates it from
the message (only ``"mas"`` does); it is always causal.

Schemes (docs/layouts.md):

* ``"ism"`` -- Intermittent Semi-working Mask (arXiv 2408.00539): every system, user and tool turn is its
  own bidirectional segment; assistant tokens are causal.
* ``"mas"`` -- Segment-Based Attention Masking (Katz et al., ACL 2025, arXiv 2412.18487) as its authors
  build it: every system and user message is its own bidirectional block (from its header through its
  end-of-turn token: the renderer cuts the template text around it into ``"template"`` turns); tool
  turns, template text and answers are causal. Two consecutive user messages are two blocks.
* ``"mas_merged"`` -- the MAS idea with whole turns: a run of consecutive turns of the same
  non-assistant role (``tool`` counting as ``user``) is merged into one block, each block bidirectional,
  with the assistant header prefilled inside the block before it; assistant tokens are causal. Equal to
  ``ism`` for the usual system/user/assistant alternation.
* ``"prefix_lm"`` -- everything before the last assistant turn is one bidirectional block and that last
  assistant turn is causal. If the dialogue does not end with an assistant turn (no answer yet, e.g. a
  prompt waiting for generation) the whole dialogue is the prefix.
* ``"causal"`` -- plain causal LM, every token ``-1``.

Zero-length turns are allowed and are dropped before a scheme is applied: they take no tokens and
neither split nor join blocks.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .segments import kv_limit_from_segment_ids

__all__ = [
    "ROLES",
    "SCHEMES",
    "TURN_ROLES",
    "check_scheme",
    "check_turns",
    "kv_limit_for_turns",
    "segment_ids_for_turns",
    "turn_boundaries",
]

SCHEMES: tuple[str, ...] = ("ism", "mas", "mas_merged", "prefix_lm", "causal")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")  # the roles of chat messages
TURN_ROLES: tuple[str, ...] = (*ROLES, "template")  # and of turns: template text cut out of a message's turn

# Roles that are model input (bidirectional candidates); the assistant's own text is always generated,
# hence causal. For MAS merging, a tool result is a user-side message.
_MERGE_ROLE = {"system": "system", "user": "user", "tool": "user"}


def check_turns(turns: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Validates ``turns`` and returns them as a list of ``(role, int length)``; ValueError names the bad turn."""
    checked: list[tuple[str, int]] = []
    for k, turn in enumerate(turns):
        try:
            role, length = turn
        except (TypeError, ValueError):
            raise ValueError(f"turn {k} must be a (role, length) pair, got {turn!r}") from None
        if role not in TURN_ROLES:
            raise ValueError(f"turn {k}: unknown role {role!r}; expected one of {TURN_ROLES}")
        # bool is an Integral subclass but a True/False length is surely a bug.
        if not isinstance(length, numbers.Integral) or isinstance(length, bool):
            raise ValueError(f"turn {k}: length must be an int, got {length!r}")
        if length < 0:
            raise ValueError(f"turn {k}: length must be >= 0, got {length}")
        checked.append((role, int(length)))
    return checked


def check_scheme(scheme: str) -> None:
    """Raise ``ValueError`` naming ``scheme`` if it is not one of :data:`SCHEMES`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")


def segment_ids_for_turns(turns: Sequence[tuple[str, int]], scheme: str) -> torch.Tensor:
    """Per-token segment ids of a dialogue under ``scheme``.

    Args:
        turns: ``(role, n_tokens)`` pairs in dialogue order; roles from :data:`TURN_ROLES`, lengths ``>= 0``.
        scheme: one of :data:`SCHEMES`.

    Returns:
        int32 1-D tensor of length ``sum(n_tokens)`` on the CPU: ``-1`` for causal tokens, otherwise the
        block id, numbered 0, 1, 2, ... in order of appearance. Feed it to
        :func:`ism_ext.masks.kv_limit_from_segment_ids`.

    Raises:
        ValueError: unknown scheme or role, non-int or negative length, malformed turn.
    """
    check_scheme(scheme)
    # Zero-length turns would otherwise split MAS blocks or decide which assistant turn is "last".
    live = [(role, length) for role, length in check_turns(turns) if length > 0]

    roles = [role for role, _ in live]
    labels = _SCHEME_LABELS[scheme](roles)  # one label per turn, then expanded to tokens in one call
    lengths = torch.tensor([length for _, length in live], dtype=torch.int64)
    return torch.repeat_interleave(torch.tensor(labels, dtype=torch.int32), lengths)


def _ism_labels(roles: list[str]) -> list[int]:
    """Every input turn its own block."""
    labels, next_id = [], 0
    for role in roles:
        if role in ("assistant", "template"):
            labels.append(-1)
        else:
            labels.append(next_id)
            next_id += 1
    return labels


def _mas_labels(roles: list[str]) -> list[int]:
    """Every system and user message its own block; tools, template text and answers causal."""
    return _ism_labels(["template" if role == "tool" else role for role in roles])


def _mas_merged_labels(roles: list[str]) -> list[int]:
    """A run of input turns of one (merged) role is one block."""
    labels, next_id, prev = [], 0, None
    for role in roles:
        if role in ("assistant", "template"):
            labels.append(-1)
            prev = None
            continue
        merged = _MERGE_ROLE[role]
        if merged != prev:  # a new block whenever the (merged) role changes or an answer intervened
            next_id += 1
            prev = merged
        labels.append(next_id - 1)
    return labels


def _prefix_lm_labels(roles: list[str]) -> list[int]:
    """Everything before the last answer one block (the whole dialogue when it does not end with one)."""
    labels = [0] * len(roles)
    if roles and roles[-1] == "assistant":
        labels[-1] = -1
    return labels


_SCHEME_LABELS = {
    "ism": _ism_labels,
    "mas": _mas_labels,
    "mas_merged": _mas_merged_labels,
    "prefix_lm": _prefix_lm_labels,
    "causal": lambda roles: [-1] * len(roles),
}


def kv_limit_for_turns(
    turns: Sequence[tuple[str, int]], scheme: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-token ``kv_limit`` (int32, 1-D) of a dialogue under ``scheme``.

    Same as ``kv_limit_from_segment_ids(segment_ids_for_turns(turns, scheme))``, computed on ``device``
    (CPU when ``None``).
    """
    ids = segment_ids_for_turns(turns, scheme)
    if device is not None:
        ids = ids.to(device)
    return kv_limit_from_segment_ids(ids)


def turn_boundaries(turns: Sequence[tuple[str, int]]) -> list[int]:
    """Token offsets where each turn starts, followed by the total length (``len(turns) + 1`` values).

    Zero-length turns keep their entry (equal to the next one), so index ``k`` always refers to turn
    ``k``: turn ``k`` occupies tokens ``[b[k], b[k + 1])``.
    """
    bounds = [0]
    for _, length in check_turns(turns):
        bounds.append(bounds[-1] + length)
    return bounds

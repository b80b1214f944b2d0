"""Attention layouts of chat dialogues: which turns are bidirectional segments under each scheme.

A dialogue is a sequence of ``(role, n_tokens)`` turns; roles are ``"system"``, ``"user"``,
``"assistant"`` and ``"tool"`` (a tool result is input to the model, so it is treated like a user turn).

Schemes (docs/layouts.md):

* ``"ism"`` -- Intermittent Semi-working Mask (arXiv 2408.00539): every system, user and tool turn is its
  own bidirectional segment; assistant tokens are causal.
* ``"mas"`` -- Segment-Based Attention Masking (Katz et al., ACL 2025, arXiv 2412.18487): a run of
  consecutive turns of the same non-assistant role (``tool`` counting as ``user``) is merged into one
  block, each block bidirectional; assistant tokens are causal. Equal to ``ism`` for the usual
  system/user/assistant alternation.
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
    "check_scheme",
    "check_turns",
    "kv_limit_for_turns",
    "segment_ids_for_turns",
    "turn_boundaries",
]

SCHEMES: tuple[str, ...] = ("ism", "mas", "prefix_lm", "causal")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

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
        if role not in ROLES:
            raise ValueError(f"turn {k}: unknown role {role!r}; expected one of {ROLES}")
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
        turns: ``(role, n_tokens)`` pairs in dialogue order; roles from :data:`ROLES`, lengths ``>= 0``.
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

    # One label per turn (Python loop over turns, not tokens), then expanded to tokens in one call.
    labels: list[int] = []
    if scheme == "causal":
        labels = [-1] * len(live)
    elif scheme == "ism":
        next_id = 0
        for role, _ in live:
            if role == "assistant":
                labels.append(-1)
            else:
                labels.append(next_id)
                next_id += 1
    elif scheme == "mas":
        next_id = 0
        prev_role: str | None = None
        for role, _ in live:
            if role == "assistant":
                labels.append(-1)
                prev_role = None
                continue
            merged = _MERGE_ROLE[role]
            if merged != prev_role:
                # A new block starts whenever the (merged) role changes or an assistant turn intervened.
                next_id += 1
                prev_role = merged
            labels.append(next_id - 1)
    else:  # prefix_lm
        answer_is_last = bool(live) and live[-1][0] == "assistant"
        labels = [0] * len(live)
        if answer_is_last:
            labels[-1] = -1

    lengths = torch.tensor([length for _, length in live], dtype=torch.int64)
    return torch.repeat_interleave(torch.tensor(labels, dtype=torch.int32), lengths)


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

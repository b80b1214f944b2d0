"""Conversational datasets -> the project's tokens: ``{"messages": [...]}`` rows become ``input_ids``, assistant-only
``labels`` and ``block_sequence_ids`` through the one turn renderer (:func:`ism_ext.turns.tokenize_dialogue`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...masks import SCHEMES
from ...turns import tokenize_dialogue
from .collator import FEATURES

__all__ = ["tokenize_conversations"]


def _tokenize_row(row: Mapping[str, Any], index: int, tokenizer: Any, scheme: str,
                  max_length: int | None) -> dict[str, list[int]]:
    """One ``{"messages": [...]}`` row -> its three token columns (errors name the row)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'dataset row {index}: expected a non-empty "messages" list, got {type(messages).__name__}')
    if row.get("tools") is not None:
        raise ValueError(f'dataset row {index}: a "tools" column is not supported by the ISM renderer')
    try:
        dialogue = tokenize_dialogue(tokenizer, messages, scheme, max_length,
                                     chat_template_kwargs=row.get("chat_template_kwargs"))
    except ValueError as e:
        raise ValueError(f"dataset row {index}: {e}") from e
    return {key: getattr(dialogue, key).tolist() for key in FEATURES}


def tokenize_conversations(dataset: Any, tokenizer: Any, scheme: str = "ism", max_length: int | None = None,
                           num_proc: int | None = None) -> Any:
    """Tokenises a conversational dataset for one-pass ISM / MAS training.

    Every row's ``messages`` go through the chat template of ``tokenizer`` and the project's turn renderer, so
    the tokens, the labels (each answer's generated text and end-of-turn token only) and the segments are those
    of ``python -m ism_ext train`` and of the chat session. A dialogue longer than ``max_length`` loses whole
    trailing rounds, never part of a turn. An optional per-row ``chat_template_kwargs`` column is passed to the
    template.

    Args:
        dataset: a `datasets.Dataset` with a ``messages`` column, or a list of ``{"messages": [...]}`` rows or of
            message lists. An already tokenised dataset (it has the three columns) is returned as it is.
        tokenizer: fast tokenizer with a chat template.
        scheme: layout scheme of :mod:`ism_ext.masks.schemes` ("ism", "mas", ...).
        max_length: per-dialogue limit in tokens (None: no limit).
        num_proc: worker processes for `datasets.Dataset.map`.

    Returns:
        A `datasets.Dataset` with the columns ``input_ids``, ``labels`` and ``block_sequence_ids`` (lists of
        ints, one dialogue per row; the other columns are dropped).

    Raises:
        ValueError: unknown scheme, a row without messages or with tools, or a dialogue the renderer rejects
            (the message names the row).
    """
    import datasets

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if isinstance(dataset, Sequence) and not isinstance(dataset, datasets.Dataset):
        dataset = datasets.Dataset.from_list([r if isinstance(r, Mapping) else {"messages": list(r)}
                                              for r in dataset])
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset or a list of rows, got {type(dataset).__name__}")
    if set(FEATURES) <= set(dataset.column_names):
        return dataset
    if "messages" not in dataset.column_names:
        raise ValueError(f'the dataset must be conversational (a "messages" column) or tokenised ({FEATURES}); '
                         f"its columns are {dataset.column_names}")
    return dataset.map(_tokenize_row, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
                       fn_kwargs={"tokenizer": tokenizer, "scheme": scheme, "max_length": max_length},
                       desc=f"Tokenizing dialogues ({scheme})")

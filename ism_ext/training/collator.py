"""`ChatCollator`: a batch of dialogues (message lists) -> model inputs for one-pass training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..masks import SCHEMES
from ..turns import IGNORE_INDEX, TokenizedDialogue, tokenize_dialogue
from .packing import pack_dialogues, pad_row

__all__ = ["ChatCollator"]


class ChatCollator:
    """Batch collator: a list of dialogues (message lists) -> model inputs for one-pass training.

    Padded mode (``pack=False``): one dialogue per row, right-padded to the longest; returns ``input_ids``,
    ``attention_mask`` (1 = token, 0 = padding), ``labels`` (``IGNORE_INDEX`` on padding) and ``block_sequence_ids``
    (``-1`` on padding), all int64 ``[B, L]``.

    Packed mode (``pack=True``): :func:`pack_dialogues` with ``max_tokens = max_length`` (or the longest
    dialogue of the batch when ``max_length`` is None), rows right-padded to the longest row; returns
    ``input_ids``, ``labels``, ``block_sequence_ids`` and ``position_ids``, all int64 ``[n_rows, L]``, and
    *no* ``attention_mask``: the dialogue boundaries are the restarts of ``position_ids`` (transformers'
    packed-sequence convention, which transformers and ``ism_ext.integrations.hf`` only honour without an
    attention mask). The padding tail of a row is one more sequence with positions ``0, 1, ...``, labels
    ``IGNORE_INDEX`` and causal segment ids, so it attends only itself and carries no loss. ``cu_seqlens`` is
    not returned (rows have different numbers of sequences, and it follows from ``position_ids``); use
    :func:`pack_dialogues` for it.

    Args:
        tokenizer: fast tokenizer with a chat template. Padding uses its pad token, else its eos token.
        scheme: layout scheme of :mod:`ism_ext.masks.schemes`.
        max_length: per-dialogue limit (whole trailing rounds dropped) and, when packing, the row capacity.
        pack: pack several dialogues per row.
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 or 64 for tensor cores).
        chat_template_kwargs: extra template variables passed to :func:`ism_ext.turns.tokenize_dialogue`.

    Items may be message lists or mappings with a ``"messages"`` key (a Hugging Face dataset row).
    """

    def __init__(
        self,
        tokenizer: Any,
        scheme: str = "ism",
        max_length: int | None = None,
        pack: bool = False,
        pad_to_multiple_of: int | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.tokenizer = tokenizer
        self.scheme = scheme
        self.max_length = max_length
        self.pack = pack
        self.pad_to_multiple_of = pad_to_multiple_of
        self.chat_template_kwargs = chat_template_kwargs
        self.pad_token_id = int(pad_id)

    def __call__(self, dialogues: Sequence[Sequence[Mapping[str, Any]] | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenises, then pads or packs, the dialogues of one batch (see the class docstring)."""
        if len(dialogues) == 0:
            raise ValueError("empty batch")
        tokenized = [
            tokenize_dialogue(
                self.tokenizer,
                list(d["messages"] if isinstance(d, Mapping) else d),
                self.scheme,
                self.max_length,
                chat_template_kwargs=self.chat_template_kwargs,
            )
            for d in dialogues
        ]
        return collate_tokenized(tokenized, pad_token_id=self.pad_token_id, pack=self.pack,
                                 max_length=self.max_length, pad_to_multiple_of=self.pad_to_multiple_of)


def collate_tokenized(dialogues: Sequence[TokenizedDialogue], *, pad_token_id: int, pack: bool,
                      max_length: int | None, pad_to_multiple_of: int | None) -> dict[str, torch.Tensor]:
    """The batch of already tokenised dialogues that `ChatCollator` returns (and the TRL collator, which gets its
    dialogues tokenised by the dataset): one per row, padded, with `attention_mask`; or packed whole into rows of
    at most `max_length` tokens with `position_ids` restarting per dialogue. Lengths round up to
    `pad_to_multiple_of`."""

    def padded_length(n: int) -> int:
        return n if pad_to_multiple_of is None else -(-n // pad_to_multiple_of) * pad_to_multiple_of

    if pack:
        capacity = max_length if max_length is not None else max(len(t) for t in dialogues)
        rows = pack_dialogues(dialogues, capacity, pad_token_id)
        length = padded_length(max(r["input_ids"].shape[1] for r in rows))
        rows = [pad_row(r, length, pad_token_id) for r in rows]
        keys = ("input_ids", "labels", "block_sequence_ids", "position_ids")
        return {key: torch.cat([r[key] for r in rows], dim=0) for key in keys}

    length = padded_length(max(len(t) for t in dialogues))
    batch = len(dialogues)
    out = {
        "input_ids": torch.full((batch, length), pad_token_id, dtype=torch.int64),
        "attention_mask": torch.zeros((batch, length), dtype=torch.int64),
        "labels": torch.full((batch, length), IGNORE_INDEX, dtype=torch.int64),
        "block_sequence_ids": torch.full((batch, length), -1, dtype=torch.int64),
    }
    for b, t in enumerate(dialogues):
        n = len(t)
        out["input_ids"][b, :n] = t.input_ids
        out["attention_mask"][b, :n] = 1
        out["labels"][b, :n] = t.labels
        out["block_sequence_ids"][b, :n] = t.block_sequence_ids
    return out

"""`IsmDataCollator`: pre-tokenised dialogues (a dataset's rows) -> padded or packed ISM training batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...training.collator import collate_tokenized
from ...turns import TokenizedDialogue

__all__ = ["FEATURES", "IsmDataCollator"]

# The columns a row of a tokenised dataset carries (see `tokenize_conversations`).
FEATURES = ("input_ids", "labels", "block_sequence_ids")


def _as_dialogue(feature: Mapping[str, Any], index: int) -> TokenizedDialogue:
    """One dataset row as the `TokenizedDialogue` that packing takes (its per-turn lengths are not needed)."""
    missing = [key for key in FEATURES if key not in feature]
    if missing:
        raise ValueError(
            f"batch row {index} has no {missing} (it has {sorted(feature)}): tokenise the dataset with "
            f"ism_ext.integrations.trl.tokenize_conversations, and with a plain transformers Trainer pass "
            f"TrainingArguments(remove_unused_columns=False), or the Trainer drops block_sequence_ids"
        )
    tensors = [torch.as_tensor(feature[key], dtype=torch.int64) for key in FEATURES]
    if len({t.numel() for t in tensors}) != 1 or tensors[0].dim() != 1:
        raise ValueError(f"batch row {index}: {FEATURES} must be 1-D lists of one length, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    return TokenizedDialogue(*tensors, turns=[])


class IsmDataCollator:
    """Batches rows of a tokenised chat dataset (``input_ids``, ``labels``, ``block_sequence_ids`` per dialogue).

    The output is what :class:`ism_ext.training.ChatCollator` gives for the same dialogues, so a Hugging Face
    `Trainer` / TRL `SFTTrainer` step sees the batch of the project's own ``train`` loop:

    * padded (``pack=False``): one dialogue per row, right-padded; ``input_ids``, ``attention_mask``, ``labels``
      (``IGNORE_INDEX`` on padding) and ``block_sequence_ids`` (``-1`` on padding), int64 ``[B, L]``;
    * packed (``pack=True``, padding-free): dialogues packed first-fit into rows of at most ``max_length`` tokens
      (the longest dialogue of the batch when None) by :func:`ism_ext.training.pack_dialogues`, ``position_ids``
      restarting at 0 for every dialogue and no ``attention_mask`` (the restarts are the boundaries); a dialogue is
      never cut.

    Args:
        pad_token_id: id of the padding tokens.
        pack: pack several dialogues per row.
        max_length: row capacity when packing (a dialogue longer than it raises: tokenise with the same limit).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, pack: bool = False, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None) -> None:
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pack = pack
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pads or packs the rows of one batch (see the class docstring)."""
        if len(features) == 0:
            raise ValueError("empty batch")
        dialogues = [_as_dialogue(f, k) for k, f in enumerate(features)]
        return collate_tokenized(dialogues, pad_token_id=self.pad_token_id, pack=self.pack,
                                 max_length=self.max_length, pad_to_multiple_of=self.pad_to_multiple_of)

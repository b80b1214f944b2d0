"""Packing several tokenised dialogues into one row, with position ids restarting per dialogue."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..turns import IGNORE_INDEX, TokenizedDialogue

__all__ = ["pack_dialogues", "pad_row"]


def pad_row(row: dict[str, torch.Tensor], length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a packed row to ``length``; the padding tail is a sequence of its own (positions 0..)."""
    n_pad = length - row["input_ids"].shape[1]
    if n_pad < 0:
        raise ValueError(f"row of {row['input_ids'].shape[1]} tokens is longer than the padded length {length}")
    if n_pad == 0:
        return row

    def cat(x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, tail.to(x.dtype).unsqueeze(0)], dim=1)

    out = dict(row)
    out["input_ids"] = cat(row["input_ids"], torch.full((n_pad,), pad_token_id))
    out["labels"] = cat(row["labels"], torch.full((n_pad,), IGNORE_INDEX))
    out["block_sequence_ids"] = cat(row["block_sequence_ids"], torch.full((n_pad,), -1))
    out["position_ids"] = cat(row["position_ids"], torch.arange(n_pad))
    cu = row["cu_seqlens"]
    out["cu_seqlens"] = torch.cat([cu, torch.tensor([int(cu[-1]) + n_pad], dtype=cu.dtype)])
    return out


def _first_fit(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Rows of dialogue indices: each dialogue goes, in order, into the first row with room for it."""
    rows: list[list[int]] = []
    free: list[int] = []
    for k, n_tok in enumerate(lengths):
        for r, room in enumerate(free):
            if n_tok <= room:
                rows[r].append(k)
                free[r] -= n_tok
                break
        else:
            rows.append([k])
            free.append(max_tokens - n_tok)
    return rows


def _row_labels_and_ids(parts: Sequence[TokenizedDialogue]) -> tuple[torch.Tensor, torch.Tensor]:
    """The row's labels (no loss across a dialogue boundary) and segment ids (no id shared by two dialogues)."""
    labels = []
    ids = []
    offset = 0
    for d in parts:
        lab = d.labels.clone()
        # The causal-LM loss predicts labels[t + 1] from position t. Position t = last token of the
        # previous dialogue would be asked to predict this dialogue's first token, which it cannot see
        # (a new dialogue starts): no loss may cross a dialogue boundary.
        if lab.numel():
            lab[0] = IGNORE_INDEX
        labels.append(lab)
        seg = d.block_sequence_ids.to(torch.int64)
        # Shift this dialogue's ids past every id used so far in the row (transformers' blockwise overlay
        # joins equal ids anywhere in a row, so a shared id would let two dialogues attend each other).
        ids.append(torch.where(seg >= 0, seg + offset, seg))
        if seg.numel() and int(seg.max()) >= 0:
            offset += int(seg.max()) + 1
    return torch.cat(labels).to(torch.int64), torch.cat(ids)


def _pack_row(dialogues: Sequence[TokenizedDialogue], members: list[int]) -> dict[str, torch.Tensor]:
    """One packed row of the dialogues ``members`` (see `pack_dialogues` for its fields)."""
    parts = [dialogues[k] for k in members]
    labels, ids = _row_labels_and_ids(parts)
    lens = torch.tensor([len(d) for d in parts], dtype=torch.int64)
    cu = torch.zeros(len(parts) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    # Position restarts: arange over the row minus the start of each token's dialogue.
    starts = torch.repeat_interleave(cu[:-1].to(torch.int64), lens)
    position_ids = torch.arange(int(lens.sum()), dtype=torch.int64) - starts
    return {
        "input_ids": torch.cat([d.input_ids.to(torch.int64) for d in parts]).unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "block_sequence_ids": ids.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "cu_seqlens": cu,
        "dialogue_indices": torch.tensor(members, dtype=torch.int64),
    }


def pack_dialogues(
    dialogues: Sequence[TokenizedDialogue],
    max_tokens: int,
    pad_token_id: int,
    *,
    pad_to: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Greedy first-fit packing of dialogues into rows of at most ``max_tokens`` tokens.

    Each dialogue goes, in order, into the first row that still has room for it (a new row if none has).

    Args:
        dialogues: tokenised dialogues, each at most ``max_tokens`` long.
        max_tokens: capacity of a row.
        pad_token_id: id of the padding tokens (only used with ``pad_to``).
        pad_to: if given, every row is right-padded to this length (at least the longest row's length, e.g.
            ``max_tokens`` for fixed shapes). The padding tail is one extra sequence: pad ids, labels
            ``IGNORE_INDEX``, segment ids ``-1``, position ids ``0, 1, ...`` and its own ``cu_seqlens`` entry.

    Returns:
        One dict per row with ``input_ids``, ``labels``, ``block_sequence_ids``, ``position_ids`` (int64
        ``[1, L]``), ``cu_seqlens`` (int32 ``[n_seq + 1]``, FlashAttention's varlen offsets of the row's
        dialogues) and ``dialogue_indices`` (int64 ``[n_dialogues]``: which input dialogues, in row order).
        ``position_ids`` restart at 0 for every dialogue, which is how transformers (and
        ``ism_ext.integrations.hf``) see packed-sequence boundaries; segment ids are renumbered so no id is
        shared by two dialogues.

    Raises:
        ValueError: ``max_tokens < 1``, or a dialogue longer than ``max_tokens``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = [len(d) for d in dialogues]
    for k, n_tok in enumerate(lengths):
        if n_tok > max_tokens:
            raise ValueError(
                f"dialogue {k} has {n_tok} tokens > max_tokens={max_tokens}; tokenise it with max_length to drop "
                f"trailing rounds"
            )
    rows = [_pack_row(dialogues, members) for members in _first_fit(lengths, max_tokens)]
    return rows if pad_to is None else [pad_row(row, pad_to, pad_token_id) for row in rows]

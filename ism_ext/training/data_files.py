"""Training data on disk: the JSONL chat file, each rank's batch order, collation with line-numbered errors."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..masks import ROLES
from ..turns import tokenize_dialogue
from .config import TrainError

__all__ = ["ChatExample", "batches_for_epoch", "file_digest", "load_chat_jsonl", "make_collate", "tokenizer_digest"]


@dataclass
class ChatExample:
    """One dialogue of a JSONL file: its messages and the (1-based) line it came from, for error messages."""

    messages: list[dict[str, Any]]
    line: int


def load_chat_jsonl(path: str | os.PathLike) -> list[ChatExample]:
    """Reads and validates a JSONL chat file: one ``{"messages": [{"role", "content"}, ...]}`` object per line.

    Blank lines are skipped. Each dialogue must start with a non-assistant message and contain at least one
    assistant message (otherwise it has nothing to train). Validation happens here, once, so that a bad line is
    reported by its line number before any model is loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TrainError: invalid JSON, a wrong structure, an unknown role or an empty file; the message names the
            file and the line.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    examples: list[ChatExample] = []
    with path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise TrainError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise TrainError(f'{where}: expected an object with a non-empty "messages" list')
            for k, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                    raise TrainError(f'{where}: message {k} must be an object with a string "content"')
                if m.get("role") not in ROLES:
                    raise TrainError(f"{where}: message {k} has role {m.get('role')!r}; expected one of {ROLES}")
            roles = [m["role"] for m in messages]
            if roles[0] == "assistant":
                raise TrainError(f"{where}: the dialogue starts with an assistant message")
            if "assistant" not in roles:
                raise TrainError(f"{where}: the dialogue has no assistant message (nothing to train on)")
            examples.append(ChatExample(messages, line_no))
    if not examples:
        raise TrainError(f"{path}: no dialogues (the file is empty)")
    return examples


def batches_for_epoch(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches (dataset indices) of one epoch: a `DistributedSampler` order, chunked.

    The order is a pure function of ``(seed, epoch, rank, world)``, so a resumed run recomputes it and skips to
    the saved batch; every rank gets the same number of batches (the sampler pads), which keeps DDP in step.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def make_collate(collator: Any, examples: Sequence[ChatExample], data_path: pathlib.Path) -> Callable:
    """Wraps the collator so that a dialogue it rejects is reported with its line in the data file."""
    def collate(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        try:
            return collator([examples[i].messages for i in indices])
        except ValueError as batch_error:
            # Only on failure: find the culprit by tokenising the batch's dialogues one at a time.
            for i in indices:
                try:
                    tokenize_dialogue(collator.tokenizer, examples[i].messages, collator.scheme, collator.max_length)
                except ValueError as e:
                    raise TrainError(f"{data_path}, line {examples[i].line}: {e}") from e
            raise batch_error

    return collate


def file_digest(path: pathlib.Path) -> str:
    """sha256 of the file's bytes (a resumed run must read the same data)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """Fingerprint of what decides the token ids (vocabulary, special tokens, chat template)."""
    desc = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(str(t) for t in tokenizer.all_special_tokens),
        "template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()

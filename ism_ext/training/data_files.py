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

__all__ = ["ChatExample", "batches_for_epoch", "check_dialogues_fit", "file_digest", "load_chat_jsonl", "make_collate",
           "tokenizer_digest"]


@dataclass
class ChatExample:
    """One dialogue of a JSONL file: its messages and the (1-based) line it came from, for error messages."""

    messages: list[dict[str, Any]]
    line: int


MAX_PROBLEMS = 10  # problems listed in one error (the count of the rest follows)
_BOM = "\ufeff"


def _problems_error(path: pathlib.Path, problems: list[str]) -> TrainError:
    """One TrainError listing the first problems of a file (each "line N: reason")."""
    shown = problems[:MAX_PROBLEMS]
    more = f"\n  ... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
    noun = "problem" if len(problems) == 1 else "problems"
    return TrainError(f"{path}: {len(problems)} {noun}:\n  " + "\n  ".join(f"{path}, {p}" for p in shown) + more)


def _parse_line(raw: bytes, line_no: int) -> list[dict[str, Any]]:
    """The messages of one JSONL line; raises ValueError with the reason (without the file and line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)") from None
    if line_no == 1 and text.startswith(_BOM):
        text = text[1:]  # a byte order mark at the start of the file (some editors write one): not content
    elif _BOM in text:
        raise ValueError("holds a byte order mark (U+FEFF), e.g. from files joined together; remove it")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected an object with a non-empty "messages" list')
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f'message {k} must be an object with a string "content"')
        if m.get("role") not in ROLES:
            raise ValueError(f"message {k} has role {m.get('role')!r}; expected one of {ROLES}")
    roles = [m["role"] for m in messages]
    if roles[0] == "assistant":
        raise ValueError("the dialogue starts with an assistant message")
    if "assistant" not in roles:
        raise ValueError("the dialogue has no assistant message (nothing to train on)")
    return messages


def load_chat_jsonl(path: str | os.PathLike) -> list[ChatExample]:
    """Reads and validates a JSONL chat file: one ``{"messages": [{"role", "content"}, ...]}`` object per line.

    Blank lines are skipped; a UTF-8 byte order mark at the start of the file is ignored. Each dialogue must
    start with a non-assistant message and contain at least one assistant message (otherwise it has nothing to
    train). The whole file is validated here, once, so that every bad line is reported (by line number, the
    first few of them) before any model is loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TrainError: bytes that are not UTF-8, a byte order mark inside the file, invalid or too deeply nested
            JSON, a wrong structure, an unknown role, or an empty file; the message names the file, each line
            and its reason.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    examples: list[ChatExample] = []
    problems: list[str] = []
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip() or raw.strip() == _BOM.encode("utf-8") and line_no == 1:
            continue
        try:
            examples.append(ChatExample(_parse_line(raw, line_no), line_no))
        except ValueError as e:
            problems.append(f"line {line_no}: {e}")
    if problems:
        raise _problems_error(path, problems)
    if not examples:
        raise TrainError(f"{path}: no dialogues (the file is empty)")
    return examples


def check_dialogues_fit(collator: Any, examples: Sequence[ChatExample], data_path: pathlib.Path) -> None:
    """Tokenises every dialogue as the collator will, so that one it rejects (its first round longer than
    ``max_length``, say) is reported by line before the model loads, not when its batch comes up.

    Raises:
        TrainError: naming the file, each rejected dialogue's line and the reason.
    """
    problems = []
    for example in examples:
        try:
            tokenize_dialogue(collator.tokenizer, example.messages, collator.scheme, collator.max_length)
        except ValueError as e:
            problems.append(f"line {example.line}: {e}")
    if problems:
        raise _problems_error(data_path, problems)


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

"""``loss.jsonl``: one JSON line per optimizer step, only ever appended to.

A resumed run keeps every line up to its checkpoint's step: the file is rewritten (atomically, see
`ism_ext.training.files`) only when it holds more than that (the steps the resume redoes, or a line cut short
by a kill); otherwise it is opened for appending as it is.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import IO, Any

from .files import atomic_write_text

__all__ = ["LOSS_FILE", "append_record", "open_loss_log", "read_loss_log", "sync_loss_log"]

LOSS_FILE = "loss.jsonl"


def _parse(path: pathlib.Path) -> tuple[list[dict[str, Any]], bool]:
    """The file's records in order, and whether it holds anything else (a cut or unreadable line)."""
    records, clean = [], True
    if path.is_file():
        text = path.read_bytes().decode("utf-8", errors="replace")
        # Without its newline the last line was cut short; appending now would glue the next record onto it.
        clean = text.endswith("\n") or not text
        for raw in text.split("\n"):
            if not raw:
                continue
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError:
                clean = False
                break  # a line cut short by an interruption: nothing after it is trustworthy
    return records, clean


def read_loss_log(path: pathlib.Path, upto: int) -> list[dict[str, Any]]:
    """The records of the log up to step ``upto`` (later ones belong to steps a resume redoes)."""
    records, _ = _parse(path)
    return [r for r in records if r.get("step", math.inf) <= upto]


def open_loss_log(path: pathlib.Path, upto: int) -> IO[str]:
    """Opens the log for appending after step ``upto``, first dropping (atomically) whatever follows that step."""
    records, clean = _parse(path)
    kept = [r for r in records if r.get("step", math.inf) <= upto]
    if not clean or len(kept) != len(records) or not path.is_file():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return path.open("a", encoding="utf-8")


def append_record(log: IO[str], record: dict[str, Any]) -> None:
    """Appends one record as one complete line (one write, then flushed to the OS)."""
    log.write(json.dumps(record) + "\n")
    log.flush()


def sync_loss_log(log: IO[str]) -> None:
    """Makes the lines written so far durable (before a checkpoint claims their steps are done)."""
    log.flush()
    os.fsync(log.fileno())

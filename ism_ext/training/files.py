"""Files a run writes, written so that an interruption (a kill, a full disk) never leaves a half-written one.

Every file goes to a temporary name in the same folder, is flushed to disk, then renamed over the target
(`os.replace` is atomic on POSIX and Windows): a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

__all__ = ["atomic_write_bytes", "atomic_write_text", "sha256_file"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces ``path`` by a file holding ``data``, all at once (see the module doc)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (checkpoint files may be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

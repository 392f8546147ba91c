"""Files that appear whole or not at all."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; flushed to disk and renamed to `path` when the block
    ends without an error and removed otherwise, so an interrupted write (or a crash just after it) leaves the
    previous file (or none), never half of one."""
    path = Path(path)
    # hidden, and unique: two threads of one process (a ComfyUI server) may write the same name at once
    partial = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())  # the rename must not reach the disk before the bytes do
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)

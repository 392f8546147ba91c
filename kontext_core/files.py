"""Files that appear whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed to `path` when the block ends without an
    error and removed otherwise, so an interrupted write leaves the previous file (or none), never half of one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # hidden, and one per process
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)

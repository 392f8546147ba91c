"""`DIR/manifest.jsonl`: one JSON object per finished item, which is also what makes a rerun resume.

Each output is written whole before its line is appended (and the line is flushed to disk before the next item
counts as started), so a crash leaves at worst an output without a line: that item runs again and gets one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from kontext_core.batch.items import Item
from kontext_core.files import written_whole

MANIFEST_FILE = "manifest.jsonl"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def outputs_of(record: dict) -> list[tuple[str, str]]:
    """(path relative to DIR, sha256) of each file a record lists: `output`, then any `more_outputs`."""
    first = [(record["output"], record["sha256"])]
    return first + [(o["output"], o["sha256"]) for o in record.get("more_outputs", [])]


def finished_record(
    item: Item, key: str, out: Path, files: list[str], *, attempts: int, seconds: float, seed: int | None, **extra
) -> dict:
    """The manifest line of an item whose `files` (relative to `out`, written whole) are done."""
    hashed = [{"output": name, "sha256": sha256_of(out / name)} for name in files]
    record = {
        "item": item.source,
        "image": str(item.image),
        "prompt": item.prompt,
        "seed": seed,
        "attempts": attempts,
        "seconds": round(seconds, 3),
        **hashed[0],
        **extra,
        "name": item.name,
        "key": key,
    }
    if len(hashed) > 1:  # a workflow that saves several images per item
        record["more_outputs"] = hashed[1:]
    return record


class Manifest:
    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.path = out, out / MANIFEST_FILE
        self.lock = threading.Lock()
        self.records: list[dict] = []
        if self.path.exists():
            text = self.path.read_bytes()
            whole = text[: text.rfind(b"\n") + 1]
            if whole != text:  # the last line was cut short by a crash: its item simply runs again
                self._rewrite_bytes(whole)
            for line in whole.decode("utf-8").splitlines():
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    continue  # not a line this program wrote: ignored, and dropped at the next rewrite
        self.by_key = {record.get("key"): record for record in self.records}

    def finished(self, key: str) -> bool:
        """Whether an item with this key was finished and its files are still there, unchanged."""
        record = self.by_key.get(key)
        if record is None:
            return False
        return all(
            (self.out / name).is_file() and sha256_of(self.out / name) == sha for name, sha in outputs_of(record)
        )

    def forget(self, names: set[str]) -> None:
        """Drops the lines of items that are about to run again (their outputs will be replaced), so the manifest
        lists each output once, for what it holds."""
        kept = [record for record in self.records if record.get("name") not in names]
        if len(kept) != len(self.records):
            self.records = kept
            self.by_key = {record.get("key"): record for record in kept}
            self._rewrite_bytes("".join(json.dumps(record) + "\n" for record in kept).encode())

    def record(self, record: dict) -> None:
        with self.lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.records.append(record)
            self.by_key[record["key"]] = record

    def _rewrite_bytes(self, data: bytes) -> None:
        with written_whole(self.path) as partial:
            partial.write_bytes(data)

"""The driver's side of a batch: the items left to do, each output written whole, the manifest, and the serial
in-process run (ray_pool.py hands the same jobs to Ray actors)."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kontext_core.batch.items import Item
from kontext_core.batch.manifest import Manifest, finished_record
from kontext_core.batch.worker import EditJob, EditResult, EditWorker
from kontext_core.files import written_whole

MAX_WORKERS_PER_ITEM = 2
IN_PROCESS = "in-process"
DEFAULT_SEED = 0  # the `edit` command's, for rows without one


@dataclass
class Pending:
    item: Item
    key: str
    number: int
    attempts: int = 0
    failed_on: list[str] = field(default_factory=list)  # the workers it failed on

    @property
    def seed(self) -> int:
        return DEFAULT_SEED if self.item.seed is None else self.item.seed


class Batch:
    def __init__(self, items: list[Item], out: Path, settings: dict, log: Callable[[str], None] | None = None):
        self.out, self.count = out, len(items)
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.manifest = Manifest(out)
        self.todo: deque[Pending] = deque()
        self.done = self.skipped = self.failed = 0
        for number, item in enumerate(items, start=1):
            key = item.key(settings)
            if self.manifest.finished(key):
                self.skipped += 1
                self.log(f"[{number}/{self.count}] {item.name}: done in an earlier run, skipped")
            else:
                self.todo.append(Pending(item, key, number))
        self.manifest.forget({pending.item.name for pending in self.todo})

    def refuse_blocked_prompts(self, tolerance: int) -> None:
        """Before any model loads: an item whose prompt the safety checks block is failed, not run."""
        from kontext_core.policy.safety import check_prompt

        for pending in list(self.todo):
            verdict = check_prompt(pending.item.prompt or "", tolerance)
            if verdict.blocked:
                self.todo.remove(pending)
                self.fail(pending, f"blocked by the safety checks: its prompt {verdict.reason}")

    def job(self, pending: Pending) -> EditJob:
        pending.attempts += 1
        return EditJob(pending.item.name, pending.item.image.read_bytes(), pending.item.prompt or "", pending.seed)

    def finish(self, pending: Pending, result: EditResult, worker: str) -> None:
        name = f"{pending.item.name}.png"
        with written_whole(self.out / name) as partial:
            partial.write_bytes(result.png)
        record = finished_record(
            pending.item,
            pending.key,
            self.out,
            [name],
            attempts=pending.attempts,
            seconds=result.seconds,
            seed=pending.seed,
            worker=worker,
        )
        self.manifest.record(record)
        self.done += 1
        self.log(f"[{pending.number}/{self.count}] {pending.item.name}: done in {result.seconds:.1f} s on {worker}")

    def failed_attempt(self, pending: Pending, worker: str, reason: str, others: int, retry: bool = True) -> None:
        """Requeues an item that failed on `worker` while `others` workers it has not failed on remain, up to
        MAX_WORKERS_PER_ITEM; otherwise (or with `retry` False: an error no other worker would change) fails it."""
        pending.failed_on.append(worker)
        if retry and others > 0 and len(pending.failed_on) < MAX_WORKERS_PER_ITEM:
            self.log(f"[{pending.number}/{self.count}] {pending.item.name} on {worker}: {reason}; requeued")
            self.todo.appendleft(pending)
        else:
            self.fail(pending, reason)

    def fail(self, pending: Pending, reason: str) -> None:
        self.failed += 1
        where = f" (tried on {', '.join(pending.failed_on)})" if pending.failed_on else ""
        self.log(f"[{pending.number}/{self.count}] {pending.item.name}: FAILED: {reason}{where}")


def run_in_process(batch: Batch, worker: EditWorker) -> None:
    while batch.todo:
        pending = batch.todo.popleft()
        try:
            result = worker.edit(batch.job(pending))
        except (ValueError, RuntimeError, OSError) as e:  # BatchError included; torch's out-of-memory too
            batch.failed_attempt(pending, IN_PROCESS, f"{type(e).__name__}: {e}", others=0)
            continue
        batch.finish(pending, result, IN_PROCESS)

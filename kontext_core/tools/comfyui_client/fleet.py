"""One batch across several ComfyUI servers, with nothing lost when one of them dies, hangs or answers errors.

Each server runs one item at a time (ComfyUI executes one prompt at a time: a second one queued there would only
wait, and be lost with it). A server that stops answering, sends nothing for the stall timeout, or answers HTTP
5xx is taken out of rotation and its item goes back to the queue for another; every `retry_after` seconds it is
asked again (/system_stats), and it rejoins once it answers. An item runs on at most two servers: one that
failed on two is reported failed, as is one that failed on the only server there is.
"""

from __future__ import annotations

import threading
import time
import urllib.error
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kontext_core.batch.items import BatchError, Item
from kontext_core.batch.manifest import Manifest, finished_record
from kontext_core.tools.comfyui_client.items import QueueError, ServerFault, Slots, Stalled
from kontext_core.tools.comfyui_client.jobs import Runner, item_seed, run_item

MAX_SERVERS_PER_ITEM = 2
# items that failed on a server and then ran on another, in a row, before that server is taken out of rotation
STRIKES_OUT = 2


@dataclass
class Job:
    item: Item
    key: str
    number: int
    attempts: int = 0
    failed_on: list[str] = field(default_factory=list)  # servers, in order
    blamed: list[str] = field(default_factory=list)  # of those, the ones that gave an error of the item's own
    stranded_since: float | None = None  # since when no server it may still run on is in rotation


@dataclass
class Member:
    """One server of the fleet and how it is doing."""

    runner: Runner
    in_rotation: bool = True
    retry_at: float = 0.0  # monotonic time of the next question, while out of rotation
    done: int = 0
    failed: int = 0  # attempts that failed here
    strikes: int = 0
    # items that failed here with an error of their own, not yet run elsewhere: the server takes no new item until
    # they have (a success elsewhere is a strike against it), so a broken server cannot fail the whole queue fast
    awaiting: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.runner.server.url


@dataclass
class Totals:
    done: int = 0
    skipped: int = 0
    failed: int = 0


def server_fault(error: BaseException) -> str | None:
    """Why the server rather than the item is at fault, or None for an error of the item's own."""
    if isinstance(error, Stalled):
        return "hangs"
    if isinstance(error, ServerFault):
        return "answers errors"
    if isinstance(error, urllib.error.HTTPError):
        return f"answers HTTP {error.code}" if error.code >= 500 else None
    if isinstance(error, (urllib.error.URLError, OSError)):
        return "does not answer"
    if isinstance(error, (ValueError, KeyError)):
        return "answers what is not ComfyUI's API"
    return None


class FleetBatch:
    def __init__(
        self,
        members: list[Member],
        workflow: dict,
        slots: Slots,
        items: list[Item],
        out: Path,
        *,
        retry_after: float = 30.0,
        give_up_after: float = 300.0,
        log: Callable[[str], None] = print,
    ):
        self.members, self.workflow, self.slots, self.items, self.out = members, workflow, slots, items, out
        self.retry_after, self.give_up_after, self.log = retry_after, give_up_after, log
        self.manifest = Manifest(out)
        self.pending: deque[Job] = deque()
        self.running: set[str] = set()  # keys of the jobs in flight
        self.totals = Totals()
        self.lock = threading.Condition()

    def run(self) -> Totals:
        for number, item in enumerate(self.items, start=1):
            key = item.key(self.workflow)
            if self.manifest.finished(key):
                self.totals.skipped += 1
                self.log(f"[{number}/{len(self.items)}] {item.name}: done in an earlier run, skipped")
            else:
                self.pending.append(Job(item, key, number))
        self.manifest.forget({job.item.name for job in self.pending})
        threads = [threading.Thread(target=self._serve, args=(m,), daemon=True) for m in self.members]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self.totals

    # ---- one thread per server

    def _serve(self, member: Member) -> None:
        while True:
            if not member.in_rotation and not self._rejoin(member):
                return
            job = self._take(member)
            if job is not None:
                self._attempt(member, job)
            elif self._over():
                return

    def _over(self) -> bool:
        return not self.pending and not self.running

    def _take(self, member: Member) -> Job | None:
        """The next job this server may run (one that has not failed here); None once the batch is over or when
        the server left the rotation meanwhile (a strike given by another thread)."""
        with self.lock:
            while True:
                if self._over() or not member.in_rotation:
                    return None
                job = None
                if not self._verdict_coming(member):
                    job = next((j for j in self.pending if member.name not in j.failed_on), None)
                if job is not None:
                    self.pending.remove(job)
                    self.running.add(job.key)
                    return job
                self.lock.wait(1.0)
                self._fail_stranded()

    def _verdict_coming(self, member: Member) -> bool:
        """Whether an item that failed here is running elsewhere, or may still be taken by a server in rotation."""
        for key in member.awaiting:
            job = next((j for j in self.pending if j.key == key), None)
            if key in self.running or (
                job is not None and any(m.in_rotation and m.name not in job.failed_on for m in self.members)
            ):
                return True
        return False

    def _rejoin(self, member: Member) -> bool:
        """Waits out of rotation until the server answers again (True) or the batch is over (False)."""
        while True:
            with self.lock:
                while not self._over() and time.monotonic() < member.retry_at:
                    self.lock.wait(max(0.0, min(1.0, member.retry_at - time.monotonic())))
                    self._fail_stranded()
                if self._over():
                    return False
            try:
                member.runner.server.check()
            except QueueError:
                member.retry_at = time.monotonic() + self.retry_after
                continue
            member.runner.close()
            member.runner.connect()  # a restarted server is a new websocket
            with self.lock:
                member.in_rotation, member.strikes = True, 0
                self._note(member, "answers again: back in rotation")
                self.lock.notify_all()
            return True

    def _fail_stranded(self) -> None:
        """Fails the jobs that every server they may still run on has been out of rotation for give_up_after."""
        now = time.monotonic()
        for job in list(self.pending):
            if any(m.in_rotation and m.name not in job.failed_on for m in self.members):
                job.stranded_since = None
            elif job.stranded_since is None:
                job.stranded_since = now
            elif now - job.stranded_since > self.give_up_after:
                self.pending.remove(job)
                self._fail(job, f"no server it may run on has answered for {self.give_up_after:g} s")
                self.lock.notify_all()

    # ---- one item on one server

    def _attempt(self, member: Member, job: Job) -> None:
        job.attempts += 1
        label = f"[{job.number}/{len(self.items)}] {job.item.name} on {member.name}"
        started = time.monotonic()
        try:
            files = run_item(member.runner, self.workflow, self.slots, job.item, job.key, self.out, label)
            seconds = time.monotonic() - started
            seed = item_seed(self.workflow, self.slots, job.item)
            record = finished_record(
                job.item,
                job.key,
                self.out,
                files,
                attempts=job.attempts,
                seconds=seconds,
                seed=seed,
                server=member.name,
            )
            try:
                self.manifest.record(record)
            except OSError as e:  # this machine's disk: the item is not done, and no server is to blame
                raise BatchError(f"cannot write {self.manifest.path}: {e.strerror or e}") from None
        except Exception as e:  # whatever it is, this item on this server is over; the thread serves on
            reason = str(e) if isinstance(e, BatchError) else f"{type(e).__name__}: {e}"
            with self.lock:
                self._failed_attempt(member, job, reason, server_fault(e))
            return
        with self.lock:
            self.running.discard(job.key)
            self.totals.done += 1
            member.done, member.strikes = member.done + 1, 0
            for other in self._blamed(job):  # it failed there, and ran here: that server is suspect
                other.awaiting.discard(job.key)
                other.strikes += 1
                if other.strikes >= STRIKES_OUT and other.in_rotation:
                    self._take_out(other, f"{STRIKES_OUT} items in a row failed there and ran on another server")
            self.lock.notify_all()
        self.log(f"{label}: done in {seconds:.1f} s (attempt {job.attempts}) -> {', '.join(files)}")

    def _failed_attempt(self, member: Member, job: Job, reason: str, fault: str | None) -> None:
        self.running.discard(job.key)
        member.failed += 1
        job.failed_on.append(member.name)
        if fault is None:
            job.blamed.append(member.name)
            member.awaiting.add(job.key)
        else:
            self._take_out(member, f"{fault} ({reason})")
        others = [m for m in self.members if m.name not in job.failed_on]
        if len(job.failed_on) >= MAX_SERVERS_PER_ITEM or not others:
            self._fail(job, reason)
        else:
            self.log(f"[{job.number}/{len(self.items)}] {job.item.name} on {member.name}: {reason}; requeued")
            self.pending.appendleft(job)  # first in line: it has waited longest
        self.lock.notify_all()

    def _take_out(self, member: Member, why: str) -> None:
        member.in_rotation = False
        member.retry_at = time.monotonic() + self.retry_after
        self._note(member, f"out of rotation: {why}")

    def _blamed(self, job: Job) -> list[Member]:
        return [m for m in self.members if m.name in job.blamed]

    def _fail(self, job: Job, reason: str) -> None:
        for member in self._blamed(job):  # it failed everywhere: its own fault, not theirs
            member.awaiting.discard(job.key)
        self.totals.failed += 1
        servers = f" (tried on {', '.join(job.failed_on)})" if job.failed_on else ""
        self.log(f"[{job.number}/{len(self.items)}] {job.item.name}: FAILED: {reason}{servers}")

    def _note(self, member: Member, what: str) -> None:
        self.log(f"server {member.name} {what}")

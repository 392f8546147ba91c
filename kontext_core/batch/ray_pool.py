"""The batch on Ray actors, one `KontextPipeline` each (one GPU per actor where the cluster has GPUs): a dead
actor's item goes to another, and a fresh actor takes the dead one's place."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kontext_core.batch.items import BatchError
from kontext_core.batch.run import Batch, Pending
from kontext_core.batch.worker import EditSettings, EditWorker, ItemRefused

INSTALL_HINT = 'pip install "comfyui-kontext[ray]"'
LOCAL = "local"  # `--ray` without an address
ACTOR_NAME = "kontext-batch-worker-{}"  # in the driver's own namespace: `ray list actors` shows them


def import_ray():
    try:
        import ray
    except ImportError:
        raise BatchError(f"--ray needs Ray, which is not installed ({INSTALL_HINT})") from None
    return ray


@dataclass
class Slot:
    name: str
    actor: object
    busy: Pending | None = None


class RayPool:
    def __init__(self, address: str, workers: int | None, model_args: argparse.Namespace, settings: EditSettings):
        self.ray = import_ray()
        self.started_ray = not self.ray.is_initialized()  # a program that started Ray keeps it
        if self.started_ray:
            self.ray.init(address=None if address == LOCAL else address, include_dashboard=False)
        gpus = self.ray.cluster_resources().get("GPU", 0)
        device = model_args.device or "cuda"
        on_gpu = gpus >= 1 and device.split(":")[0] == "cuda"  # --device cpu keeps CPU actors on a GPU cluster
        self.resources = {"num_gpus": 1} if on_gpu else {"num_cpus": 1}
        self.count = workers or (int(gpus) if on_gpu else 1)
        self.model_args, self.settings = model_args, settings
        self.actor_class = self.ray.remote(EditWorker)
        self.started = 0
        self.slots = [self._start() for _ in range(self.count)]
        # a model that cannot load fails here, once, with its own message, instead of as every item's error
        model = self.ray.get([slot.actor.ready.remote() for slot in self.slots])[0]
        self.replacements = self.count  # fresh actors for dead ones, at most this many: a crash loop ends
        self.description = f"{self.count} Ray actor(s) ({'1 GPU' if on_gpu else '1 CPU'} each), model {model}"

    def _start(self) -> Slot:
        name = ACTOR_NAME.format(self.started)
        self.started += 1
        actor = self.actor_class.options(name=name, **self.resources).remote(self.model_args, self.settings)
        return Slot(name, actor)

    def run(self, batch: Batch) -> None:
        ray = self.ray
        running: dict[object, Slot] = {}
        while batch.todo or running:
            for slot in self.slots:
                if slot.busy is None:
                    pending = next((p for p in batch.todo if slot.name not in p.failed_on), None)
                    if pending is not None:
                        batch.todo.remove(pending)
                        slot.busy = pending
                        running[slot.actor.edit.remote(batch.job(pending))] = slot
            if not running:  # what is left already failed on every live worker and cannot be retried
                for pending in list(batch.todo):
                    batch.todo.remove(pending)
                    batch.fail(pending, "no worker left that it has not failed on")
                break
            (ready,), _ = ray.wait(list(running), num_returns=1)
            slot = running.pop(ready)
            pending, slot.busy = slot.busy, None
            try:
                result = ray.get(ready)
            except ray.exceptions.RayActorError as e:
                self._replace(slot)
                reason = f"its worker died ({type(e).__name__})"
                batch.failed_attempt(pending, slot.name, reason, others=self._others(pending, slot))
                continue
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if e.cause is not None else e
                reason = f"{type(cause).__name__}: {cause}"
                others = self._others(pending, slot)
                batch.failed_attempt(pending, slot.name, reason, others, retry=not isinstance(cause, ItemRefused))
                continue
            except ray.exceptions.RayError as e:  # e.g. the result lost with its node: the actor may live on
                batch.failed_attempt(pending, slot.name, f"{type(e).__name__}: {e}", others=self._others(pending, slot))
                continue
            batch.finish(pending, result, slot.name)

    def _others(self, pending: Pending, slot: Slot) -> int:
        return sum(s is not slot and s.name not in pending.failed_on for s in self.slots)

    def _replace(self, dead: Slot) -> None:
        self.slots.remove(dead)
        if self.replacements > 0:
            self.replacements -= 1
            self.slots.append(self._start())

    def close(self) -> None:
        for slot in self.slots:
            self.ray.kill(slot.actor)
        if self.started_ray:
            self.ray.shutdown()

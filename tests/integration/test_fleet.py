"""The batch client on two real ComfyUI servers with the built-in small model: one SIGKILLed a third of the way
through and restarted later loses nothing and runs nothing twice, and every output equals the library's.
Also the memory of one server over many queued prompts. Runs where COMFYUI_ROOT / COMFYUI_PYTHON are set.

KONTEXT_FLEET_FULL=1 runs the issue's measured sizes (60 items; 100 prompts for the memory) instead of smaller
ones; the timeline is printed either way.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.helpers.batch_items import write_task_csv
from tests.helpers.comfyui_server import ROOT, ComfyServer, comfyui_paths, start_server

from kontext_core.tools import comfyui_client as queue

FULL = os.environ.get("KONTEXT_FLEET_FULL") == "1"
ITEMS = 60 if FULL else 12
MEMORY_PROMPTS, WARM_UP = (100, 10) if FULL else (30, 10)
WORKFLOW = ROOT / "workflows" / "api" / "small_model_edit.json"
BATCH_TIMEOUT = 3600.0 if FULL else 900.0  # seconds: a bound on the whole batch on this 2-core machine


def bare_server(base: Path, port: int | None = None) -> ComfyServer:
    """A ComfyUI with no model files: the small-model workflow needs only the pack's built-in ones."""
    root, python = comfyui_paths()
    for folder in ("models/diffusion_models", "models/text_encoders", "models/vae", "input", "output", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    return start_server(root, python, base, port)


def manifest(out: Path) -> list[dict]:
    path = out / queue.MANIFEST_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def library_outputs(csv_path: Path, out: Path) -> None:
    """The same items through the library's own batch runner, in ComfyUI's Python (the same torch build as the
    servers): the outputs the servers' must equal."""
    _, python = comfyui_paths()
    command = [str(python), "-m", "kontext_core.batch", "--csv", str(csv_path), "--out", str(out)]
    subprocess.run([*command, "--small-model", "--no-safety-check"], cwd=ROOT, check=True, timeout=1800)


class Timeline:
    """Notes with their time since the start; `watch` (a thread of its own) notes each manifest line as it comes."""

    def __init__(self, out: Path, batch: threading.Thread):
        self.out, self.batch, self.started = out, batch, time.monotonic()
        self.notes: list[str] = []
        self.seen = 0

    def note(self, what: str) -> None:
        self.notes.append(f"{time.monotonic() - self.started:7.1f} s  {what}")

    def watch(self) -> None:
        while True:
            running = self.batch.is_alive() and time.monotonic() - self.started < BATCH_TIMEOUT
            lines = manifest(self.out)
            for done, line in enumerate(lines[self.seen :], start=self.seen + 1):
                self.note(f"{done:>2}/{ITEMS} item {line['item']} on {line['server']} (attempts {line['attempts']})")
            self.seen = len(lines)
            if not running:  # the lines written last are in
                return
            time.sleep(0.2)

    def wait_for(self, outputs: int) -> None:
        while self.seen < outputs and self.batch.is_alive() and time.monotonic() - self.started < BATCH_TIMEOUT:
            time.sleep(0.2)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(autouse=True)
def one_thread_per_server(monkeypatch):
    """Each ComfyUI (and the library's reference run) computes with one torch thread, as one server per core of
    this 2-core machine; the same thread count on both sides keeps the sums' order, so the pixels can be equal."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def servers(tmp_path_factory):
    # one after the other from this thread: a server dies with the thread that started it (PR_SET_PDEATHSIG)
    started = [bare_server(tmp_path_factory.mktemp(f"fleet-{name}")) for name in ("a", "b")]
    yield started
    for server in started:
        server.stop()


def test_a_server_killed_a_third_of_the_way_and_restarted_loses_nothing(servers, tmp_path, capsys):
    steady, victim = servers
    csv_path, items = write_task_csv(tmp_path / "in", ITEMS)
    out = tmp_path / "out"
    argv = ["--workflow", str(WORKFLOW), "--csv", str(csv_path), "--out", str(out), "--retry-after", "5"]
    argv += ["--server", steady.url, "--server", victim.url]
    exit_code: list[int] = []
    batch = threading.Thread(target=lambda: exit_code.append(queue.main(argv)), daemon=True)
    timeline = Timeline(out, batch)
    batch.start()
    timeline.note(f"batch of {ITEMS} started on {steady.url} and {victim.url} (the victim)")
    watcher = threading.Thread(target=timeline.watch, daemon=True)
    watcher.start()
    # kill and restart from this thread: a server dies with the thread that started it (PR_SET_PDEATHSIG)
    restarted: list[ComfyServer] = []
    timeline.wait_for(ITEMS // 3)
    victim.process.kill()  # SIGKILL: no clean shutdown, its prompt in flight is simply gone
    victim.process.wait(timeout=30)
    killed_after = timeline.seen
    timeline.note(f"victim SIGKILLed after {killed_after} outputs")
    timeline.wait_for(2 * ITEMS // 3)
    if batch.is_alive():
        timeline.note("victim restarting on its old port")
        restarted.append(bare_server(victim.base, int(victim.url.rsplit(":", 1)[1])))
        timeline.note(f"victim answers again (started in {restarted[0].started_in:.1f} s)")
    batch.join(BATCH_TIMEOUT)
    watcher.join(10)
    timeline.note("batch ended")
    try:
        err = capsys.readouterr().err
        requeued = [line for line in err.splitlines() if "requeued" in line or "rotation" in line]
        lines = manifest(out)
        with capsys.disabled():
            print(f"\n[fleet] timeline ({ITEMS} items, 2 servers, small model, 28 steps):")
            print("\n".join(timeline.notes + ["client said:"] + requeued))
            print(f"[fleet] items per server: {collections.Counter(line['server'] for line in lines)}")
        assert exit_code == [0], err[-3000:]
        assert killed_after is not None and killed_after < ITEMS
        names = [line["item"] for line in lines]
        assert sorted(names) == list(range(1, ITEMS + 1))  # 0 lost, 0 duplicates
        assert len({line["output"] for line in lines}) == ITEMS
        assert any(line["attempts"] == 2 for line in lines), "the item in flight on the killed server ran again"
        assert f"server {victim.url} out of rotation: does not answer" in err

        library_outputs(csv_path, tmp_path / "library")
        differ = {}
        for line, item in zip(sorted(lines, key=lambda line: line["item"]), items):
            ours = pixels(tmp_path / "library" / f"{item.name}.png").astype(np.int16)
            difference = np.abs(pixels(out / line["output"]).astype(np.int16) - ours)
            if difference.any():
                differ[item.name] = (int(difference.max()), float((difference > 0).mean()))
        with capsys.disabled():
            print(f"[fleet] {ITEMS - len(differ)}/{ITEMS} outputs bit-identical to the library's; the others")
            print(f"        (max |difference| in 8-bit levels, share of values): {differ}")
        # the same torch build and thread count on both sides, the same pixel conversions and memory layouts
        assert not differ, differ
    finally:
        for server in restarted:
            server.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no VmRSS")


def test_a_server_s_memory_stays_flat_over_many_queued_prompts(tmp_path_factory, tmp_path, capsys):
    server = bare_server(tmp_path_factory.mktemp("memory"))
    try:
        csv_path, _ = write_task_csv(tmp_path / "in", MEMORY_PROMPTS)
        out = tmp_path / "out"
        argv = ["--workflow", str(WORKFLOW), "--csv", str(csv_path), "--out", str(out), "--server", server.url]
        exit_code: list[int] = []
        batch = threading.Thread(target=lambda: exit_code.append(queue.main(argv)), daemon=True)
        batch.start()
        rss, started = {}, time.monotonic()
        while batch.is_alive() and time.monotonic() - started < BATCH_TIMEOUT:
            rss.setdefault(len(manifest(out)), rss_kib(server.process.pid))  # right after each output arrived
            time.sleep(0.05)
        batch.join(timeout=5)
        capsys.readouterr()
        assert exit_code == [0] and len(manifest(out)) == MEMORY_PROMPTS
        after = rss_kib(server.process.pid)
        warm = rss[WARM_UP]
        growth = (max(value for done, value in rss.items() if done >= WARM_UP) - warm) / warm
        with capsys.disabled():
            marks = ", ".join(f"{done}: {value / 1024:.0f}" for done, value in sorted(rss.items()) if done % 10 == 0)
            print(f"\n[memory] ComfyUI RSS MiB after n prompts ({marks}; at the end {after / 1024:.0f})")
            print(f"[memory] growth after {WARM_UP} warm-up prompts: {growth:.2%}")
        assert growth <= 0.05
    finally:
        server.stop()

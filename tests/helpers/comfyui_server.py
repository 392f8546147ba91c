"""A real ComfyUI with this pack, started once per test session on a loopback port.

Runs only where COMFYUI_ROOT (a ComfyUI checkout) and COMFYUI_PYTHON (a Python with its requirements) are set;
everywhere else the tests that use it skip. The server gets its own --base-directory (models, custom_nodes,
input, output, user), so the checkout is never written to, and the pack is symlinked in as ComfyUI users do.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from kontext_core.tools import comfyui_client as queue

ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "comfyui-kontext"
START_TIMEOUT = 180.0  # seconds: importing ComfyUI and torch on a busy 2-core machine


def comfyui_paths() -> tuple[Path, Path]:
    root, python = os.environ.get("COMFYUI_ROOT"), os.environ.get("COMFYUI_PYTHON")
    if not root or not python:
        pytest.skip("COMFYUI_ROOT / COMFYUI_PYTHON are not set (a ComfyUI checkout and its Python)")
    if not (Path(root) / "main.py").is_file():
        pytest.fail(f"COMFYUI_ROOT={root} has no main.py: it is not a ComfyUI checkout")
    if not os.access(python, os.X_OK):
        pytest.fail(f"COMFYUI_PYTHON={python} is not an executable")
    return Path(root), Path(python)


def _stop_with_this_process() -> None:
    """Linux: the server gets SIGTERM when the test process dies, so a killed run leaves no server behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ComfyServer:
    root: Path  # the ComfyUI checkout
    python: Path  # its Python
    base: Path  # --base-directory: models/, custom_nodes/, input/, output/, user/
    url: str
    process: subprocess.Popen
    log_path: Path
    started_in: float = 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, route: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            return response.read()

    def get_json(self, route: str):
        return json.loads(self.get(route))

    def post_json(self, route: str, payload) -> tuple[int, dict]:
        """(status, body) without raising on 4xx, so tests can look at ComfyUI's error bodies."""
        request = urllib.request.Request(
            self.url + route, json.dumps(payload).encode(), {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def can_import(self, module: str) -> bool:
        """Whether ComfyUI's Python has `module` (the pack's optional extras)."""
        probe = subprocess.run([str(self.python), "-c", f"import {module}"], capture_output=True, timeout=60)
        return probe.returncode == 0

    def runner(self, timeout: float = 240.0, log=lambda text: None) -> queue.Runner:
        """The batch client's prompt follower (websocket, /history), connected to this server."""
        runner = queue.Runner(queue.Server(self.url), timeout=timeout, log=log)
        runner.connect()
        assert runner.websocket is not None, "ComfyUI's websocket did not open"
        return runner

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(root: Path, python: Path, base: Path, port: int | None = None) -> ComfyServer:
    """`port` None picks a free one; a given one brings a stopped server back at its old address."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_FOLDER
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    port = free_port() if port is None else port
    log_path = base / "comfyui.log"
    command = [
        str(python),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
        "--preview-method",
        "latent2rgb",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1")
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_stop_with_this_process
        )
    server = ComfyServer(root, python, base, f"http://127.0.0.1:{port}", process, log_path)
    while True:
        if process.poll() is not None:
            pytest.fail(f"ComfyUI exited with {process.returncode} while starting:\n{server.log()[-4000:]}")
        try:
            server.get("/system_stats", timeout=5)
            break
        except (urllib.error.URLError, OSError):
            if time.monotonic() - started > START_TIMEOUT:
                server.stop()
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT:.0f} s:\n{server.log()[-4000:]}")
            time.sleep(0.5)
    server.started_in = time.monotonic() - started
    return server


_SESSION: dict[str, ComfyServer] = {}


def session_server(prepare) -> ComfyServer:
    """One server for the whole session, shared by every module that uses it; `prepare(base)` writes its files."""
    if "server" not in _SESSION:
        root, python = comfyui_paths()
        base = Path(tempfile.mkdtemp(prefix="kontext-comfyui-"))
        for folder in ("models/diffusion_models", "models/text_encoders", "models/vae", "input", "output", "user"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        prepare(base)
        _SESSION["server"] = start_server(root, python, base)
    return _SESSION["server"]


def stop_session_server() -> None:
    server = _SESSION.pop("server", None)
    if server is not None:
        server.stop()
        if os.environ.get("KONTEXT_KEEP_COMFYUI_BASE") is None:
            shutil.rmtree(server.base, ignore_errors=True)
        else:
            print(f"ComfyUI base directory kept: {server.base}")


def comfy_session():
    """The session's server, tiny models and input images in its base; each test module registers it as its
    `comfy` fixture (one server for all of them)."""

    def prepare(base: Path) -> None:
        from tests.helpers.tiny_files import write_all

        write_all(base)

    server = session_server(prepare)
    print(f"\nComfyUI started in {server.started_in:.1f} s at {server.url} (base {server.base})")
    yield server
    stop_session_server()

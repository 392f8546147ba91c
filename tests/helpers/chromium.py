"""Headless Chromium driven over the DevTools protocol, for the tests of the pack in ComfyUI's web frontend.

Its one prerequisite is a `chromium` binary (Debian: `apt-get install chromium`); nothing is downloaded. The
tests that use it run only beside a real ComfyUI (COMFYUI_ROOT), and there a missing browser fails the test with
that instruction instead of skipping it. The batch client's websocket reader carries the protocol.
"""

from __future__ import annotations

import base64
import re
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kontext_core.tools import comfyui_client as queue

BROWSER_TIMEOUT = 60.0
FLAGS = (  # headless as root, with nothing reaching out of the machine
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1600,1000",
)
APP = "(window.app ?? window.comfyAPI?.app?.app)"  # ComfyUI's app object, as extensions import it


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("the frontend tests need a Chromium binary on PATH: apt-get install chromium (Debian/Ubuntu)")
    return binary


class Chromium:
    """One page of a headless Chromium, its console recorded from the first load."""

    def __init__(self, url: str):
        self.profile = tempfile.mkdtemp(prefix="kontext-chromium-")  # a new, empty profile each time
        self.process = subprocess.Popen(
            [chromium_binary(), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                pytest.fail("Chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.socket = queue.WebSocket(page["webSocketDebuggerUrl"], timeout=30)
        self.next_id = 0
        self.errors: list[str] = []  # exceptions, console.error and error log entries of the page
        self.warnings: list[str] = []
        self.call("Runtime.enable")
        self.call("Log.enable")
        self.call("Page.navigate", url=url)  # now that the console is recorded

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.socket.receive(1.0)
            message = json.loads(text) if text else {}
            self._record(message)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
        raise TimeoutError(method)

    def _record(self, message: dict) -> None:
        params = message.get("params") or {}
        if message.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif message.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            (self.errors if params["type"] == "error" else self.warnings).append(f"console.{params['type']}: {text}")
        elif message.get("method") == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            entry = params["entry"]
            text = f"log: {entry.get('text')} {entry.get('url', '')}"
            (self.errors if entry["level"] == "error" else self.warnings).append(text)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:120]}…: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = BROWSER_TIMEOUT, explain: str | None = None):
        """The first truthy value of `expression`; on timeout a failure showing `explain`'s value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        shown = f"; {explain} = {self.evaluate(explain)}" if explain else ""
        shown += "\nconsole:\n" + "\n".join((self.errors + self.warnings)[-20:])
        pytest.fail(f"after {timeout:.0f} s the page still does not satisfy {expression}{shown}")

    def click(self, selector: str, at: float = 0.5) -> None:
        """A real mouse click (pressed and released) on the element `selector` finds, `at` of its width from
        the left and halfway down, once it has stopped moving (dialogs slide in); fails when the element is
        not shown or another one covers that point."""
        find = f"""(() => {{
              const e = document.querySelector({json.dumps(selector)});
              if (!e) return null;
              e.scrollIntoView({{block: "nearest", inline: "nearest"}});
              const r = e.getBoundingClientRect();
              const x = r.left + r.width * {at}, y = r.top + r.height / 2;
              const top = document.elementFromPoint(x, y);
              return r.width > 0 && top && (top === e || e.contains(top)) ? [x, y] : null;
            }})()"""
        explain = f"document.querySelector({json.dumps(selector)})?.outerHTML?.slice(0, 300)"
        where, deadline = None, time.monotonic() + BROWSER_TIMEOUT
        while where is None or self.evaluate(find) != where:
            if time.monotonic() > deadline:
                pytest.fail(f"{selector} did not stop moving: {where}")
            where = self.wait_for(find, explain=explain)
            time.sleep(0.3)
        x, y = where
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=1, clickCount=1)

    def screenshot(self, path: Path) -> Path:
        time.sleep(0.5)  # a frame or two for the canvas and the images
        shot = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        assert shot.startswith(b"\x89PNG") and len(shot) > 10_000, f"{path.name}: not a screenshot of a page"
        path.write_bytes(shot)
        return path

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        if self.process.poll() is None:
            self.process.kill()  # nothing of its profile is kept
            self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


# What ComfyUI's frontend itself logs on a fresh, offline host with no user data: the user's optional style
# sheet and new user's folders not found, no favicon, the release check with no network, and one TypeError
# in the frontend's own settings code (GraphView's onChange): all eight also on a ComfyUI with no custom nodes.
HOST_ERRORS = (
    re.compile(
        r"log: Failed to load resource: the server responded with a status of 404 \(Not Found\) "
        r"http://127\.0\.0\.1:\d+/(api/userdata/user\.css|user\.css|favicon\.ico|api/userdata/comfy\.templates\.json"
        r"|api/userdata\?dir=(workflows|subgraphs%2F)&recurse=true&split=false&full_info=true)$"
    ),
    re.compile(r"log: Failed to load resource: net::ERR_NAME_NOT_RESOLVED https://api\.comfy\.org/releases\?\S+$"),
    re.compile(r"exception: TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange [^/]*"),
)


def unexpected_errors(errors: list[str]) -> list[str]:
    """The errors that are not the frontend's own (HOST_ERRORS); any with an extension in its stack is kept."""
    return [e for e in errors if "/extensions/" in e or not any(p.match(e) for p in HOST_ERRORS)]


@contextmanager
def page(url: str) -> Iterator[Chromium]:
    """A browser on `url`, closed at the end; the block fails if the page logged an error of ours."""
    browser = Chromium(url)
    try:
        yield browser
        errors = unexpected_errors(browser.errors)
    finally:
        browser.close()
    assert not errors, "the page logged errors:\n" + "\n".join(errors)

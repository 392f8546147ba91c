"""The pack in ComfyUI's web frontend: its JS is served and runs, the example workflows are offered as
templates and load with every node known, in a headless Chromium. Skipped without COMFYUI_ROOT /
COMFYUI_PYTHON, and without a `chromium` binary (Debian: apt-get install chromium)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from tests.helpers.comfyui_server import PACK_FOLDER, ROOT, comfy_session

from kontext_core.tools import comfyui_client as queue

BROWSER_TIMEOUT = 60.0
UI_WORKFLOWS = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))

comfy = pytest.fixture(scope="session", name="comfy")(comfy_session)


def test_the_pack_javascript_is_listed_and_served(comfy):
    scripts = [p for p in comfy.get_json("/extensions") if p.startswith(f"/extensions/{PACK_FOLDER}/")]
    local = sorted(p.relative_to(ROOT / "web").as_posix() for p in (ROOT / "web").rglob("*.js"))
    assert sorted(p.removeprefix(f"/extensions/{PACK_FOLDER}/") for p in scripts) == local
    for script in scripts:
        assert comfy.get(script) == (ROOT / "web" / script.removeprefix(f"/extensions/{PACK_FOLDER}/")).read_bytes()


def test_the_ui_workflows_are_offered_as_templates(comfy):
    templates = comfy.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == UI_WORKFLOWS, templates
    for name in UI_WORKFLOWS:
        served = json.loads(comfy.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json"))
        assert served == json.loads((ROOT / "workflows" / f"{name}.json").read_text())


class Chromium:
    """Headless Chromium driven over the DevTools protocol (with the batch client's websocket reader)."""

    def __init__(self, binary: str, url: str):
        self.profile = tempfile.mkdtemp(prefix="kontext-chromium-")
        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1920,1080",
                url,
            ],
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
        self.console: list[str] = []  # errors and warnings the page logged, for failure messages
        self.call("Runtime.enable")
        self.call("Log.enable")
        self.call("Page.reload", ignoreCache=True)  # from the start, now that the console is recorded

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
            self.console.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif message.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            self.console.append(
                f"console.{params['type']}: "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            )
        elif message.get("method") == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            self.console.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}…: {result['exceptionDetails']}")
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
        shown += "\nconsole:\n" + "\n".join(self.console[-20:])
        pytest.fail(f"after {timeout:.0f} s the page still does not satisfy {expression}{shown}")

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


APP = "(window.app ?? window.comfyAPI?.app?.app)"


def test_the_frontend_loads_the_extension_and_a_workflow_in_chromium(comfy):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium)")
    # a first visit opens the template browser over the canvas; mark the tutorial done so the graph shows
    assert comfy.post_json("/settings/Comfy.TutorialCompleted", True)[0] == 200
    browser = Chromium(binary, comfy.url)
    try:
        started = time.monotonic()
        names = f"({APP}?.extensions ?? []).map(e => e.name)"
        browser.wait_for(f"{names}.includes('KontextCore.SamplerSizeHint')", explain=names)
        loaded_in = time.monotonic() - started
        names = browser.evaluate(names)

        # node types are registered after the extensions load: wait for every type the workflows use
        workflows = {name: json.loads((ROOT / "workflows" / f"{name}.json").read_text()) for name in UI_WORKFLOWS}
        types = sorted({node["type"] for workflow in workflows.values() for node in workflow["nodes"]})
        missing = f"{json.dumps(types)}.filter(t => !globalThis.LiteGraph?.registered_node_types?.[t])"
        browser.wait_for(f"{missing}.length === 0", explain=missing)

        # every UI workflow loads with all its nodes known to the frontend; single_edit stays for the screenshot
        for name in [n for n in UI_WORKFLOWS if n != "single_edit"] + ["single_edit"]:
            workflow = workflows[name]
            browser.evaluate(f"{APP}.loadGraphData({json.dumps(workflow)})")
            nodes = f"{APP}.graph.nodes.map(n => [n.type, !!n.has_errors, !!LiteGraph.registered_node_types[n.type]])"
            count = len(workflow["nodes"])
            nodes = browser.wait_for(f"{APP}.graph.nodes.length === {count} && {nodes}", explain=nodes)
            assert sorted(t for t, _, _ in nodes) == sorted(n["type"] for n in workflow["nodes"]), name
            unknown = [t for t, errors, known in nodes if errors or not known]
            assert not unknown, f"{name}: node types the frontend does not know: {unknown}"
        time.sleep(1.0)  # a frame or two for the canvas
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
    path = Path(tempfile.mkdtemp(prefix="kontext-frontend-")) / "comfyui_single_edit.png"
    path.write_bytes(shot)
    print(
        f"\n[frontend] our extension registered {loaded_in:.1f} s after opening ({len(names)} extensions); "
        f"{len(UI_WORKFLOWS)} UI workflows loaded with every node known; screenshot: {path}"
    )
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000

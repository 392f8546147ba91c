"""Thumbnails for ComfyUI's template browser: workflows/<name>.jpg beside each example workflow, which the
frontend asks for (and logs a 404 for when missing). Each is the workflow as the frontend draws it, fit to the
view, taken from a headless Chromium on a real ComfyUI:

    eval "$(cat /tmp/comfyhost.env)"   # COMFYUI_ROOT and COMFYUI_PYTHON
    python -m tests.helpers.template_thumbnails
"""

from __future__ import annotations

import base64
import json
import time

from tests.helpers.chromium import APP, Chromium
from tests.helpers.comfyui_server import ROOT, session_server, stop_session_server
from tests.helpers.tiny_files import write_all

WIDTH = 512  # px: twice the template card's width, as the frontend's own thumbnails


def main() -> None:
    server = session_server(write_all)
    browser = None
    try:
        for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False)):
            server.post_json(f"/settings/{setting}", value)
        browser = Chromium(server.url)
        browser.wait_for(f"{APP}?.graph?.nodes?.length > 0")
        for path in sorted((ROOT / "workflows").glob("*.json")):
            browser.evaluate(f"{APP}.loadGraphData({path.read_text()})")
            browser.evaluate(f"{APP}.extensionManager.command.execute('Comfy.Canvas.FitView')")
            time.sleep(1.0)  # the frame after the view moved
            box = browser.evaluate(
                "(r => ({x: r.x, y: r.y, width: r.width, height: r.height}))"
                "(document.getElementById('graph-canvas').getBoundingClientRect())"
            )
            clip = {**box, "scale": WIDTH / box["width"]}
            shot = browser.call("Page.captureScreenshot", format="jpeg", quality=80, clip=clip)["data"]
            path.with_suffix(".jpg").write_bytes(base64.b64decode(shot))
            print(f"{path.with_suffix('.jpg').relative_to(ROOT)}: {json.dumps(browser.errors[-1:])}")
    finally:
        if browser is not None:
            browser.close()
        stop_session_server()


if __name__ == "__main__":
    main()

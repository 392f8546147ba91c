"""The pack in ComfyUI's web frontend: its JS is served and runs, the example workflows are offered as
templates and load with every node known, in a headless Chromium, with nothing logged as an error. Skipped
without COMFYUI_ROOT / COMFYUI_PYTHON; beside a ComfyUI it needs a `chromium` binary (apt-get install chromium).
The editor (compare, edit again, history, drift) is tested in test_editor_browser.py."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from tests.helpers.chromium import APP, page
from tests.helpers.comfyui_server import PACK_FOLDER, ROOT, comfy_session

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
        # the template browser shows <name>.jpg (made by tests/helpers/template_thumbnails.py); a missing one is a 404
        thumbnail = comfy.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg")
        assert thumbnail == (ROOT / "workflows" / f"{name}.jpg").read_bytes() and thumbnail.startswith(b"\xff\xd8")


def test_the_frontend_loads_the_extension_and_a_workflow_in_chromium(comfy):
    # a first visit opens the template browser over the canvas; mark the tutorial done so the graph shows
    assert comfy.post_json("/settings/Comfy.TutorialCompleted", True)[0] == 200
    with page(comfy.url) as browser:
        started = time.monotonic()
        names = f"({APP}?.extensions ?? []).map(e => e.name)"
        ours = "['KontextCore.SamplerSizeHint', 'KontextCore.Editor']"
        browser.wait_for(f"{ours}.every(n => {names}.includes(n))", explain=names)
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
        path = browser.screenshot(Path(tempfile.mkdtemp(prefix="kontext-frontend-")) / "comfyui_single_edit.png")
    print(
        f"\n[frontend] our extension registered {loaded_in:.1f} s after opening ({len(names)} extensions); "
        f"{len(UI_WORKFLOWS)} UI workflows loaded with every node known; screenshot: {path}"
    )

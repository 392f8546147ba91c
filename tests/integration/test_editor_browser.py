"""The editor (web/js/kontext_editor.js) in a headless Chromium against a real ComfyUI with the built-in small
model: multi_round_edit opened from the template browser, queued with the Run button, the history strip and its
drift read from the page, the before/after slider dragged, edit-again and a branch queued again; a screenshot
of each step. Runs where COMFYUI_ROOT / COMFYUI_PYTHON are set (else skipped); there Chromium must be installed.

    KONTEXT_SCREENSHOTS=/tmp/shots python -m pytest -s tests/integration/test_editor_browser.py
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.chromium import APP, Chromium, page
from tests.helpers.comfyui_server import PACK_FOLDER, ROOT, comfy_session
from PIL import Image

from kontext_core.recomposite import drift
from kontext_core.small_model import BUILTIN_PREFIX

comfy = pytest.fixture(scope="session", name="comfy")(comfy_session)

WORKFLOW = json.loads((ROOT / "workflows" / "multi_round_edit.json").read_text())
SCENE = "kontext_small_scene.png"  # the small model's kind of picture (64×64): an orange diamond, a red triangle, a green square
# the small model knows no scarves or snow: three edits of the kinds it was trained on replace the workflow's
INSTRUCTIONS = (
    "Change the color of the red triangle to green.",
    "Remove the orange diamond.",
    "Make the green square blue.",
)
TEXT, SAMPLER, SAVE = (20, 30, 40), (22, 32, 42), (24, 34, 44)  # multi_round_edit's node ids, per round
SMALL_MODEL = {  # node id -> widget values: multi_round_edit on the built-in small model and its scene
    1: {"model_name": f"{BUILTIN_PREFIX}flux1-kontext-small.safetensors"},
    2: {
        "t5_name": f"{BUILTIN_PREFIX}t5-small-encoder.safetensors",
        "clip_name": f"{BUILTIN_PREFIX}clip-small.safetensors",
        "t5_max_length": "auto",
    },
    3: {"vae_name": f"{BUILTIN_PREFIX}ae-small.safetensors"},
    10: {"image": SCENE},
    11: {"mode": "keep"},  # the scene is already a multiple of 16
    **{node: {"prompt": text} for node, text in zip(TEXT, INSTRUCTIONS)},
}
CARDS = "#kontext-rounds .kontext-round"
ROUNDS = f"[...document.querySelectorAll('{CARDS}')].map(c => ({{...c.dataset}}))"


def set_widgets(browser: Chromium, values: dict[int, dict]) -> None:
    """Widget values set as the frontend sets them when a user picks them (value, then the widget's callback)."""
    browser.evaluate(
        f"""Object.entries({json.dumps(values)}).forEach(([id, widgets]) => Object.entries(widgets).forEach(
              ([name, value]) => {{
                const widget = {APP}.graph.getNodeById(Number(id)).widgets.find(w => w.name === name);
                widget.value = value;
                widget.callback?.(value);
              }}))"""
    )


def pixels(base: Path, ref: str) -> np.ndarray:
    """An image the page names as type/subfolder/file, read from the server's folders."""
    return np.asarray(Image.open(base / ref).convert("RGB"))


def queue_and_wait(browser: Chromium, rounds: int, timeout: float = 300.0) -> list[dict]:
    browser.click('[data-testid="queue-button"] button[aria-label="Run"]')
    # every card with its drift measured (the original has none)
    done = f"(() => {{ const r = {ROUNDS}; return r.length === {rounds} && r.every(c => c.depth === '0' || c.drift) && r }})()"
    return browser.wait_for(done, timeout=timeout, explain=ROUNDS)


@pytest.fixture
def shots() -> Path:
    folder = Path(os.environ.get("KONTEXT_SCREENSHOTS") or tempfile.mkdtemp(prefix="kontext-editor-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_editor_compares_edits_again_and_measures_drift(comfy, shots):
    shutil.copy(ROOT / "workflows" / "inputs" / SCENE, comfy.base / "input" / SCENE)
    assert comfy.post_json("/settings/Comfy.TutorialCompleted", True)[0] == 200
    with page(comfy.url) as browser:
        # 0. ComfyUI's default workflow, without the pack's nodes: the editor shows nothing and logs nothing
        names = f"({APP}?.extensions ?? []).map(e => e.name)"
        browser.wait_for(f"{names}.includes('KontextCore.Editor') && {APP}.graph.nodes.length > 0", explain=names)
        assert not browser.evaluate(f"{APP}.graph.nodes.some(n => n.type.startsWith('KontextCore'))")
        frontend = browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__")  # the editor was written on 1.27.10
        browser.screenshot(shots / "0_default_workflow.png")
        assert browser.evaluate("document.getElementById('kontext-rounds') === null")

        # 1. multi_round_edit from the template browser (the pack's templates are listed under its folder name)
        browser.evaluate(f"{APP}.extensionManager.command.execute('Comfy.BrowseTemplates')")
        browser.click(f'li[role="option"][aria-label="{PACK_FOLDER}"]')
        browser.wait_for("!!document.querySelector('[data-testid=\"template-workflow-multi_round_edit\"]')")
        browser.screenshot(shots / "1_template_browser.png")
        browser.click('[data-testid="template-workflow-multi_round_edit"]')
        loaded = f"{APP}.graph.nodes.length === {len(WORKFLOW['nodes'])} && {APP}.graph.getNodeById(44)?.type"
        assert browser.wait_for(loaded) == "KontextCoreSaveImage"
        set_widgets(browser, SMALL_MODEL)
        browser.screenshot(shots / "2_multi_round_edit_loaded.png")

        # 2. queued with the Run button: the original and three rounds, each from the one before
        cards = queue_and_wait(browser, 4)
        browser.screenshot(shots / "3_history_and_drift.png")
        assert [(c["depth"], c["parent"]) for c in cards] == [("0", ""), ("1", "0"), ("2", "1"), ("3", "2")]
        assert [c["instruction"] for c in cards[1:]] == list(INSTRUCTIONS)
        assert [c["seed"] for c in cards[1:]] == ["0", "1", "2"]
        original, *made = [pixels(comfy.base, c["image"]) for c in cards]
        assert np.array_equal(original, pixels(comfy.base, f"input/{SCENE}"))  # "keep": the scene as loaded
        for k, card in enumerate(cards[1:], start=1):  # the page shows the engine's drift of each chain
            assert float(card["driftDb"]) == drift([original, *made[:k]]).psnr_db, card
        # these rounds stay above 30 dB, so no hint shows; the hint's threshold checked in the page's own code
        assert browser.evaluate("document.querySelector('#kontext-rounds .kontext-hint').textContent") == ""
        script = f"/extensions/{PACK_FOLDER}/js/kontext_editor.js"
        hints = browser.evaluate(
            f"import('{script}').then(m => [29.9, 30].map(db => m.driftHint({{depth: 2, drift: {{psnr_db: db}}}})))"
        )
        assert hints[0].startswith("round 2 has drifted to 29.9 dB") and "Keep Unchanged" in hints[0], hints
        assert hints[1] == "", hints

        # the queue's view of the task: the three results, each source only inside its result's entry
        browser.click('button.side-bar-button[aria-label^="Queue"]')
        browser.click(".task-item .tag-wrapper button")  # the task's output count, which opens them
        items = "[...document.querySelectorAll('.task-item')].map(t => t.querySelector('img')?.alt ?? t.innerText)"
        listed = browser.wait_for(f"(l => l.length === 3 && l)({items})", explain=items)
        browser.screenshot(shots / "3b_queue_lists_the_results.png")
        assert sorted(listed) == sorted(Path(c["image"]).name for c in cards[1:]), listed
        browser.click('button.side-bar-button[aria-label^="Queue"]')  # closed again

        # 3. compare on round 2's node: before is round 1's image, the slider moves the split
        browser.evaluate(f"{APP}.canvas.centerOnNode({APP}.graph.getNodeById({SAVE[1]}))")
        view = f"{APP}.graph.getNodeById({SAVE[1]}).widgets.find(w => w.name === 'kontext_compare').element"
        browser.wait_for(f"!{view}.hidden && {view}.querySelector('.kontext-after').complete")
        browser.evaluate(f"{view}.id = 'compare-round-2'")  # a handle for the clicks
        browser.click("#compare-round-2 .kontext-slider", at=0.25)
        ref = "(i => { const u = new URL(i.src).searchParams; return [u.get('type'), u.get('subfolder'), u.get('filename')]"
        ref += ".filter(Boolean).join('/') })"
        state = browser.evaluate(
            f"""(() => {{ const v = {view}; return {{
                  before: {ref}(v.querySelector('.kontext-before')), after: {ref}(v.querySelector('.kontext-after')),
                  slider: Number(v.querySelector('.kontext-slider').value),
                  clip: v.querySelector('.kontext-after').style.clipPath }} }})()"""
        )
        browser.screenshot(shots / "4_compare_round_2.png")
        assert state["after"] == cards[2]["image"]
        assert np.array_equal(pixels(comfy.base, state["before"]), made[0])  # round 2 edited round 1's image
        assert 20 <= state["slider"] <= 30 and state["clip"] == f"inset(0px 0px 0px {state['slider']}%)", state

        # 4. edit again on round 1: its image is copied into input/ and set on the loader; the user then
        #    writes round 2's instruction and seed into round 1's nodes and queues
        browser.evaluate(f"{APP}.canvas.centerOnNode({APP}.graph.getNodeById({SAVE[0]}))")
        view = f"{APP}.graph.getNodeById({SAVE[0]}).widgets.find(w => w.name === 'kontext_compare').element"
        browser.evaluate(f"{view}.id = 'compare-round-1'")
        browser.click("#compare-round-1 .kontext-edit-again")
        loader = f"{APP}.graph.getNodeById(10).widgets.find(w => w.name === 'image').value"
        held = browser.wait_for(f"{loader}.startsWith('kontext_rounds/') && {loader}", explain=loader)
        assert np.array_equal(pixels(comfy.base, f"input/{held}"), made[0])
        assert browser.evaluate(f"document.querySelector('{CARDS}[data-branch]').dataset.id") == "1"
        browser.screenshot(shots / "5_edit_again_from_round_1.png")
        set_widgets(browser, {TEXT[0]: {"prompt": INSTRUCTIONS[1]}, SAMPLER[0]: {"seed": 1}})
        cards = queue_and_wait(browser, 7)
        browser.screenshot(shots / "6_rounds_after_edit_again.png")
        again = cards[4]  # round 1's node, now editing round 1's image with round 2's seed and instruction
        assert (again["depth"], again["parent"], again["seed"]) == ("2", "1", "1")
        assert again["instruction"] == INSTRUCTIONS[1]
        assert [(c["depth"], c["parent"]) for c in cards[5:]] == [("3", "4"), ("4", "5")]
        # the workflow's round 2 encodes round 1's decoded image, which VAE Decode gives in 8-bit levels, and
        # edit-again encodes the same pixels read back from the saved PNG: same seed and instruction, same image
        assert np.array_equal(pixels(comfy.base, again["image"]), made[1])

        # 5. a branch from the original (its card), with round 1's seed and instruction back: the workflow's round 1
        browser.click(f"{CARDS}[data-id='0']")
        browser.wait_for(f"document.querySelector('{CARDS}[data-branch]')?.dataset.id === '0'")
        set_widgets(browser, {TEXT[0]: {"prompt": INSTRUCTIONS[0]}, SAMPLER[0]: {"seed": 0}})
        cards = queue_and_wait(browser, 10)
        browser.screenshot(shots / "7_branch_from_the_original.png")
        branch = cards[7]
        assert (branch["depth"], branch["parent"], branch["seed"]) == ("1", "0", "0")
        assert np.array_equal(pixels(comfy.base, branch["image"]), made[0])  # edit-again gave round 1 exactly
        assert [c["image"] for c in cards[8:]] != [c["image"] for c in cards[2:4]]  # new files, rounds 2, 3 again
        assert all(np.array_equal(pixels(comfy.base, c["image"]), m) for c, m in zip(cards[8:], made[1:]))
    print(
        f"\n[editor] frontend {frontend}; screenshots in {shots}; drift of rounds 1-3: "
        f"{', '.join(f'{drift([original, *made[:k]]).psnr_db:.2f} dB' for k in (1, 2, 3))}; edit-again from round 1 "
        "equals the workflow's round 2 pixel for pixel"
    )

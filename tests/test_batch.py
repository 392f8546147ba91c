"""`python -m kontext_core.batch` in this process: outputs equal to `KontextPipeline.edit`, the manifest, resuming."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from tests.helpers.batch_items import serial_edit, write_task_csv

from kontext_core.batch.cli import main
from kontext_core.batch.manifest import MANIFEST_FILE
from kontext_core.small_model import load_default_pipeline

STEPS = 3  # the runner's default is edit's 28; fewer keep the test quick, and parity holds at any count


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


@pytest.fixture
def loaded_once(pipe, monkeypatch):
    """Workers get the module's pipeline instead of loading their own (the first test loads it for real)."""
    import kontext_core.cli.models

    monkeypatch.setattr(kontext_core.cli.models, "load_pipeline", lambda args, small: (pipe, "the small model"))


def manifest(out) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_FILE).read_text().splitlines()]


def test_a_csv_batch_equals_the_serial_edits(pipe, tmp_path, capsys):
    csv_path, items = write_task_csv(tmp_path / "in", 3)
    out = tmp_path / "out"
    args = ["--csv", str(csv_path), "--out", str(out), "--steps", str(STEPS), "--no-safety-check"]
    assert main(args) == 0
    assert "3 done, 0 already done, 0 failed" in capsys.readouterr().err
    lines = manifest(out)
    assert [line["item"] for line in lines] == [1, 2, 3]
    for line, item in zip(lines, items):
        assert (line["image"], line["prompt"], line["seed"], line["attempts"]) == (
            str(item.image),
            item.prompt,
            item.seed,
            1,
        )
        assert line["output"] == f"{item.name}.png" and line["worker"] == "in-process" and line["seconds"] > 0
        data = (out / line["output"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == line["sha256"]
        with Image.open(out / line["output"]) as png:
            assert png.text["ai_generated"] == "true"  # written with the edit command's provenance
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(serial_edit(pipe, item, STEPS)))


def test_a_rerun_skips_what_is_done_and_redoes_what_changed(loaded_once, tmp_path, capsys):
    csv_path, _ = write_task_csv(tmp_path / "in", 3)
    out = tmp_path / "out"
    args = ["--csv", str(csv_path), "--out", str(out), "--steps", "1", "--no-safety-check"]
    assert main(args) == 0
    lines = manifest(out)
    capsys.readouterr()
    assert main(args) == 0  # everything done: nothing runs again
    assert "0 done, 3 already done, 0 failed" in capsys.readouterr().err
    (out / lines[1]["output"]).unlink()  # a lost output, and other settings: only what they touch runs
    assert main(args) == 0
    assert "1 done, 2 already done, 0 failed" in capsys.readouterr().err
    assert main([*args[:-3], "--steps", "2", "--no-safety-check"]) == 0
    assert "3 done, 0 already done, 0 failed" in capsys.readouterr().err
    assert sorted(line["item"] for line in manifest(out)) == [1, 2, 3]  # one line per item, for what it holds


def test_a_folder_batch_with_one_prompt(pipe, loaded_once, tmp_path):
    _, items = write_task_csv(tmp_path / "in", 2)
    out = tmp_path / "out"
    prompt = "Remove the shape."
    assert (
        main(
            ["--images", str(tmp_path / "in"), "--prompt", prompt, "--seed", "4", "--out", str(out)] + ["--steps", "2"]
        )
        == 0
    )
    lines = manifest(out)
    assert [line["item"] for line in lines] == ["scene_1.png", "scene_2.png"]
    with Image.open(out / "scene_1.png") as png:
        with Image.open(items[0].image) as image:
            expected = pipe.edit(image.convert("RGB"), prompt, seed=4, steps=2)
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected))


def test_a_blocked_prompt_fails_its_item_and_the_rest_run(loaded_once, tmp_path, capsys):
    csv_path, items = write_task_csv(tmp_path / "in", 2)
    text = csv_path.read_text().replace(items[1].prompt, "naked child")
    csv_path.write_text(text)
    assert main(["--csv", str(csv_path), "--out", str(tmp_path / "out"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "0002_scene_2: FAILED: blocked by the safety checks: its prompt" in err
    assert "1 done, 0 already done, 1 failed" in err
    assert [line["item"] for line in manifest(tmp_path / "out")] == [1]


def test_usage_errors(tmp_path, capsys):
    csv_path, _ = write_task_csv(tmp_path / "in", 1)
    out = ["--out", str(tmp_path / "out")]
    for argv, message in [
        (["--images", str(tmp_path / "in"), *out], "--images needs --prompt"),
        (["--csv", str(csv_path), "--prompt", "p", *out], "--prompt and --seed go with --images"),
        (["--csv", str(csv_path), "--workers", "2", *out], "--workers goes with --ray"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert main(["--csv", str(tmp_path / "missing.csv"), *out]) == 2
    assert "error: --csv: cannot read" in capsys.readouterr().err
    assert main(["--csv", str(csv_path), "--transformer", str(tmp_path / "none.safetensors"), *out]) == 2
    assert "error:" in capsys.readouterr().err


def test_ray_without_the_extra_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    csv_path, _ = write_task_csv(tmp_path / "in", 1)
    assert main(["--csv", str(csv_path), "--out", str(tmp_path / "out"), "--ray", "--no-safety-check"]) == 2
    assert (
        'error: --ray needs Ray, which is not installed (pip install "comfyui-kontext[ray]")' in capsys.readouterr().err
    )

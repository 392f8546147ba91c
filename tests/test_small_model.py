"""The shipped small model: its files in the real layouts, under 5 MiB each, and a real held-out edit."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from kontext_core import load_default_pipeline
from kontext_core.cli.main import main
from kontext_core.cli.parser import DEMO_SEED
from kontext_core.checkpoints.summary import describe
from kontext_core.model.flux import Flux
from kontext_core.synthetic.judge import judge
from kontext_core.small_model import SMALL_FLUX, SMALL_T5_LENGTH, SMALL_VAE, small_model_files
from kontext_core.small_model.store_fp8 import MARKER
from kontext_core.small_model.tokenizers import write_clip_tokenizer, write_t5_tokenizer
from kontext_core.synthetic.tasks import HELD_OUT_SEED, make_task, vocabulary
from kontext_core.checkpoints.tokenizers import load_tokenizer

FILES = small_model_files()
MIB = 2**20


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


def test_files_are_small_and_in_the_real_layouts():
    for name in ("transformer", "vae", "t5", "clip"):
        assert getattr(FILES, name).stat().st_size < 5 * MIB, name
    with safe_open(FILES.transformer, "pt") as f:
        tensors = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    scales = {key for key in tensors if key.endswith(".scale_weight")}
    with torch.device("meta"):
        bfl_keys = set(Flux(SMALL_FLUX).state_dict())
    assert set(tensors) - scales - {MARKER} == bfl_keys  # BFL keys, nothing renamed
    # ComfyUI's scaled fp8: every block Linear weight in e4m3 beside its scale, the rest as trained
    assert {key.removesuffix(".scale_weight") + ".weight" for key in scales} == {
        key for key, dtype in tensors.items() if dtype == "F8_E4M3" and key != MARKER
    }
    assert any(key.startswith("single_blocks.") for key in scales) and tensors["img_in.weight"] == "F16"
    assert "FLUX transformer (BFL layout)" in describe(FILES.transformer)


def test_loaded_configs_are_the_trained_ones(pipe):
    assert dataclasses.asdict(pipe.transformer.params) == dataclasses.asdict(SMALL_FLUX)
    assert pipe.vae.params == SMALL_VAE  # widths from the tensors, groups and FLUX's scale/shift from the header
    assert pipe.text_encoder.t5_max_length == SMALL_T5_LENGTH
    assert pipe.default_resize == "keep"


def test_a_folder_of_small_model_files_loads_from_a_string_path(tmp_path):
    for source in vars(FILES).values():
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / source.name)
    pipeline = load_default_pipeline(folder=str(tmp_path))  # a CLI argument or a config value is a str
    assert dataclasses.asdict(pipeline.transformer.params) == dataclasses.asdict(SMALL_FLUX)


def test_a_folder_without_the_small_model_names_what_is_missing(tmp_path):
    for folder in (tmp_path, str(tmp_path)):  # the folder given is the one read, whatever its type: no fallback
        with pytest.raises(FileNotFoundError, match="folder= must hold every file of small_model_files") as error:
            load_default_pipeline(folder=folder)
        assert str(tmp_path / "flux1-kontext-small.safetensors") in str(error.value)


def test_the_shipped_tokenizers_are_what_the_trainer_writes_in_any_folder(tmp_path):
    # train_flux writes them into its --out folder: a run on the package's own folder must leave them as shipped
    for write, shipped in ((write_t5_tokenizer, FILES.t5_tokenizer), (write_clip_tokenizer, FILES.clip_tokenizer)):
        written = write(tmp_path / "elsewhere" / shipped.name)
        assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in shipped.iterdir())
        for file in shipped.iterdir():
            assert (written / file.name).read_bytes() == file.read_bytes(), file


def test_tokenizers_know_every_task_word():
    t5 = load_tokenizer(FILES.t5_tokenizer, "t5")
    clip = load_tokenizer(FILES.clip_tokenizer, "clip")
    assert t5.model_max_length == SMALL_T5_LENGTH
    sentence = " ".join(vocabulary())
    assert t5.unk_token_id not in t5(sentence).input_ids
    ids = clip(sentence, add_special_tokens=False).input_ids
    assert clip.unk_token_id not in ids  # CLIP's unknown token is its end-of-text, never inside the words
    assert clip.decode(ids).split() == sentence.split()  # byte-level BPE: every word round-trips
    single = [w for w in vocabulary() if w.isalpha() and len(clip.tokenize(w)) == 1]
    assert len(single) >= len(vocabulary()) // 2  # the merges were built from the task words


def test_held_out_edit_succeeds(pipe):
    task = make_task(DEMO_SEED)
    assert task.seed >= HELD_OUT_SEED and task.held_out
    out = pipe.edit(task.images, task.instruction)
    verdict = judge(task, out)
    assert out.size == task.target.size
    assert verdict.success, verdict
    assert verdict.psnr_unedited >= 25.0


def test_demo_command_writes_before_after_truth_and_the_verdict(tmp_path, capsys, pipe):
    code = main(["demo", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"before.png", "after.png", "truth.png"}
    task = make_task(DEMO_SEED)
    with Image.open(tmp_path / "after.png") as after:
        expected = pipe.edit(task.images, task.instruction)
        assert after.tobytes() == expected.tobytes()  # the demo is the library's edit, nothing else
        success = judge(task, after.convert("RGB")).success
    assert code == (0 if success else 1)
    assert ("success:" if success else "FAILED:") in capsys.readouterr().out


def test_cli_uses_the_small_model_when_nothing_is_configured(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_ROOT", raising=False)
    task = make_task(DEMO_SEED)
    task.images[0].save(tmp_path / "in.png")
    code = main(
        [
            "edit",
            "--image",
            str(tmp_path / "in.png"),
            "--prompt",
            task.instruction,
            "--out",
            str(tmp_path / "out.png"),
            "--steps",
            "8",
        ]
    )
    assert code == 0 and (tmp_path / "out.png").is_file()
    assert "built-in small model" in capsys.readouterr().err


def test_small_model_workflow_edits_in_the_node_graph(monkeypatch, tmp_path):
    """The shipped workflow, run node by node with the real built-in files (no stand-ins), does the edit."""
    from tests.helpers.workflows import execute, host_folders, load

    from kontext_core.synthetic.render import render

    for kind in ("diffusion_models", "text_encoders", "vae", "input", "output"):
        (tmp_path / kind).mkdir()
    host_folders(monkeypatch, tmp_path)  # empty model folders: only the built-in files are offered
    task = make_task(DEMO_SEED)
    shipped = Image.open(FILES.transformer.parents[3] / "workflows" / "inputs" / "kontext_small_scene.png")
    assert shipped.tobytes() == render(task.scenes[0]).tobytes()  # the workflow's input is the demo task's
    shipped.save(tmp_path / "input" / "kontext_small_scene.png")
    _, api = load("small_model_edit")
    results = execute(api, tmp_path / "input")
    decoded = next(results[k] for k, n in api.items() if n["class_type"] == "KontextCoreVAEDecode")[0]
    out = np.asarray(Image.fromarray((decoded[0].numpy() * 255).round().astype("uint8")), dtype=np.int16)
    # the graph is the library's edit: same files, same seed and steps, same pixel conversions
    expected = np.asarray(load_default_pipeline().edit(task.images, task.instruction, seed=0), dtype=np.int16)
    assert np.array_equal(out, expected)
    assert list((tmp_path / "output" / "kontext").glob("small_model_edit_*.png"))


def test_edit_converts_references_to_rgb_before_resizing(pipe):
    """As BFL and diffusers: Pillow would resize a palette image with NEAREST and an RGBA one alpha-weighted."""
    task = make_task(DEMO_SEED)
    palette = task.images[0].resize((61, 45)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    for image in (palette, palette.convert("RGBA")):
        ours = pipe.edit(image, task.instruction, steps=1, seed=0, resize="keep")
        rgb = pipe.edit(image.convert("RGB"), task.instruction, steps=1, seed=0, resize="keep")
        assert np.array_equal(np.asarray(ours), np.asarray(rgb)), image.mode


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"true_cfg_scale": 4.0}, "needs a negative prompt"),
        ({"num_images": 4, "noise": torch.zeros(1, 16, 8, 8)}, "noise has 1 rows but 4 images were asked for"),
    ],
)
def test_bad_pipeline_options_are_refused_by_name(pipe, options, message):
    task = make_task(DEMO_SEED)
    with pytest.raises(ValueError, match=message):
        pipe.edit(task.images, task.instruction, steps=1, resize="keep", **options)

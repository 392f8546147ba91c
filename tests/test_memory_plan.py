"""The memory plan: weights counted as the loaders hold them, from the real models' key manifests (the 12B
transformer, T5-XXL, CLIP-L, the VAE), and `inspect --plan` with files on disk."""

from __future__ import annotations

import math

import pytest
from tests.helpers.flux_files import read_manifest
from tests.helpers import tiny_files

from kontext_core.cli.main import main
from kontext_core.runtime.memory_plan import (
    ACTIVATION_VALUES_PER_TOKEN,
    GiB,
    PlanInputs,
    StoredTensor,
    describe_plan,
    plans,
    tokens,
)


def _tensors(manifest: str, kind) -> list[StoredTensor]:
    return [StoredTensor(k, math.prod(shape), kind(k, shape)) for k, shape in read_manifest(manifest).items()]


def _q4_k_m(key: str, shape: tuple[int, ...]) -> str:
    if len(shape) == 2 and shape[1] % 256 == 0:
        return "Q6_K" if key.endswith(("_mlp.2.weight", "linear2.weight")) else "Q4_K"
    return "F32" if len(shape) == 1 else "F16"


def _inputs(transformer, t5, **size) -> PlanInputs:
    def bf16(k, s):
        return "bfloat16"

    return PlanInputs(
        _tensors("flux_kontext_dev_keys.tsv", transformer),
        _tensors("t5xxl_encoder_keys.tsv", t5),
        _tensors("clip_l_text_keys.tsv", bf16),
        _tensors("flux_ae_keys.tsv", bf16),
        **size,
    )


def test_a_q4_k_m_transformer_and_q8_0_t5_on_a_12_gib_card():
    inputs = _inputs(_q4_k_m, lambda k, s: "Q8_0" if len(s) == 2 and "relative" not in k else "F32")
    # the transformer's weights as held: Q4_K 144 bytes / 256 values, Q6_K 210 / 256, F16 and F32 tensors in bf16
    held = sum(
        t.values * {"Q4_K": 144 / 256, "Q6_K": 210 / 256}.get(t.stored, 2) for t in inputs.transformer
    )  # fmt: skip
    first = plans(inputs)[0]
    assert first.label == "GGUF as is" and first.phases[1].parts["transformer"] == pytest.approx(held)
    assert 6.5 * GiB < held < 7.5 * GiB  # ComfyUI-GGUF's flux1-kontext-dev-Q4_K_M.gguf is 6.9 GB
    # a 1024² edit with one reference: 2 × 64 × 64 image tokens and 512 text tokens
    assert tokens(inputs) == 8704 and first.phases[1].parts["activations"] == 8704 * ACTIVATION_VALUES_PER_TOKEN * 2
    text = describe_plan(inputs, 12)
    assert "fits with: GGUF as is, T5 to the host after encoding (peak 10.1 GiB of 12 GiB)" in text
    assert "text_encoder.t5.to('cpu')" in text  # how to do what it says


def test_bf16_files_need_offloading_on_12_gib_and_nothing_fits_on_4():
    inputs = _inputs(lambda k, s: "bfloat16", lambda k, s: "float16")
    labels = [p.label for p in plans(inputs)]
    assert labels[:4] == [
        "as stored",
        "as stored, T5 to the host after encoding",
        "fp8 weights",
        "fp8 weights, T5 to the host after encoding",
    ]
    assert "fits with: as stored + block offload, T5 to the host after encoding" in describe_plan(inputs, 12)
    assert "fits with: fp8 weights, T5 to the host after encoding" in describe_plan(inputs, 16)
    assert "fits with: as stored (peak 33.5 GiB of 36 GiB)" in describe_plan(inputs, 36)
    assert "nothing fits: the smallest plan" in describe_plan(inputs, 4)
    bigger = describe_plan(_inputs(lambda k, s: "bfloat16", lambda k, s: "float16", width=2048, height=2048), 36)
    assert "fits with: as stored, T5 to the host after encoding" in bigger  # activations grow with the size


def test_inspect_plan_reads_the_users_files(tmp_path, capsys):
    models = tmp_path / "models"
    for folder, name, write in (
        ("diffusion_models", tiny_files.TRANSFORMER, tiny_files.write_transformer),
        ("vae", tiny_files.VAE, tiny_files.write_vae),
        ("text_encoders", tiny_files.T5, tiny_files.write_t5),
        ("text_encoders", tiny_files.CLIP, tiny_files.write_clip),
    ):
        (models / folder).mkdir(parents=True, exist_ok=True)
        write(models / folder / name)
    assert main(["inspect", "--plan", "--vram", "12", "--comfyui", str(tmp_path), "--width", "512"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for a 512×1024 edit with 1 reference(s) on a 12 GiB card" in out
    assert f"transformer: {tmp_path / 'models' / 'diffusion_models' / 'flux1-kontext-dev.safetensors'}" in out
    assert "fits with: as stored (peak" in out

    assert main(["inspect", "--plan", "--comfyui", str(tmp_path)]) == 2  # this CPU has no card to read the size of
    assert "--plan needs --vram GiB" in capsys.readouterr().err
    assert main(["inspect", "--vram", "12", str(tmp_path / "models" / "vae" / "ae.safetensors")]) == 2
    assert "--vram needs --plan" in capsys.readouterr().err


def test_the_loader_note_counts_what_the_model_holds(tmp_path):
    import kontext_core
    from kontext_core.runtime.memory_plan import loaded_model_note
    from tests.helpers.tiny_models import tiny_flux_model
    from tests.helpers.flux_files import write_gguf

    write_gguf(tmp_path / "k.gguf", tiny_flux_model(seed=1).state_dict())
    model = kontext_core.load_transformer(tmp_path / "k.gguf")
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    note = loaded_model_note(model, "cpu")
    assert note.startswith(f"transformer weights {held / GiB:.1f} GiB (GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 blocks kept)")
    assert "a 1024×1024 edit adds about 1.1 GiB of activations" in note and "inspect --plan --vram N" in note

"""The save node through the real provenance engine: metadata, and a C2PA edit record when signing is set."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from tests.helpers.nodes import load_pack
from PIL import Image

from kontext_core.policy import provenance

pack = load_pack()
_comfy = sys.modules[f"{pack.__name__}.nodes._comfy"]
save = sys.modules[f"{pack.__name__}.nodes.save"]


def test_saves_workflow_and_disclosure(monkeypatch, tmp_path):
    monkeypatch.setattr(_comfy, "output_directory", lambda: str(tmp_path))
    monkeypatch.delenv(provenance.CERT_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    images = torch.rand(2, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    result = save.KontextCoreSaveImage.run(
        images,
        "kontext/test",
        prompt={"1": {"class_type": "X", "inputs": {}}},
        extra_pnginfo={"workflow": {"nodes": []}, "note": "hi"},
    )
    files = [tmp_path / "kontext" / f"test_0000{i}_.png" for i in (1, 2)]
    assert [f"{d['subfolder']}/{d['filename']}" for d in result.ui["images"]] == [f"kontext/{f.name}" for f in files]
    png = Image.open(files[0])
    assert json.loads(png.text["prompt"]) == {"1": {"class_type": "X", "inputs": {}}}
    assert json.loads(png.text["workflow"]) == {"nodes": []}
    assert json.loads(png.text["note"]) == "hi"
    assert png.text["model"] == "FLUX.1 Kontext"  # no Kontext Model Loader in this graph: the family only
    assert "trainedAlgorithmicMedia" in png.info.get("XML:com.adobe.xmp", "")
    pixels = torch.from_numpy(np.array(png)).float() / 255
    assert (pixels - images[0]).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only


def test_disable_metadata_leaves_out_prompt_and_workflow(monkeypatch, tmp_path):
    monkeypatch.setattr(_comfy, "output_directory", lambda: str(tmp_path))
    monkeypatch.setattr(_comfy, "metadata_disabled", lambda: True)  # ComfyUI started with --disable-metadata
    monkeypatch.delenv(provenance.CERT_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    prompt = {"1": {"class_type": "KontextCoreModelLoader", "inputs": {"model_name": "kontext.safetensors"}}}
    save.KontextCoreSaveImage.run(
        torch.rand(1, 16, 16, 3), "private", prompt=prompt, extra_pnginfo={"workflow": {"nodes": []}, "note": "hi"}
    )
    png = Image.open(tmp_path / "private_00001_.png")
    assert not {"prompt", "workflow", "note"} & set(png.text)
    assert png.text["ai_generated"] == "true" and png.text["model"] == "FLUX.1 Kontext (kontext.safetensors)"


def test_signed_edit_records_its_source(monkeypatch, tmp_path):
    pytest.importorskip("c2pa")
    certs = provenance.make_test_certificates(tmp_path / "certs")
    monkeypatch.setattr(_comfy, "output_directory", lambda: str(tmp_path / "out"))
    monkeypatch.setattr(_comfy, "temp_directory", lambda: str(tmp_path / "temp"))
    monkeypatch.setenv(provenance.CERT_ENV, str(certs.cert_chain))
    monkeypatch.setenv(provenance.KEY_ENV, str(certs.private_key))
    images = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    source = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    save.KontextCoreSaveImage.run(images, "edit", source_image=source)
    report = provenance.verify_png(tmp_path / "out" / "edit_00001_.png", certs.root_cert)
    assert report["validation_state"] == "Trusted"
    assert "c2pa.edited" in json.dumps(report["active_manifest"])


def test_an_edit_lists_its_source_for_the_editor(monkeypatch, tmp_path):
    monkeypatch.setattr(_comfy, "output_directory", lambda: str(tmp_path / "out"))
    monkeypatch.setattr(_comfy, "temp_directory", lambda: str(tmp_path / "temp"))
    monkeypatch.delenv(provenance.CERT_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    images = torch.rand(2, 16, 24, 3, generator=torch.Generator().manual_seed(1))
    source = torch.rand(1, 16, 24, 3, generator=torch.Generator().manual_seed(2))
    created = save.KontextCoreSaveImage.run(images, "edit").ui["images"]
    assert all(save.SOURCE_FIELD not in entry for entry in created)  # a creation has no source
    edited = save.KontextCoreSaveImage.run(images, "edit", source_image=source).ui["images"]
    listed = [entry[save.SOURCE_FIELD] for entry in edited]
    assert listed[0] == listed[1] and (listed[0]["subfolder"], listed[0]["type"]) == ("kontext", "temp")
    preview = np.asarray(Image.open(tmp_path / "temp" / "kontext" / listed[0]["filename"]))
    assert np.array_equal(preview, (source[0].numpy() * 255).round().astype(np.uint8))

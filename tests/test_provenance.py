"""Provenance: disclosure metadata, atomic writes, and C2PA manifests that verify and break on tampering."""

from __future__ import annotations

import importlib.util
import json
import os
import zlib

import pytest
from PIL import Image

from kontext_core.policy import provenance
from kontext_core.policy.provenance import (
    TRAINED_ALGORITHMIC_MEDIA,
    SigningConfig,
    make_test_certificates,
    save_png,
    verify_png,
)

needs_c2pa = pytest.mark.skipif(
    importlib.util.find_spec("c2pa") is None, reason='c2pa-python not installed (pip install "comfyui-kontext[safety]")'
)
PROMPT = {"3": {"class_type": "KontextCoreSampler", "inputs": {"seed": 7}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "KontextCoreSampler"}]}


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return make_test_certificates(tmp_path_factory.mktemp("c2pa-ca"))


def _image(color=(40, 90, 160)) -> Image.Image:
    return Image.new("RGB", (64, 48), color)


def test_metadata_without_signing(tmp_path):
    out = save_png(
        _image(),
        tmp_path / "a.png",
        prompt=PROMPT,
        workflow=json.dumps(WORKFLOW),
        instruction="make the sky red",
        parameters="seed: 7, steps: 28",
    )
    with Image.open(out) as im:
        im.load()
        text = im.text
        assert im.size == (64, 48) and im.getpixel((0, 0)) == (40, 90, 160)
        exif = im.getexif()
    assert json.loads(text["prompt"]) == PROMPT and json.loads(text["workflow"]) == WORKFLOW
    assert text["ai_generated"] == "true" and text["parameters"] == "seed: 7, steps: 28"
    assert text["model"] == provenance.DEFAULT_MODEL
    assert f"<Iptc4xmpExt:DigitalSourceType>{TRAINED_ALGORITHMIC_MEDIA}<" in text["XML:com.adobe.xmp"]
    assert exif[0x0131].startswith("comfyui-kontext") and "make the sky red" in exif[0x010E]
    assert os.listdir(tmp_path) == ["a.png"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_png(_image(), target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["keep.png"]


def test_signing_env_config(monkeypatch, tmp_path):
    monkeypatch.delenv(provenance.CERT_ENV, raising=False)
    monkeypatch.delenv(provenance.KEY_ENV, raising=False)
    assert SigningConfig.from_env() is None
    monkeypatch.setenv(provenance.CERT_ENV, str(tmp_path / "c.pem"))
    with pytest.raises(provenance.ProvenanceError, match="both"):
        SigningConfig.from_env()
    monkeypatch.setenv(provenance.KEY_ENV, str(tmp_path / "k.pem"))
    assert SigningConfig.from_env() == SigningConfig(tmp_path / "c.pem", tmp_path / "k.pem")


def _flip_idat_byte(path) -> None:
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0x01
    path.write_bytes(bytes(data))


@needs_c2pa
def test_signed_text_to_image_verifies_and_tampering_breaks_it(tmp_path, certs):
    out = save_png(_image(), tmp_path / "gen.png", prompt=PROMPT, workflow=WORKFLOW, signing=certs.signing_config())
    valid, trusted = verify_png(out), verify_png(out, certs.root_cert)
    print(f"\nsigned text-to-image: {valid['validation_state']}, with test root: {trusted['validation_state']}")
    assert valid["validation_state"] == "Valid" and valid["failures"] == []
    assert trusted["validation_state"] == "Trusted"
    assert verify_png(out, certs.root_cert.read_text())["validation_state"] == "Trusted"
    actions = next(
        a["data"]["actions"] for a in trusted["active_manifest"]["assertions"] if a["label"].startswith("c2pa.actions")
    )
    assert [a["action"] for a in actions] == ["c2pa.created"]
    assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert actions[0]["softwareAgent"]["name"] == provenance.DEFAULT_MODEL

    with Image.open(out) as im:  # still an ordinary PNG, metadata intact after signing
        im.load()
        assert im.getpixel((5, 5)) == (40, 90, 160)
        assert json.loads(im.text["prompt"]) == PROMPT and im.text["ai_generated"] == "true"
        assert TRAINED_ALGORITHMIC_MEDIA in im.text["XML:com.adobe.xmp"]

    _flip_idat_byte(out)
    tampered = verify_png(out, certs.root_cert)
    print(f"after a one-byte change: {tampered['validation_state']} {tampered['failures']}")
    assert tampered["validation_state"] == "Invalid"
    assert any("mismatch" in code for code in tampered["failures"])


@needs_c2pa
def test_signed_edit_records_inputs_as_ingredients(tmp_path, certs):
    source = save_png(_image((200, 10, 10)), tmp_path / "in.png")
    out = save_png(
        _image(),
        tmp_path / "edit.png",
        inputs=[source, _image((0, 255, 0))],
        instruction="make it blue",
        signing=certs.signing_config(),
    )
    result = verify_png(out, certs.root_cert)
    assert result["validation_state"] == "Trusted", result["failures"]
    manifest = result["active_manifest"]
    assert [(i["title"], i["relationship"]) for i in manifest["ingredients"]] == [
        ("in.png", "parentOf"),
        ("input_1.png", "componentOf"),
    ]
    actions = next(a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.placed", "c2pa.edited"]
    assert actions[-1]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA


@needs_c2pa
def test_untrusted_anchor_and_unsigned_file(tmp_path, certs):
    other = make_test_certificates(tmp_path / "other")
    out = save_png(_image(), tmp_path / "s.png", signing=certs.signing_config())
    assert verify_png(out, other.root_cert)["validation_state"] != "Trusted"
    assert verify_png(save_png(_image(), tmp_path / "u.png"))["validation_state"] is None
    # the verify command as a gate: with trust anchors given, only a trusted signer passes
    assert provenance.main(["verify", str(out), "--trust", str(other.root_cert)]) == 1
    assert provenance.main(["verify", str(out), "--trust", str(certs.root_cert)]) == 0


@needs_c2pa
def test_verify_names_a_missing_or_unreadable_file(tmp_path, capsys):
    assert provenance.main(["verify", str(tmp_path / "missing.png")]) == 2
    assert "verify: error: [Errno 2] No such file or directory" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not a png")
    assert provenance.main(["verify", str(tmp_path / "text.png")]) == 2
    assert "text.png: cannot be read as a PNG with a C2PA manifest" in capsys.readouterr().err


def test_extra_text_cannot_rewrite_the_disclosure(tmp_path):
    with pytest.raises(ValueError, match="'ai_generated' is written by save_png itself"):
        save_png(_image(), tmp_path / "x.png", extra_text={"ai_generated": "false"})
    assert not (tmp_path / "x.png").exists()


@needs_c2pa
def test_signing_failure_is_loud_and_leaves_nothing(tmp_path, certs):
    # A certificate that does not belong to the key (here the CA's own self-signed cert) must not produce a file.
    bad = tmp_path / "root_only.pem"
    bad.write_bytes(certs.root_cert.read_bytes())
    with pytest.raises(provenance.ProvenanceError, match="signing failed"):
        save_png(_image(), tmp_path / "x.png", signing=SigningConfig(bad, certs.private_key))
    assert not (tmp_path / "x.png").exists() and os.listdir(tmp_path) == ["root_only.pem"]


def test_cli_makes_test_ca(tmp_path, capsys):
    assert provenance.main(["make-test-ca", str(tmp_path / "ca")]) == 0
    names = sorted(os.listdir(tmp_path / "ca"))
    assert names == ["root_ca.pem", "signer_chain.pem", "signer_key.pem"]
    assert (os.stat(tmp_path / "ca" / "signer_key.pem").st_mode & 0o777) == 0o600
    assert "KONTEXT_C2PA_CERT_CHAIN" in capsys.readouterr().out


def test_flip_helper_changes_image_data(tmp_path):
    # The tamper test is only meaningful if the flipped byte lands in the compressed pixels.
    path = save_png(_image(), tmp_path / "t.png")
    before = path.read_bytes()
    _flip_idat_byte(path)
    after = path.read_bytes()
    assert sum(a != b for a, b in zip(before, after)) == 1
    start = after.index(b"IDAT") + 4
    length = int.from_bytes(after[start - 8 : start - 4], "big")
    assert start <= after.index(b"IDAT") + 10 < start + length
    assert zlib.crc32(after[start - 4 : start + length]) != int.from_bytes(
        after[start + length : start + length + 4], "big"
    )


@needs_c2pa
def test_a_failed_signature_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, certs, monkeypatch):
    import c2pa
    import tempfile

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    target = out / "keep.png"
    target.write_bytes(b"old")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the unsigned intermediate goes

    def sign_half(self, signer, mime, source, dest):
        dest.write(source.read()[:100])  # the signed file half written, then the signer fails
        raise c2pa.C2paError("signer failed")

    monkeypatch.setattr(c2pa.Builder, "sign", sign_half)
    with pytest.raises(provenance.ProvenanceError, match="C2PA signing failed"):
        save_png(_image(), target, signing=certs.signing_config())
    assert target.read_bytes() == b"old" and os.listdir(out) == ["keep.png"] and os.listdir(scratch) == []


@needs_c2pa
def test_verify_says_when_a_file_is_unsigned_and_names_unusable_trust_anchors(tmp_path, certs, capsys):
    unsigned = save_png(_image(), tmp_path / "u.png")
    assert provenance.main(["verify", str(unsigned)]) == 1
    assert f"{unsigned}: no C2PA manifest (not signed)" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a certificate")
    signed = save_png(_image(), tmp_path / "s.png", signing=certs.signing_config())
    assert provenance.main(["verify", str(signed), "--trust", str(tmp_path / "notes.txt")]) == 2
    assert (
        f"{tmp_path / 'notes.txt'}: the trust anchors are not PEM certificates c2pa can use" in capsys.readouterr().err
    )

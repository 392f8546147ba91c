"""resize_to_kontext: the three modes for PIL images and ComfyUI IMAGE tensors, agreeing with each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_core.model.config import PREFERRED_KONTEXT_RESOLUTIONS
from kontext_core.resize import crop_box, kontext_size, resize_to_kontext


def pil_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


@pytest.mark.parametrize(
    "width, height, expected",
    [(1000, 700, (1248, 832)), (300, 900, (672, 1568)), (512, 512, (1024, 1024)), (1600, 1000, (1328, 800))],
)
def test_stretch_goes_to_the_nearest_preferred_resolution(width, height, expected):
    out = resize_to_kontext(pil_image(width, height, 0), "stretch")
    assert out.size == expected and expected in PREFERRED_KONTEXT_RESOLUTIONS


def test_stretch_is_a_plain_lanczos_resize_like_bfl():
    image = pil_image(301, 203, 1)
    assert np.array_equal(np.asarray(resize_to_kontext(image)), np.asarray(image.resize((1248, 832), Image.LANCZOS)))


def test_crop_cuts_to_the_target_aspect_then_scales():
    image = pil_image(400, 150, 2)  # wider than any preferred ratio: the sides go
    box = crop_box(400, 150, 1568, 672)
    assert box == (25, 0, 375, 150)  # 350/150 ≈ 1568/672
    expected = image.crop(box).resize((1568, 672), Image.LANCZOS)
    assert np.array_equal(np.asarray(resize_to_kontext(image, "crop")), np.asarray(expected))
    assert crop_box(150, 400, 672, 1568) == (0, 25, 150, 375)


def test_keep_rounds_each_side_to_16_and_leaves_fitting_images_alone():
    assert kontext_size(61, 45, "keep") == (64, 48)
    assert kontext_size(5, 300, "keep") == (16, 304)
    assert kontext_size(40, 24, "keep") == (48, 32)  # halves round up
    image = pil_image(48, 32, 3)
    assert resize_to_kontext(image, "keep") is image
    tensor = as_tensor(image)
    assert resize_to_kontext(tensor, "keep") is tensor


@pytest.mark.parametrize("mode", ["stretch", "crop", "keep"])
def test_tensor_and_pil_paths_agree(mode):
    images = [pil_image(83, 57, 4), pil_image(83, 57, 5)]
    batch = torch.cat([as_tensor(i) for i in images])
    out = resize_to_kontext(batch, mode)
    for row, image in zip(out, images):
        expected = as_tensor(resize_to_kontext(image, mode))[0]
        assert torch.equal(row, expected)
    assert out.dtype == batch.dtype
    assert torch.equal(resize_to_kontext(batch[0], mode), out[0])  # [H, W, C] too


def test_single_channel_tensor():
    gray = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (1, 40, 70, 1)).astype(np.float32) / 255)
    assert resize_to_kontext(gray, "keep").shape == (1, 48, 64, 1)


@pytest.mark.parametrize("bad, match", [("nope", "resize mode"), (None, None)])
def test_errors(bad, match):
    if bad is None:
        with pytest.raises(ValueError, match="image tensor"):
            resize_to_kontext(torch.zeros(2, 3, 8, 8))
        with pytest.raises(ValueError, match="PIL image"):
            resize_to_kontext(np.zeros((8, 8, 3)))
    else:
        with pytest.raises(ValueError, match=match):
            resize_to_kontext(pil_image(8, 8, 0), bad)

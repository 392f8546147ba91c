"""Style presets: the 17 names, both wordings, and clear errors."""

from __future__ import annotations

import pytest

from kontext_core.policy.styles import STYLE_PRESETS, apply_style

NAMES = [
    "3d-model",
    "analog-film",
    "anime",
    "cinematic",
    "comic-book",
    "craft-clay",
    "digital-art",
    "enhance",
    "fantasy-art",
    "isometric",
    "line-art",
    "low-poly",
    "neon-punk",
    "origami",
    "photographic",
    "pixel-art",
    "texture",
]


def test_the_seventeen_presets():
    assert list(STYLE_PRESETS) == NAMES
    assert len(set(STYLE_PRESETS.values())) == 17


@pytest.mark.parametrize("name", NAMES)
def test_edit_wording_is_an_instruction_that_keeps_content(name):
    text = apply_style("Put a hat on the dog", name, "edit")
    assert text.startswith("Put a hat on the dog. ") and text.endswith(STYLE_PRESETS[name])
    assert "unchanged" in STYLE_PRESETS[name]
    assert apply_style("  ", name) == STYLE_PRESETS[name]  # style only


@pytest.mark.parametrize("name", NAMES)
def test_generate_wording_describes_the_subject(name):
    text = apply_style("a lighthouse at dusk.", name, "generate")
    assert "a lighthouse at dusk" in text.lower() and "a lighthouse at dusk." not in text.lower()
    assert "unchanged" not in text and "{prompt}" not in text and text[0].isupper()


def test_punctuation_is_kept():
    assert apply_style("Make it night!", "anime").startswith("Make it night! Restyle")


@pytest.mark.parametrize(
    "args, name",
    [
        (("x", "watercolour"), "style"),
        (("x", "anime", "remix"), "mode"),
        (("", "anime", "generate"), "prompt"),
        ((None, "anime"), "prompt"),
    ],
)
def test_errors_name_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        apply_style(*args)

"""SamplingOptions: one checked description of how to sample, shared by `sample` and the pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from kontext_core.pipeline import KontextPipeline
from kontext_core.sampling import SamplingOptions, euler, true_cfg


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": True}, "steps must be at least 1"),
        ({"steps": 2.5}, "steps must be at least 1"),
        ({"guidance": float("inf")}, "guidance must be a finite number"),
        ({"true_cfg_scale": float("nan")}, "true_cfg_scale must be a finite number"),
        ({"denoise": 1.5}, r"denoise must be in \(0, 1\]"),
        ({"reference_method": "tile"}, "reference_method must be one of"),
        ({"reference_cache_every": 1.0}, "reference_cache_every must be 0"),
    ],
)
def test_bad_options_are_refused_when_made(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**fields)


def test_options_are_values():
    options = SamplingOptions(steps=4)
    assert dataclasses.replace(options, guidance=3.0) == SamplingOptions(steps=4, guidance=3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 5


def test_euler_integrates_a_known_flow_exactly():
    # Euler is exact for a constant velocity: x(0) = x(1) - v
    x0 = torch.tensor([3.0])
    out = euler(lambda x, sigma, i: torch.tensor([2.0]), x0, [1.0, 0.75, 0.25, 0.0])
    assert out.item() == 3.0 - 2.0
    seen = []
    euler(lambda x, sigma, i: x, x0, [1.0, 0.5, 0.0], lambda i, s, x, d: seen.append((i, s, x.item(), d.item())))
    # step 0: x=3, v=3 → x 1.5, denoised 3 - 1·3 = 0; step 1: x=1.5, v=1.5 → 0.75, denoised 1.5 - 0.5·1.5
    assert seen == [(0, 0.5, 1.5, 0.0), (1, 0.0, 0.75, 0.75)]


def test_true_cfg_extrapolates_from_the_negative():
    guided = true_cfg(lambda x, s, i: x + 2, lambda x, s, i: x, scale=3.0)
    assert guided(torch.tensor([1.0]), 0.5, 0).item() == 1.0 + 3.0 * 2.0


def test_the_pipeline_checks_its_options_before_any_model_runs():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the pipeline used its {name} before checking the options")

    pipe = KontextPipeline(Untouchable(), Untouchable(), Untouchable())
    with pytest.raises(ValueError, match="reference_method must be one of"):
        pipe.edit(Image.new("RGB", (32, 32)), "p", reference_method="tile")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        pipe.generate("p", width=32, height=32, steps=0)

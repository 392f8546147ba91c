"""The small model's training code, run for a few steps so it cannot rot (the real run is documented in
README.md and benchmarks/RESULTS.md)."""

from __future__ import annotations

import math

import pytest
import torch

from kontext_core.small_model import SMALL_FLUX, load_default_pipeline, small_model_files
from kontext_core.small_model import train_flux, train_vae
from kontext_core.small_model.data import image_pool, training_tasks
from kontext_core.tasks import HELD_OUT_SEED, make_task


def test_training_never_sees_held_out_seeds():
    with pytest.raises(ValueError, match="training seeds"):
        list(training_tasks(HELD_OUT_SEED - 2, 3))
    pool = image_pool(0, 4)
    assert sum(len(images) for images in pool.values()) == sum(len(make_task(s).images) + 1 for s in range(4))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    vae, info = train_vae.train(steps=2, batch=2, lr=1e-3, tasks=3, seed=0, log_every=1)
    assert math.isfinite(info["final_mse"])
    train_vae.save(vae, small_model_files(out).vae, info)
    train_flux.main(["--vae", str(small_model_files(out).vae), "--tasks", "24", "--batch", "4", "--max-steps", "2",
                     "--out", str(out)])  # fmt: skip
    return out


def test_decoder_fine_tune_keeps_the_latent_space(trained):
    before = small_model_files(trained).vae
    vae, _ = train_vae.train(steps=2, batch=2, lr=1e-2, tasks=3, seed=1, log_every=1, init=before)
    original = load_default_pipeline(folder=trained).vae
    for (name, a), b in zip(vae.encoder.state_dict().items(), original.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(vae.decoder.parameters(), original.decoder.parameters()))


def test_trained_files_load_as_the_default_pipeline(trained):
    pipe = load_default_pipeline(folder=trained)
    assert pipe.transformer.params.hidden_size == SMALL_FLUX.hidden_size
    task = make_task(HELD_OUT_SEED + 7)  # two references
    out = pipe.edit(task.images, task.instruction, steps=2)
    assert out.size == task.target.size

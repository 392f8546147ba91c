"""The quality benchmark's tables: how outputs become the figures in benchmarks/RESULTS.md."""

from __future__ import annotations

import math

import pytest
import torch
from _flux_files import bfl_file
from tiny_models import tiny_flux_model

from benchmarks.quality import benchmark_tasks, stored_in_fp8, tabulate, vae_round_trips
from kontext_core.small_model import load_default_pipeline, small_model_available
from kontext_core.small_model.store_fp8 import store_fp8
from kontext_core.tasks import HELD_OUT_SEED, KINDS, make_task

TASKS = [make_task(HELD_OUT_SEED + k) for k in range(len(KINDS))]
EDIT_KINDS = [t.kind for t in TASKS if t.kind not in ("text_to_image", "restyle")]


def test_the_truth_scores_full_marks():
    table = tabulate(TASKS, [t.target for t in TASKS])
    assert all(table[kind]["success"] == 1.0 for kind in KINDS)
    # identical pixels have infinite PSNR, which the means leave out rather than average
    assert table["single_edits"] == {"tasks": 6, "success": 1.0, "psnr_unedited_db": None}


def test_copying_the_input_fails_every_edit():
    edits = [t for t in TASKS if t.kind in EDIT_KINDS]
    table = tabulate(edits, [t.images[0] for t in edits])
    assert all(table[kind]["success"] == 0.0 for kind in EDIT_KINDS)
    assert table["single_edits"]["success"] == 0.0


def test_benchmark_tasks_are_held_out_unless_a_training_seed_is_given():
    held_out, training = benchmark_tasks(2), benchmark_tasks(2, first_seed=0)
    assert [t.seed for t in held_out] == list(range(HELD_OUT_SEED, HELD_OUT_SEED + 2 * len(KINDS)))
    assert [t.seed for t in training] == list(range(2 * len(KINDS)))
    assert [t.kind for t in training] == [t.kind for t in held_out] == 2 * list(KINDS)
    assert not any(t.held_out for t in training)  # training tasks never hold an unseen combination


def test_tabulate_needs_one_output_per_task():
    with pytest.raises(ValueError):
        tabulate(TASKS, [TASKS[0].target])


@pytest.mark.skipif(not small_model_available(), reason="the small model's weights are not in the package")
def test_vae_round_trip_is_the_truth_decoded_at_its_size():
    pipe = load_default_pipeline()
    tasks = TASKS[:2]
    for task, out in zip(tasks, vae_round_trips(pipe, tasks)):
        assert out.size == task.target.size
        psnr_db = tabulate([task], [out])[task.kind]["psnr_target_db"]
        # a wrong latent scale or shift decodes far below 20 dB; the shipped VAE averages 33 dB on held-out truths
        assert psnr_db is not None and math.isfinite(psnr_db) and psnr_db > 20


def test_fp8_storage_is_read_from_the_header(tmp_path):
    # the benchmark's fp8 path re-quantizes the weights, meaningless for a file stored in fp8 already
    fp16 = bfl_file(tiny_flux_model(seed=5), tmp_path / "fp16.safetensors", torch.float16)
    store_fp8(fp16, tmp_path / "fp8.safetensors")
    assert not stored_in_fp8(fp16)
    assert stored_in_fp8(tmp_path / "fp8.safetensors")

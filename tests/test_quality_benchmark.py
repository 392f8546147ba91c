"""The quality benchmark's tables: how outputs become the figures in benchmarks/RESULTS.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tests.helpers.flux_files import bfl_file
from tests.helpers.tiny_models import tiny_flux_model

from benchmarks import quality
from benchmarks.quality import (
    benchmark_tasks,
    compare_variant,
    drift,
    evaluate,
    recomposite,
    tabulate,
    vae_round_trips,
)
from kontext_core.checkpoints import stored_fp8_dtype
from kontext_core.recomposite import DEFAULT_GROW
from kontext_core.small_model import load_default_pipeline
from kontext_core.small_model.store_fp8 import store_fp8
from kontext_core.synthetic.tasks import HELD_OUT_SEED, KINDS, make_task

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
    assert stored_fp8_dtype(fp16) is None
    assert stored_fp8_dtype(tmp_path / "fp8.safetensors") == torch.float8_e4m3fn


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--per-kind", "0"], "argument --per-kind: must be at least 1, got 0"),
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--drift-scenes", "-1"], "argument --drift-scenes: must be at least 0, got -1"),
        (["--variants", "exact,fast_k2"], "unknown fast_k2"),  # the report's key, not the option's name
        (["--first-seed", "999990"], "judges seeds up to 1,000,149: expected all of them below 1,000,000"),
        (["--first-seed", "-1"], "none negative"),
    ],
)
def test_bad_benchmark_options_are_refused_by_name(args, message, capsys):
    with pytest.raises(SystemExit):
        quality.main(args)
    assert message in capsys.readouterr().err


def test_recomposite_takes_only_the_visibly_changed_pixels():
    rng = np.random.default_rng(0)
    before = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    after = before.copy()
    after[10:14, 20:24] += 128  # a visible edit: every channel moves by 128 (mod 256)
    faint = np.clip(after.astype(np.int16) + rng.integers(-3, 4, after.shape), 0, 255).astype(np.uint8)  # drift
    out = np.asarray(recomposite(Image.fromarray(before), Image.fromarray(faint)))
    d = DEFAULT_GROW
    edited = np.zeros((32, 32), dtype=bool)
    edited[10 - d : 14 + d, 20 - d : 24 + d] = True
    assert (out[~edited] == before[~edited]).all()  # the faint change everywhere else is undone
    assert (out[10:14, 20:24] == faint[10:14, 20:24]).all()  # the edit itself is kept


def test_a_variant_that_changes_nothing_reproduces_the_exact_outputs():
    pipe, tasks = load_default_pipeline(), TASKS[:2]
    _, exact = evaluate(pipe, tasks, steps=2)
    row = compare_variant(exact, tasks, lambda: pipe, steps=2)
    assert row["identical_outputs"] == 2 and math.isinf(row["psnr_to_exact_mean_db"])
    changed = compare_variant(exact, tasks, lambda: pipe, steps=2, guidance=1.0)
    assert changed["identical_outputs"] < 2 and math.isfinite(changed["psnr_to_exact_min_db"])


def test_recompositing_never_drifts_more_than_the_plain_chain_in_its_first_round():
    pipe = load_default_pipeline()
    plain, recomposited = (drift(pipe, HELD_OUT_SEED, method, steps=2) for method in ("plain", "recomposite"))
    assert len(plain) == len(recomposited) == quality.DRIFT_ROUNDS
    # same seed, same first output; recompositing only puts original pixels back where the edit did not reach
    first = "psnr_unedited_vs_original_db"
    assert recomposited[0][first] >= plain[0][first]
    with pytest.raises(ValueError, match="method must be one of"):
        drift(pipe, HELD_OUT_SEED, "Latent", steps=2)  # never silently the plain chain

"""The small model's training code, run for a few steps so it cannot rot (the real run is documented in
README.md and benchmarks/RESULTS.md)."""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import pytest
import torch
from safetensors import safe_open

from kontext_core.small_model import SMALL_FLUX, load_default_pipeline, small_model_files
from kontext_core.small_model import prepared, train_flux, train_vae
from kontext_core.small_model.data import image_pool, training_tasks
from kontext_core.small_model.train_flux import TaskGroup, batches, parse_kind_weights
from kontext_core.synthetic.tasks import HELD_OUT_SEED, KINDS, make_task
from kontext_core.checkpoints.tokenizers import load_tokenizer


def test_training_never_sees_held_out_seeds():
    with pytest.raises(ValueError, match="training seeds"):
        list(training_tasks(HELD_OUT_SEED - 2, 3))
    pool = image_pool(0, 4)
    assert sum(len(images) for images in pool.values()) == sum(len(make_task(s).images) + 1 for s in range(4))


@pytest.fixture(scope="module", autouse=True)
def temp_folder(tmp_path_factory):
    """The runs here cache their encoded tasks in a folder of their own, not in the machine's temp folder."""
    folder = tmp_path_factory.mktemp("temp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    vae, info = train_vae.train(steps=2, batch=2, lr=1e-3, tasks=3, seed=0, log_every=1)
    assert math.isfinite(info["final_mse"])
    train_vae.save(vae, small_model_files(out).vae, info)
    # Half the shipped depth, as the shipped model started out (README's lineage): it also trains faster here.
    train_flux.main(
        [
            "--vae",
            str(small_model_files(out).vae),
            "--tasks",
            "24",
            "--batch",
            "4",
            "--max-steps",
            "2",
            "--blocks",
            f"{SMALL_FLUX.depth // 2},{SMALL_FLUX.depth_single_blocks // 2}",
            "--out",
            str(out),
        ]
    )
    return out


def _resume(trained, out, *options: str, max_steps: int) -> None:
    """A short run from the `trained` fixture's weights, on its VAE and 24 tasks, with `options` added."""
    vae = str(small_model_files(trained).vae)
    common = ["--vae", vae, "--tasks", "24", "--batch", "4", "--max-steps", str(max_steps), "--resume", str(trained)]
    train_flux.main([*common, *options, "--out", str(out)])


def test_distillation_and_kind_weights_run(trained, tmp_path):
    _resume(
        trained, tmp_path, "--minutes", "5", "--distill-minutes", "5", "--kind-weights", "move=3,restyle=0", max_steps=2
    )
    with safe_open(small_model_files(tmp_path).transformer, "pt") as f:
        info = json.loads(f.metadata()["training"])
    assert info["flow_steps"] == 0 and info["steps"] == 2  # both steps distilled guidance
    assert info["kind_weights"] == {"move": 3.0, "restyle": 0.0}
    for folder in (tmp_path, tmp_path / "undistilled"):  # the student and the teacher it started from
        assert load_default_pipeline(folder=folder).transformer.params.guidance_embed


def test_deepened_run_saves_the_deeper_config(trained, tmp_path):
    _resume(trained, tmp_path, "--deepen", max_steps=1)
    params = load_default_pipeline(folder=tmp_path).transformer.params
    assert load_default_pipeline(folder=trained).transformer.params.depth == SMALL_FLUX.depth // 2
    assert params == SMALL_FLUX  # grown from half the depth to the shipped shape, as the shipped model was


def _group(kinds: list[str], targets: torch.Tensor, references: list[torch.Tensor]) -> TaskGroup:
    n = len(kinds)
    return TaskGroup(
        targets,
        references,
        torch.zeros(n, 4, dtype=torch.long),
        torch.zeros(n, 4, dtype=torch.long),
        torch.tensor([KINDS.index(kind) for kind in kinds]),
    )


def test_kind_weights_steer_which_tasks_are_drawn():
    assert parse_kind_weights("move=3, background=0.5") == {"move": 3.0, "background": 0.5}
    for bad, message in (("moov=2", "not a task kind"), ("move", "needs a number"), ("move=-1", ">= 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_kind_weights(bad)
    groups = [
        _group([*KINDS, *KINDS], torch.zeros(16, 16, 2, 2), []),
        _group(["move"] * 2, torch.zeros(2, 16, 2, 2), []),
    ]
    only_move = {kind: 0.0 for kind in KINDS if kind != "move"}
    stream = batches(groups, 8, torch.Generator().manual_seed(0), only_move)
    for _ in range(20):
        group, rows = next(stream)
        assert all(KINDS[kind] == "move" for kind in group.kinds[rows].tolist())
    with pytest.raises(ValueError, match="no task"):
        next(batches(groups, 8, torch.Generator(), {kind: 0.0 for kind in KINDS}))


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


def _prepared(trained, workers: int) -> list[TaskGroup]:
    files = small_model_files(trained)
    t5 = load_tokenizer(files.t5_tokenizer, "t5")
    clip = load_tokenizer(files.clip_tokenizer, "clip")
    return train_flux.prepare(files.vae, 24, t5, clip, torch.device("cpu"), workers)


def test_parallel_rendering_prepares_the_same_tasks(trained, monkeypatch):
    monkeypatch.setattr(prepared, "RENDER_CHUNK", 5)  # several chunks, the last one short
    serial, parallel = _prepared(trained, 1), _prepared(trained, 3)
    assert sum(len(g.targets) for g in serial) == 24
    assert sorted(int(k) for g in serial for k in g.kinds) == sorted(KINDS.index(make_task(s).kind) for s in range(24))
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        for name in ("targets", "t5_ids", "clip_ids", "kinds"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert len(a.references) == len(b.references)
        assert all(torch.equal(r, q) for r, q in zip(a.references, b.references))


def test_first_task_prepares_the_later_seeds(trained):
    files = small_model_files(trained)
    t5, clip = load_tokenizer(files.t5_tokenizer, "t5"), load_tokenizer(files.clip_tokenizer, "clip")
    later = train_flux.prepare(files.vae, 12, t5, clip, torch.device("cpu"), first=12)
    kinds = sorted(int(k) for g in later for k in g.kinds)
    assert kinds == sorted(KINDS.index(make_task(s).kind) for s in range(12, 24))

    def shapes(group: TaskGroup) -> tuple:
        return (group.targets.shape[1:], *(r.shape[1:] for r in group.references))

    # rows keep seed order inside a group, so seeds 12..23 are the last rows of each group of seeds 0..23
    everything = {shapes(g): g for g in _prepared(trained, 1)}
    for group in later:
        whole = everything[shapes(group)]
        n = len(group.targets)
        assert torch.equal(group.t5_ids, whole.t5_ids[-n:]) and torch.equal(group.kinds, whole.kinds[-n:])
        # encoded in other batches than the 24 tasks were: fp32 convolutions may differ in the last bits
        torch.testing.assert_close(group.targets, whole.targets[-n:], rtol=1e-5, atol=1e-5)
        for r, q in zip(group.references, whole.references, strict=True):
            torch.testing.assert_close(r, q[-n:], rtol=1e-5, atol=1e-5)


def test_a_run_reads_the_tasks_an_earlier_run_encoded(trained, temp_folder, tmp_path, capsys):
    vae = small_model_files(trained).vae
    cache = train_flux.prepared_cache(vae, 0, 24)
    assert cache.parent == temp_folder and cache.exists()  # written by the run of `trained`
    assert [p.name for p in temp_folder.iterdir() if p.suffix == ".partial"] == []
    train_flux.main(["--vae", str(vae), "--tasks", "24", "--prepare-only", "--out", str(tmp_path)])
    assert f"(read from {cache})" in capsys.readouterr().out
    train_flux.main(["--vae", str(vae), "--tasks", "24", "--prepare-only", "--no-cache", "--out", str(tmp_path)])
    assert "(encoded)" in capsys.readouterr().out


def test_the_task_cache_is_named_by_all_the_tasks_are_made_of(trained, tmp_path, monkeypatch):
    vae = small_model_files(trained).vae
    name = train_flux.prepared_cache(vae, 0, 24)
    assert train_flux.prepared_cache(vae, 0, 24) == name
    assert train_flux.prepared_cache(vae, 24, 24) != name and train_flux.prepared_cache(vae, 0, 25) != name
    other_weights = tmp_path / "ae.safetensors"
    other_weights.write_bytes(vae.read_bytes() + b" ")  # same mtime would not matter: the bytes are hashed
    assert train_flux.prepared_cache(other_weights, 0, 24) != name
    monkeypatch.setattr(prepared, "SMALL_T5_LENGTH", prepared.SMALL_T5_LENGTH + 1)  # tokenized differently
    assert train_flux.prepared_cache(vae, 0, 24) != name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--first-task", "-1"], "--first-task -1 with"),
        (["--first-task", "999990", "--tasks", "20"], "--first-task 999990 with"),
    ],
)
def test_first_task_must_pick_training_seeds(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        train_flux.main([*args, "--prepare-only", "--out", str(tmp_path)])
    assert message in capsys.readouterr().err  # the check's own message: the usage line names --first-task anyway


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blocks", "2"], "argument --blocks: expected two counts"),
        (["--blocks", "2,0"], "at least 1"),
        (["--blocks", "2,6", "--resume", "run"], "keeps its own"),
        (
            ["--save-every", "0"],
            "argument --save-every: must be at least 1, got 0",
        ),  # was a ZeroDivisionError after encoding
        (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["--batch", "x"], "argument --batch: expected a whole number, got 'x'"),
        (["--minutes", "inf"], "argument --minutes: must be positive, got inf"),
        (["--lr", "0"], "argument --lr: must be positive, got 0.0"),
        (["--minutes", "10", "--distill-minutes", "11"], "--distill-minutes must lie in [0, --minutes 10.0], got 11.0"),
        (["--distill-minutes", "-1"], "--distill-minutes must lie in"),
        ([], "arguments are required: --out"),  # never the package's own weights folder by default
    ],
)
def test_bad_training_options_are_refused_by_name(args, message, capsys, tmp_path):
    out = [] if not args else ["--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        train_flux.main([*args, *out, "--prepare-only"])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_run_never_replaces_another_vae_in_its_out_folder(trained, tmp_path, capsys):
    other = small_model_files(tmp_path).vae
    other.write_bytes(b"a VAE trained elsewhere")
    with pytest.raises(SystemExit):
        train_flux.main(
            ["--vae", str(small_model_files(trained).vae), "--tasks", "24", "--prepare-only", "--out", str(tmp_path)]
        )
    assert "holds another ae-small.safetensors than --vae" in capsys.readouterr().err
    assert other.read_bytes() == b"a VAE trained elsewhere"


def test_vae_training_needs_an_out_folder(capsys):
    with pytest.raises(SystemExit):
        train_vae.main(["--steps", "1"])
    assert "arguments are required: --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--tasks", "0"], "argument --tasks: must be at least 1, got 0"),
        (["--lr", "-1"], "argument --lr: must be positive, got -1.0"),
    ],
)
def test_bad_vae_training_options_are_refused_by_name(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        train_vae.main([*args, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_runs_on_the_gpu(trained, tmp_path):
    _resume(
        trained, tmp_path, "--device", "cuda", "--no-cache", "--minutes", "5", "--distill-minutes", "5", max_steps=2
    )
    with safe_open(small_model_files(tmp_path).transformer, "pt") as f:
        assert json.loads(f.metadata()["training"])["steps"] == 2
    assert (
        load_default_pipeline(folder=tmp_path).transformer.params
        == load_default_pipeline(folder=trained).transformer.params
    )

"""`torchrun --nproc-per-node 2 -m kontext_core edit ... --parallel ulysses` writes the PNG the one-process
command writes; the flag is refused outside torchrun and where it cannot help."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kontext_core.cli.main import main
from kontext_core.parallel.errors import NOT_LAUNCHED
from kontext_core.synthetic.tasks import make_task
from tests.helpers.parallel_runs import torchrun

ONE_LEVEL = 1  # 1/255: the split forward sums attention in another order, which may move a pixel by one level


@pytest.fixture(scope="module")
def edit_args(tmp_path_factory) -> list[str]:
    image = tmp_path_factory.mktemp("parallel-cli") / "in.png"
    make_task(1_000_001).images[0].save(image)
    prompt = "Remove the purple diamond."
    return ["edit", "--image", str(image), "--prompt", prompt, "--seed", "3", "--steps", "4", "--small-model"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_torchrun_ulysses_writes_the_one_process_png(edit_args, tmp_path):
    assert main([*edit_args, "--no-safety-check", "--out", str(tmp_path / "one.png")]) == 0
    split = [*edit_args, "--no-safety-check", "--out", str(tmp_path / "two.png"), "--parallel", "ulysses"]
    done = torchrun(2, ["-m", "kontext_core", *split], timeout=120)
    assert done.returncodes == [0], done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # rank 1 wrote nothing
    assert np.abs(pixels(tmp_path / "two.png") - pixels(tmp_path / "one.png")).max() <= ONE_LEVEL
    assert done.output.count("4/4") == 1, "one progress bar: rank 0's"


def test_the_flag_is_refused_outside_torchrun_and_for_cfg_without_a_negative_prompt(edit_args, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.png")]
    assert main([*edit_args, *out, "--parallel", "ulysses"]) == 2
    assert NOT_LAUNCHED in capsys.readouterr().err
    assert main([*edit_args, *out, "--parallel", "cfg"]) == 2
    assert "--negative-prompt and --true-cfg-scale above 1" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()

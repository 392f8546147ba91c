"""The one `kontext` command: its entry point, and the subcommands it hands to their own command lines."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kontext_core.cli.main import main
from kontext_core.cli.parser import DELEGATED, WEIGHT_DTYPE_CHOICES
from kontext_core.runtime.quant import WEIGHT_DTYPES

ROOT = Path(__file__).resolve().parents[1]


def test_the_entry_point_is_declared_and_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["kontext"].partition(":")
    assert getattr(importlib.import_module(module), name) is main


@pytest.mark.parametrize("command", ["demo", "edit", "generate", "inspect", "fetch"])
def test_each_own_subcommand_shows_its_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: kontext {command}")


def test_help_does_not_load_torch():
    # what keeps `kontext --help` fast (0.2 s against 2 s with torch): the parser holds dtype names, not dtypes
    code = "import atexit, sys; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules))"
    code += "; from kontext_core.cli.main import main; main(['--help'])"
    shown = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.rstrip().endswith("torch loaded: False")


def test_the_weight_dtypes_offered_are_the_engines():
    assert WEIGHT_DTYPE_CHOICES == tuple(WEIGHT_DTYPES)


@pytest.mark.parametrize("command", sorted(DELEGATED))
def test_each_delegated_subcommand_shows_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_kontext_queue_is_the_batch_client(tmp_path, capsys):
    args = ["--workflow", str(tmp_path / "missing.json"), "--images", str(tmp_path), "--prompt", "p"]
    args += ["--out", str(tmp_path / "out")]
    assert main(["queue", *args]) == 2
    through_kontext = capsys.readouterr().err
    direct = subprocess.run(
        [sys.executable, "-m", "kontext_core.tools.comfyui_client", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert direct.returncode == 2
    assert through_kontext == direct.stderr


def test_the_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    for command in ("demo", "edit", "generate", "inspect", "fetch", *DELEGATED):
        assert command in shown

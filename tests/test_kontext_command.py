"""The one `kontext` command: its entry point, and the subcommands it hands to their own command lines."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kontext_core.cli.main import main
from kontext_core.cli.parser import DELEGATED

ROOT = Path(__file__).resolve().parents[1]


def test_the_entry_point_is_declared_and_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["kontext"].partition(":")
    assert (module, name) == ("kontext_core.cli.main", "main")


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

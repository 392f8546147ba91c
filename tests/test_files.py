"""Files written whole: the rename happens only after the block that writes them finishes."""

from __future__ import annotations

import pytest

from kontext_core.files import written_whole


def test_a_finished_write_appears_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "model.safetensors"
    with written_whole(target) as partial:
        assert partial.parent == tmp_path and partial != target
        partial.write_bytes(b"new")
        assert not target.exists()  # not before the block ends
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), written_whole(target) as partial:
        partial.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]

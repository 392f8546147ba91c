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


def test_two_writers_of_one_name_do_not_share_the_partial_file(tmp_path):
    # a ComfyUI server saves from several threads of one process; each write needs its own partial file
    target = tmp_path / "image.png"
    with written_whole(target) as first, written_whole(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block ends last, so its rename wins
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]

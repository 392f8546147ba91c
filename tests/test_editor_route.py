"""The editor's drift route without ComfyUI: images found in the folders by reference, the engine's measure
answered, and every request it cannot measure refused with a message naming the chain entry."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
from tests.helpers.nodes import ROOT, load_pack
from PIL import Image

from kontext_core.recomposite import drift

pack = load_pack()
routes = importlib.import_module(f"{pack.__name__}.nodes.routes")


@pytest.fixture
def folders(tmp_path, monkeypatch):
    for kind in routes.FOLDERS:
        (tmp_path / kind / "kontext").mkdir(parents=True)
        monkeypatch.setitem(routes.FOLDERS, kind, lambda kind=kind: str(tmp_path / kind))
    return tmp_path


def write(folders, kind: str, name: str, pixels: np.ndarray) -> dict:
    Image.fromarray(pixels).save(folders / kind / "kontext" / name)
    return {"filename": name, "subfolder": "kontext", "type": kind}


def test_the_route_answers_the_engines_drift_of_the_chain(folders):
    original = np.full((8, 8, 3), 90, np.uint8)
    edited = original + 4
    edited[:2, :2] = 250
    chain = [write(folders, "temp", "source.png", original), write(folders, "output", "round1.png", edited)]
    expected = drift([original, edited])
    assert routes.drift_report({"chain": chain}) == {
        "psnr_db": expected.psnr_db,
        "identical": False,
        "unedited_fraction": expected.unedited_fraction,
    }
    same = routes.drift_report({"chain": [chain[0], write(folders, "input", "copy.png", original)]})
    assert same == {"psnr_db": None, "identical": True, "unedited_fraction": 1.0}  # JSON has no inf


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ("source.png", "'chain' list"),
        ([{"subfolder": "kontext"}], r"chain\[0\] must be an object with a 'filename'"),
        ([{"filename": "source.png", "subfolder": "kontext", "type": "models"}], r"chain\[0\] must have a 'type'"),
        ([{"filename": "../../etc/passwd", "type": "temp"}], r"chain\[0\]' must stay inside"),
        ([{"filename": "gone.png", "subfolder": "kontext", "type": "temp"}], r"chain\[0\]: no file 'gone.png'"),
        ([{"filename": "text.png", "subfolder": "kontext", "type": "temp"}], r"chain\[0\]: 'text.png' is not an image"),
        ([{"filename": "source.png", "subfolder": "kontext", "type": "temp"}], "at least one round"),
        (
            [{"filename": "source.png", "subfolder": "kontext", "type": "temp"}, {"filename": "wide.png"}],
            r"chain\[1\] is 12×8 but the original 8×8",
        ),
    ],
)
def test_a_chain_it_cannot_measure_is_refused_by_name(folders, chain, message):
    write(folders, "temp", "source.png", np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(folders / "output" / "wide.png")
    (folders / "temp" / "kontext" / "text.png").write_text("not a png")
    with pytest.raises(ValueError, match=message):
        routes.drift_report({"chain": chain} if isinstance(chain, list) else chain)


def test_the_editor_script_names_what_the_nodes_define():
    """web/js/kontext_editor.js keeps its own copy of the route and of the save node's output key."""
    script = (ROOT / "web" / "js" / "kontext_editor.js").read_text()
    save = importlib.import_module(f"{pack.__name__}.nodes.save")
    for name, value in (("DRIFT_ROUTE", routes.DRIFT_ROUTE), ("SOURCE_FIELD", save.SOURCE_FIELD)):
        assert re.search(rf'^const {name} = "([^"]+)";', script, re.M).group(1) == value, name

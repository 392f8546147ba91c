"""requirements.txt (what ComfyUI-Manager and `comfy node install` read) says what pyproject.toml says."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# ComfyUI brings its own CUDA build of torch; a torch line in requirements.txt could replace it.
LEFT_TO_COMFYUI = {"torch"}
EXTRAS_A_WORKFLOW_NEEDS = ("gguf", "safety")


def _by_name(lines: list[str]) -> dict[str, Requirement]:
    requirements = [Requirement(line) for line in lines]
    by_name = {canonicalize_name(r.name): r for r in requirements}
    assert len(by_name) == len(requirements), f"a package is listed twice in {lines}"
    return by_name


def _requirements_txt() -> dict[str, Requirement]:
    lines = [line.split(" #")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return _by_name([line for line in lines if line and not line.startswith("#")])


def _pyproject_expected() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS_A_WORKFLOW_NEEDS:
        lines += project["optional-dependencies"][extra]
    expected = _by_name(list(dict.fromkeys(lines)))
    return {name: r for name, r in expected.items() if name not in LEFT_TO_COMFYUI}


def test_requirements_txt_matches_pyproject():
    listed, expected = _requirements_txt(), _pyproject_expected()
    assert sorted(listed) == sorted(expected), "requirements.txt and pyproject.toml list different packages"
    for name, requirement in expected.items():
        assert listed[name].specifier == requirement.specifier, f"{name}: {listed[name]} vs pyproject's {requirement}"
        assert listed[name].marker == requirement.marker, f"{name}: {listed[name]} vs pyproject's {requirement}"


def test_requirements_txt_leaves_torch_to_comfyui():
    assert not LEFT_TO_COMFYUI & set(_requirements_txt())

"""The engine's import surface: what `import kontext_core` loads, and the paths from before the split."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kontext_core import _moved

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_importing_the_engine_loads_no_tool_and_no_model_code():
    # the pack's import in ComfyUI pays only for this; everything else loads when first used
    result = run_python(
        "import sys, kontext_core; print(sorted(m for m in sys.modules if m.startswith('kontext_core')))"
    )
    assert result.stdout.strip() == "['kontext_core', 'kontext_core._moved']", result.stderr
    result = run_python(
        "import sys, kontext_core; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:1])"
    )
    assert result.stdout.strip() == "[]"


def test_importing_the_pack_leaves_what_only_a_run_needs_unloaded():
    """ComfyUI imports every custom node at start: the filter's rules, provenance, the parallel workers, the
    memory plan, the GGUF layers and the small model load with the first run that uses them."""
    code = (
        "import sys; from tests.helpers.nodes import load_pack; load_pack(); "
        "print(sorted(m for m in sys.modules if m.startswith(('kontext_core.policy.', 'kontext_core.parallel.', "
        "'kontext_core.runtime.memory_plan', 'kontext_core.runtime.gguf', 'kontext_core.small_model'))))"
    )
    result = run_python(code)
    # the style presets and the tolerance scale fill node widgets; the parallel config names the loader's methods
    loaded = ["kontext_core.parallel.config", "kontext_core.policy.styles", "kontext_core.policy.tolerance"]
    assert result.stdout.strip() == str(loaded), result.stderr


@pytest.mark.parametrize(("old", "new"), sorted(_moved.MOVED.items()))
def test_a_moved_path_is_the_moved_module_with_a_warning_naming_its_home(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} has moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize(("stable", "home"), sorted(_moved.STABLE.items()))
def test_the_contract_paths_import_silently(stable, home):
    sys.modules.pop(stable, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = importlib.import_module(stable)
    assert module is importlib.import_module(home)


def test_a_monkeypatch_through_an_old_path_reaches_the_new_module(monkeypatch):
    sys.modules.pop("kontext_core.quant", None)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("kontext_core.quant")
    monkeypatch.setattr("kontext_core.quant.FP8_DTYPES", ())
    assert importlib.import_module("kontext_core.runtime.quant").FP8_DTYPES == () == old.FP8_DTYPES


def test_the_old_text_module_still_gives_the_encoder_and_its_loader():
    sys.modules.pop("kontext_core.text", None)
    with pytest.warns(DeprecationWarning, match="kontext_core.checkpoints.tokenizers"):
        old = importlib.import_module("kontext_core.text")
    from kontext_core.checkpoints.tokenizers import load_text_encoder
    from kontext_core.model.text import FluxTextEncoder

    assert (old.load_text_encoder, old.FluxTextEncoder) == (load_text_encoder, FluxTextEncoder)


def test_the_model_package_imports_no_other_engine_package():
    """model is the bottom layer (docs/architecture.md): files, runtime and the rest build on it, not under it."""
    imports = re.compile(r"^\s*(?:from|import) (kontext_core\.[\w.]+)", re.M)
    outside = {
        f"{path.name}: {name}"
        for path in (ROOT / "kontext_core" / "model").glob("*.py")
        for name in imports.findall(path.read_text())
        if not name.startswith("kontext_core.model")
    }
    assert not outside


def test_python_m_on_an_old_path_runs_the_new_module_and_says_where_it_went():
    result = subprocess.run(
        [sys.executable, "-m", "kontext_core.checkpoints.inspect"], cwd=ROOT, capture_output=True, text=True
    )
    assert "FutureWarning: python -m kontext_core.checkpoints.inspect has moved" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_module_of_the_engine_or_the_nodes_is_over_400_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for folder in ("kontext_core", "nodes")
        for path in (ROOT / folder).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}

"""Shared fixtures; the builders live in tests/helpers/ so test modules can import them too."""

from __future__ import annotations

import pytest
from tests.helpers.tiny_models import tiny_flux_model

from kontext_core.model.flux import Flux


@pytest.fixture
def tiny_flux() -> Flux:
    return tiny_flux_model()


@pytest.fixture(autouse=True)
def _no_real_model_lookup(tmp_path_factory, monkeypatch):
    """No test may find the machine's own FLUX files: model discovery sees an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "empty-hf-cache"))

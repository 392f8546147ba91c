"""Shared fixtures; the builders live in tiny_models.py so test modules can import them too."""

from __future__ import annotations

import pytest
from tiny_models import tiny_flux_model

from kontext_core.model import Flux


@pytest.fixture
def tiny_flux() -> Flux:
    return tiny_flux_model()

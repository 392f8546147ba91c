"""Shared test helpers: tiny random models, model files written as the real ones are, and error metrics.

Test modules import from here (``from tests.helpers.tiny_models import tiny_flux_model``), never
from one another, so each builder exists once.
"""

"""One Kontext image split across processes on torch.distributed: sequence parallel (Ulysses, ring) and CFG
parallel. See docs/parallel.md. The names below load on first use, so `errors` and `config` need no torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ParallelConfig": "config",
    "METHODS": "config",
    "ParallelError": "errors",
    "PeerFailed": "errors",
    "StopRequested": "errors",
    "ParallelPlan": "groups",
    "agree": "groups",
    "init_from_environment": "groups",
    "launched_by_torchrun": "groups",
    "ParallelFlux": "model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

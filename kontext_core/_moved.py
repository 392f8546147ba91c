"""Import paths from before the engine was split into sub-packages, kept working.

The engine contract's paths (`kontext_core.tasks`, `.safety`, `.styles`; DESIGN.md §2) are stable names of
the modules' new homes and import silently. The other old paths import the moved module itself (the same
object, so monkeypatching through either name patches both) with a DeprecationWarning; they go away in the
next release. `python -m` on an old path runs the new module and says where it went.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

STABLE = {
    "kontext_core.tasks": "kontext_core.synthetic.tasks",
    "kontext_core.safety": "kontext_core.policy.safety",
    "kontext_core.styles": "kontext_core.policy.styles",
}

MOVED = {
    "kontext_core.config": "kontext_core.model.config",
    "kontext_core.layers": "kontext_core.model.layers",
    "kontext_core.math": "kontext_core.model.flux_math",
    "kontext_core.autoencoder": "kontext_core.model.autoencoder",
    # the old module held the encoder and its loading; the loader imports the encoder, so both names resolve
    "kontext_core.text": "kontext_core.checkpoints.tokenizers",
    "kontext_core.reference_cache": "kontext_core.model.reference_cache",
    "kontext_core.quant": "kontext_core.runtime.quant",
    "kontext_core.lora": "kontext_core.runtime.lora",
    "kontext_core.compile": "kontext_core.runtime.compile",
    "kontext_core.offload": "kontext_core.runtime.offload",
    "kontext_core.provenance": "kontext_core.policy.provenance",
    "kontext_core.tasks_render": "kontext_core.synthetic.render",
    "kontext_core.quality": "kontext_core.synthetic.judge",
    "kontext_core.cli_options": "kontext_core.cli.options",
    "kontext_core.discovery": "kontext_core.tools.discovery",
    "kontext_core.fetch": "kontext_core.tools.fetch",
    "kontext_core.queue": "kontext_core.tools.comfyui_client",
    "kontext_core.checkpoints.inspect": "kontext_core.checkpoints.summary",
}

_TARGETS = {**STABLE, **MOVED}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _TARGETS:
            return None
        if fullname in MOVED:
            # stacklevel 2 lands on the importing line: warnings skips importlib's own frames
            warnings.warn(f"{fullname} has moved to {MOVED[fullname]}", DeprecationWarning, stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(_TARGETS[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the moved module ran when create_module imported it

    def get_code(self, fullname: str) -> CodeType:
        """For `python -m OLD.PATH` (runpy asks the loader for code instead of importing)."""
        new = _TARGETS[fullname]
        if fullname in MOVED:
            warnings.warn(f"python -m {fullname} has moved: use python -m {new}", FutureWarning, stacklevel=2)
        spec = importlib.util.find_spec(new)
        if spec.submodule_search_locations is not None:  # a package runs as its __main__, as runpy does
            new += ".__main__"
            spec = importlib.util.find_spec(new)
        return spec.loader.get_code(new)


def install() -> None:
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(_OldPaths())

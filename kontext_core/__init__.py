"""kontext_core: a self-contained FLUX.1 Kontext engine (no ComfyUI imports).

The public names are imported lazily so that `import kontext_core` stays cheap and the parts that
need optional packages only load when used.
"""

from __future__ import annotations

import importlib

from kontext_core import _moved

__version__ = "0.1.0"

_EXPORTS = {
    "Flux": "kontext_core.model.flux",
    "FluxParams": "kontext_core.model.config",
    "AutoEncoder": "kontext_core.model.autoencoder",
    "AutoEncoderParams": "kontext_core.model.config",
    "KontextPipeline": "kontext_core.pipeline",
    "load_transformer": "kontext_core.checkpoints.transformer",
    "load_vae": "kontext_core.checkpoints.autoencoder",
    "load_text_encoder": "kontext_core.checkpoints.tokenizers",
    "load_default_pipeline": "kontext_core.small_model",
    "apply_lora": "kontext_core.runtime.lora",
    "load_lora": "kontext_core.runtime.lora",
    "remove_lora": "kontext_core.runtime.lora",
    "use_loras": "kontext_core.runtime.lora",
}

__all__ = sorted(_EXPORTS)

_moved.install()


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kontext_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

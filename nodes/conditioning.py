"""Text and references: prompts to CONDITIONING (core layout), reference latents, style presets."""

from __future__ import annotations

import torch

from kontext_core.policy.styles import STYLE_MODES, STYLE_PRESETS, apply_style
from kontext_core.sampling import REFERENCE_METHODS

from ._spec import Input, KontextNode, Output, conditioning_input, latent_input

CATEGORY = "Kontext Core/conditioning"
DEFAULT_GUIDANCE = 2.5


def reference_method(name: str) -> str:
    """ComfyUI's method names, its "uxo/uno" and "uso" spellings folded into "uxo"."""
    if "uxo" in name or "uso" in name or "uno" in name:
        return "uxo"
    if name not in REFERENCE_METHODS:
        raise ValueError(f"reference_latents_method must be one of {REFERENCE_METHODS}, got {name!r}")
    return name


class KontextCoreTextEncode(KontextNode):
    NODE_ID = "KontextCoreTextEncode"
    DISPLAY_NAME = "Kontext Text Encode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Encodes an edit instruction (or a description, for text-to-image) with T5 and CLIP into a CONDITIONING "
        "in ComfyUI's FLUX layout, with the distilled guidance stored beside it."
    )
    INPUTS = (
        Input("text_encoder", "KONTEXT_TEXT_ENCODER", "From Kontext Text Encoder Loader."),
        Input(
            "prompt",
            "STRING",
            "What to change, as an instruction: 'Make the car red and keep the background'.",
            default="",
            multiline=True,
        ),
        Input(
            "guidance",
            "FLOAT",
            "Distilled guidance strength stored in the conditioning; Kontext is tuned "
            "for 2.5. The sampler uses it unless its own guidance is set.",
            default=DEFAULT_GUIDANCE,
            min=0.0,
            max=100.0,
            step=0.1,
        ),
    )
    OUTPUTS = (Output("CONDITIONING", "conditioning", "T5 tokens with CLIP's pooled vector and the guidance."),)

    @classmethod
    def run(cls, text_encoder, prompt: str, guidance: float = DEFAULT_GUIDANCE):
        if not hasattr(text_encoder, "encode"):
            raise ValueError(f"{cls.NODE_ID}: input 'text_encoder' must be a KONTEXT_TEXT_ENCODER")
        with torch.no_grad():
            txt, y = text_encoder.encode([prompt])
        return ([[txt.cpu(), {"pooled_output": y.cpu(), "guidance": float(guidance)}]],)


class KontextCoreReferenceLatent(KontextNode):
    NODE_ID = "KontextCoreReferenceLatent"
    DISPLAY_NAME = "Kontext Reference Latent"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Attaches up to three encoded images to the conditioning as references for the edit. Chain it to add "
        "more; the references are appended, as with ComfyUI's ReferenceLatent."
    )
    INPUTS = (
        Input("conditioning", "CONDITIONING", "The positive conditioning to attach the references to."),
        Input("latent", "LATENT", "The image to edit, from Kontext VAE Encode (or core VAE Encode)."),
        Input(
            "reference_latents_method",
            "COMBO",
            "How several references are placed: 'offset' tiles them "
            "side by side in one frame (BFL-style, the default), 'index' gives each its own frame index, "
            "'uxo' places them diagonally past the target (UNO/USO style).",
            default="offset",
            options=REFERENCE_METHODS,
        ),
        Input("latent_2", "LATENT", "Optional second reference (e.g. an object to put in the scene).", optional=True),
        Input("latent_3", "LATENT", "Optional third reference.", optional=True),
    )
    OUTPUTS = (Output("CONDITIONING", "conditioning", "The conditioning with reference_latents appended."),)

    @classmethod
    def run(cls, conditioning, latent, reference_latents_method: str = "offset", latent_2=None, latent_3=None):
        conditioning = conditioning_input(cls, "conditioning", conditioning)
        new = [
            latent_input(cls, name, value)
            for name, value in (("latent", latent), ("latent_2", latent_2), ("latent_3", latent_3))
            if value is not None
        ]
        method = reference_method(reference_latents_method)
        out = []
        for txt, meta in conditioning:
            meta = dict(meta)
            meta["reference_latents"] = list(meta.get("reference_latents") or []) + new
            meta["reference_latents_method"] = method
            out.append([txt, meta])
        return (out,)


class KontextCoreStylePreset(KontextNode):
    NODE_ID = "KontextCoreStylePreset"
    DISPLAY_NAME = "Kontext Style Preset"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Adds one of 17 style presets to a prompt: as an edit instruction that keeps the composition "
        "(edit mode) or as a styled description (generate mode, for text-to-image)."
    )
    INPUTS = (
        Input(
            "prompt",
            "STRING",
            "Your instruction or subject. May be empty in edit mode (restyle only).",
            default="",
            multiline=True,
        ),
        Input("style", "COMBO", "The style preset.", default="cinematic", options=tuple(STYLE_PRESETS)),
        Input(
            "mode",
            "COMBO",
            "'edit' phrases the style as an instruction for an existing image; 'generate' "
            "as a description of a new one.",
            default="edit",
            options=STYLE_MODES,
        ),
    )
    OUTPUTS = (Output("STRING", "prompt", "The prompt with the style's wording; wire it to Kontext Text Encode."),)

    @classmethod
    def run(cls, prompt: str, style: str, mode: str = "edit"):
        return (apply_style(prompt, style, mode),)


NODES = [KontextCoreTextEncode, KontextCoreReferenceLatent, KontextCoreStylePreset]

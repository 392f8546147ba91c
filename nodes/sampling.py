"""The sampler: the engine's Euler loop on ComfyUI's CONDITIONING and LATENT, with progress and previews."""

from __future__ import annotations

import torch

from kontext_core import sampling
from kontext_core.runtime.lora import use_loras

from ._comfy import interruptible, step_callback
from ._spec import Input, KontextNode, Output, conditioning_input, is_worker_group, latent_input, model_input
from .conditioning import DEFAULT_GUIDANCE, reference_method

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def _single(node, name: str, conditioning) -> tuple[torch.Tensor, dict]:
    conditioning = conditioning_input(node, name, conditioning)
    if len(conditioning) != 1:
        raise ValueError(
            f"{node.NODE_ID}: input '{name}' holds {len(conditioning)} conditionings; Kontext takes exactly one "
            "(combine prompts in the text instead)"
        )
    txt, meta = conditioning[0]
    if not isinstance(meta.get("pooled_output"), torch.Tensor):
        raise ValueError(f"{node.NODE_ID}: input '{name}' has no pooled_output (encode it with a FLUX text encoder)")
    return txt, meta


def _check_even(node, name: str, latent: torch.Tensor, what: str) -> None:
    # FLUX packs 2×2 latent pixels into a token: image sides must be multiples of 16
    if latent.shape[2] % 2 or latent.shape[3] % 2:
        raise ValueError(
            f"{node.NODE_ID}: input '{name}': {what} is {latent.shape[3] * 8}×{latent.shape[2] * 8} pixels; Kontext "
            "needs sides that are multiples of 16 (scale the image with Kontext Image Scale before encoding it)"
        )


class KontextCoreSampler(KontextNode):
    NODE_ID = "KontextCoreSampler"
    DISPLAY_NAME = "Kontext Sampler"
    CATEGORY = "Kontext Core/sampling"
    DESCRIPTION = (
        "Runs FLUX.1 Kontext: Euler sampling on BFL's shifted schedule, with the references attached to the "
        "positive conditioning. Without references it is plain text-to-image. Outputs a LATENT for VAE Decode."
    )
    INPUTS = (
        Input("model", "KONTEXT_MODEL", "From Kontext Model Loader (or Kontext LoRA Loader)."),
        Input(
            "positive", "CONDITIONING", "The instruction, with the images to edit attached by Kontext Reference Latent."
        ),
        Input(
            "seed",
            "INT",
            "Seed of the starting noise, drawn on the CPU in fp32 as BFL's code draws it there: a "
            "seed gives the same noise on every device.",
            default=0,
            min=0,
            max=MAX_SEED,
            control_after_generate=True,
        ),
        Input(
            "steps", "INT", "Denoising steps. 28 is Kontext's default; 20 is usually enough.", default=28, min=1, max=50
        ),
        Input(
            "guidance",
            "FLOAT",
            "Distilled guidance. -1 uses the value stored in the positive conditioning "
            "(Kontext Text Encode / FluxGuidance), or 2.5 if it has none; 0 or more overrides it.",
            default=-1.0,
            min=-1.0,
            max=100.0,
            step=0.1,
        ),
        Input(
            "denoise",
            "FLOAT",
            "1.0 starts from pure noise. Below 1 the connected latent is the starting "
            "image and only the last part of the schedule runs.",
            default=1.0,
            min=0.01,
            max=1.0,
            step=0.01,
        ),
        Input(
            "width",
            "INT",
            "Output width in pixels when no latent is connected (multiple of 16).",
            default=1024,
            min=16,
            max=4096,
            step=16,
        ),
        Input(
            "height",
            "INT",
            "Output height in pixels when no latent is connected (multiple of 16).",
            default=1024,
            min=16,
            max=4096,
            step=16,
        ),
        Input(
            "batch_size",
            "INT",
            "Images per run when no latent is connected (a connected latent's batch size wins).",
            default=1,
            min=1,
            max=16,
        ),
        Input(
            "true_cfg_scale",
            "FLOAT",
            "True classifier-free guidance against the negative prompt. 1.0 is "
            "off (one model pass per step); above 1 doubles the work.",
            default=1.0,
            min=1.0,
            max=10.0,
            step=0.1,
        ),
        Input(
            "negative", "CONDITIONING", "Optional negative prompt, used only when true_cfg_scale > 1.", optional=True
        ),
        Input(
            "latent",
            "LATENT",
            "Optional: sets the output size (and batch), and is the starting image when "
            "denoise < 1. Usually the edited image's latent.",
            optional=True,
        ),
    )
    OUTPUTS = (Output("LATENT", "latent", "The result in raw VAE space (decode with Kontext VAE Decode)."),)

    @classmethod
    def run(
        cls,
        model,
        positive,
        seed: int,
        steps: int,
        guidance: float = -1.0,
        denoise: float = 1.0,
        width: int = 1024,
        height: int = 1024,
        batch_size: int = 1,
        true_cfg_scale: float = 1.0,
        negative=None,
        latent=None,
    ):
        model, loras = model_input(cls, "model", model)
        txt, meta = _single(cls, "positive", positive)
        if guidance < 0:
            stored = meta.get("guidance")
            guidance = DEFAULT_GUIDANCE if stored is None else float(stored)

        init = None
        if latent is not None:
            raw = latent_input(cls, "latent", latent)
            if "noise_mask" in latent:
                raise ValueError(
                    f"{cls.NODE_ID}: input 'latent' carries a noise_mask (Set Latent Noise Mask), which "
                    "Kontext does not use; say in the instruction what to change instead"
                )
            _check_even(cls, "latent", raw, "the latent")
            batch_size, height, width = raw.shape[0], raw.shape[2] * 8, raw.shape[3] * 8
            init = sampling.latent_to_model(raw.float()) if denoise < 1.0 else None
        elif denoise < 1.0:
            raise ValueError(f"{cls.NODE_ID}: input 'denoise' below 1 needs a 'latent' to start from")
        for name, side in (("width", width), ("height", height)):
            if side % 16:
                raise ValueError(f"{cls.NODE_ID}: input '{name}' must be a multiple of 16, got {side}")

        neg = None
        if true_cfg_scale != 1.0:
            if negative is None:
                raise ValueError(f"{cls.NODE_ID}: input 'negative' is needed when true_cfg_scale is not 1.0")
            neg_txt, neg_meta = _single(cls, "negative", negative)
            neg = (neg_txt, neg_meta["pooled_output"])

        given = meta.get("reference_latents") or []
        try:
            sampling.check_references(given, batch_size)
        except ValueError as e:
            raise ValueError(f"{cls.NODE_ID}: input 'positive': its {e}") from None
        references = [sampling.latent_to_model(reference.float()) for reference in given]
        try:
            method = reference_method(meta.get("reference_latents_method") or "offset")
        except ValueError as e:
            raise ValueError(f"{cls.NODE_ID}: input 'positive': {e}") from None
        options = sampling.SamplingOptions(
            steps=steps, guidance=guidance, denoise=denoise, true_cfg_scale=true_cfg_scale, reference_method=method
        )
        if is_worker_group(model):
            from kontext_core.parallel.workers import SamplingJob

            noise = sampling.get_noise(batch_size, height, width, seed)
            job = SamplingJob(
                noise,
                txt.cpu(),
                meta["pooled_output"].cpu(),
                options,
                [r.cpu() for r in references],
                negative=None if neg is None else tuple(t.cpu() for t in neg),
                init_latent=init,
                loras=loras,
            )
            try:
                out = model.sample(job, callback=step_callback(steps))
            except ValueError as e:  # the workers could not load a LoRA of the chain
                raise ValueError(f"{cls.NODE_ID}: input 'model': {e}") from None
            return ({"samples": sampling.latent_from_model(out).float().cpu()},)
        device = next(model.parameters()).device
        noise = sampling.get_noise(batch_size, height, width, seed, device=device)
        with torch.no_grad(), interruptible(model):
            use_loras(model, loras)  # exactly this branch's LoRAs: those of an earlier run come off
            out = sampling.sample(
                model,
                noise,
                txt,
                meta["pooled_output"],
                options,
                references=references,
                init_latent=init,
                negative=neg,
                callback=step_callback(steps),
            )
        return ({"samples": sampling.latent_from_model(out).float().cpu()},)


NODES = [KontextCoreSampler]

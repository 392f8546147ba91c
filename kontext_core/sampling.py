"""Rectified-flow sampling for Kontext: packing, position ids, the shifted schedule, the Euler loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from kontext_core.model.config import AutoEncoderParams
from kontext_core.model.flux import Flux

REFERENCE_METHODS = ("offset", "index", "uxo")
_LATENT = AutoEncoderParams()


def latent_to_model(raw: Tensor) -> Tensor:
    """Raw VAE latent (ComfyUI's LATENT) → the scaled latent the transformer works in."""
    return (raw - _LATENT.shift_factor) * _LATENT.scale_factor


def latent_from_model(z: Tensor) -> Tensor:
    return z / _LATENT.scale_factor + _LATENT.shift_factor


def get_noise(
    batch: int,
    height: int,
    width: int,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """BFL's seeded noise for an image of height×width pixels, drawn on a CPU generator (equal to BFL's on a CPU in
    fp32; BFL draws on the target device) and then moved, so a seed means the same noise on every device."""
    return torch.randn(
        batch,
        16,
        2 * math.ceil(height / 16),
        2 * math.ceil(width / 16),
        dtype=dtype,
        generator=torch.Generator(device="cpu").manual_seed(seed),
    ).to(device)


def pack(z: Tensor) -> Tensor:
    """B×C×H×W latent → B×(H/2·W/2)×(C·4) tokens of 2×2 patches."""
    if z.shape[-1] % 2 or z.shape[-2] % 2:
        raise ValueError(f"latent height and width must be even (image sides multiples of 16), got {tuple(z.shape)}")
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, latent_height: int, latent_width: int) -> Tensor:
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=latent_height // 2, w=latent_width // 2, ph=2, pw=2)


def position_ids(h_tokens: int, w_tokens: int, index: int = 0, h_offset: int = 0, w_offset: int = 0) -> Tensor:
    """Ids (index, row, column) of an h×w token grid, row-major, as a [h·w, 3] float tensor."""
    ids = torch.zeros(h_tokens, w_tokens, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h_tokens)[:, None] + h_offset
    ids[..., 2] = torch.arange(w_tokens)[None, :] + w_offset
    return ids.reshape(-1, 3)


def reference_placements(
    target_hw: tuple[int, int], reference_hws: Sequence[tuple[int, int]], method: str = "offset"
) -> list[tuple[int, int, int]]:
    """(index, h_offset, w_offset) in tokens for each reference, with ComfyUI's rules.

    Sizes are latent sizes (pixels / 8). `offset`: index 1, each new reference tiled right of or below
    the ones before, whichever keeps the canvas squarer; `index`: index 1, 2, 3… at the origin;
    `uxo`: index 0, placed diagonally past the target and the references before.
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"reference_method must be one of {REFERENCE_METHODS}, got {method!r}")
    placements = []
    canvas_h = canvas_w = 0
    for i, (ref_h, ref_w) in enumerate(reference_hws):
        if method == "index":
            index, h_off, w_off = i + 1, 0, 0
        elif method == "uxo":
            index, h_off, w_off = 0, target_hw[0] + canvas_h, target_hw[1] + canvas_w
            canvas_h, canvas_w = canvas_h + ref_h, canvas_w + ref_w
        else:
            index, h_off, w_off = 1, 0, 0
            if ref_h + canvas_h > ref_w + canvas_w:
                w_off = canvas_w
            else:
                h_off = canvas_h
            canvas_h, canvas_w = max(canvas_h, ref_h + h_off), max(canvas_w, ref_w + w_off)
        # offsets are kept in latent pixels above and rounded to tokens here, as ComfyUI does
        placements.append((index, (h_off + 1) // 2, (w_off + 1) // 2))
    return placements


def reference_tokens(references: Sequence[Tensor], target_hw: tuple[int, int], method: str) -> tuple[Tensor, Tensor]:
    """Packed tokens [B, N, 64] and ids [N, 3] of all references, in order."""
    placements = reference_placements(target_hw, [tuple(r.shape[-2:]) for r in references], method)
    tokens = [pack(r) for r in references]
    ids = [
        position_ids(r.shape[-2] // 2, r.shape[-1] // 2, index, h_off, w_off)
        for r, (index, h_off, w_off) in zip(references, placements)
    ]
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """num_steps+1 sigmas from 1 to 0; shifted toward high noise for larger images (BFL's, bit for bit)."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def denoise_schedule(steps: int, image_seq_len: int, denoise: float = 1.0) -> list[float]:
    """The sigmas actually run: for denoise < 1, the last `steps` of a longer schedule (as ComfyUI)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return get_schedule(total, image_seq_len)[-(steps + 1) :]


@dataclass
class StepInfo:
    """What a per-step callback sees: for progress bars, previews and interruption."""

    step: int
    total: int
    sigma: float
    latent: Tensor
    denoised: Tensor


def _batched(x: Tensor, batch: int, name: str) -> Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"{name}: expected 1 or {batch} rows (the noise's batch), got {x.shape[0]}")
    return x.expand(batch, *x.shape[1:])


def _check_text_widths(model: Flux, name: str, txt: Tensor, y: Tensor) -> None:
    """A clear error where the matrix products would fail: text encoders of another model than the transformer
    (the built-in small model's files mixed with real FLUX ones, say) encode to another width."""
    p = model.params
    if txt.shape[-1] != p.context_in_dim or y.shape[-1] != p.vec_in_dim:
        raise ValueError(
            f"{name}: the text encoders give T5 features {txt.shape[-1]} wide and a CLIP vector {y.shape[-1]} wide, "
            f"but this transformer takes {p.context_in_dim} and {p.vec_in_dim}: the text encoders and the diffusion "
            "model are from different models (e.g. the built-in small model's files mixed with real FLUX ones)"
        )


@torch.no_grad()
def sample(
    model: Flux,
    noise: Tensor,
    txt: Tensor,
    y: Tensor,
    *,
    references: Sequence[Tensor] = (),
    reference_method: str = "offset",
    steps: int = 28,
    guidance: float = 2.5,
    denoise: float = 1.0,
    init_latent: Tensor | None = None,
    negative: tuple[Tensor, Tensor] | None = None,
    true_cfg_scale: float = 1.0,
    callback: Callable[[StepInfo], None] | None = None,
    reference_cache_every: int = 0,
) -> Tensor:
    """Euler sampling of the flow from `noise` to a model-space latent B×16×h×w.

    `references` are clean model-space latents appended as context tokens. `negative` (txt, y) with
    `true_cfg_scale` > 1 runs true classifier-free guidance (two passes a step). `denoise` < 1 starts
    from `init_latent` noised to the first kept sigma. `reference_cache_every` = K > 0 turns on the
    approximate fast mode: the references' keys/values are recomputed every K steps and reused between.
    """
    if noise.ndim != 4:
        raise ValueError(f"noise must be B×16×h×w, got shape {tuple(noise.shape)}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    if true_cfg_scale != 1.0 and negative is None:
        raise ValueError(
            f"true_cfg_scale={true_cfg_scale} needs a negative prompt (negative=(txt, y)); "
            "without one it would be ignored"
        )
    if (
        isinstance(reference_cache_every, bool)
        or not isinstance(reference_cache_every, int)
        or reference_cache_every < 0
    ):
        raise ValueError(
            f"reference_cache_every must be 0 (exact) or a step count K > 0, got {reference_cache_every!r}"
        )
    _check_text_widths(model, "txt/y", txt, y)
    if negative is not None:
        _check_text_widths(model, "negative", *negative)
    batch, _, lat_h, lat_w = noise.shape
    device, dtype = noise.device, model.compute_dtype
    use_cfg = negative is not None and true_cfg_scale != 1.0
    img = pack(noise.float())
    img_ids = position_ids(lat_h // 2, lat_w // 2)[None].expand(batch, -1, -1).to(device)
    txt, y = _batched(txt, batch, "txt").to(device, dtype), _batched(y, batch, "y").to(device, dtype)
    txt_ids = torch.zeros(batch, txt.shape[1], 3, device=device)
    if use_cfg:
        neg_txt, neg_y = (_batched(t, batch, f"negative {n}").to(device, dtype) for t, n in zip(negative, ("txt", "y")))
        neg_txt_ids = torch.zeros(batch, neg_txt.shape[1], 3, device=device)

    ref_tok = ref_ids = None
    if references:
        ref_tok, ref_ids = reference_tokens([r.to(device) for r in references], (lat_h, lat_w), reference_method)
        ref_tok = _batched(ref_tok, batch, "references").to(dtype)
        ref_ids = ref_ids[None].expand(batch, -1, -1).to(device)
    use_cache = reference_cache_every > 0 and ref_tok is not None
    caches = [model.new_reference_cache(ref_tok.shape[1]) for _ in range(1 + use_cfg)] if use_cache else None

    sigmas = denoise_schedule(steps, img.shape[1], denoise)
    if denoise < 1.0:
        if init_latent is None:
            raise ValueError("denoise < 1 needs an init_latent to start from")
        img = sigmas[0] * img + (1.0 - sigmas[0]) * pack(_batched(init_latent, batch, "init_latent").to(device).float())
    guidance_vec = torch.full((batch,), guidance, device=device, dtype=dtype)

    def velocity(x: Tensor, t_vec: Tensor, step: int, txt_: Tensor, txt_ids_: Tensor, y_: Tensor, cache) -> Tensor:
        x_in, ids_in = x.to(dtype), img_ids
        if ref_tok is not None:
            recording = cache is None or step % reference_cache_every == 0
            if cache is not None:
                cache.set_recording(recording)
            if recording:
                x_in, ids_in = torch.cat((x_in, ref_tok), dim=1), torch.cat((img_ids, ref_ids), dim=1)
        pred = model(x_in, ids_in, txt_, txt_ids_, t_vec, y_, guidance_vec, ref_cache=cache)
        return pred[:, : x.shape[1]].float()

    total = len(sigmas) - 1
    for step, (t_curr, t_prev) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t_vec = torch.full((batch,), t_curr, dtype=dtype, device=device)
        v = velocity(img, t_vec, step, txt, txt_ids, y, caches[0] if caches else None)
        if use_cfg:
            v_neg = velocity(img, t_vec, step, neg_txt, neg_txt_ids, neg_y, caches[1] if caches else None)
            v = v_neg + true_cfg_scale * (v - v_neg)
        if callback is not None:
            denoised = unpack(img - t_curr * v, lat_h, lat_w)
        img = img + (t_prev - t_curr) * v
        if callback is not None:
            callback(StepInfo(step + 1, total, t_prev, unpack(img, lat_h, lat_w), denoised))
    return unpack(img, lat_h, lat_w)

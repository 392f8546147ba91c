"""Rectified-flow sampling for Kontext: packing, position ids, the shifted schedule, the Euler loop."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from kontext_core.model.config import FLUX_LATENT, LatentFormat
from kontext_core.model.flux import Flux

REFERENCE_METHODS = ("offset", "index", "uxo")

# dx/dσ at the packed target tokens x, noise level σ, step index: what the Euler loop integrates
Velocity = Callable[[Tensor, float, int], Tensor]


def latent_to_model(raw: Tensor, latent: LatentFormat = FLUX_LATENT) -> Tensor:
    """Raw VAE latent (ComfyUI's LATENT) → the scaled latent the transformer works in."""
    return (raw - latent.shift_factor) * latent.scale_factor


def latent_from_model(z: Tensor, latent: LatentFormat = FLUX_LATENT) -> Tensor:
    return z / latent.scale_factor + latent.shift_factor


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


def check_references(references: Sequence[Tensor], batch: int) -> None:
    """Each reference a FLUX latent [1 or `batch`, 16, h, w] with even h and w; the error names which one."""
    for i, ref in enumerate(references, start=1):
        if not isinstance(ref, Tensor) or ref.ndim != 4 or ref.shape[1] != 16:
            raise ValueError(f"reference {i} is not a FLUX latent [B, 16, h, w]")
        if ref.shape[2] % 2 or ref.shape[3] % 2:
            raise ValueError(
                f"reference {i} is {ref.shape[3] * 8}×{ref.shape[2] * 8} pixels; Kontext needs sides that are "
                "multiples of 16 (FLUX packs 2×2 latent pixels into a token)"
            )
        if ref.shape[0] not in (1, batch):
            raise ValueError(f"reference {i} holds {ref.shape[0]} images; expected 1 or the batch of {batch}")


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


@dataclass(frozen=True)
class SamplingOptions:
    """How one image is sampled, apart from its inputs (as BFL's CLI's `SamplingOptions`); checked when made.

    `true_cfg_scale` > 1 runs true classifier-free guidance (two passes a step) and needs a negative prompt;
    `denoise` < 1 starts part way, from an init latent; `reference_cache_every` = K > 0 is the approximate
    fast mode: the references' keys/values are recomputed every K steps and reused between.
    """

    steps: int = 28
    guidance: float = 2.5
    denoise: float = 1.0
    true_cfg_scale: float = 1.0
    reference_method: str = "offset"
    reference_cache_every: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps!r}")
        for name in ("guidance", "true_cfg_scale"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.denoise, numbers.Real) or not 0.0 < self.denoise <= 1.0:
            raise ValueError(f"denoise must be in (0, 1], got {self.denoise!r}")
        if self.reference_method not in REFERENCE_METHODS:
            raise ValueError(f"reference_method must be one of {REFERENCE_METHODS}, got {self.reference_method!r}")
        if not _is_int(self.reference_cache_every) or self.reference_cache_every < 0:
            raise ValueError(
                f"reference_cache_every must be 0 (exact) or a step count K > 0, got {self.reference_cache_every!r}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class StepInfo:
    """What a per-step callback sees: for progress bars, previews and interruption."""

    step: int
    total: int
    sigma: float
    latent: Tensor
    denoised: Tensor


def euler(
    velocity: Velocity,
    x: Tensor,
    sigmas: Sequence[float],
    callback: Callable[[int, float, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Euler steps of dx/dσ = velocity along `sigmas` (k-diffusion's `sample_euler`, in velocity form).

    `callback(i, next sigma, x after the step, denoised estimate before it)` follows every step.
    """
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = velocity(x, sigma, i)
        x_next = x + (sigma_next - sigma) * v
        if callback is not None:
            callback(i, sigma_next, x_next, x - sigma * v)
        x = x_next
    return x


def cfg_mix(v: Tensor, v_neg: Tensor, scale: float) -> Tensor:
    """uncond + scale · (cond − uncond), in this order of operations wherever the two passes ran."""
    return v_neg + scale * (v - v_neg)


def true_cfg(cond: Velocity, uncond: Velocity, scale: float) -> Velocity:
    """Classifier-free guidance of two velocities."""

    def guided(x: Tensor, sigma: float, step: int) -> Tensor:
        return cfg_mix(cond(x, sigma, step), uncond(x, sigma, step), scale)

    return guided


@dataclass
class References:
    """The references as context tokens of a batch: packed latents and their position ids."""

    tokens: Tensor  # B × N × 64, in the model's compute dtype
    ids: Tensor  # B × N × 3


def flux_velocity(
    model: Flux,
    img_ids: Tensor,
    txt: Tensor,
    y: Tensor,
    guidance: float,
    references: References | None = None,
    cache_every: int = 0,
) -> Velocity:
    """The transformer as a velocity field over the target tokens, with text, guidance and references bound.

    The references ride along as trailing context tokens; with `cache_every` = K > 0 they do so only every
    K-th step, and the steps between attend to their keys and values cached from then (the fast mode).
    """
    batch, device, dtype = img_ids.shape[0], img_ids.device, model.compute_dtype
    txt_ids = torch.zeros(batch, txt.shape[1], 3, device=device)
    guidance_vec = torch.full((batch,), guidance, device=device, dtype=dtype)
    cache = None
    if references is not None and cache_every > 0:
        cache = model.new_reference_cache(references.tokens.shape[1])

    def velocity(x: Tensor, sigma: float, step: int) -> Tensor:
        x_in, ids = x.to(dtype), img_ids
        with_references = references is not None and (cache is None or step % cache_every == 0)
        if cache is not None:
            cache.set_recording(with_references)
        if with_references:
            x_in, ids = torch.cat((x_in, references.tokens), dim=1), torch.cat((img_ids, references.ids), dim=1)
        t_vec = torch.full((batch,), sigma, dtype=dtype, device=device)
        pred = model(x_in, ids, txt, txt_ids, t_vec, y, guidance_vec, ref_cache=cache)
        return pred[:, : x.shape[1]].float()

    return velocity


def _batched(x: Tensor, batch: int, name: str) -> Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"{name}: expected 1 or {batch} rows (the noise's batch), got {x.shape[0]}")
    return x.expand(batch, *x.shape[1:])


def _check_text_widths(model: Flux, name: str, txt: Tensor, y: Tensor) -> None:
    """A clear error where the matrix products would fail: text encoders of another model encode to another width."""
    p = model.params
    if txt.shape[-1] != p.context_in_dim or y.shape[-1] != p.vec_in_dim:
        raise ValueError(
            f"{name}: the text encoders give T5 features {txt.shape[-1]} wide and a CLIP vector {y.shape[-1]} wide, "
            f"but this transformer takes {p.context_in_dim} and {p.vec_in_dim}: the text encoders and the diffusion "
            "model are from different models"
        )


@torch.no_grad()
def sample(
    model: Flux,
    noise: Tensor,
    txt: Tensor,
    y: Tensor,
    options: SamplingOptions | None = None,
    *,
    references: Sequence[Tensor] = (),
    negative: tuple[Tensor, Tensor] | None = None,
    init_latent: Tensor | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    **fields,
) -> Tensor:
    """Euler sampling of the flow from `noise` to a model-space latent B×16×h×w.

    `options` (or its fields as keywords: `steps=4, guidance=3.0`, …) say how; `references` are clean
    model-space latents appended as context tokens; `negative` (txt, y) is the negative prompt of true CFG;
    `init_latent` is where `denoise` < 1 starts from, noised to the first kept sigma.
    """
    options = dataclasses.replace(options or SamplingOptions(), **fields)
    if noise.ndim != 4:
        raise ValueError(f"noise must be B×16×h×w, got shape {tuple(noise.shape)}")
    if options.true_cfg_scale != 1.0 and negative is None:
        raise ValueError(
            f"true_cfg_scale={options.true_cfg_scale} needs a negative prompt (negative=(txt, y)); "
            "without one it would be ignored"
        )
    _check_text_widths(model, "txt/y", txt, y)
    if negative is not None:
        _check_text_widths(model, "negative", *negative)
    batch, _, lat_h, lat_w = noise.shape
    device, dtype = noise.device, model.compute_dtype
    img_ids = position_ids(lat_h // 2, lat_w // 2)[None].expand(batch, -1, -1).to(device)
    refs = None
    check_references(references, batch)
    if references:
        tokens, ids = reference_tokens([r.to(device) for r in references], (lat_h, lat_w), options.reference_method)
        refs = References(_batched(tokens, batch, "references").to(dtype), ids[None].expand(batch, -1, -1).to(device))

    def conditioned(txt: Tensor, y: Tensor, name: str) -> Velocity:
        txt, y = (_batched(t, batch, f"{name}{n}").to(device, dtype) for t, n in ((txt, "txt"), (y, "y")))
        return flux_velocity(model, img_ids, txt, y, options.guidance, refs, options.reference_cache_every)

    velocity = conditioned(txt, y, "")
    if negative is not None and options.true_cfg_scale != 1.0:
        # a model split across processes (kontext_core.parallel) may run the two passes on two sets of ranks
        guided = getattr(model, "true_cfg", true_cfg)
        velocity = guided(velocity, conditioned(*negative, "negative "), options.true_cfg_scale)

    x = pack(noise.float())
    sigmas = denoise_schedule(options.steps, x.shape[1], options.denoise)
    if options.denoise < 1.0:
        if init_latent is None:
            raise ValueError("denoise < 1 needs an init_latent to start from")
        init = pack(_batched(init_latent, batch, "init_latent").to(device).float())
        x = sigmas[0] * x + (1.0 - sigmas[0]) * init

    def report(i: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
        latent, denoised = unpack(x, lat_h, lat_w), unpack(denoised, lat_h, lat_w)
        callback(StepInfo(i + 1, len(sigmas) - 1, sigma, latent, denoised))

    return unpack(euler(velocity, x, sigmas, report if callback is not None else None), lat_h, lat_w)

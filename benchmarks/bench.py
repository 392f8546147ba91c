"""Speed and memory of a Kontext edit: ours against diffusers with identical random weights, in one run.

    python -m benchmarks.bench --size mid --device cpu [--json out.json] [--fast-sweep]
    python -m benchmarks.bench --size full --device cuda          # 1024² + 1024² reference, 512 T5 tokens

One process builds random weights once and gives the very same tensors to both implementations
(diffusers' modules are views of ours), then times, side by side: one transformer step (median of
`--repeats` after warm-up, synchronized on CUDA) and the whole edit split into text encode, VAE encode,
denoise and VAE decode. Both pipelines take the same precomputed text embeddings (both would run the
same transformers T5/CLIP), so text encoding is timed once and added to both edits. Every timed output
is also compared, so the speed figures come with proof that the two compute the same thing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from benchmarks.flops import flux_forward_flops
from tests.helpers.metrics import psnr
from kontext_core.model.autoencoder import AutoEncoder
from kontext_core.checkpoints.autoencoder import (
    diffusers_vae_key_to_bfl,
    is_attention_projection,
    vae_params_from_shapes,
)
from kontext_core.runtime.compile import CudaGraphForward, optimize
from kontext_core.model.config import FLUX_KONTEXT_DEV, FluxParams
from kontext_core.model.flux import Flux
from kontext_core.runtime.offload import offload
from kontext_core.pipeline import KontextPipeline
from kontext_core.sampling import get_noise, pack, position_ids, reference_tokens, sample

MODES = ("exact", "fast", "fp8", "offload", "compile", "graphs")


@dataclass(frozen=True)
class BenchSize:
    flux: FluxParams
    width: int  # output and reference, pixels
    height: int
    txt_tokens: int
    steps: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    t5: dict = field(default_factory=dict)  # transformers T5Config arguments
    clip: dict = field(default_factory=dict)  # transformers CLIPTextConfig arguments
    note: str = ""


CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu")
# the CPU proxy's T5: T5-XXL's head width and gated FFN at d_model 512 × 4 layers (T5-XXL is 4.7B parameters)
T5_MID = dict(d_model=512, d_ff=1024, num_layers=4, num_heads=8, d_kv=64, feed_forward_proj="gated-gelu")
T5_TINY = dict(d_model=48, d_ff=64, num_layers=1, num_heads=2, d_kv=24, vocab_size=128)
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
CLIP_TINY.update(vocab_size=128, bos_token_id=0, eos_token_id=127, pad_token_id=1)  # a 128-token vocabulary


def kontext_layout(
    hidden: int, heads: int, blocks: tuple[int, int], text_widths: tuple[int, int], axes: list[int]
) -> FluxParams:
    """FLUX.1 Kontext's layout at another width and depth: (double, single) blocks, (T5, CLIP) widths."""
    (depth, single), (context, vec) = blocks, text_widths
    widths = dict(hidden_size=hidden, num_heads=heads, context_in_dim=context, vec_in_dim=vec, axes_dim=axes)
    return replace(FLUX_KONTEXT_DEV, depth=depth, depth_single_blocks=single, **widths)


SIZES = {
    "tiny": BenchSize(
        flux=kontext_layout(hidden=64, heads=4, blocks=(1, 1), text_widths=(48, 32), axes=[4, 6, 6]),
        width=64,
        height=48,
        txt_tokens=8,
        steps=2,
        vae_channels=(32, 32, 32, 32),
        vae_layers=1,
        t5=T5_TINY,
        clip=CLIP_TINY,
        note="CI size: checks that the benchmark runs and both implementations agree; timings mean little",
    ),
    "mid": BenchSize(
        flux=kontext_layout(hidden=256, heads=4, blocks=(2, 4), text_widths=(512, 768), axes=[8, 28, 28]),
        width=256,
        height=256,
        txt_tokens=128,
        steps=8,
        vae_channels=(64, 64, 128, 128),
        vae_layers=1,
        t5=T5_MID,
        clip=CLIP_L,
        note="CPU proxy: hidden 256 (head dim 64), 2+4 blocks, 256² output + 256² reference, 128 text tokens, "
        "8 steps; T5 reduced to d_model 512 × 4 layers (T5-XXL is 4.7B parameters), CLIP-L full size",
    ),
    "full": BenchSize(
        flux=FLUX_KONTEXT_DEV,
        width=1024,
        height=1024,
        txt_tokens=512,
        steps=28,
        vae_channels=(128, 256, 512, 512),
        vae_layers=2,
        t5=T5_XXL,
        clip=CLIP_L,
        note="FLUX.1 Kontext [dev] architecture (12B, 19+38 blocks), 1024² output + 1024² reference, 512 T5 tokens",
    ),
}


# ---------------------------------------------------------------- random models, shared weights


def random_fill_(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random: weights N(0, 1/fan_in) so activations keep their scale through deep stacks."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = 1.0 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.2
            p.normal_(0.0, std, generator=gen)
    return module.eval().requires_grad_(False)


def on_meta_then_fill(
    factory: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int
) -> nn.Module:
    """Build without allocating, then allocate straight on `device` in `dtype`: no CPU init of 12B weights."""
    with torch.device("meta"):
        module = factory()
    if any(True for _ in module.buffers()):
        raise RuntimeError(f"{type(module).__name__} has buffers, which a meta build would leave uninitialized")
    return random_fill_(module.to(dtype).to_empty(device=device), seed)


def diffusers_transformer(model: Flux) -> nn.Module:
    """diffusers' FluxTransformer2DModel whose weights are views of `model`'s (no second copy)."""
    from tests.helpers.reference_mappings import diffusers_twin

    return diffusers_twin(model, share_weights=True)


def vae_pair(size: BenchSize, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[nn.Module, AutoEncoder]:
    """diffusers' AutoencoderKL with random weights, and our AutoEncoder on views of the same tensors."""
    from tests.helpers.diffusers_models import flux_like_kl

    levels = len(size.vae_channels)
    kl = flux_like_kl(size.vae_channels, size.vae_layers).to(device)
    if dtype != torch.float32:  # (diffusers warns on any dtype cast, even to float32)
        kl = kl.to(dtype)
    random_fill_(kl, seed)
    ours_sd = {}
    for key, value in kl.state_dict().items():
        name = diffusers_vae_key_to_bfl(key, levels)
        ours_sd[name] = value[..., None, None] if is_attention_projection(name) and value.ndim == 2 else value
    params = vae_params_from_shapes({k: tuple(v.shape) for k, v in ours_sd.items()}, "benchmark VAE")
    with torch.device("meta"):
        vae = AutoEncoder(params)
    vae.load_state_dict(ours_sd, strict=True, assign=True)
    return kl, vae.eval().requires_grad_(False)


def fp8_copy(model: Flux) -> Flux | None:
    """Our model with every block Linear stored in fp8 (per-tensor scale), or None without kontext_core.runtime.quant."""
    try:
        from kontext_core.runtime import quant
    except ImportError:
        return None
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(("double_", "single_"))}
    device, dtype = model.img_in.weight.device, model.img_in.weight.dtype
    with torch.device("meta"):
        q = Flux(model.params)
        quant.use_fp8_linears(q, names)
        q = q.to(dtype)
        for name in names:  # fp8 while still on meta, so the full-precision copy is never allocated
            layer = q.get_submodule(name)
            layer.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=torch.float8_e4m3fn), requires_grad=False)
            layer.scale_weight = torch.empty((), dtype=torch.float32)
    q = q.to_empty(device=device)
    source = model.state_dict()
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    with torch.no_grad():
        for key, tensor in q.state_dict().items():
            layer, _, kind = key.rpartition(".")
            if layer in names and kind == "weight":
                w = source[key].float()
                scale = w.abs().amax().clamp(min=1e-12) / fp8_max
                tensor.copy_((w / scale).to(torch.float8_e4m3fn))
                q.get_submodule(layer).scale_weight.copy_(scale)
            elif kind != "scale_weight":
                tensor.copy_(source[key])
    q.compute_dtype = model.compute_dtype
    if device.type == "cuda" and quant.fp8_matmul_supported(device):
        quant.enable_fp8_matmul(q)
    return q.eval().requires_grad_(False)


def shared_copy(model: Flux) -> Flux:
    """A second Flux module on the same weight tensors (so one can be compiled or hooked, the other not)."""
    with torch.device("meta"):
        twin = Flux(model.params)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    twin.compute_dtype = model.compute_dtype
    return twin.eval().requires_grad_(False)


# ---------------------------------------------------------------- measuring


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object], warmup: int, repeat: int, stat: str = "median"):
        """Seconds of the reported call (see `pick`) of `repeat` after `warmup`, all times, the last result."""
        result = None
        for _ in range(warmup):
            result = fn()
        times = []
        for _ in range(repeat):
            self.sync()
            start = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return times[pick(times, stat)], times, result


class PeakMemory:
    """Growth of device memory (CUDA: max_memory_allocated) or of the resident set (CPU: VmHWM, reset
    through /proc/self/clear_refs) over its level at `reset()`. Every model of the run stays resident,
    so a variant's peak is reported as its own weights plus this growth, not as the process total."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = (
            "weights of the variant + peak growth of max_memory_allocated during its run"
            if device.type == "cuda"
            else "weights of the variant + peak growth of the process RSS (VmHWM) during its run"
        )
        self.base = 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)
        except OSError as err:
            raise RuntimeError(f"peak RSS on CPU needs Linux's /proc/self/clear_refs ({err})") from None
        self.base = self._status_mib("VmRSS")

    def growth_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return self._status_mib("VmHWM") - self.base

    @staticmethod
    def _status_mib(field_name: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"/proc/self/status has no {field_name}: peak memory needs Linux")


def weights_mib(*modules) -> float:
    """Bytes of the parameters and buffers that a variant reads (shared views counted at their size)."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def compare(test: Tensor, ref: Tensor) -> dict:
    test, ref = test.double(), ref.double()
    return {
        "max_abs": (test - ref).abs().max().item(),
        "rel_l2": ((test - ref).norm() / ref.norm()).item(),
        "psnr_db": psnr(test, ref),
        "ref_max_abs": ref.abs().max().item(),
    }


class Timed:
    """Wraps a method so each call's seconds (and its first argument, e.g. the final latent) are kept."""

    def __init__(self, fn: Callable, clock: Clock):
        self.fn, self.clock = fn, clock
        self.seconds: list[float] = []
        self.last_input: Tensor | None = None

    def __call__(self, *args, **kwargs):
        self.clock.sync()
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.clock.sync()
        self.seconds.append(time.perf_counter() - start)
        self.last_input = args[0] if args else None
        return out


class FixedText:
    """The text encoder seen by our pipeline: the precomputed embeddings (encode is timed on its own)."""

    def __init__(self, txt: Tensor, y: Tensor):
        self.txt, self.y = txt, y

    def encode(self, prompts):
        n = 1 if isinstance(prompts, str) else len(prompts)
        return self.txt.expand(n, -1, -1), self.y.expand(n, -1)


def bench_picture(width: int, height: int) -> Image.Image:
    """Gradients and a checkerboard: structure for the VAE, deterministic, not noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, ((xx // 16 + yy // 16) % 2) * 200], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


# ---------------------------------------------------------------- the benchmark


@dataclass
class Settings:
    size: str = "mid"
    device: str = "cpu"
    dtype: str | None = None  # bf16 on CUDA, fp32 on CPU
    steps: int | None = None
    repeats: int = 5
    warmup: int = 2
    edit_repeats: int = 1
    modes: tuple[str, ...] = ("exact", "fast", "fp8", "offload")
    fast_k: int = 2
    diffusers: bool = True
    sweep_k: tuple[int, ...] = ()
    sweep_prompts: int = 4
    sweep_seeds: int = 2
    seed: int = 0
    stat: str = "median"  # or "min": the fastest run, for a machine shared with other work


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def text_encoders(size: BenchSize, device: torch.device, dtype: torch.dtype, seed: int, clock: Clock, s: Settings):
    """Random T5 and CLIP of the size's widths: times one encode and returns its embeddings."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = on_meta_then_fill(lambda: T5EncoderModel(T5Config(**size.t5)), device, dtype, seed)
    clip = random_fill_(CLIPTextModel(CLIPTextConfig(**size.clip)).to(device, dtype), seed + 1)
    gen = torch.Generator().manual_seed(seed)
    t5_ids = torch.randint(2, t5.config.vocab_size, (1, size.txt_tokens), generator=gen).to(device)
    clip_ids = torch.randint(2, clip.config.vocab_size - 1, (1, 77), generator=gen)
    clip_ids[0, 20] = clip.config.eos_token_id  # the pooled output is read at the end token
    clip_ids = clip_ids.to(device)

    def encode():
        with torch.no_grad():
            return t5(input_ids=t5_ids).last_hidden_state, clip(input_ids=clip_ids).pooler_output

    seconds, _, (txt, y) = clock.time(encode, warmup=1, repeat=max(1, min(s.repeats, 3)), stat=s.stat)
    return seconds, txt.float(), y.float()


def clock_device(model: Flux) -> torch.device:
    return model.img_in.weight.device


def step_inputs(model: Flux, size: BenchSize, txt: Tensor, y: Tensor, seed: int):
    """One denoising step's inputs: target + reference tokens, as the edit sends them."""
    device, dtype = clock_device(model), model.compute_dtype
    gen = torch.Generator().manual_seed(seed + 7)
    lat_h, lat_w = size.height // 8, size.width // 8
    noise = torch.randn(1, 16, lat_h, lat_w, generator=gen)
    reference = torch.randn(1, 16, lat_h, lat_w, generator=gen)
    ref_tok, ref_ids = reference_tokens([reference], (lat_h, lat_w), "offset")
    img = torch.cat((pack(noise), ref_tok), dim=1).to(device, dtype)
    img_ids = torch.cat((position_ids(lat_h // 2, lat_w // 2), ref_ids))[None].to(device)
    txt_ids = torch.zeros(1, txt.shape[1], 3, device=device)
    t = torch.tensor([0.7], device=device, dtype=dtype)
    guidance = torch.tensor([2.5], device=device, dtype=dtype)
    return img, img_ids, txt.to(device, dtype), txt_ids, t, y.to(device, dtype), guidance, ref_tok.shape[1]


@dataclass
class Variant:
    """One thing to time: `run()` does it once and returns its output (a step's velocity, or an edit)."""

    impl: str
    mode: str
    run: Callable[[], object]
    flops: int
    weights_mib: float = 0.0
    output: object = None
    peak_mib: float = 0.0
    times: list[float] = field(default_factory=list)


def interleaved(variants: list[Variant], warmup: int, repeat: int, clock: Clock, memory: PeakMemory) -> None:
    """Time the variants round-robin, so load from other processes on a shared machine hits all alike.

    The first call of each (which also compiles, allocates, fills caches) gives its output and peak memory.
    """
    for v in variants:
        memory.reset()
        v.output = v.run()
        v.peak_mib = v.weights_mib + memory.growth_mib()
    for _ in range(warmup):
        for v in variants:
            v.run()
    for _ in range(repeat):
        for v in variants:
            clock.sync()
            start = time.perf_counter()
            v.run()
            clock.sync()
            v.times.append(time.perf_counter() - start)


def bench_steps(s: Settings, size: BenchSize, model: Flux, twin, extra: dict[str, Flux], txt, y, clock, memory):
    img, img_ids, txt_d, txt_ids, t, y_d, g, n_ref = step_inputs(model, size, txt, y, s.seed)
    n_txt, n_img, n_target = txt_d.shape[1], img.shape[1], img.shape[1] - n_ref
    full = flux_forward_flops(model.params, n_txt, n_img)
    cached = flux_forward_flops(model.params, n_txt, n_target, cached_tokens=n_ref)
    forward = lambda m: lambda: m(img, img_ids, txt_d, txt_ids, t, y_d, g)
    weights = weights_mib(model)
    variants = [Variant("ours", "exact", forward(model), full, weights)]
    if twin is not None:
        variants.append(
            Variant(
                "diffusers",
                "exact",
                lambda: twin(
                    hidden_states=img,
                    encoder_hidden_states=txt_d,
                    pooled_projections=y_d,
                    timestep=t,
                    img_ids=img_ids[0],
                    txt_ids=txt_ids[0],
                    guidance=g,
                    return_dict=False,
                )[0],
                full,
                weights_mib(twin),
            )
        )
    if "fast" in s.modes:
        cache = model.new_reference_cache(n_ref)
        with torch.no_grad():
            model(img, img_ids, txt_d, txt_ids, t, y_d, g, ref_cache=cache)
        cache.set_recording(False)
        variants.append(
            Variant(
                "ours",
                "fast: step reusing reference K/V",
                lambda: model(img[:, :n_target], img_ids[:, :n_target], txt_d, txt_ids, t, y_d, g, ref_cache=cache),
                cached,
                weights,
            )
        )
    variants += [Variant("ours", mode, forward(m), full, weights_mib(m)) for mode, m in extra.items()]
    if "graphs" in s.modes and clock.cuda:
        variants.append(Variant("ours", "CUDA graph replay", forward(CudaGraphForward(model)), full, weights))
    with torch.no_grad():
        interleaved(variants, s.warmup, s.repeats, clock, memory)
    exact = variants[0].output.cpu()
    rows = [_step_row(v, s.stat) for v in variants]
    for v, row in zip(variants[1:], rows[1:]):
        # the reused-cache step sees the cache recorded at these very inputs: it must match the exact step,
        # which checks the mechanism (the fast mode's drift across steps is in the edit table)
        ref = exact[:, :n_target] if v.mode.startswith("fast") else exact
        row["error_vs"], row["error"] = "ours exact", compare(v.output.cpu(), ref)
    if twin is not None:
        rows[0]["ratio_vs_diffusers"] = rows[0]["s_per_step"] / rows[1]["s_per_step"]
    tokens = {
        "txt_tokens": n_txt,
        "img_tokens": n_img,
        "reference_tokens": n_ref,
        "flops_per_step": full,
        "flops_per_cached_step": cached,
    }
    return rows, tokens, exact


def pick(times: list[float], stat: str) -> int:
    """Index of the run that `stat` reports: the (lower) median, or the fastest (for a shared, noisy machine)."""
    order = sorted(range(len(times)), key=times.__getitem__)
    return order[0] if stat == "min" else order[(len(order) - 1) // 2]


def _step_row(v: Variant, stat: str) -> dict:
    seconds = v.times[pick(v.times, stat)]
    return {
        "impl": v.impl,
        "mode": v.mode,
        "s_per_step": seconds,
        "times": v.times,
        "flops": v.flops,
        "tflops": v.flops / seconds / 1e12,
        "peak_mib": v.peak_mib,
    }


def edit_flops(tokens: dict, steps: int, cache_every: int) -> int:
    if cache_every <= 0:
        return steps * tokens["flops_per_step"]
    recording = len(range(0, steps, cache_every))
    return recording * tokens["flops_per_step"] + (steps - recording) * tokens["flops_per_cached_step"]


class EditRun:
    """A whole edit through one pipeline, with its VAE's encode/decode timed; keeps the final latent."""

    def __init__(
        self, call: Callable[[int], Image.Image], vae: nn.Module, to_model_space: Callable, steps: int, clock: Clock
    ):
        self.call, self.vae, self.to_model_space, self.steps, self.clock = call, vae, to_model_space, steps, clock
        self.stages: list[tuple[float, float]] = []

    def __call__(self, steps: int | None = None) -> tuple[Tensor, Image.Image]:
        enc, dec = Timed(self.vae.encode, self.clock), Timed(self.vae.decode, self.clock)
        self.vae.encode, self.vae.decode = enc, dec
        try:
            image = self.call(steps or self.steps)
        finally:
            del self.vae.encode, self.vae.decode
        self.stages.append((sum(enc.seconds), sum(dec.seconds)))
        return self.to_model_space(dec.last_input.float()).cpu(), image


def bench_edits(s, size, steps, model, twin, vae_kl, vae, extra, txt, y, text_seconds, tokens, clock, memory):
    """Edit rows (with `_latent` and `_image` kept for comparisons), the picture and the noise used."""
    device = clock_device(model)
    image = bench_picture(size.width, size.height)
    noise = get_noise(1, size.height, size.width, s.seed + 11, device=device)
    ours = lambda transformer, k=0: ours_edit(transformer, vae, txt, y, image, noise, steps, k, clock)
    exact_flops, weights = edit_flops(tokens, steps, 0), weights_mib(model, vae)
    variants = [Variant("ours", "exact", ours(model), exact_flops, weights)]
    if twin is not None:
        variants.append(
            Variant(
                "diffusers",
                "exact",
                diffusers_edit(size, twin, vae_kl, txt, y, image, noise, steps, clock),
                exact_flops,
                weights_mib(twin, vae_kl),
            )
        )
    if "fast" in s.modes:
        variants.append(
            Variant("ours", f"fast K={s.fast_k}", ours(model, s.fast_k), edit_flops(tokens, steps, s.fast_k), weights)
        )
    variants += [Variant("ours", mode, ours(m), exact_flops, weights_mib(m, vae)) for mode, m in extra.items()]
    with torch.no_grad():
        for v in variants:
            v.run(1)  # warm-up at one step: compiles and allocates without a whole edit
        interleaved(variants, 0, s.edit_repeats, clock, memory)
    rows = [_edit_row(v, text_seconds, s.stat) for v in variants]
    for row in rows[1:]:
        row["error_vs"], row["error"] = "ours exact", _edit_errors(row, rows[0])
    if twin is not None:
        rows[0]["ratio_vs_diffusers"] = rows[0]["s_per_edit"] / rows[1]["s_per_edit"]
    return rows, image, noise


def ours_edit(transformer, vae, txt, y, image, noise, steps, cache_every, clock) -> EditRun:
    pipe = KontextPipeline(transformer, vae, FixedText(txt, y))
    call = lambda n: pipe.edit(
        image, "benchmark", steps=n, guidance=2.5, noise=noise, resize="keep", reference_cache_every=cache_every
    )
    return EditRun(call, vae, lambda z: z, steps, clock)


def diffusers_edit(size, twin, vae_kl, txt, y, image, noise, steps, clock) -> EditRun:
    from tests.helpers.diffusers_models import kontext_pipeline

    pipe = kontext_pipeline(twin, vae_kl)
    dtype = next(twin.parameters()).dtype
    args = {
        "image": image,
        "prompt_embeds": txt.to(noise.device, dtype),
        "pooled_prompt_embeds": y.to(noise.device, dtype),
        "width": size.width,
        "height": size.height,
        "guidance_scale": 2.5,
        "latents": pack(noise),
        "_auto_resize": False,
        "max_area": size.width * size.height,
        "output_type": "pil",
    }
    cfg = vae_kl.config
    # diffusers decodes latent / scaling + shift: undo it to compare in the model's space
    to_model_space = lambda raw: (raw - cfg.shift_factor) * cfg.scaling_factor
    return EditRun(lambda n: pipe(**args, num_inference_steps=n).images[0], vae_kl, to_model_space, steps, clock)


def _edit_row(v: Variant, text_s: float, stat: str) -> dict:
    """The reported run's total and its own stage times, so the stages add up to the total."""
    runner: EditRun = v.run
    i = pick(v.times, stat)
    total = v.times[i]
    vae_enc, vae_dec = runner.stages[-len(v.times) :][i]
    denoise = total - vae_enc - vae_dec
    latent, image = v.output
    return {
        "impl": v.impl,
        "mode": v.mode,
        "s_per_edit": total + text_s,
        "times": v.times,
        "text_encode_s": text_s,
        "vae_encode_s": vae_enc,
        "denoise_s": denoise,
        "vae_decode_s": vae_dec,
        "flops_denoise": v.flops,
        "tflops_denoise": v.flops / denoise / 1e12,
        "peak_mib": v.peak_mib,
        "_latent": latent,
        "_image": image,
    }


def _edit_errors(row: dict, ref: dict) -> dict:
    err = compare(row["_latent"], ref["_latent"])
    a = np.asarray(row["_image"], dtype=np.int16)
    b = np.asarray(ref["_image"], dtype=np.int16)
    err["image_max_abs_255"] = int(np.abs(a - b).max())
    return err


def offload_rows(
    s, size, steps, model, vae, txt, y, image, noise, text_s, tokens, exact_step, exact_edit, clock, memory
):
    """The model itself offloaded block by block. Run last and alone: nothing else may hold its device weights."""
    if clock.cuda:
        torch.cuda.empty_cache()
    handle = offload(model, clock_device(model))
    try:
        img, img_ids, txt_d, txt_ids, t, y_d, g, _ = step_inputs(model, size, txt, y, s.seed)
        # resident weights now: everything but the blocks (placeholders); the blocks show up in the growth
        step = Variant(
            "ours",
            "block offload",
            lambda: model(img, img_ids, txt_d, txt_ids, t, y_d, g),
            tokens["flops_per_step"],
            weights_mib(model),
        )
        edit = Variant(
            "ours",
            "block offload",
            ours_edit(model, vae, txt, y, image, noise, steps, 0, clock),
            edit_flops(tokens, steps, 0),
            weights_mib(model, vae),
        )
        with torch.no_grad():
            interleaved([step], s.warmup, s.repeats, clock, memory)
            edit.run(1)
            interleaved([edit], 0, s.edit_repeats, clock, memory)
    finally:
        handle.remove()
    step_row, edit_row = _step_row(step, s.stat), _edit_row(edit, text_s, s.stat)
    step_row["error_vs"], step_row["error"] = "ours exact", compare(step.output.cpu(), exact_step)
    edit_row["error_vs"], edit_row["error"] = "ours exact", _edit_errors(edit_row, exact_edit)
    return step_row, edit_row


def fast_mode_sweep(s: Settings, size: BenchSize, steps: int, model: Flux, clock: Clock) -> list[dict]:
    """Error (final latent) and denoise speed-up of the reference cache for each K, over prompt × seed combos."""
    device, p = clock_device(model), model.params
    lat_h, lat_w = size.height // 8, size.width // 8
    results = {
        k: {"max_abs": [], "psnr_db": [], "rel_l2": [], "seconds": [], "speedups": [], "span": []} for k in s.sweep_k
    }
    exact_seconds = []
    for prompt in range(s.sweep_prompts):
        gen = torch.Generator().manual_seed(1000 + prompt)
        txt = torch.randn(1, size.txt_tokens, p.context_in_dim, generator=gen)
        y = torch.randn(1, p.vec_in_dim, generator=gen)
        for seed in range(s.sweep_seeds):
            noise = get_noise(1, size.height, size.width, seed, device=device)
            reference = torch.randn(1, 16, lat_h, lat_w, generator=torch.Generator().manual_seed(2000 + seed))
            run = partial(sample, model, noise, txt, y, references=[reference.to(device)], steps=steps, guidance=2.5)
            exact_s, _, exact = clock.time(partial(run, reference_cache_every=0), 0, 1)
            exact_seconds.append(exact_s)
            for k in s.sweep_k:
                seconds, _, fast = clock.time(partial(run, reference_cache_every=k), 0, 1)
                err = compare(fast, exact)
                for key in ("max_abs", "psnr_db", "rel_l2"):
                    results[k][key].append(err[key])
                results[k]["seconds"].append(seconds)
                results[k]["span"].append((exact.max() - exact.min()).item())
                # timed right after its exact run, so a burst of outside load rarely splits the pair
                results[k]["speedups"].append(exact_s / seconds)
    return [
        {
            "k": k,
            "combos": len(r["max_abs"]),
            "max_abs_mean": statistics.mean(r["max_abs"]),
            "max_abs_max": max(r["max_abs"]),
            "psnr_db_mean": statistics.mean(r["psnr_db"]),
            "psnr_db_min": min(r["psnr_db"]),
            "rel_l2_mean": statistics.mean(r["rel_l2"]),
            "latent_span_mean": statistics.mean(r["span"]),
            "denoise_s": r["seconds"][pick(r["seconds"], s.stat)],
            "exact_denoise_s": exact_seconds[pick(exact_seconds, s.stat)],
            "speedup": statistics.median(r["speedups"]),
        }
        for k, r in results.items()
    ]


def run(s: Settings) -> dict:
    """Everything the settings ask for; a JSON-ready dict (see `render_markdown`)."""
    if s.size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {s.size!r}")
    unknown = set(s.modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but CUDA is not available")
    dtype = DTYPES[s.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    size = SIZES[s.size]
    steps = s.steps or size.steps
    clock, memory = Clock(device), PeakMemory(device)
    notes = [size.note]

    # text first, then free it: the transformer's peak memory should not include T5
    text_seconds, txt, y = text_encoders(size, device, dtype, s.seed, clock, s)
    txt, y = txt.cpu(), y.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model = on_meta_then_fill(lambda: Flux(size.flux), device, dtype, s.seed + 2)
    twin = None
    if s.diffusers:
        twin = diffusers_transformer(model)
    vae_kl, vae = vae_pair(size, device, dtype, s.seed + 3)

    extra: dict[str, Flux] = {}
    if "fp8" in s.modes:
        fp8 = fp8_copy(model)
        if fp8 is None:
            notes.append("fp8: kontext_core.runtime.quant not available, skipped")
        else:
            scaled = any(getattr(m, "fp8_matmul", False) for m in fp8.modules())
            extra["fp8 (_scaled_mm)" if scaled else "fp8 storage, upcast per layer"] = fp8
            del fp8  # `extra` alone holds it, so it is freed before the offload run
    if "compile" in s.modes:
        extra["torch.compile (per block, dynamic)"] = optimize(shared_copy(model))
    if "graphs" in s.modes and device.type != "cuda":
        notes.append("graphs: CUDA graphs need a CUDA device, skipped")

    step_rows, tokens, exact_step = bench_steps(s, size, model, twin, extra, txt, y, clock, memory)
    edit_rows, image, noise = bench_edits(
        s, size, steps, model, twin, vae_kl, vae, extra, txt, y, text_seconds, tokens, clock, memory
    )
    if "offload" in s.modes:
        del twin, extra  # they hold device weights (views of the model's, the fp8 copy) that offloading frees
        gc.collect()
        step, edit = offload_rows(
            s,
            size,
            steps,
            model,
            vae,
            txt,
            y,
            image,
            noise,
            text_seconds,
            tokens,
            exact_step,
            edit_rows[0],
            clock,
            memory,
        )
        step_rows.append(step)
        edit_rows.append(edit)
    for row in edit_rows:
        del row["_latent"], row["_image"]
    sweep = fast_mode_sweep(s, size, steps, model, clock) if s.sweep_k else []

    import diffusers
    import transformers

    return {
        "settings": {**s.__dict__, "modes": list(s.modes), "sweep_k": list(s.sweep_k)},
        "config": {
            "size": s.size,
            "device": str(device),
            "device_name": device_name(device),
            "dtype": str(dtype),
            "threads": torch.get_num_threads(),
            "steps": steps,
            "width": size.width,
            "height": size.height,
            "flux": size.flux.__dict__,
            "t5": size.t5,
            "clip": dict(size.clip),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "memory": memory.kind,
            **tokens,
        },
        "step": step_rows,
        "edit": edit_rows,
        "fast_mode_sweep": sweep,
        "notes": notes,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


# ---------------------------------------------------------------- output


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if x == float("inf"):
        return "∞"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def _err(row: dict) -> str:
    e = row.get("error")
    if not e:
        return "–"
    text = f"max abs {e['max_abs']:.2e}, rel {e['rel_l2']:.1e}, PSNR {_fmt(e['psnr_db'])} dB"
    if "image_max_abs_255" in e:
        text += f", image ≤{e['image_max_abs_255']}/255"
    return f"{text} (vs {row['error_vs']})"


def render_markdown(result: dict) -> str:
    c = result["config"]
    stat = result["settings"]["stat"]
    lines = [
        (
            f"## Kontext benchmark: size {c['size']} on {c['device']} ({c['device_name']}, {c['threads']} threads), "
            f"{c['dtype'].replace('torch.', '')}"
        ),
        "",
        (
            f"{c['width']}×{c['height']} output + same-size reference: {c['img_tokens']} image tokens "
            f"({c['reference_tokens']} reference) + {c['txt_tokens']} text tokens, {c['steps']} steps, guidance 2.5; "
            f"hidden {c['flux']['hidden_size']}, {c['flux']['depth']}+{c['flux']['depth_single_blocks']} blocks; "
            f"{c['flops_per_step'] / 1e12:.4g} TFLOP per step. torch {c['torch']}, diffusers {c['diffusers']}, "
            f"transformers {c['transformers']}. Memory: {c['memory']}."
        ),
        "",
        "### Transformer step",
        "",
        f"| impl | mode | s/step ({stat}) | TFLOP/s | peak MiB | ours/diffusers | error |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in result["step"]:
        lines.append(
            f"| {r['impl']} | {r['mode']} | {_fmt(r['s_per_step'], 4)} | {_fmt(r['tflops'])} | {r['peak_mib']:.0f} | "
            f"{_fmt(r.get('ratio_vs_diffusers'))} | {_err(r)} |"
        )
    lines += [
        "",
        "### Whole edit (s; text encode shared, see notes)",
        "",
        (
            f"| impl | mode | s/edit ({stat} run) | text enc | VAE enc | denoise | VAE dec | denoise TFLOP/s "
            "| peak MiB | ours/diffusers | error |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["edit"]:
        lines.append(
            f"| {r['impl']} | {r['mode']} | {_fmt(r['s_per_edit'], 4)} | {_fmt(r['text_encode_s'])} | "
            f"{_fmt(r['vae_encode_s'])} | {_fmt(r['denoise_s'], 4)} | {_fmt(r['vae_decode_s'])} | "
            f"{_fmt(r['tflops_denoise'])} | {r['peak_mib']:.0f} | {_fmt(r.get('ratio_vs_diffusers'))} | {_err(r)} |"
        )
    if result["fast_mode_sweep"]:
        lines += [
            "",
            "### Fast mode (reference K/V reused for K−1 of every K steps) vs exact, final latents",
            "",
            (
                "| K | combos | max abs (mean / worst) | exact latent range | PSNR dB (mean / worst) | rel L2 (mean) "
                f"| denoise s ({stat}) | exact s ({stat}) | speed-up (median of pairs) |"
            ),
            "|---:|---:|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in result["fast_mode_sweep"]:
            lines.append(
                f"| {r['k']} | {r['combos']} | {r['max_abs_mean']:.3g} / {r['max_abs_max']:.3g} | "
                f"{r['latent_span_mean']:.3g} | "
                f"{r['psnr_db_mean']:.1f} / {r['psnr_db_min']:.1f} | {r['rel_l2_mean']:.2e} | "
                f"{_fmt(r['denoise_s'])} | {_fmt(r['exact_denoise_s'])} | {r['speedup']:.2f}× |"
            )
    lines += (
        ["", "Notes:"]
        + [f"- {n}" for n in result["notes"]]
        + [
            (
                "- s/edit = text encode (timed once, same T5/CLIP for both) + the pipeline call; denoise = the "
                "pipeline call minus VAE encode and decode (so it includes the pipeline's own overhead)."
            ),
            "- ours/diffusers < 1 means ours is faster. diffusers runs on views of our weight tensors.",
        ]
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the size's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed transformer steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--edit-repeats", type=int, default=1, help="timed whole edits (median reported)")
    ap.add_argument("--modes", default="exact,fast,fp8,offload", help=f"comma list from {','.join(MODES)}")
    ap.add_argument("--fast-k", type=int, default=2, help="K of the fast mode in the edit table")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers side")
    ap.add_argument("--fast-sweep", default="", help="e.g. 2,3,4: fast-mode error/speed over prompt×seed combos")
    ap.add_argument("--sweep-prompts", type=int, default=4)
    ap.add_argument("--sweep-seeds", type=int, default=2)
    ap.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="which run to report; 'min' on a machine shared with other work",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None, help="also write all numbers here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = tuple(m for m in a.modes.split(",") if m)
    if "exact" not in modes:
        modes = ("exact", *modes)
    given = {f.name: getattr(a, f.name) for f in fields(Settings) if hasattr(a, f.name)}
    sweep_k = tuple(int(k) for k in a.fast_sweep.split(",") if k)
    s = Settings(**given | {"modes": modes, "diffusers": not a.no_diffusers, "sweep_k": sweep_k})
    return s, a.json


def main(argv: list[str] | None = None) -> dict:
    settings, json_path = parse_args(argv)
    result = run(settings)
    print(render_markdown(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()

"""Full-size smoke test on a CPU: the 12B FLUX.1 Kontext architecture from a real-layout scaled-fp8 file.

    python -m benchmarks.full_size_smoke --out /tmp/smoke [--keep-file] [--width 128 --height 128 ...]

1. Builds the 12B transformer (19 double + 38 single blocks, hidden 3072) on `meta` and streams random
   weights, tensor by tensor, into one safetensors file laid out like ComfyUI's
   `flux1-dev-kontext_fp8_scaled.safetensors` (`model.diffusion_model.` keys, block Linear weights in
   float8_e4m3fn with a float32 `.scale_weight` scalar each, a `scaled_fp8` marker, the rest bf16), then
   checks the written header against the BFL key/shape manifest.
2. Loads it with `kontext_core.load_transformer(path)` as a user's file (dtype=None: fp8 kept), timing the
   load and the peak RSS.
3. Runs one Euler step of an edit (target + one reference, 512 random T5 tokens of width 4096, CLIP 768)
   through `kontext_core.sampling.sample`, hooking the first double/single block and the final layer.
4. Decodes a latent with the full-size VAE (random weights, written as an `ae.safetensors` and loaded with
   `kontext_core.load_vae`).
5. Compares the embedders, the first double block, the first single block and the final layer with
   diffusers' modules holding the same (dequantized fp32) weights on the hooked inputs, mapping names with
   the engine's own `kontext_core.checkpoints.diffusers_to_bfl`.

Everything measured goes to `--out/results.json` as it is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import struct
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/full_size_smoke.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import kontext_core
from kontext_core import AutoEncoder, AutoEncoderParams, Flux, FluxParams
from kontext_core.model.config import FLUX_KONTEXT_DEV
from kontext_core.checkpoints import diffusers_to_bfl, open_tensors, read_header
from kontext_core.sampling import sample

PREFIX = "model.diffusion_model."
FP8 = torch.float8_e4m3fn
ST_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32"}
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
REPO = Path(__file__).resolve().parents[1]
MANIFESTS = [REPO / "shared" / "reference", REPO.parent / "shared" / "reference", REPO / "tests" / "data"]
GiB = 2**30


# ---------------------------------------------------------------- memory and results


def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[name + "_mib"] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    # ru_maxrss is the kernel's hiwater mark, which clear_refs resets too: the run's own peak is tracked here
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out["process_peak_mib"] = max(_PEAK[0], out.get("VmHWM_mib", 0.0), out["ru_maxrss_mib"])
    return out


_PEAK = [0.0]  # the highest VmHWM seen before any reset


def reset_peak() -> bool:
    """VmHWM := VmRSS (Linux >= 4.0), so the next stage's peak is its own (the process peak is kept)."""
    _PEAK[0] = proc_status()["process_peak_mib"]
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def put(self, section: str, value) -> None:
        self.data[section] = value
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def compare(test: torch.Tensor, ref: torch.Tensor) -> dict:
    test, ref = test.detach().double(), ref.detach().double()
    diff = test - ref
    return {
        "max_abs": diff.abs().max().item(),
        "rel_l2": (diff.norm() / ref.norm()).item(),
        "ref_max_abs": ref.abs().max().item(),
        "ref_rms": ref.pow(2).mean().sqrt().item(),
    }


def finite_stats(t: torch.Tensor) -> dict:
    t = t.detach().float()
    return {"finite": bool(torch.isfinite(t).all()), "shape": list(t.shape), "min": t.min().item(),
            "max": t.max().item(), "std": t.std().item()}  # fmt: skip


# ---------------------------------------------------------------- the file


def read_manifest(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = path.read_text().splitlines()[1:]
    out = {}
    for row in rows:
        key, shape, *dtype = row.split("\t")
        out[key] = (tuple(int(x) for x in shape.strip("[]").split(",") if x.strip()), dtype[0] if dtype else "")
    return out


def find_manifest(name: str, given: Path | None) -> Path | None:
    if given is not None:
        return given
    return next((d / name for d in MANIFESTS if (d / name).is_file()), None)


def is_block_linear_weight(key: str, shape: tuple[int, ...]) -> bool:
    return key.startswith(BLOCK_PREFIXES) and key.endswith(".weight") and len(shape) == 2


def tensor_plan(params: FluxParams, scale_input: bool) -> list[tuple[str, str, tuple[int, ...], str | None]]:
    """(file key, BFL key or role, shape, safetensors dtype) in file order; built on meta, nothing allocated."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(params).state_dict().items()}
    plan = [(PREFIX + "scaled_fp8", "marker", (0,), "F8_E4M3")]
    for key, shape in shapes.items():
        if is_block_linear_weight(key, shape):
            layer = key.removesuffix(".weight")
            plan.append((PREFIX + key, key, shape, "F8_E4M3"))
            plan.append((PREFIX + layer + ".scale_weight", "scale:" + key, (), "F32"))
            if scale_input:
                plan.append((PREFIX + layer + ".scale_input", "one", (), "F32"))
        else:
            plan.append((PREFIX + key, key, shape, "BF16"))
    return plan


def random_weight(key: str, shape: tuple[int, ...], gen: torch.Generator, std: float) -> torch.Tensor:
    """Random float32 values for one BFL tensor: N(0, std) weights, small biases, RMSNorm scales near 1."""
    if key.endswith(".scale"):  # RMSNorm: near 1, not exactly, so a query/key mix-up would show
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if key.endswith(".bias"):
        return 0.01 * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


def write_scaled_fp8_file(path: Path, params: FluxParams, seed: int, std: float, scale_input: bool) -> dict:
    """Stream the file: header first (all sizes are known from the shapes), then one tensor at a time."""
    plan = tensor_plan(params, scale_input)
    itemsize = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    header, offset = {}, 0
    for file_key, _, shape, dtype in plan:
        n = math.prod(shape) * itemsize[dtype]
        header[file_key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data start aligned to 8 bytes, as safetensors writes it
    start = time.perf_counter()
    pending_scale: dict[str, torch.Tensor] = {}
    tmp = path.with_suffix(".partial")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (file_key, role, shape, dtype) in enumerate(plan):
            if role == "marker":
                t = torch.empty(0, dtype=FP8)
            elif role == "one":
                t = torch.ones((), dtype=torch.float32)
            elif role.startswith("scale:"):
                t = pending_scale.pop(role.removeprefix("scale:"))
            else:
                gen = torch.Generator().manual_seed(seed * 100_003 + i)
                w = random_weight(role, shape, gen, std)
                if dtype == "F8_E4M3":
                    scale = (w.abs().amax() / torch.finfo(FP8).max).clamp(min=torch.finfo(torch.float32).tiny)
                    t = (w / scale).to(FP8)
                    pending_scale[role] = scale.reshape(()).float()
                else:
                    t = w.to(torch.bfloat16)
                del w
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            assert data.nbytes == header[file_key]["data_offsets"][1] - header[file_key]["data_offsets"][0], file_key
            f.write(memoryview(data))
            del t, data
    tmp.replace(path)
    return {"seconds": time.perf_counter() - start, "tensors": len(plan), "bytes": path.stat().st_size,
            "fp8_weights": sum(1 for _, _, _, d in plan if d == "F8_E4M3") - 1}  # fmt: skip


def check_against_manifest(path: Path, manifest: dict | None, scale_input: bool) -> dict:
    """Every manifest key, with its shape, under the ComfyUI prefix; fp8 + scale for block Linears; nothing else."""
    header, _ = read_header(path)
    problems = []
    if manifest is None:
        return {"checked": False, "note": "manifest flux_kontext_dev_keys.tsv not found"}
    expected = set()
    for key, (shape, _) in manifest.items():
        fk = PREFIX + key
        expected.add(fk)
        entry = header.get(fk)
        if entry is None:
            problems.append(f"missing {fk}")
            continue
        if tuple(entry["shape"]) != shape:
            problems.append(f"{fk} shape {entry['shape']} != manifest {list(shape)}")
        want = "F8_E4M3" if is_block_linear_weight(key, shape) else "BF16"
        if entry["dtype"] != want:
            problems.append(f"{fk} dtype {entry['dtype']} != {want}")
        if want == "F8_E4M3":
            layer = fk.removesuffix(".weight")
            for extra in (".scale_weight",) + ((".scale_input",) if scale_input else ()):
                expected.add(layer + extra)
                e = header.get(layer + extra)
                if e is None or e["dtype"] != "F32" or math.prod(e["shape"]) != 1:
                    problems.append(f"{layer + extra}: missing or not an F32 scalar ({e})")
    expected.add(PREFIX + "scaled_fp8")
    marker = header.get(PREFIX + "scaled_fp8")
    if marker is None or marker["dtype"] != "F8_E4M3":
        problems.append(f"scaled_fp8 marker missing or not F8_E4M3 ({marker})")
    unexpected = sorted(set(header) - expected)
    if unexpected:
        problems.append(f"unexpected keys: {unexpected[:5]}")
    return {"checked": True, "manifest_keys": len(manifest), "file_keys": len(header), "problems": problems,
            "ok": not problems}  # fmt: skip


# ---------------------------------------------------------------- the step, with hooks


class Capture:
    """Inputs and outputs of one module's first call, detached copies on the CPU."""

    def __init__(self, module: torch.nn.Module):
        self.args = self.kwargs = self.output = None
        self.handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
        ]

    @staticmethod
    def _copy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, (tuple, list)):
            return type(x)(Capture._copy(v) for v in x)
        if isinstance(x, dict):
            return {k: Capture._copy(v) for k, v in x.items()}
        return x

    def _pre(self, module, args, kwargs):
        if self.args is None:
            self.args, self.kwargs = self._copy(args), self._copy(kwargs)

    def _post(self, module, args, output):
        if self.output is None:
            self.output = self._copy(output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def edit_inputs(a: argparse.Namespace, params: FluxParams) -> dict:
    gen = torch.Generator().manual_seed(a.seed + 1)
    return {
        "noise": torch.randn(1, 16, a.height // 8, a.width // 8, generator=gen),
        "reference": torch.randn(1, 16, a.ref_height // 8, a.ref_width // 8, generator=gen),
        "txt": torch.randn(1, a.txt_tokens, params.context_in_dim, generator=gen),
        "y": torch.randn(1, params.vec_in_dim, generator=gen),
    }


# ---------------------------------------------------------------- diffusers twins, same weights


def dequantized(source, bfl_keys: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """BFL key -> tensor from the file in `dtype`: fp8 weights as `w.to(dtype) * scale_weight.to(dtype)` (what
    kontext_core's Fp8Linear computes per call in its compute dtype), the others cast."""
    out = {}
    for key in bfl_keys:
        t = source.tensor(PREFIX + key)
        if t.dtype == FP8:
            scale = source.tensor(PREFIX + key.removesuffix(".weight") + ".scale_weight")
            out[key] = t.to(dtype) * scale.to(dtype)
        else:
            out[key] = t.to(dtype)
    return out


def to_diffusers(bfl: dict[str, torch.Tensor], diffusers_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """diffusers tensors (full diffusers names) from BFL ones, by running the engine's own diffusers_to_bfl on
    row labels: each diffusers tensor's rows are labelled, mapped, and gathered back from the BFL tensor they
    land in (fused q/k/v, swapped halves and renames all come from the engine's recipes, not a new table)."""
    names = sorted(diffusers_shapes)
    base = 1 << 20
    probes = {k: torch.arange(diffusers_shapes[k][0], dtype=torch.float64) + i * base for i, k in enumerate(names)}
    labels = diffusers_to_bfl(probes)
    missing = sorted(set(labels) - set(bfl)) + sorted(set(bfl) - set(labels))
    if missing:
        raise KeyError(f"BFL keys the mapping and the file disagree on: {missing[:6]}")
    out = {}
    for bfl_key, lab in labels.items():
        owner, row = (lab // base).long(), (lab % base).long()
        for i in owner.unique().tolist():
            pos = (owner == i).nonzero().flatten()
            pos = pos[row[pos].argsort()]
            name = names[i]
            if len(pos) != diffusers_shapes[name][0]:
                raise ValueError(f"{name}: {len(pos)} rows mapped, {diffusers_shapes[name][0]} expected")
            out[name] = bfl[bfl_key].index_select(0, pos).reshape(diffusers_shapes[name]).contiguous()
    unmapped = sorted(set(names) - set(out))
    if unmapped:
        raise KeyError(f"diffusers tensors no BFL tensor maps to: {unmapped[:6]}")
    return out


def materialize(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"still on meta: {left[:5]}")
    return module.eval().requires_grad_(False)


def part_shapes(module: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def diffusers_part(twin_part: torch.nn.Module, prefix: str, bfl: dict[str, torch.Tensor]) -> torch.nn.Module:
    mapped = to_diffusers(bfl, part_shapes(twin_part, prefix))
    return materialize(twin_part, {k.removeprefix(prefix): v for k, v in mapped.items()})


def map_into(twin_part: torch.nn.Module, prefix: str, bfl: dict[str, torch.Tensor], sources: tuple[str, ...]):
    """Fill one diffusers submodule (full name `prefix`) from the BFL tensors whose names start with `sources`."""
    return diffusers_part(twin_part, prefix, {k: v for k, v in bfl.items() if k.startswith(sources)})


# diffusers top-level module -> the BFL tensors it is made of
EMBEDDER_SOURCES = {
    "x_embedder": ("img_in.",),
    "context_embedder": ("txt_in.",),
    "time_text_embed": ("time_in.", "vector_in.", "guidance_in."),
}


class _Stop(Exception):
    pass


def ours_part(skeleton_part: torch.nn.Module, prefix: str, bfl: dict[str, torch.Tensor]) -> torch.nn.Module:
    return materialize(skeleton_part, {k.removeprefix(prefix): v for k, v in bfl.items() if k.startswith(prefix)})


def parity(a: argparse.Namespace, path: Path, params: FluxParams, cap: dict[str, Capture], results: Results) -> dict:
    """Part by part (embedders, first double block, first single block, final layer), with the file's weights:
    our module in fp32, diffusers' in fp32 and in bf16, on the inputs hooked from the 1-step run; compared with
    what our loaded model computed there (fp8 weights upcast per layer, bf16 activations). One part at a time."""
    import diffusers
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    p = params
    small = FluxParams(**{**p.__dict__, "depth": 1, "depth_single_blocks": 1})

    def new_twin():
        with torch.device("meta"):
            return diffusers.FluxTransformer2DModel(
                in_channels=p.in_channels, num_layers=1, num_single_layers=1,
                attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
                joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
                guidance_embeds=p.guidance_embed, axes_dims_rope=tuple(p.axes_dim),
            )  # fmt: skip

    def new_skeleton():
        with torch.device("meta"):
            return Flux(small)

    source = open_tensors(path)
    keys = [k.removeprefix(PREFIX) for k in source.keys() if k.startswith(PREFIX)]
    weights = [k for k in keys if k != "scaled_fp8" and not k.endswith((".scale_weight", ".scale_input"))]
    top = [k for k in weights if not k.startswith(BLOCK_PREFIXES)]

    img_in, img_ids, txt_in, txt_ids, t_vec, y_in, g_vec = cap["model"].args[:7]
    n_txt = txt_in.shape[1]
    rope = new_twin().pos_embed(torch.cat((txt_ids[0], img_ids[0]), dim=0))  # diffusers' own cos/sin, same ids
    db, sb, fl = cap["double0"], cap["single0"], cap["final"]
    d_img, d_txt, d_vec, d_pe = (db.kwargs[k] for k in ("img", "txt", "vec", "pe"))
    s_x, s_vec, s_pe = sb.args[0], sb.kwargs["vec"], sb.kwargs["pe"]
    f_img, f_vec = fl.args

    def embed_theirs(twin, bfl, dt):
        for name, sources in EMBEDDER_SOURCES.items():
            map_into(getattr(twin, name), name + ".", bfl, sources)
        return {"img": twin.x_embedder(img_in.to(dt)), "txt": twin.context_embedder(txt_in.to(dt)),
                "vec": twin.time_text_embed(t_vec.to(dt) * 1000, g_vec.to(dt) * 1000, y_in.to(dt))}  # fmt: skip

    def embed_ours(skel, bfl):
        for name in ("img_in", "txt_in", "time_in", "vector_in", "guidance_in"):
            ours_part(getattr(skel, name), name + ".", bfl)
        got = {}

        def grab(module, args, kwargs):  # our own forward, stopped at its first block (still on meta)
            got.update(kwargs)
            raise _Stop

        hook = skel.double_blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            skel(img_in.float(), img_ids, txt_in.float(), txt_ids, t_vec.float(), y_in.float(), g_vec.float())
        except _Stop:
            pass
        finally:
            hook.remove()
        return {k: got[k] for k in ("img", "txt", "vec")}

    def double_theirs(twin, bfl, dt):
        blk = diffusers_part(twin.transformer_blocks[0], "transformer_blocks.0.", bfl)
        assert isinstance(blk, FluxTransformerBlock)
        t_txt, t_img = blk(hidden_states=d_img.to(dt), encoder_hidden_states=d_txt.to(dt), temb=d_vec.to(dt),
                           image_rotary_emb=rope)  # fmt: skip
        return {"img": t_img, "txt": t_txt}

    def double_ours(skel, bfl):
        o_img, o_txt = ours_part(skel.double_blocks[0], "double_blocks.0.", bfl)(
            img=d_img.float(), txt=d_txt.float(), vec=d_vec.float(), pe=d_pe
        )
        return {"img": o_img, "txt": o_txt}

    def single_theirs(twin, bfl, dt):
        blk = diffusers_part(twin.single_transformer_blocks[0], "single_transformer_blocks.0.", bfl)
        assert isinstance(blk, FluxSingleTransformerBlock)
        t_txt, t_img = blk(hidden_states=s_x[:, n_txt:].to(dt), encoder_hidden_states=s_x[:, :n_txt].to(dt),
                           temb=s_vec.to(dt), image_rotary_emb=rope)  # fmt: skip
        return {"x": torch.cat((t_txt, t_img), dim=1)}

    def single_ours(skel, bfl):
        return {"x": ours_part(skel.single_blocks[0], "single_blocks.0.", bfl)(s_x.float(), vec=s_vec.float(), pe=s_pe)}

    def final_theirs(twin, bfl, dt):
        map_into(twin.norm_out, "norm_out.", bfl, ("final_layer.adaLN_modulation.",))
        map_into(twin.proj_out, "proj_out.", bfl, ("final_layer.linear.",))
        return {"out": twin.proj_out(twin.norm_out(f_img.to(dt), f_vec.to(dt)))}

    def final_ours(skel, bfl):
        return {"out": ours_part(skel.final_layer, "final_layer.", bfl)(f_img.float(), f_vec.float())}

    parts = {
        "embedders": ([k for k in top if not k.startswith("final_layer.")], embed_theirs, embed_ours,
                      {k: db.kwargs[k] for k in ("img", "txt", "vec")}),
        "double_block_0": ([k for k in weights if k.startswith("double_blocks.0.")], double_theirs, double_ours,
                           {"img": db.output[0], "txt": db.output[1]}),
        "single_block_0": ([k for k in weights if k.startswith("single_blocks.0.")], single_theirs, single_ours,
                           {"x": sb.output}),
        "final_layer": ([k for k in top if k.startswith("final_layer.")], final_theirs, final_ours, {"out": fl.output}),
    }  # fmt: skip
    out: dict = {
        "diffusers": diffusers.__version__,
        "as_run": f"the loaded model's own outputs at these inputs: fp8 weights upcast per layer, {d_img.dtype} compute",
        "rope": "ours: the model's own pe (float64 angles → fp32); diffusers: its FluxPosEmbed on the same ids",
        "weights": "fp32: fp8.float() * scale_weight (fp32); bf16: fp8.to(bf16) * scale_weight.to(bf16), as Fp8Linear",
    }  # fmt: skip
    for part, (part_keys, theirs_fn, ours_fn, as_run) in parts.items():
        start = time.perf_counter()
        reset_peak()
        with torch.no_grad():
            bfl = dequantized(source, part_keys, torch.float32)
            theirs32 = theirs_fn(new_twin(), bfl, torch.float32)
            gc.collect()  # diffusers' copy is gone (its twin was a temporary) before ours is built
            ours32 = ours_fn(new_skeleton(), bfl)
            del bfl
            gc.collect()
            bfl = dequantized(source, part_keys, torch.bfloat16)
            theirs16 = theirs_fn(new_twin(), bfl, torch.bfloat16)
            del bfl
            gc.collect()
        res = {
            name: {
                "ours_fp32_vs_diffusers_fp32": compare(ours32[name], theirs32[name]),
                "ours_as_run_vs_diffusers_bf16": compare(as_run[name], theirs16[name]),
                "ours_as_run_vs_diffusers_fp32": compare(as_run[name], theirs32[name]),
                "diffusers_bf16_vs_diffusers_fp32": compare(theirs16[name], theirs32[name]),
                "ours_as_run_vs_ours_fp32": compare(as_run[name], ours32[name]),
            }
            for name in as_run
        }
        res["seconds"] = time.perf_counter() - start
        res["peak"] = proc_status()
        out[part] = res
        del theirs32, ours32, theirs16
        gc.collect()
        results.put("parity", out)
        print(f"parity {part}: {res['seconds']:.1f} s", flush=True)
    source.close()
    return out


# ---------------------------------------------------------------- the VAE


def vae_stage(a: argparse.Namespace, out_dir: Path, results: Results) -> dict:
    from safetensors.torch import save_file

    params = AutoEncoderParams()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoEncoder(params).state_dict().items()}
    gen = torch.Generator().manual_seed(a.seed + 5)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) >= 2:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):  # GroupNorm
            state[key] = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.01 * torch.randn(shape, generator=gen)
    path = out_dir / "ae-random.safetensors"
    save_file(state, str(path))
    del state
    manifest_path = find_manifest("flux_ae_keys.tsv", None)
    manifest_ok = None
    if manifest_path is not None:
        m = read_manifest(manifest_path)
        manifest_ok = {k: s for k, (s, _) in m.items()} == shapes
    reset_peak()
    start = time.perf_counter()
    vae = kontext_core.load_vae(path)
    load_s = time.perf_counter() - start
    z = torch.randn(
        1, params.z_channels, a.vae_latent, a.vae_latent, generator=torch.Generator().manual_seed(a.seed + 6)
    )
    with torch.no_grad():
        vae.decode(z[:, :, :8, :8])  # warm-up (allocator, oneDNN primitives) on a smaller latent
        start = time.perf_counter()
        image = vae.decode(z)
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        latent = vae.encode(image.clamp(-1, 1))
        encode_s = time.perf_counter() - start
    res = {
        "params": params.__dict__, "file_bytes": path.stat().st_size, "manifest_shapes_match": manifest_ok,
        "load_s": load_s, "dtype": str(next(vae.parameters()).dtype),
        "latent": list(z.shape), "decode_s": decode_s, "image": finite_stats(image),
        "encode_s_of_decoded": encode_s, "encoded": finite_stats(latent), "peak": proc_status(),
    }  # fmt: skip
    del vae
    path.unlink()
    results.put("vae", res)
    return res


# ---------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.full_size_smoke", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the weights file and results.json")
    ap.add_argument("--keep-file", action="store_true", help="keep the ~12 GB transformer file afterwards")
    ap.add_argument("--reuse-file", action="store_true", help="use --out/flux1-kontext-random_fp8_scaled.safetensors "
                    "if it is already there instead of writing it again")  # fmt: skip
    ap.add_argument("--width", type=int, default=128, help="output width, pixels")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--ref-width", type=int, default=128, help="reference width, pixels")
    ap.add_argument("--ref-height", type=int, default=128)
    ap.add_argument("--txt-tokens", type=int, default=512, help="T5 tokens (width 4096)")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps per timed sample() call")
    ap.add_argument("--step-repeats", type=int, default=2, help="timed sample() calls (the first pages the file in)")
    ap.add_argument("--vae-latent", type=int, default=16, help="VAE latent side (16 → a 128² image)")
    ap.add_argument("--std", type=float, default=0.02, help="std of the random Linear weights")
    ap.add_argument("--scale-input", action="store_true", help="also write a .scale_input (1.0) per fp8 layer")
    ap.add_argument(
        "--depth", type=int, default=19, help="double blocks (19 = FLUX.1; fewer only to debug this script)"
    )
    ap.add_argument("--depth-single", type=int, default=38, help="single blocks (38 = FLUX.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma list of stages to skip: vae,parity")
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    skip = set(filter(None, a.skip.split(",")))
    a.out.mkdir(parents=True, exist_ok=True)
    results = Results(a.out / "results.json")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    import diffusers

    results.put("env", {
        "argv": sys.argv, "args": vars(a), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })  # fmt: skip
    # 12B by default: 19 + 38 blocks, hidden 3072, 24 heads, context 4096, vec 768, guidance embed, axes (16, 56, 56)
    params = dataclasses.replace(FLUX_KONTEXT_DEV, depth=a.depth, depth_single_blocks=a.depth_single)
    path = a.out / "flux1-kontext-random_fp8_scaled.safetensors"

    # 1. the file
    manifest_path = find_manifest("flux_kontext_dev_keys.tsv", None)
    manifest = read_manifest(manifest_path) if manifest_path else None
    if a.reuse_file and path.is_file():
        write = {"reused": True, "bytes": path.stat().st_size}
    else:
        reset_peak()
        need = 12.5 * GiB * (a.depth + a.depth_single / 2) / 38
        free = os.statvfs(a.out).f_bavail * os.statvfs(a.out).f_frsize
        if free < need:
            raise SystemExit(f"{a.out}: {free / GiB:.1f} GiB free, the file needs about {need / GiB:.1f} GiB")
        print(f"writing {path} ...", flush=True)
        write = write_scaled_fp8_file(path, params, a.seed, a.std, a.scale_input)
        write["peak"] = proc_status()
    write["manifest"] = str(manifest_path)
    write["check"] = check_against_manifest(path, manifest, a.scale_input)
    write["gib"] = write["bytes"] / GiB
    results.put("file", write)
    print(f"file: {write['gib']:.2f} GiB, manifest check: {write['check'].get('ok')}", flush=True)

    # 2. load as a user's file
    gc.collect()
    reset_peak()
    before = proc_status()
    start = time.perf_counter()
    model = kontext_core.load_transformer(path)
    load_s = time.perf_counter() - start
    fp8_layers = sum(1 for m in model.modules() if getattr(getattr(m, "weight", None), "dtype", None) == FP8)
    load = {
        "seconds": load_s, "before": before, "after": proc_status(), "compute_dtype": str(model.compute_dtype),
        "params": model.params.__dict__, "fp8_weight_layers": fp8_layers,
        "weight_dtypes": sorted({str(t.dtype) for t in model.state_dict().values()}),
        "weight_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }  # fmt: skip
    results.put("load", load)
    print(f"load: {load_s:.1f} s, compute {model.compute_dtype}, {fp8_layers} fp8 layers", flush=True)

    # 3. one step of an edit
    x = edit_inputs(a, params)
    cap = {"model": Capture(model), "double0": Capture(model.double_blocks[0]),
           "single0": Capture(model.single_blocks[0]), "final": Capture(model.final_layer)}  # fmt: skip
    steps = []
    reset_peak()
    for r in range(a.step_repeats):
        start = time.perf_counter()
        z = sample(model, x["noise"], x["txt"], x["y"], references=[x["reference"]], steps=a.steps, guidance=2.5)
        seconds = time.perf_counter() - start
        steps.append({"seconds": seconds, "s_per_step": seconds / a.steps, "out": finite_stats(z),
                      "status": proc_status()})  # fmt: skip
        if r == 0:
            for c in cap.values():
                c.remove()
        print(f"sample {r}: {seconds:.1f} s for {a.steps} step(s), finite={steps[-1]['out']['finite']}", flush=True)
        results.put("step", {"runs": steps, "peak_since_load_start": proc_status(), "tokens": {
            "txt": a.txt_tokens, "img": (a.height // 16) * (a.width // 16),
            "reference": (a.ref_height // 16) * (a.ref_width // 16)}})  # fmt: skip
    hooked = {n: finite_stats(c.output[0] if isinstance(c.output, tuple) else c.output) for n, c in cap.items()}
    results.data["step"]["hooked_outputs"] = hooked
    results.put("step", results.data["step"])
    del model, z
    gc.collect()
    results.put("after_unload", proc_status())

    # 4. the VAE
    if "vae" not in skip:
        v = vae_stage(a, a.out, results)
        print(f"VAE decode {v['latent']}: {v['decode_s']:.2f} s, finite={v['image']['finite']}", flush=True)

    # 5. parity with diffusers, block by block
    if "parity" not in skip:
        reset_peak()
        parity(a, path, params, cap, results)

    if not a.keep_file:
        path.unlink()
        results.data["file"]["deleted"] = True
    results.put("finished_status", proc_status())
    results.put("finished", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    print(render(results.data))
    return results.data


def render(d: dict) -> str:
    rows = [("file", f"{d['file']['gib']:.2f} GiB, manifest check ok={d['file']['check'].get('ok')}")]
    if "seconds" in d["file"]:
        rows.append(("write", f"{d['file']['seconds']:.1f} s, peak RSS {d['file']['peak']['VmHWM_mib']:.0f} MiB"))
    ld = d["load"]
    rows.append(("load_transformer", f"{ld['seconds']:.2f} s, RSS after {ld['after']['VmRSS_mib']:.0f} MiB, "
                                     f"compute {ld['compute_dtype']}"))  # fmt: skip
    for i, r in enumerate(d["step"]["runs"]):
        rows.append((f"sample run {i}", f"{r['s_per_step']:.1f} s/step, finite={r['out']['finite']}, "
                                        f"VmHWM {r['status']['VmHWM_mib']:.0f} MiB"))  # fmt: skip
    rows.append(("peak RSS load+steps", f"{d['step']['peak_since_load_start']['VmHWM_mib']:.0f} MiB (VmHWM)"))
    if "finished_status" in d:
        rows.append(("peak RSS whole run", f"{d['finished_status']['process_peak_mib']:.0f} MiB"))
    if "vae" in d:
        v = d["vae"]
        rows.append(("VAE decode", f"{v['latent']} in {v['decode_s']:.2f} s, finite={v['image']['finite']}"))
    if "parity" in d:
        p = d["parity"]
        rows.append(("parity (rel L2 / max abs)", "ours fp32 vs diffusers fp32 | ours as run vs diffusers bf16 | "
                                                  "ours as run vs diffusers fp32"))  # fmt: skip
        for part in ("embedders", "double_block_0", "single_block_0", "final_layer"):
            for o, e in p.get(part, {}).items():
                if not isinstance(e, dict) or "ours_fp32_vs_diffusers_fp32" not in e:
                    continue
                cells = [e[c] for c in ("ours_fp32_vs_diffusers_fp32", "ours_as_run_vs_diffusers_bf16",
                                        "ours_as_run_vs_diffusers_fp32")]  # fmt: skip
                rows.append((f"  {part}.{o}", " | ".join(f"{c['rel_l2']:.2e} / {c['max_abs']:.2e}" for c in cells)
                             + f"  (|ref| max {cells[0]['ref_max_abs']:.3g})"))  # fmt: skip
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


if __name__ == "__main__":
    main()

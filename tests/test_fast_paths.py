"""Each fast path against the plain path: compiled blocks, CUDA graphs, attention kernels, offload, fast mode."""

from __future__ import annotations


import pytest
import torch
from tests.helpers.flux_files import kontext_inputs
from tests.helpers.metrics import psnr
from tests.helpers.tiny_models import tiny_flux_model

from kontext_core.model import flux_math as kmath
from kontext_core.runtime.compile import CudaGraphForward, is_compiled, optimize
from kontext_core.runtime.offload import offload
from kontext_core.model.reference_cache import ReferenceKV
from kontext_core.sampling import sample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def sampling_case(params, seed: int = 0):
    """Noise for a non-square 80×48 target, a 64×96 reference and random text, as an edit sends."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, 6, 10, generator=gen)
    reference = torch.randn(1, 16, 8, 12, generator=gen)
    txt = torch.randn(1, 5, params.context_in_dim, generator=gen)
    y = torch.randn(1, params.vec_in_dim, generator=gen)
    return noise, [reference], txt, y


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
@torch.no_grad()
def test_compiled_blocks_match_eager_and_new_shapes_do_not_recompile():
    from torch._dynamo.utils import counters

    model = tiny_flux_model(seed=5)
    keys = list(model.state_dict())
    first = kontext_inputs(model.params, batch=1, seed=1)
    # another token count: 3 more text tokens and 8 fewer image tokens
    second = list(first)
    second[0], second[1] = first[0][:, 8:], first[1][:, 8:]
    second[2] = torch.randn(1, 10, model.params.context_in_dim, generator=torch.Generator().manual_seed(2))
    second[3] = torch.zeros(1, 10, 3)
    eager = [model(*first), model(*second)]

    optimize(model)
    assert is_compiled(model) and list(model.state_dict()) == keys
    out_first = model(*first)
    graphs = counters["stats"]["unique_graphs"]
    out_second = model(*second)
    assert counters["stats"]["unique_graphs"] == graphs, "a new token count recompiled the blocks"
    for out, ref in zip((out_first, out_second), eager):
        err = (out - ref).abs().max().item()
        print(f"compiled vs eager: max abs {err:.2e} (output max {ref.abs().max():.2f})")
        assert err <= 1e-5 * max(1.0, ref.abs().max().item())


def test_optimize_refuses_cuda_graph_modes_and_can_be_a_no_op():
    model = tiny_flux_model()
    with pytest.raises(ValueError, match="reduce-overhead"):
        optimize(model, mode="reduce-overhead")
    assert optimize(model, compile=False) is model and not is_compiled(model)


# ---------------------------------------------------------------- CUDA graphs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_graphs_without_cuda_say_so():
    with pytest.raises(RuntimeError, match="CUDA"):
        CudaGraphForward(tiny_flux_model())


def test_cuda_graph_forward_shows_the_model_params():
    """`sample` reads `model.params` (text widths) before the loop; the graph wrapper must pass them through."""
    model = tiny_flux_model()
    wrapper = CudaGraphForward.__new__(CudaGraphForward)  # no CUDA here: only the attribute is checked
    wrapper.model = model
    assert wrapper.params is model.params and wrapper.compute_dtype == model.compute_dtype


@cuda
@torch.no_grad()
def test_cuda_graph_sampling_matches_eager():
    model = tiny_flux_model(seed=6).cuda()
    noise, refs, txt, y = sampling_case(model.params)
    eager = sample(model, noise.cuda(), txt, y, references=[r.cuda() for r in refs], steps=3)
    graphed = CudaGraphForward(model)
    replayed = sample(graphed, noise.cuda(), txt, y, references=[r.cuda() for r in refs], steps=3)
    assert len(graphed.graphs) == 1  # every step has the same shape: one capture, two replays
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="reference_cache_every"):
        sample(graphed, noise.cuda(), txt, y, references=[r.cuda() for r in refs], steps=2, reference_cache_every=2)


@cuda
@torch.no_grad()
def test_sampling_loop_has_no_host_sync():
    """From the first step's callback on, any device→host synchronization in the loop raises."""
    model = tiny_flux_model(seed=7).cuda()
    noise, refs, txt, y = sampling_case(model.params)

    def strict(_info):
        torch.cuda.set_sync_debug_mode("error")

    try:
        sample(model, noise.cuda(), txt, y, references=[r.cuda() for r in refs], steps=3, callback=strict)
        sample(
            model,
            noise.cuda(),
            txt,
            y,
            references=[r.cuda() for r in refs],
            steps=4,
            callback=strict,
            reference_cache_every=2,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- attention kernels


def attention_case(device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 37, 64, generator=gen) for _ in range(3))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, dim=-1) @ v.double()
    ref = ref.transpose(1, 2).reshape(2, 37, 3 * 64)
    return [t.to(device, dtype) for t in (q, k, v)], ref


def test_sdpa_matches_float64_attention():
    (q, k, v), ref = attention_case("cpu", torch.float32)
    out = kmath.scaled_dot_product(q, k, v, "sdpa")
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_auto_is_sdpa_on_cpu_and_missing_kernels_are_refused():
    assert kmath.resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert kmath.available_backends("cpu") == ["sdpa"]
    with pytest.raises(RuntimeError, match="not available"):
        kmath.resolve_backend("flash", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="attention backend"):
        kmath.check_backend_name("xformers")


def test_the_attention_backend_belongs_to_the_model():
    # two models in one process keep their own kernels; a bad name is refused when it is set, not at a forward
    flash, exact = tiny_flux_model(seed=0), tiny_flux_model(seed=0)
    flash.attention_backend = "flash"
    assert (flash.attention_backend, exact.attention_backend) == ("flash", "auto")
    with pytest.raises(ValueError, match="attention backend"):
        exact.attention_backend = "xformers"
    inputs = kontext_inputs(exact.params)
    assert torch.isfinite(exact(*inputs)).all()
    with pytest.raises(RuntimeError, match="'flash' is not available on cpu"):
        flash(*inputs)


# bf16 operands: 1e-3..1e-2 relative; SageAttention also quantizes q and k to int8 per block
KERNEL_TOLERANCE = {"sdpa": 1e-2, "flash": 1e-2, "sage": 3e-2}


@cuda
@pytest.mark.parametrize("name", ["sdpa", "flash", "sage"])
def test_cuda_kernels_match_float64_attention(name):
    if name not in kmath.available_backends("cuda"):
        pytest.skip(f"{name} is not installed")
    (q, k, v), ref = attention_case("cuda", torch.bfloat16)
    out = kmath.scaled_dot_product(q, k, v, kmath.resolve_backend(name, "cuda", torch.bfloat16)).double().cpu()
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"{name} bf16 vs float64: rel {rel:.2e}")
    assert rel < KERNEL_TOLERANCE[name]


# ---------------------------------------------------------------- block offload


@torch.no_grad()
def test_offload_on_cpu_is_exact_and_holds_at_most_two_blocks():
    model = tiny_flux_model(seed=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    args = kontext_inputs(model.params, batch=2)
    ref = model(*args)
    noise, refs, txt, y = sampling_case(model.params)
    ref_sampled = sample(model, noise, txt, y, references=refs, steps=3, reference_cache_every=2)

    handle = offload(model, "cpu")
    blocks = [*model.double_blocks, *model.single_blocks]
    assert handle.resident_blocks() == 0 and all(p.numel() == 0 for b in blocks for p in b.parameters())
    seen = []
    for block in blocks:
        block.register_forward_pre_hook(
            lambda m, a: seen.append((handle.resident_blocks(), min(p.numel() for p in m.parameters())))
        )
    out = model(*args)
    assert torch.equal(out, ref)
    assert len(seen) == len(blocks)
    assert all(resident <= 2 and smallest > 0 for resident, smallest in seen)  # the running block is loaded
    assert handle.resident_blocks() <= 1  # only the prefetched first block waits for the next step
    assert torch.equal(sample(model, noise, txt, y, references=refs, steps=3, reference_cache_every=2), ref_sampled)

    handle.remove()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(*args), ref)


@cuda
@torch.no_grad()
def test_offload_to_cuda_is_exact_and_keeps_weights_on_the_host():
    model = tiny_flux_model(seed=9)
    args = kontext_inputs(model.params, batch=2)
    resident = tiny_flux_model(seed=9).cuda()
    ref = resident(*(a.cuda() for a in args))
    handle = offload(model, "cuda")
    blocks = [*model.double_blocks, *model.single_blocks]
    out = model(*(a.cuda() for a in args))
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    assert all(p.numel() == 0 for i, b in enumerate(blocks) if i > 0 for p in b.parameters())
    handle.remove()
    assert all(p.is_cuda and p.numel() > 0 for p in model.parameters())


# ---------------------------------------------------------------- reference-cache fast mode


@torch.no_grad()
def test_fast_mode_error_is_reported_and_reused_steps_skip_the_reference():
    model = tiny_flux_model(seed=10)
    noise, refs, txt, y = sampling_case(model.params, seed=4)
    target_tokens = noise.shape[-2] * noise.shape[-1] // 4
    reference_tokens = refs[0].shape[-2] * refs[0].shape[-1] // 4
    calls = []
    model.img_in.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    exact = sample(model, noise, txt, y, references=refs, steps=6)
    quality_by_k = []
    for k in (2, 3, 4):
        calls.clear()
        fast = sample(model, noise, txt, y, references=refs, steps=6, reference_cache_every=k)
        full = target_tokens + reference_tokens
        assert calls == [full if step % k == 0 else target_tokens for step in range(6)]
        err = (fast - exact).abs().max().item()
        quality = psnr(fast, exact)
        print(f"fast mode K={k}: max abs {err:.3e}, PSNR {quality:.1f} dB (output max {exact.abs().max():.2f})")
        assert err > 0  # an approximation: equal to exact would mean the cache was not used
        quality_by_k.append(quality)
    # reusing stale keys/values for longer costs accuracy
    assert quality_by_k[0] > quality_by_k[-1]


def test_the_reference_cache_holds_only_the_reference_tokens():
    slot = ReferenceKV(num_tokens=3)
    k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    slot.extend(k, v)
    for kept, full in ((slot.k, k), (slot.v, v)):
        torch.testing.assert_close(kept, full[:, :, -3:], rtol=0, atol=0)
        # its own storage: a view would keep all ten tokens' keys/values alive between recordings
        assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()


# ---------------------------------------------------------------- LoRAs and the paths that keep weight copies


def _a_lora(model):
    gen = torch.Generator().manual_seed(4)
    qkv = model.double_blocks[0].img_attn.qkv
    return {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(qkv.out_features, 2, generator=gen),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, qkv.in_features, generator=gen),
    }


@torch.no_grad()
def test_loras_do_not_change_underneath_an_offload():
    from kontext_core.runtime.lora import apply_lora

    model = tiny_flux_model(seed=9)
    args = kontext_inputs(model.params, batch=1)
    result = apply_lora(model, _a_lora(model))  # before offload: its host copies hold the LoRA
    with_lora = model(*args)
    handle = offload(model, "cpu")
    assert torch.equal(model(*args), with_lora)
    with pytest.raises(ValueError, match="while the transformer is offloaded"):
        result.remove()  # it would come off the module, not off the copies the offload installs
    with pytest.raises(ValueError, match="while the transformer is offloaded"):
        apply_lora(model, _a_lora(model))
    handle.remove()
    result.remove()
    assert not torch.equal(model(*args), with_lora)


@cuda
@torch.no_grad()
def test_cuda_graphs_are_captured_again_when_a_lora_changes_the_weights():
    from kontext_core.runtime.lora import apply_lora

    model = tiny_flux_model(seed=10).cuda()
    args = [a.cuda() if a is not None else None for a in kontext_inputs(model.params, batch=1)]
    graphed = CudaGraphForward(model)
    plain = graphed(*args)
    result = apply_lora(model, {k: v.cuda() for k, v in _a_lora(model).items()})
    torch.testing.assert_close(graphed(*args), model(*args), rtol=1e-5, atol=1e-5)
    result.remove()
    torch.testing.assert_close(graphed(*args), plain, rtol=1e-5, atol=1e-5)

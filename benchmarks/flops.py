"""FLOPs of one Flux forward, counted from the matrix products (a multiply-add is 2 FLOPs).

Elementwise work (norms, RoPE, modulation, activations) is left out: it is a few percent at the
full size and moves bytes rather than using the matrix units, so it does not belong in TFLOP/s.
"""

from __future__ import annotations

from kontext_core.model.config import FluxParams


def flux_forward_flops(
    params: FluxParams, txt_tokens: int, img_tokens: int, *, cached_tokens: int = 0, batch: int = 1
) -> int:
    """FLOPs of `Flux.forward` for `batch` sequences of `txt_tokens` text and `img_tokens` image tokens.

    `img_tokens` counts every image token the blocks compute (target plus references). `cached_tokens`
    are reference tokens whose keys and values come from a reference cache: they add keys to every
    attention but no projections (the fast mode's non-recording steps).
    """
    for name, value in (("txt_tokens", txt_tokens), ("img_tokens", img_tokens), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if cached_tokens < 0:
        raise ValueError(f"cached_tokens must be non-negative, got {cached_tokens}")
    h = params.hidden_size
    mlp = int(h * params.mlp_ratio)
    queries = txt_tokens + img_tokens
    keys = queries + cached_tokens

    def linear(tokens: int, fan_in: int, fan_out: int) -> int:
        return 2 * tokens * fan_in * fan_out

    # q·kᵀ and p·v over all heads: 2 products of queries × keys × head_dim × heads
    attention = 2 * 2 * queries * keys * h

    embed = linear(img_tokens, params.in_channels, h) + linear(txt_tokens, params.context_in_dim, h)
    embed += linear(1, 256, h) + linear(1, h, h) + linear(1, params.vec_in_dim, h) + linear(1, h, h)
    if params.guidance_embed:
        embed += linear(1, 256, h) + linear(1, h, h)

    stream = lambda n: linear(n, h, 3 * h) + linear(n, h, h) + linear(n, h, mlp) + linear(n, mlp, h)
    double = stream(txt_tokens) + stream(img_tokens) + attention + 2 * linear(1, h, 6 * h)
    single = linear(queries, h, 3 * h + mlp) + linear(queries, h + mlp, h) + attention + linear(1, h, 3 * h)
    final = linear(img_tokens, h, params.out_channels) + linear(1, h, 2 * h)
    return batch * (embed + params.depth * double + params.depth_single_blocks * single + final)

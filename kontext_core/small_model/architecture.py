"""The small model's networks built from scratch: its T5 and CLIP towers, zero-initialized outputs, and growing the transformer deeper."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from kontext_core.model.layers import DoubleStreamBlock, SingleStreamBlock
from kontext_core.model.flux import Flux
from kontext_core.small_model import SMALL_FLUX
from kontext_core.small_model.tokenizers import CLIP_LENGTH


def small_t5(vocab_size: int) -> T5EncoderModel:
    widths = dict(d_model=SMALL_FLUX.context_in_dim, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    positions = dict(relative_attention_num_buckets=32, relative_attention_max_distance=64)
    encoder_only = dict(is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(
        T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", **widths, **positions, **encoder_only)
    )


def small_clip(vocab_size: int, eos_token_id: int) -> CLIPTextModel:
    widths = dict(hidden_size=SMALL_FLUX.vec_in_dim, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)
    # our byte tokenizer's specials: BOS just below EOS, padding with EOS as CLIP's own tokenizer pads
    specials = dict(bos_token_id=eos_token_id - 1, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    config = CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu", **widths, **specials
    )
    return CLIPTextModel(config)


def zero_init_outputs(model: Flux) -> Flux:
    """adaLN-Zero (DiT): every block starts as the identity and the output at zero, which trains stably."""
    for block in model.double_blocks:
        for mod in (block.img_mod.lin, block.txt_mod.lin):
            nn.init.zeros_(mod.weight), nn.init.zeros_(mod.bias)
    for block in model.single_blocks:
        nn.init.zeros_(block.modulation.lin.weight), nn.init.zeros_(block.modulation.lin.bias)
    for layer in (model.final_layer.linear, model.final_layer.adaLN_modulation[-1]):
        nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
    return model


def closed(block: DoubleStreamBlock | SingleStreamBlock) -> DoubleStreamBlock | SingleStreamBlock:
    """A copy of `block` whose residual gates are zero: it passes its input through unchanged."""
    block = copy.deepcopy(block)
    for mod in (block.img_mod, block.txt_mod) if isinstance(block, DoubleStreamBlock) else (block.modulation,):
        with torch.no_grad():  # Modulation's chunks are (shift, scale, gate) per ModulationOut
            mod.lin.weight.view(mod.multiplier // 3, 3, -1, mod.lin.in_features)[:, 2] = 0
            mod.lin.bias.view(mod.multiplier // 3, 3, -1)[:, 2] = 0
    return block


def deepen(flux: Flux) -> Flux:
    """Twice the blocks: each trained block followed by a closed copy of itself. The deeper model computes
    exactly what `flux` did, and the copies' gates open as training needs them (progressive stacking)."""
    deeper = copy.deepcopy(flux)
    deeper.params = dataclasses.replace(
        flux.params, depth=2 * flux.params.depth, depth_single_blocks=2 * flux.params.depth_single_blocks
    )
    deeper.double_blocks = nn.ModuleList(b for block in deeper.double_blocks for b in (block, closed(block)))
    deeper.single_blocks = nn.ModuleList(b for block in deeper.single_blocks for b in (block, closed(block)))
    return deeper

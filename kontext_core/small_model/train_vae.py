"""Training the small VAE: reconstruction of the synthetic scenes through a 16-channel latent.

    python -m kontext_core.small_model.train_vae --steps 2600 --out run/

The latent keeps FLUX's convention: the model-space latent `(mean − shift) · scale` with FLUX's constants is
pushed toward zero mean and unit variance per channel, so the flow's unit noise fits it as it fits the real
VAE. The decoder also learns from slightly noised latents, so the transformer's small errors decode cleanly.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kontext_core.model.autoencoder import AutoEncoder
from kontext_core.checkpoints.autoencoder import load_vae
from kontext_core.cli.options import at_least, positive
from kontext_core.files import written_whole
from kontext_core.synthetic.tasks import HELD_OUT_SEED
from kontext_core.small_model import SMALL_VAE, small_model_files
from kontext_core.small_model.data import image_pool, size_batches, to_signed

LATENT_NOISE = 0.05  # model-space std of the noise the decoder learns to ignore
STATS_WEIGHT = 1e-2


def latent_stats_penalty(z: torch.Tensor) -> torch.Tensor:
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3))
    return (mean.pow(2) + torch.log(var + 1e-6).pow(2)).mean()


def train(
    steps: int, batch: int, lr: float, tasks: int, seed: int, log_every: int = 100, init: Path | None = None
) -> tuple[AutoEncoder, dict]:
    """From scratch, or (`init`) fine-tune the decoder of a trained VAE with its encoder frozen: the latent
    space a transformer was trained in stays exactly the same while the decoding improves."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pool = image_pool(0, tasks) if init is None else image_pool(HELD_OUT_SEED // 2, tasks)
    vae = AutoEncoder(SMALL_VAE) if init is None else load_vae(init, dtype=torch.float32).requires_grad_(True)
    if init is not None:
        vae.encoder.requires_grad_(False)
    p = vae.params
    trained = [t for t in vae.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    batches = size_batches(pool, batch, generator)
    start, mse_avg = time.time(), None
    for step in range(steps):
        x = to_signed(next(batches))
        with torch.set_grad_enabled(init is None):
            raw = vae.encoder(x).chunk(2, dim=1)[0]
        z = (raw - p.shift_factor) * p.scale_factor
        noisy = z + LATENT_NOISE * torch.rand(z.shape[0], 1, 1, 1) * torch.randn_like(z)
        out = vae.decoder(noisy / p.scale_factor + p.shift_factor)
        mse = (out - x).pow(2).mean()
        loss = mse + 0.1 * (out - x).abs().mean()
        if init is None:
            loss = loss + STATS_WEIGHT * latent_stats_penalty(z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        mse_avg = mse.item() if mse_avg is None else 0.98 * mse_avg + 0.02 * mse.item()
        if step % log_every == 0 or step == steps - 1:
            psnr = 10 * math.log10(4.0 / max(mse_avg, 1e-12))  # signal range 2 in [-1, 1]
            print(
                f"step {step} mse {mse_avg:.5f} (~{psnr:.1f} dB) z mean {z.mean():.3f} std {z.std():.3f} "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
    info = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "tasks": tasks,
        "seconds": round(time.time() - start),
        "final_mse": mse_avg,
        "decoder_only_from": None if init is None else str(init),
    }
    return vae.eval(), info


def save(vae: AutoEncoder, path: Path, info: dict) -> None:
    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    config = {
        "scaling_factor": vae.params.scale_factor,
        "shift_factor": vae.params.shift_factor,
        "norm_num_groups": vae.params.norm_groups,
    }
    with written_whole(path) as partial:
        save_file(state, partial, metadata={"config": json.dumps(config), "training": json.dumps(info)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=at_least(1), default=2400)
    parser.add_argument("--batch", type=at_least(1), default=16)
    parser.add_argument("--lr", type=positive, default=1e-3)
    parser.add_argument("--tasks", type=at_least(1), default=6000, help="training tasks whose images form the pool")
    parser.add_argument("--seed", type=int, default=0)
    # Required: the shipped transformer was trained on the shipped VAE's latents; no run may overwrite it unasked.
    parser.add_argument("--out", type=Path, required=True, help="the folder ae-small.safetensors is saved in")
    parser.add_argument("--init", type=Path, help="a trained VAE whose decoder to fine-tune (encoder frozen)")
    args = parser.parse_args(argv)
    vae, info = train(args.steps, args.batch, args.lr, args.tasks, args.seed, init=args.init)
    args.out.mkdir(parents=True, exist_ok=True)
    save(vae, small_model_files(args.out).vae, info)


if __name__ == "__main__":
    main()

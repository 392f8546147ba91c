"""The training tasks made ready once: rendered, VAE-encoded and tokenized, cached by all they are made from."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import multiprocessing
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from kontext_core.checkpoints.autoencoder import load_vae
from kontext_core.synthetic.tasks import KINDS
from kontext_core.small_model import SMALL_T5_LENGTH
from kontext_core.small_model.data import to_signed, to_uint8, training_tasks
from kontext_core.small_model.tokenizers import CLIP_LENGTH


@dataclass
class TaskGroup:
    """Training tasks of one shape: target size and reference sizes; latents in model space."""

    targets: Tensor  # N×16×h×w
    references: list[Tensor]  # each N×16×h_i×w_i
    t5_ids: Tensor  # N×SMALL_T5_LENGTH
    clip_ids: Tensor  # N×77
    kinds: Tensor  # N, each row's task kind as an index into `tasks.KINDS`


RENDER_CHUNK = 2000  # tasks rendered per worker call and encoded per VAE pass
# Images per encoder call. On a CPU 16 64×64 images a call encode about twice as fast as 256 (measured 3.4 s
# against 7.3 s per 1,024 on two cores: the activations stay in cache); a GPU wants large calls.
ENCODE_BATCH = {"cpu": 16, "cuda": 256}


def render_tasks(seeds: range) -> list[tuple[str, str, list[np.ndarray]]]:
    """(kind, instruction, [target, *references] as 3×H×W uint8) of each training task: numpy arrays, which
    come back from the workers by pickling (tensors would go through shared-memory handles, one per image)."""
    return [
        (task.kind, task.instruction, [to_uint8(image).numpy() for image in (task.target, *task.images)])
        for task in training_tasks(seeds.start, len(seeds))
    ]


# What encoded tasks are made of besides their seeds and the VAE's weights: the code that renders, tokenizes and
# encodes them (package-relative paths).
PREPARED_FROM = (
    "synthetic/tasks.py",
    "synthetic/instructions.json",
    "synthetic/render.py",
    "model/autoencoder.py",
    "model/config.py",
    "checkpoints/autoencoder.py",
    "small_model/data.py",
    "small_model/tokenizers.py",
)


def prepared_cache(vae: Path, first: int, count: int) -> Path:
    """Where `prepare`'s tasks are kept for the next run (encoding them takes minutes): in the temp folder, named
    by their seeds and a hash of all they are made from, so a changed generator, tokenizer or VAE never reads a
    stale file."""
    digest = hashlib.sha256(vae.read_bytes())
    package = Path(__file__).resolve().parents[1]
    for name in PREPARED_FROM:
        digest.update((package / name).read_bytes())
    for function in (render_tasks, prepare):
        digest.update(inspect.getsource(function).encode())
    digest.update(f"{SMALL_T5_LENGTH} {CLIP_LENGTH}".encode())
    return Path(tempfile.gettempdir()) / f"kontext-small-prepared-{first}+{count}-{digest.hexdigest()[:16]}.pt"


@torch.no_grad()
def prepare(
    vae_path: Path,
    count: int,
    t5_tok: PreTrainedTokenizerBase,
    clip_tok: PreTrainedTokenizerBase,
    device: torch.device,
    workers: int = 1,
    first: int = 0,
) -> list[TaskGroup]:
    """`count` training tasks from seed `first` on, encoded into latents (on `device`), grouped by their images'
    sizes. Rendering is pure Python and runs in `workers` processes; tasks come back in seed order either way."""
    end = first + count
    chunks = [range(start, min(start + RENDER_CHUNK, end)) for start in range(first, end, RENDER_CHUNK)]
    kinds, prompts, latents, groups = [], [], [], {}  # groups: image shapes -> task indices
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        # the workers are forked before the GPU is touched: a forked CUDA context is unusable
        vae = load_vae(vae_path, device=device, dtype=torch.float32)
        per_call = ENCODE_BATCH.get(device.type, ENCODE_BATCH["cpu"])
        for chunk in pool.imap(render_tasks, chunks) if pool else map(render_tasks, chunks):
            by_size: dict[tuple[int, ...], list[tuple[int, int, np.ndarray]]] = {}  # (task, slot, pixels)
            for kind, prompt, images in chunk:
                i = len(prompts)
                kinds.append(KINDS.index(kind))
                prompts.append(prompt)
                latents.append([None] * len(images))
                groups.setdefault(tuple(image.shape for image in images), []).append(i)
                for slot, image in enumerate(images):
                    by_size.setdefault(image.shape, []).append((i, slot, image))
            for entries in by_size.values():
                pixels = torch.from_numpy(np.stack([e[2] for e in entries])).contiguous().to(device)
                z = torch.cat(
                    [
                        vae.encoder(to_signed(pixels[s : s + per_call])).chunk(2, dim=1)[0]
                        for s in range(0, len(pixels), per_call)
                    ]
                )
                z = ((z - vae.params.shift_factor) * vae.params.scale_factor).cpu()
                for (i, slot, _), latent in zip(entries, z):
                    latents[i][slot] = latent
    t5_all = t5_tok(prompts, padding="max_length", max_length=SMALL_T5_LENGTH, truncation=True, return_tensors="pt")
    if (t5_all.input_ids[:, -1] != t5_tok.pad_token_id).any():
        raise RuntimeError(f"an instruction is longer than {SMALL_T5_LENGTH} T5 tokens")
    clip_all = clip_tok(prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt")
    kind_ids = torch.tensor(kinds)
    return [
        TaskGroup(
            targets=torch.stack([latents[i][0] for i in indices]),
            references=[torch.stack([latents[i][1 + r] for i in indices]) for r in range(len(latents[indices[0]]) - 1)],
            t5_ids=t5_all.input_ids[indices],
            clip_ids=clip_all.input_ids[indices],
            kinds=kind_ids[indices],
        )
        for indices in groups.values()
    ]

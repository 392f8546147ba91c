"""Helpers for the node tests: the pack loaded the way ComfyUI loads it, and tiny stand-in components."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

from kontext_core import sampling

ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "kontext_core_pack_under_test"


def load_pack():
    """The repo's top-level __init__.py imported as a package, as ComfyUI's custom-node loader does."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


class TinyTextEncoder:
    """`encode(prompts) -> (txt, y)` with prompt-dependent random vectors of the tiny transformer's widths."""

    def __init__(self, context_dim: int, vec_dim: int, length: int = 7):
        self.context_dim, self.vec_dim, self.length = context_dim, vec_dim, length

    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        txt, y = [], []
        for prompt in prompts:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:6], "little")
            gen = torch.Generator().manual_seed(seed)
            txt.append(torch.randn(self.length, self.context_dim, generator=gen))
            y.append(torch.randn(self.vec_dim, generator=gen))
        return torch.stack(txt), torch.stack(y)


class TinyVAE(nn.Module):
    """A random 8× encoder/decoder pair with the engine VAE's raw/scaled interface (not the real architecture:
    the node tests check the plumbing around it, the VAE's own tests check the network)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.down = nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.up = nn.ConvTranspose2d(16, 3, kernel_size=8, stride=8)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.up(z))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return sampling.latent_to_model(self.encode_raw(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(sampling.latent_from_model(z))


def random_image(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A ComfyUI IMAGE whose pixels are exact 8-bit values, like LoadImage's."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, height, width, 3), generator=gen).float() / 255.0


class FakeFolderPaths(types.ModuleType):
    """ComfyUI's `folder_paths` as far as the pack uses it (model folders per kind, listing by extension, lookup
    with `..` stripped; input/output/temp under `install`), for tests outside ComfyUI; the real one is
    exercised in tests/integration."""

    def __init__(self, folders: dict[str, list[str]], install: Path):
        super().__init__("folder_paths")
        self.__file__ = str(install / "folder_paths.py")  # where ComfyUI's own tokenizers would be looked for
        self.directories = {kind: str(install / kind) for kind in ("input", "output", "temp")}
        kinds = ("diffusion_models", "text_encoders", "vae", "loras")
        self.folder_names_and_paths = {kind: (list(folders.get(kind, [])), {".safetensors", ".ckpt"}) for kind in kinds}

    def get_directory_by_type(self, kind: str) -> str | None:
        return self.directories.get(kind)

    def get_folder_paths(self, kind: str) -> list[str]:
        return self.folder_names_and_paths[kind][0][:]

    def get_filename_list(self, key: str) -> list[str]:
        roots, extensions = self.folder_names_and_paths[key]
        names = set()
        for root in roots:
            for folder, _, files in os.walk(root, followlinks=True):
                kept = [f for f in files if os.path.splitext(f)[1].lower() in extensions]
                names.update(os.path.relpath(os.path.join(folder, f), root) for f in kept)
        return sorted(names)

    def get_full_path(self, key: str, name: str) -> str | None:
        name = os.path.relpath(os.path.join("/", name), "/")
        paths = (os.path.join(root, name) for root in self.folder_names_and_paths[key][0])
        return next((path for path in paths if os.path.isfile(path)), None)


def use_model_folders(monkeypatch, comfy_bridge, folders: dict[str, list[str]], install: Path) -> None:
    """The pack sees `folders` as ComfyUI's model folders (kind -> paths) of a ComfyUI in `install` (without
    its tokenizer folders); other ComfyUI modules stay absent."""
    fake = FakeFolderPaths(folders, install)
    monkeypatch.setattr(comfy_bridge, "comfy_module", lambda name: fake if name == "folder_paths" else None)

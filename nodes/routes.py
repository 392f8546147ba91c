"""The editor's server route: how far a chain of edits has drifted from its original (web/js/kontext_editor.js
asks for each round it shows). The measure is the engine's (`kontext_core.recomposite.drift`); this module
only finds the images in ComfyUI's folders, checks the request and shapes the answer."""

from __future__ import annotations

import asyncio
import os

import numpy as np
from PIL import Image

from kontext_core.recomposite import drift

from . import _comfy
from .save import inside_folder

DRIFT_ROUTE = "/kontext/drift"
FOLDERS = {"input": _comfy.input_directory, "output": _comfy.output_directory, "temp": _comfy.temp_directory}


def image_file(ref, index: int) -> str:
    """The file behind an image reference as ComfyUI's /view takes it: {filename, subfolder, type}."""
    what = f"chain[{index}]"
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str) or not ref["filename"]:
        raise ValueError(f"{what} must be an object with a 'filename', got {ref!r}")
    kind, subfolder = ref.get("type", "output"), ref.get("subfolder", "")
    if not isinstance(kind, str) or kind not in FOLDERS or not isinstance(subfolder, str):
        raise ValueError(f"{what} must have a 'type' among {sorted(FOLDERS)} and a string 'subfolder', got {ref!r}")
    path = inside_folder(FOLDERS[kind](), os.path.join(subfolder, ref["filename"]), what)
    if not os.path.isfile(path):
        raise ValueError(f"{what}: no file {ref['filename']!r} in the {kind} folder's {subfolder or 'top'} folder")
    return path


def drift_report(payload) -> dict:
    """{psnr_db, identical, unedited_fraction} of `payload["chain"]`: the original, then each round's result."""
    chain = payload.get("chain") if isinstance(payload, dict) else None
    if not isinstance(chain, list):
        raise ValueError(f"the request must be a JSON object with a 'chain' list of images, got {payload!r}")
    images = []
    for index, ref in enumerate(chain):
        path = image_file(ref, index)
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError as e:
            raise ValueError(f"chain[{index}]: {ref['filename']!r} is not an image this server can read ({e})") from e
    for index, image in enumerate(images[1:], start=1):
        if image.shape != images[0].shape:
            raise ValueError(
                f"chain[{index}] is {image.shape[1]}×{image.shape[0]} but the original {images[0].shape[1]}×"
                f"{images[0].shape[0]}: drift is measured between images of one size"
            )
    result = drift(images)
    identical = result.psnr_db == float("inf")  # JSON has no infinity
    return {
        "psnr_db": None if identical else result.psnr_db,
        "identical": identical,
        "unedited_fraction": result.unedited_fraction,
    }


def register() -> None:
    """Adds the route to ComfyUI's server; imported here so the pack imports without ComfyUI's server."""
    server = _comfy.comfy_module("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:  # ComfyUI used as a library: nodes without a web server
        return
    from aiohttp import web

    @prompt_server.routes.post(DRIFT_ROUTE)
    async def post_drift(request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"error": "the request body must be JSON"}, status=400)
        try:  # reading the images off the event loop
            return web.json_response(await asyncio.to_thread(drift_report, payload))
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)

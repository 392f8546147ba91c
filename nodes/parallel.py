"""One image across several devices inside ComfyUI: a loader that starts a persistent worker group (one process
per device, kontext_core.parallel.workers) holding the model, which the Kontext Sampler then runs on."""

from __future__ import annotations

import torch

import kontext_core
from kontext_core.parallel.config import METHODS, ParallelConfig
from kontext_core.runtime.quant import COMPUTE_DTYPES, weight_options

from ._comfy import ModelSlot
from ._models import model_path
from ._spec import Input, KontextNode, Output
from .loaders import (
    CATEGORY,
    COMPUTE_DTYPE,
    TRANSFORMER_FILE,
    KontextCoreModelLoader,
    _say_if_small,
    auto_compute_dtype,
)

AUTO_DEVICES = "auto"  # every CUDA device; two CPU workers where there is none


def parse_devices(text: str) -> list[str]:
    """'cuda:0,cuda:1' or 'cpu,cpu' (one worker each), or 'auto'."""
    if text.strip() == AUTO_DEVICES:
        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] if count else ["cpu", "cpu"]
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for device in devices:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ValueError(f"input 'devices': {device!r} is not a device (cpu, cuda:0, cuda:1 …)") from None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"input 'devices': workers run on cpu or cuda devices, got {device!r}")
    if len(devices) < 2:
        raise ValueError(f"input 'devices': a worker group needs 2 or more devices, got {text!r}")
    return devices


class KontextCoreParallelModelLoader(KontextNode):
    NODE_ID = "KontextCoreParallelModelLoader"
    DISPLAY_NAME = "Kontext Parallel Model Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads a FLUX.1 Kontext transformer into a group of worker processes, one per device, that split each "
        "image between them (sequence or CFG parallel). The group stays up between runs; picking another file "
        "or option stops it and starts a new one."
    )
    INPUTS = (
        TRANSFORMER_FILE,
        Input(
            "method",
            "COMBO",
            "ulysses: tokens split, heads exchanged (the device count must divide the 24 heads); ring: any "
            "device count; cfg: true CFG's two passes on 2 devices; cfg+ulysses, cfg+ring: both (4 or more).",
            default="ulysses",
            options=METHODS,
        ),
        Input(
            "devices",
            "STRING",
            "One worker per device, comma-separated (cuda:0,cuda:1 or cpu,cpu); 'auto' is every GPU.",
            default=AUTO_DEVICES,
        ),
        COMPUTE_DTYPE,
    )
    OUTPUTS = (Output("KONTEXT_MODEL", "model", "The worker group, for Kontext Sampler."),)
    _slot = ModelSlot()

    validate_inputs = KontextCoreModelLoader.validate_inputs  # the same file list and check

    @classmethod
    def run(cls, model_name: str, method: str = "ulysses", devices: str = AUTO_DEVICES, compute_dtype: str = "auto"):
        path = model_path("diffusion_models", model_name, "model_name")
        _say_if_small(model_name)
        if method not in METHODS:
            raise ValueError(f"input 'method': expected one of {METHODS}, got {method!r}")
        config = ParallelConfig(method)
        names = parse_devices(devices)
        try:
            config.sequence_degree(len(names))
        except ValueError as e:
            raise ValueError(f"input 'devices': {e}") from None
        dtype = COMPUTE_DTYPES[compute_dtype] or auto_compute_dtype(torch.device(names[0]))
        from kontext_core.parallel.workers import ModelSource, WorkerGroup  # torch.distributed and friends

        # each worker loads the file itself, onto its own device, keeping fp8 layers fp8 as the plain loader does
        source = ModelSource(kontext_core.load_transformer, {"path": path, "dtype": dtype, **weight_options("default")})
        return (cls._slot.get(path, (method, tuple(names), dtype), lambda: WorkerGroup(source, config, names)),)


NODES = [KontextCoreParallelModelLoader]

"""Block-wise offload: the transformer's blocks stay in host memory and visit the device one at a time.

Everything outside the blocks (embedders, final layer) moves to the device for good. Each block's
weights are copied in just before it runs and dropped right after, so the device holds about two
blocks of weights (the running one and the next, prefetched on a side stream on CUDA) instead of all
57. The arithmetic is unchanged: outputs are bit-identical to the resident model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kontext_core.model.flux import Flux


class _BlockWeights:
    """One block's tensors in host memory, and where each one goes back into the module."""

    def __init__(self, block: nn.Module, device: torch.device, pin: bool):
        self.slots: list[tuple[nn.Module, str, bool, Tensor]] = []
        for module in block.modules():
            for name, param in module.named_parameters(recurse=False):
                self.slots.append((module, name, True, _host_copy(param, pin)))
            for name, buffer in module.named_buffers(recurse=False):
                self.slots.append((module, name, False, _host_copy(buffer, pin)))
        self.device = device
        self.on_device: list[Tensor] | None = None
        self.ready: torch.cuda.Event | None = None

    def fetch(self, stream: torch.cuda.Stream | None) -> None:
        """Start copying to the device (on `stream` when given; the copy is then asynchronous)."""
        if stream is None:
            self.on_device = [host.to(self.device) for *_, host in self.slots]
            return
        with torch.cuda.stream(stream):
            self.on_device = [host.to(self.device, non_blocking=True) for *_, host in self.slots]
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def install(self) -> None:
        """Point the module's parameters and buffers at the device copies (after the copy is done)."""
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            for tensor in self.on_device:
                # the copies were allocated on the side stream: keep the allocator from reusing them early
                tensor.record_stream(current)
            self.ready = None
        for (module, name, is_param, _), tensor in zip(self.slots, self.on_device):
            _set(module, name, is_param, tensor)

    def release(self) -> None:
        """Drop the device copies; the module keeps empty placeholders until the next fetch."""
        for module, name, is_param, host in self.slots:
            _set(module, name, is_param, torch.empty(0, dtype=host.dtype, device=self.device))
        self.on_device = None

    @property
    def fetched(self) -> bool:
        return self.on_device is not None


def _host_copy(tensor: Tensor, pin: bool) -> Tensor:
    host = tensor.detach().to("cpu")
    # pinned memory lets the copy to the GPU run asynchronously, overlapped with the previous block
    return host.pin_memory() if pin else host


def _set(module: nn.Module, name: str, is_param: bool, tensor: Tensor) -> None:
    if is_param:
        getattr(module, name).data = tensor
    else:
        module._buffers[name] = tensor


class BlockOffload:
    """Hooks that bring each block of `model` to `device` just before it runs; `remove()` undoes them."""

    def __init__(self, model: Flux, device: torch.device | str, *, prefetch: bool = True):
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"cannot offload to {device}: CUDA is not available")
        self.model = model
        self.device = device
        blocks = [*model.double_blocks, *model.single_blocks]
        if not blocks:
            raise ValueError("the model has no blocks to offload")
        for name, child in model.named_children():
            if name not in ("double_blocks", "single_blocks"):
                child.to(device)
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda and prefetch else None
        self.prefetch = prefetch
        self.weights = [_BlockWeights(block, device, pin=cuda) for block in blocks]
        for weights in self.weights:
            weights.release()
        self.handles = []
        model.__dict__["_block_offload"] = self  # LoRAs must not change underneath the host copies
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i)))
            self.handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i)))

    def _before(self, i: int) -> None:
        weights = self.weights[i]
        if not weights.fetched:
            weights.fetch(None)
        weights.install()
        if self.prefetch:
            # the block after the last is the first of the next forward (the next denoising step)
            upcoming = self.weights[(i + 1) % len(self.weights)]
            if not upcoming.fetched:
                upcoming.fetch(self.stream)

    def _after(self, i: int) -> None:
        self.weights[i].release()

    def resident_blocks(self) -> int:
        """How many blocks hold device weights now (for tests and memory reports)."""
        return sum(w.fetched for w in self.weights)

    def remove(self) -> Flux:
        """Take the hooks off and put every block's weights back on the device; returns the model."""
        for handle in self.handles:
            handle.remove()
        if self.stream is not None:
            self.stream.synchronize()
        for weights in self.weights:
            weights.ready = None
            for module, name, is_param, host in weights.slots:
                _set(module, name, is_param, host.to(self.device))
            weights.on_device = None
        self.handles = []
        self.model.__dict__.pop("_block_offload", None)
        return self.model


def offload(model: Flux, device: torch.device | str, *, prefetch: bool = True) -> BlockOffload:
    """Run `model` on `device` with only about two blocks' weights there at a time (see module docs).

    With device "cpu" the same hooks run with host and device memory being one: outputs and memory
    are unchanged, which is how the mechanism is tested without a GPU.
    """
    return BlockOffload(model, device, prefetch=prefetch)

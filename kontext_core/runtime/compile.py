"""Exact fast paths: torch.compile of the blocks with dynamic token counts, and CUDA-graph replay.

Both compute the same function as the eager model (fusion reorders fp32 rounding only); neither
changes module names, so state dicts and loaders are unaffected.

Compiling block by block ("regional" compilation) rather than the whole forward: the 19 double and
38 single blocks share their compiled code (measured: 22 blocks → 3 graphs), the Python around them
(reference cache, offload hooks) stays eager, and compile time is seconds, not minutes. With
`dynamic=True` the token counts are symbolic: a new resolution or prompt length reuses the
compiled code instead of recompiling (measured: none on a new text and image length).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kontext_core.model.config import FluxParams
from kontext_core.runtime.lora import weights_version
from kontext_core.model.flux import Flux
from kontext_core.model.reference_cache import ReferenceCache


def optimize(
    model: Flux,
    *,
    compile: bool = True,
    dynamic: bool = True,
    mode: str | None = None,
    backend: str = "inductor",
) -> Flux:
    """Compile each block of `model` in place (see module docs) and return it.

    `mode` is torch.compile's (e.g. "max-autotune-no-cudagraphs"); its CUDA-graph modes are refused
    here because graph outputs are overwritten on replay while the reference cache keeps them —
    use `CudaGraphForward` for graphs.
    """
    if mode in ("reduce-overhead", "max-autotune"):
        raise ValueError(
            f"mode {mode!r} captures CUDA graphs inside the blocks, which the reference cache cannot "
            "share; use mode='max-autotune-no-cudagraphs' and CudaGraphForward for graphs"
        )
    if not compile:
        return model
    for block in (*model.double_blocks, *model.single_blocks):
        block.compile(dynamic=dynamic, mode=mode, backend=backend)
    return model


def is_compiled(model: Flux) -> bool:
    return all(
        getattr(b, "_compiled_call_impl", None) is not None for b in (*model.double_blocks, *model.single_blocks)
    )


class CudaGraphForward:
    """`model.forward` replayed from a CUDA graph, one graph per distinct input shape.

    Each new shape is warmed up (which also compiles an `optimize`d model) and captured once; later
    calls with that shape copy the inputs into the graph's static buffers and replay: no Python or
    kernel-launch overhead per block and no host synchronization. The result is a fresh tensor (a
    copy of the static output) so callers may keep it across calls. The reference cache's
    record/reuse alternation changes shapes and keeps tensors between calls, so it is not supported
    here; pass this object to `sampling.sample` in place of the model for the exact path.
    """

    def __init__(self, model: Flux, *, max_graphs: int = 8):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; none is available (use optimize() alone on CPU)")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need the model on a CUDA device; it is on {device}")
        self.model = model
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor | None], Tensor]] = {}
        self.weights_version = weights_version(model)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    @property
    def params(self) -> FluxParams:  # `sampling.sample` checks the text widths against it
        return self.model.params

    def new_reference_cache(self, num_reference_tokens: int) -> ReferenceCache:
        raise RuntimeError("CudaGraphForward runs the exact path only; reference_cache_every must be 0")

    def __call__(self, *args: Tensor | None, ref_cache: ReferenceCache | None = None) -> Tensor:
        if ref_cache is not None:
            raise RuntimeError("CudaGraphForward runs the exact path only; reference_cache_every must be 0")
        if weights_version(self.model) != self.weights_version:  # a LoRA went on or came off: new weight tensors
            self.graphs.clear()
            self.weights_version = weights_version(self.model)
        key = tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                raise RuntimeError(
                    f"more than {self.max_graphs} input shapes seen; CUDA graphs are for a fixed shape "
                    "(raise max_graphs, or use optimize() alone for varying shapes)"
                )
            self.graphs[key] = self._capture(args)
        graph, static_in, static_out = self.graphs[key]
        for buffer, value in zip(static_in, args):
            if buffer is not None:
                buffer.copy_(value, non_blocking=True)
        graph.replay()
        return static_out.clone()

    def _capture(self, args: tuple[Tensor | None, ...]):
        static_in = [None if a is None else a.detach().clone() for a in args]

        def run() -> Tensor:
            return self.model(*static_in)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # compile, autotune and allocate outside the graph
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            static_out = run()
        return graph, static_in, static_out

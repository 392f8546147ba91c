"""Reading model files: safetensors only, every format a ComfyUI user has, converted to BFL names."""

from .safetensors_io import CheckpointError, TensorSource, open_tensors, read_header

__all__ = ["CheckpointError", "TensorSource", "open_tensors", "read_header"]

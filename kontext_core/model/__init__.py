"""The FLUX.1 Kontext model itself: the DiT and its layers, attention and RoPE, the VAE, the text encoders.

Module and parameter names are the BFL checkpoint keys, so loading a file is a lookup. Nothing here reads
files or knows about sampling: `kontext_core.checkpoints` builds these modules from files.
"""

from kontext_core.model.autoencoder import AutoEncoder
from kontext_core.model.config import AutoEncoderParams, FluxParams
from kontext_core.model.flux import Flux

__all__ = ["AutoEncoder", "AutoEncoderParams", "Flux", "FluxParams"]

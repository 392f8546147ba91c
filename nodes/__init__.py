"""The node list. Ids are frozen once released: workflows and scripts refer to them."""

from __future__ import annotations

from . import conditioning, images, loaders, parallel, safety, sampling, save
from ._spec import KontextNode

NODES: list[type[KontextNode]] = [
    *loaders.NODES,
    *parallel.NODES,
    *conditioning.NODES,
    *images.NODES,
    *sampling.NODES,
    *safety.NODES,
    *save.NODES,
]

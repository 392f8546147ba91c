"""ComfyUI entry point of the Kontext Core node pack.

ComfyUI imports this file as a package and the nodes register through the V3 `comfy_entrypoint`, on the
versioned `comfy_api.v0_0_2` that every ComfyUI the pack supports (>= 0.3.64) ships, so a later `latest`
cannot change the schema under us. Outside ComfyUI (pytest, plain Python) there is no `comfy_api`: the
V1 mappings stay for that import, which is how the unit tests run every node without ComfyUI. Run as a bare file it defines no nodes.
"""

import os
import sys

WEB_DIRECTORY = "./web"

# The engine is imported as `kontext_core` (as when pip-installed), so the pack's folder must be importable.
_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

try:
    from comfy_api.v0_0_2 import ComfyExtension
except ImportError:
    ComfyExtension = None

if __package__:  # loaded as a package (ComfyUI, importlib); a bare run of this file has no nodes to offer
    from .nodes import NODES
    from .nodes._adapter import v1_class, v3_class

    if ComfyExtension is not None:

        class KontextCoreExtension(ComfyExtension):
            async def get_node_list(self):
                return [v3_class(node) for node in NODES]

        async def comfy_entrypoint() -> KontextCoreExtension:
            from .nodes import routes  # the editor's server route; needs ComfyUI's server, so only here

            routes.register()
            return KontextCoreExtension()

    else:
        NODE_CLASS_MAPPINGS = {node.NODE_ID: v1_class(node) for node in NODES}
        NODE_DISPLAY_NAME_MAPPINGS = {node.NODE_ID: node.DISPLAY_NAME for node in NODES}

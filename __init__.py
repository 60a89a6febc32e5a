"""Concept Lab: concept neurons, seed search and attention saliency for ComfyUI.

ComfyUI imports this folder as a package under the folder's own name, calls ``comfy_entrypoint``
for the nodes (V3 nodes, registered as ComfyUI's own comfy_extras register theirs) and serves
``WEB_DIRECTORY``. Everything else lives in ``nodes/`` (adapters) and ``kernels/`` (pure torch).
No ``NODE_CLASS_MAPPINGS`` here: ComfyUI would then take the V1 path and never call the entry point.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"
__version__ = "0.1.0"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

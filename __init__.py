"""Concept Lab: concept neurons, seed search and attention saliency for ComfyUI.

ComfyUI imports this folder as a package under the folder's own name and reads the three
names below. Everything else lives in ``nodes/`` (adapters) and ``kernels/`` (pure torch).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
__version__ = "0.1.0"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

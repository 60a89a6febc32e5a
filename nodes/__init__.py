"""Node adapters: ComfyUI types in, kernels called, ComfyUI types out. One module a capability."""
from . import concept_neurons, demo, model_info, saliency, seed_search

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _mod in (demo, model_info, concept_neurons, seed_search, saliency):
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)

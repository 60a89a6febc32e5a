"""Node adapters: ComfyUI types in, kernels called, ComfyUI types out. One module a capability."""
from . import demo, model_info, saliency

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _mod in (demo, model_info, saliency):
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)

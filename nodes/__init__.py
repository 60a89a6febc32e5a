"""Node adapters: ComfyUI types in, kernels called, ComfyUI types out. One module a capability."""
from . import concept_neurons, demo, model_info, saliency, seed_search

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _mod in (demo, model_info, concept_neurons, seed_search, saliency):
    for _cls in getattr(_mod, "NODES", ()):        # V3 nodes (io.ComfyNode)
        _schema = _cls.GET_SCHEMA()
        NODE_CLASS_MAPPINGS[_schema.node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_schema.node_id] = _schema.display_name
    NODE_CLASS_MAPPINGS.update(getattr(_mod, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))

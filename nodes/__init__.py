"""Node adapters: ComfyUI types in, kernels called, ComfyUI types out. One module a capability.

Every node is a V3 node (``io.ComfyNode``, ``nodes/_schema.py``). ComfyUI registers them through
:func:`comfy_entrypoint`, the way its own ``comfy_extras`` modules do."""
from . import concept_neurons, demo, model_info, saliency, seed_search
from ._schema import ComfyExtension

NODES = [*demo.NODES, *model_info.NODES, *concept_neurons.NODES, *seed_search.NODES, *saliency.NODES]


class ConceptLabExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> ConceptLabExtension:
    return ConceptLabExtension()

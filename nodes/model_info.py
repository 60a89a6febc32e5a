"""ConceptLab Model Info: what Concept Lab sees in a MODEL (family, concept-neuron candidates)."""
from __future__ import annotations

import json

from ..kernels.layers import concept_kv_layers, kv_weight_count
from ._runtime import family_label, model_family, require_family, UNET_FAMILIES, DIT_FAMILIES
from ._schema import io, schema
from .architectures import dit_stream

NODE = "ConceptLab Model Info"


def describe_model(model) -> dict:
    """Family, parameter count and the cross-attention K/V weights Cones would search."""
    require_family(NODE, model, UNET_FAMILIES + DIT_FAMILIES)
    dm = model.model.diffusion_model
    shapes = {n: tuple(p.shape) for n, p in dm.named_parameters()}
    layers = concept_kv_layers(shapes)
    fam = model_family(model)
    label, architecture = family_label(fam), None
    stream = dit_stream(dm, fam) if fam in DIT_FAMILIES else None
    if stream is not None:   # the checkpoint's kind, e.g. SD3.5 (one family id with SD3)
        cfg = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
        own, architecture = stream.describe(cfg)
        label = own or label
    return {
        "family": fam,
        "family_label": label,
        "architecture": architecture,
        "parameters": sum(p.numel() for p in dm.parameters()),
        "dtype": str(next(dm.parameters()).dtype).replace("torch.", ""),
        "kv_layers": len(layers),
        "kv_weights": kv_weight_count(layers, shapes),
        "candidates": getattr(stream, "candidates_note", None),   # which weights, and why
    }


class ConceptLabModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabModelInfo", display_name=NODE, category="ConceptLab/utils",
            description=("Reports what Concept Lab sees in a MODEL: its family, its size, and how many "
                         "cross-attention key/value weights (the concept-neuron candidates) it has. "
                         "Does not change the model."),
            search_aliases=["model info", "model family", "inspect model", "parameter count",
                            "concept neuron candidates"],
            is_output_node=True,
            inputs=[io.Model.Input("model", tooltip="Any SD1.x, SD2.x, SDXL, SD3 or Flux model.")],
            outputs=[io.String.Output(display_name="info", tooltip="The same report as JSON text.")])

    @classmethod
    def execute(cls, model):
        info = describe_model(model)
        text = json.dumps(info)
        lines = [f"{info['family_label']}: {info['parameters']:,} parameters ({info['dtype']})",
                 f"{info['kv_layers']} K/V layers, {info['kv_weights']:,} concept-neuron candidates"]
        if info["architecture"]:
            lines.append(info["architecture"])
        if info["candidates"]:
            lines.append(info["candidates"])
        return io.NodeOutput(text, ui={"text": lines})


NODES = [ConceptLabModelInfo]

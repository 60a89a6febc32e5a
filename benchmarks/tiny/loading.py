"""Tiny models loaded the way a user loads weights: a state dict that ComfyUI's own model
detection recognises, put through ComfyUI's own loading path with a weight precision.

``comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": ...})``, what UNETLoader's
``weight_dtype`` (default / fp8_e4m3fn / fp8_e5m2 ...) calls. ComfyUI stores the weights in the precision and, where the device cannot compute in
it (every low precision on a CPU), runs the model with manual-cast ops in another dtype.

Two families: a narrow SD1.x UNet (SD15's detection keys: 320 channels, 768-wide context; one
level, one res block) with a one-layer 768-wide CLIP, and the tiny Flux.1-dev of ``flux.py``.
Import after ``comfy_runtime.bootstrap()``.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from . import demo

#: UNETLoader's weight_dtype names (plus the fp32 baseline and fp16/bf16) -> torch dtype.
PRECISIONS = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

#: A narrow SD1.x UNet that ComfyUI detects as SD15 (its detection keys: 320 channels, a 768-wide
#: context, no linear projections, no ADM): one level, one res block, one transformer per block.
SD15_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
    "transformer_depth_output": [1, 1], "transformer_depth_middle": 1, "context_dim": 768,
    "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
    "use_checkpoint": False, "use_spatial_transformer": True, "legacy": False,
    "num_heads": 8, "num_head_channels": -1,
}

#: A one-layer CLIP text model 768 wide (SD1.x's conditioning width) with a small MLP.
CLIP_768 = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 256, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 1, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "vocab_size": 49408,
}


def sd15_state_dict(seed: int = 1) -> dict:
    """The narrow SD15 UNet's state dict (fp32, seeded, fan-in scaled), with the keys a
    diffusion-model file has."""
    import comfy.model_base
    import comfy.supported_models
    with torch.inference_mode():
        base = comfy.model_base.BaseModel(comfy.supported_models.SD15(dict(SD15_CONFIG)))
        demo()._seeded_init_(base.diffusion_model, seed)
        base.diffusion_model.out[2].weight.mul_(0.2)   # an output of about unit std, as a trained one
        return {k: v.detach().clone() for k, v in base.diffusion_model.state_dict().items()}


def flux_state_dict(scale: float = 0.05) -> dict:
    """A tiny Flux.1-dev's state dict (``flux.py``'s, 128 wide: ComfyUI's detection fixes
    Flux.1's rotary axes at 16 + 56 + 56, so one head of 128), or ``Unavailable`` on an old
    ComfyUI."""
    from . import model_from_config
    from .flux import flux1_config
    cfg = dict(flux1_config(), hidden_size=128, num_heads=1, axes_dim=[16, 56, 56])
    m = model_from_config("Flux", cfg, scale)
    with torch.inference_mode():
        return {k: v.detach().clone() for k, v in m.model.diffusion_model.state_dict().items()}


def load(sd: dict, precision: str = "fp32"):
    """A MODEL from a diffusion-model state dict, through ComfyUI's own detection and loading
    with weights stored in ``precision`` (a key of PRECISIONS). The state dict is not changed."""
    import comfy.sd
    dtype = PRECISIONS[precision]
    sd = dict(sd)   # ComfyUI's loaders pop keys
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    if model is None:
        raise RuntimeError("ComfyUI's model detection did not recognise the state dict")
    return model


def weight_dtypes(model) -> set:
    """The dtypes the diffusion model's weights are stored in."""
    return {p.dtype for p in model.model.diffusion_model.parameters()}


def clip_768(seed: int = 2):
    """A CLIP (ComfyUI's SDClipModel, SD1's tokenizer) 768 wide, one layer, seeded weights."""
    import comfy.sd
    import comfy.sd1_clip
    path = os.path.join(tempfile.gettempdir(), "conceptlab_clip_768.json")
    with open(path, "w") as f:
        json.dump(CLIP_768, f)

    class ClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, *args, **kwargs):
            kwargs["textmodel_json_config"] = path
            kwargs.pop("version", None)
            super().__init__(*args, **kwargs)

    class Clip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, **kwargs):
            kwargs["clip_model"] = ClipL
            super().__init__(device=device, dtype=dtype, **kwargs)

    class Target:
        params: dict = {}
        clip = Clip
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=Target)
        demo()._seeded_init_(clip.cond_stage_model, seed)
    return clip

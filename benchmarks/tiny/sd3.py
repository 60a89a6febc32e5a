"""SD3-family tiny models: SD3.5 Medium (MMDiT-X) and SD3.5 Large, from ComfyUI's own
``supported_models.SD3`` / ``model_base.SD3`` (``comfy.ldm.modules.diffusionmodules.mmdit``).

ComfyUI's model detection reads an MMDiT checkpoint's geometry from its weights: ``depth`` is
the width over 64 (one 64-wide head per unit; SD3.5 Medium 24, Large 38), one joint block per
unit of depth, 16 latent channels in 2x2 patches, a learned position embedding of
``pos_embed_max_size`` patches a side (384 for Medium, 192 for Large), the pooled text width
(2048) and the text width (4096), ``qk_norm: "rms"`` when the blocks carry RMS q/k norms (both
SD3.5s; SD3 Medium has none) and ``x_block_self_attn_layers``, the MMDiT-X blocks whose image
stream runs a second, image-only self-attention (SD3.5 Medium: blocks 0-12; Large: none).

The tiny ones keep every detected key and shrink the sizes: depth 3 (3 blocks, 192 wide, 3 heads
of 64), a 16-patch position embedding, and the demo CLIP's 64-wide text and pooled vectors."""
from __future__ import annotations

from . import Tiny, demo_clip, model_from_config, register, vae

DEPTH = 3
POS_EMBED = 16


def _config(x_block_self_attn_layers: list) -> dict:
    """An SD3.5 unet_config as comfy/model_detection.py makes it from a checkpoint, shrunk."""
    return dict(in_channels=16, patch_size=2, out_channels=16, depth=DEPTH, input_size=None,
                adm_in_channels=64,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 64, "out_features": 64 * DEPTH}},
                num_patches=POS_EMBED * POS_EMBED, pos_embed_max_size=POS_EMBED,
                qk_norm="rms", pos_embed_scaling_factor=None,
                x_block_self_attn_layers=list(x_block_self_attn_layers))


#: SD3.5 Medium: MMDiT-X, the first blocks with the extra image self-attention (real: 0-12 of 24).
SD35_MEDIUM_CONFIG = _config([0, 1])
#: SD3.5 Large: plain joint blocks with RMS q/k norms.
SD35_LARGE_CONFIG = _config([])


def sd3_model(config: dict, scale: float = 0.05):
    """The tiny SD3.5 as a ModelPatcher."""
    return model_from_config("SD3", config, scale)


@register("sd3.5", "SD3.5 Medium: MMDiT-X, 3 joint blocks (0-1 with image self-attention), 192 "
                   "wide, RMS q/k norm, 16-channel latents")
def sd35_medium() -> Tiny:
    return Tiny("sd3", sd3_model(SD35_MEDIUM_CONFIG), demo_clip(), vae(16))


@register("sd3.5-large", "SD3.5 Large: 3 joint blocks, 192 wide, RMS q/k norm, 16-channel latents")
def sd35_large() -> Tiny:
    return Tiny("sd3", sd3_model(SD35_LARGE_CONFIG), demo_clip(), vae(16))

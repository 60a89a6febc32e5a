"""Flux-family tiny models: Flux.1-dev (guidance embedding, pooled text vector)."""
from __future__ import annotations

import dataclasses

from . import Tiny, Unavailable, demo_clip, model_from_config, register, vae

#: A tiny Flux.1-dev: 64 wide, 2 heads of 32, 2 double-stream blocks and one single-stream block,
#: patch size 2 on 16-channel latents; text input 64 wide (the demo CLIP's).
FLUX1_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64,
                    context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2,
                    depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
                    qkv_bias=True, guidance_embed=True)


def flux1_config() -> dict:
    try:
        import comfy.ldm.flux.model as fm
    except ImportError as e:
        raise Unavailable(f"this ComfyUI has no Flux classes ({e})") from None
    cfg = dict(FLUX1_CONFIG)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(fm.FluxParams)}:
        # ComfyUI 0.33 made this a required field; its model detection sets [] for Flux.1 (text
        # tokens get no positional ids), which is what a real Flux.1 checkpoint loads with.
        cfg["txt_ids_dims"] = []
    return cfg


def flux1_model(scale: float = 0.05):
    return model_from_config("Flux", flux1_config(), scale)


@register("flux", "Flux.1-dev: 2 double + 1 single block, 64 wide, guidance embedding, pooled vector")
def flux1() -> Tiny:
    return Tiny("flux", flux1_model(), demo_clip(), vae(16))

"""Z-Image tiny model: ComfyUI's own ``supported_models.ZImage`` / ``model_base.Lumina2``
(``comfy.ldm.lumina.model.NextDiT``: ``context_refiner`` layers on the caption alone,
``noise_refiner`` layers on the image alone, then joint ``layers`` where caption and image tokens
share one weight set; Flux's 16-channel latent format).

ComfyUI's model detection gives a real Z-Image checkpoint (``comfy/model_detection.py``, "Z
image"): ``dim`` 3840 and ``cap_feat_dim`` 2560 (Qwen3-4B) from ``cap_embedder.1.weight``,
``n_layers`` 30 counted, 30 heads and 30 K/V heads (head width 128), rotary axes 32/48/48 with
theta 256, FFN multiplier 8/3, ``z_image_modulation``, ``time_scale`` 1000, patch size 2 on 16
channels, ``qk_norm``, and ``pad_tokens_multiple`` 32 when the checkpoint has a
``cap_pad_token``; ``n_refiner_layers`` is the class default, 2.

The tiny model keeps all of that except the sizes: 256 wide (the narrowest Z-Image's modulation
takes: its timestep embedder always makes 256 channels and each layer reads min(dim, 256) of
them), 2 heads of 128 (Z-Image's own head width and rotary axes), 2 joint layers, and a caption
input 64 wide, the demo CLIP's. The caption and image are padded to 32 tokens as in the real one,
so the pad tokens are exercised too."""
from __future__ import annotations

from . import Tiny, Unavailable, demo_clip, model_from_config, register, vae

#: What model detection gives for a real Z-Image checkpoint, shrunk (dim 3840 -> 256, 30 -> 2
#: heads of 128, 30 -> 2 joint layers, caption input 2560 -> 64).
ZIMAGE_CONFIG = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=64,
                     n_layers=2, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
                     axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                     z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)


def zimage_model(scale: float = 0.05, **overrides):
    import comfy.supported_models as sm
    if not hasattr(sm, "ZImage"):
        raise Unavailable("this ComfyUI has no supported_models.ZImage, Z-Image's config (with "
                          "comfy.ldm.lumina's NextDiT; ComfyUI 0.3.75 and 0.33 have them)")
    return model_from_config("ZImage", dict(ZIMAGE_CONFIG, **overrides), scale)


@register("zimage", "Z-Image (Turbo's design): 2 caption-refiner + 2 noise-refiner + 2 joint "
                    "layers, 256 wide (2 heads of 128), tokens padded to 32, 16-channel latents")
def zimage() -> Tiny:
    return Tiny("zimage", zimage_model(), demo_clip(), vae(16))

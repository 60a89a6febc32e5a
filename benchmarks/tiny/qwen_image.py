"""Qwen-Image tiny model: ComfyUI's own ``supported_models.QwenImage`` / ``model_base.QwenImage``
(``comfy.ldm.qwen_image``: double-stream ``transformer_blocks`` with a text stream of its own,
RoPE on text and image tokens, Wan 2.1's 16-channel latent format, whose latents are 5-D
``(B, 16, 1, H, W)``: an image is one frame).

ComfyUI's model detection reads three things from a real checkpoint: ``image_model``,
``in_channels`` (64: 16 latent channels x a 2x2 patch) and ``num_layers`` (60); everything else
is the model class's defaults (24 heads of 128, a 3584-wide Qwen2.5-VL text input, RoPE axes
16/56/56). The tiny model keeps the detected keys and shrinks the defaults: 2 heads of 32
(64 wide), 3 blocks, RoPE axes 8/12/12 (they must sum to the head width), and a 64-wide text
input, the demo CLIP's."""
from __future__ import annotations

import torch

from . import Tiny, Unavailable, demo, demo_clip, model_from_config, register, vae

#: What model detection gives for a real Qwen-Image checkpoint (num_layers shrunk from 60), plus
#: the class defaults it leaves alone, shrunk.
QWEN_IMAGE_CONFIG = dict(image_model="qwen_image", in_channels=64, num_layers=3,
                         attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                         axes_dims_rope=(8, 12, 12))


def qwen_image_model(scale: float = 0.05):
    """The tiny Qwen-Image as a ModelPatcher (Unavailable on a ComfyUI without it)."""
    return model_from_config("QwenImage", QWEN_IMAGE_CONFIG, scale)


#: A Wan 2.1 VAE (the VAE real Qwen-Image checkpoints ship, a causal 3-D VAE: 5-D latents; a
#: batch of images given to its ``encode`` is one video) shrunk to 4 base channels. ComfyUI's
#: ``comfy.sd.VAE`` recognises it from its state dict and fixes the rest of its design.
WAN21_VAE_DIM = 4


def wan21_vae(seed: int = 3):
    """A real ComfyUI VAE of Qwen-Image's kind (Wan 2.1, 16 channels, 8x down), seeded weights."""
    import comfy.sd
    try:
        from comfy.ldm.wan.vae import WanVAE
    except ImportError as e:
        raise Unavailable(f"this ComfyUI has no Wan 2.1 VAE ({e})") from None
    with torch.inference_mode():
        probe = WanVAE(dim=WAN21_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                       attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
        demo()._seeded_init_(probe, seed)
        return comfy.sd.VAE(sd=probe.state_dict())


@register("qwen_image", "Qwen-Image: 3 double-stream blocks, 64 wide (2 heads of 32), text RoPE, "
                        "5-D 16-channel latents")
def qwen_image() -> Tiny:
    return Tiny("qwen_image", qwen_image_model(), demo_clip(), vae(16),
                extra={"wan21_vae": wan21_vae})

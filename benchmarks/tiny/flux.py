"""Flux-family tiny models: Flux.1-dev (guidance embedding, pooled text vector), Flux.2-dev (global
modulation, 128-channel latents from a batch-normed 2x2-patch VAE, no pooled vector) and Chroma
(modulation from the distilled-guidance approximator, no pooled vector).

Each config is what ComfyUI's model detection (``comfy/model_detection.py``) produces for the real
checkpoint, with the sizes shrunk: 64 wide, 2 heads of 32, 2 double-stream blocks and one
single-stream block, text input 64 wide (the demo CLIP's). Everything else (axes, theta, MLP
type, biases, patch size, latent channels, the approximator's input) is the real one's."""
from __future__ import annotations

import copy
import dataclasses

import torch

from . import Tiny, Unavailable, demo, demo_clip, model_from_config, register, vae

#: A tiny Flux.1-dev: 64 wide, 2 heads of 32, 2 double-stream blocks and one single-stream block,
#: patch size 2 on 16-channel latents; text input 64 wide (the demo CLIP's).
FLUX1_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64,
                    context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2,
                    depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
                    qkv_bias=True, guidance_embed=True)

#: A tiny Flux.2-dev. Detection of the real one (6144 wide, 8 double + 48 single blocks, Mistral
#: text 15360 wide): four rotary axes of 32 (here 8; heads = width / sum(axes)), theta 2000, MLP
#: ratio 3 with SiLU-gated MLPs, no biases, global modulation (one modulation per stream for all
#: blocks, no per-block ``txt_mod``), patch size 1 on 128-channel latents, text position ids on
#: axis 3 (``txt_ids_dims=[3]``), no pooled vector (``vec_in_dim`` None), guidance embedding.
FLUX2_CONFIG = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                    context_in_dim=64, hidden_size=64, mlp_ratio=3.0, num_heads=2, depth=2,
                    depth_single_blocks=1, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
                    qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True,
                    mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                    ref_index_scale=10.0, yak_mlp=False, txt_norm=False)

#: A tiny Chroma. Detection of the real one (3072 wide, 19 double + 38 single blocks, T5 4096
#: wide): Flux.1's axes and theta, patch size 2 with the patchified channels as ``in_channels``
#: (64 = 16 x 2 x 2), no pooled vector, and the approximator (``distilled_guidance_layer``: 64
#: inputs = timestep 16 + guidance 16 + modulation index 32, ``out_dim`` = the width, here 2
#: layers of 64 instead of 5 of 5120).
CHROMA_CONFIG = dict(image_model="chroma", in_channels=64, out_channels=64, vec_in_dim=None,
                     context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2,
                     depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
                     qkv_bias=True, txt_ids_dims=[], in_dim=64, out_dim=64, hidden_dim=64,
                     n_layers=2)


def _flux_params():
    try:
        import comfy.ldm.flux.model as fm
    except ImportError as e:
        raise Unavailable(f"this ComfyUI has no Flux classes ({e})") from None
    return {f.name for f in dataclasses.fields(fm.FluxParams)}


def flux1_config() -> dict:
    cfg = dict(FLUX1_CONFIG)
    if "txt_ids_dims" in _flux_params():
        # ComfyUI 0.33 made this a required field; its model detection sets [] for Flux.1 (text
        # tokens get no positional ids), which is what a real Flux.1 checkpoint loads with.
        cfg["txt_ids_dims"] = []
    return cfg


def flux1_model(scale: float = 0.05):
    return model_from_config("Flux", flux1_config(), scale)


def flux2_model(scale: float = 0.1):
    """A tiny Flux.2-dev MODEL (``supported_models.Flux2``), or :class:`Unavailable`. Weights of
    std 0.1 (Flux.1's tiny model: 0.05): without biases and with gated MLPs the model's velocity
    has about unit std then (0.4 at 0.05), as a trained flow model's (noise minus image) has;
    Flux.2's latents are used as the VAE makes them (no scale or shift), so the Seed Search
    objective is read at that scale."""
    missing = {"global_modulation", "txt_ids_dims", "mlp_silu_act", "ops_bias"} - _flux_params()
    if missing:
        raise Unavailable(f"this ComfyUI's Flux classes have no Flux.2 options ({', '.join(sorted(missing))})")
    return model_from_config("Flux2", FLUX2_CONFIG, scale)


def chroma_model(scale: float = 0.05):
    """A tiny Chroma MODEL (``supported_models.Chroma``), or :class:`Unavailable`."""
    try:
        import comfy.ldm.chroma.model  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"this ComfyUI has no Chroma classes ({e})") from None
    return model_from_config("Chroma", CHROMA_CONFIG, scale)


def flux2_vae(seed: int = 3):
    """A VAE of the Flux.2 VAE's design: an AutoencoderKL of 32 latent channels whose latents are
    folded into 2x2 patches and batch-normed (``batch_norm_latent``), so 128 channels at 1/16 of
    the image size, as ComfyUI loads the real one (``bn.running_mean`` in its state dict: latent
    channels x 4, down/upscale ratio x 2). The demo VAE's tiny widths; seeded weights and
    running statistics."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    d = demo()
    params = copy.deepcopy(d.VAE_PARAMS)
    params["embed_dim"] = params["ddconfig"]["z_channels"] = 32
    params["ddconfig"]["batch_norm_latent"] = True
    with torch.inference_mode():
        probe = AutoencoderKL(**params)
        if getattr(probe, "bn", None) is None:
            raise Unavailable("this ComfyUI's AutoencoderKL has no batch_norm_latent (Flux.2's VAE)")
        d._seeded_init_(probe, seed)
        g = torch.Generator().manual_seed(seed + 1)
        probe.bn.running_mean.copy_(torch.randn(probe.bn.running_mean.shape, generator=g) * 0.1)
        probe.bn.running_var.copy_(torch.rand(probe.bn.running_var.shape, generator=g) + 0.5)
        v = comfy.sd.VAE(sd=probe.state_dict(), config={"params": params})
    v.latent_channels = 32 * 4
    v.downscale_ratio = v.upscale_ratio = 16
    return v


@register("flux", "Flux.1-dev: 2 double + 1 single block, 64 wide, guidance embedding, pooled vector")
def flux1() -> Tiny:
    return Tiny("flux", flux1_model(), demo_clip(), vae(16))


@register("flux2", "Flux.2-dev: 2 double + 1 single block, 64 wide, global modulation, "
                   "128-channel latents (batch-normed 2x2-patch VAE), guidance embedding, no pooled vector")
def flux2() -> Tiny:
    return Tiny("flux2", flux2_model(), demo_clip(), flux2_vae())


@register("chroma", "Chroma: 2 double + 1 single block, 64 wide, modulation from the approximator, "
                    "16-channel latents, no pooled vector")
def chroma() -> Tiny:
    return Tiny("chroma", chroma_model(), demo_clip(), vae(16))

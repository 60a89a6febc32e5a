"""The bundled demo models: tiny text-to-image models built from ComfyUI's own classes.

They let every Concept Lab capability run, and be measured, on a CPU with nothing to download.
The UNet model is an SD1.x-architecture latent diffusion model (``comfy.supported_models.SD15``
with a small ``unet_config``), a tiny CLIP text encoder (ComfyUI's ``SDClipModel`` with
ComfyUI's shipped CLIP tokenizer) and a tiny ``AutoencoderKL`` VAE (8x downscale, 4 latent
channels, so ComfyUI's stock EmptyLatentImage / VAEDecode work unchanged).

Weights come from ``demo/<name>.safetensors`` in this pack when present (trained by
``python -m benchmarks.train``); otherwise the architecture is built with a deterministic,
seeded initialisation and the node says so in its log line.
"""
from __future__ import annotations

import json
import logging
import os

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models

from ._runtime import fail

log = logging.getLogger("ConceptLab")

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(PACK_ROOT, "demo")

TEXT_CONFIG = os.path.join(DEMO_DIR, "clip_tiny.json")
TEXT_DIM = 64

UNET_CONFIG = {
    "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": TEXT_DIM,
    "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
    "use_checkpoint": False, "use_spatial_transformer": True, "legacy": False,
    "num_heads": 8, "num_head_channels": -1,
}

VAE_PARAMS = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0, "attn_resolutions": [],
        "dropout": 0.0,
    },
}

DEMO_MODELS = {
    "digits-unet (SD1.x architecture)": "digits_unet",
}


# --------------------------------------------------------------------------------------------
# text encoder plumbing (a CLIP target ComfyUI's comfy.sd.CLIP accepts, old and new)
# --------------------------------------------------------------------------------------------
class _TinyClipL(comfy.sd1_clip.SDClipModel):
    def __init__(self, *args, **kwargs):
        kwargs["textmodel_json_config"] = TEXT_CONFIG
        kwargs.pop("version", None)
        super().__init__(*args, **kwargs)


class _TinyClip(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, **kwargs):
        kwargs["clip_model"] = _TinyClipL
        super().__init__(device=device, dtype=dtype, **kwargs)


class _ClipTarget:
    params: dict = {}
    clip = _TinyClip
    tokenizer = comfy.sd1_clip.SD1Tokenizer


# --------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------
def _seeded_init_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic initialisation (ComfyUI's ops skip weight init on purpose)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if not p.is_floating_point():
            continue
        if p.ndim >= 2:
            fan_in = p[0].numel()
            vals = torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5
        elif name.endswith("bias"):
            vals = torch.zeros(p.shape)
        else:
            vals = torch.ones(p.shape)
        p.copy_(vals.to(p.dtype))


def demo_weights_path(key: str) -> str:
    return os.path.join(DEMO_DIR, f"{key}.safetensors")


def _split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def build_demo_model(key: str = "digits_unet"):
    """(MODEL, CLIP, VAE, info) for a demo model, built through ComfyUI's own classes."""
    import safetensors.torch

    path = demo_weights_path(key)
    trained = os.path.isfile(path)
    sd = safetensors.torch.load_file(path) if trained else None

    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()

    cfg = comfy.supported_models.SD15(dict(UNET_CONFIG))
    base = cfg.get_model({})
    unet = base.diffusion_model
    if sd is not None:
        unet.load_state_dict(_split(sd, "unet."), strict=True)
    else:
        _seeded_init_(unet, 1)
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)

    clip = comfy.sd.CLIP(target=_ClipTarget)
    if sd is not None:
        clip.load_sd(_split(sd, "clip."))
    else:
        _seeded_init_(clip.cond_stage_model, 2)

    vae_sd = _split(sd, "vae.") if sd is not None else None
    if vae_sd is None:
        from comfy.ldm.models.autoencoder import AutoencoderKL
        # Build once just to obtain a deterministic state dict with the right keys.
        probe = AutoencoderKL(**VAE_PARAMS)
        _seeded_init_(probe, 3)
        vae_sd = probe.state_dict()
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": VAE_PARAMS})

    info = {"name": key, "trained": trained, "family": "sd1", "weights": path if trained else None}
    if not trained:
        log.warning("ConceptLab: demo model %s has no trained weights at %s; using a seeded "
                    "untrained initialisation (architecture preview only).", key, path)
    return model, clip, vae, info


# --------------------------------------------------------------------------------------------
# node
# --------------------------------------------------------------------------------------------
class ConceptLabLoadDemoModel:
    DESCRIPTION = ("Loads one of Concept Lab's bundled demo models (tiny, CPU-friendly, nothing to "
                   "download) as ordinary MODEL, CLIP and VAE outputs, so every Concept Lab node "
                   "and ComfyUI's stock samplers can be tried in minutes. Use 64x64 latents.")
    CATEGORY = "ConceptLab/demo"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("model", "clip", "vae", "info")
    OUTPUT_TOOLTIPS = ("The demo diffusion model.", "Its text encoder.", "Its VAE.",
                       "JSON describing which demo model was loaded and from where.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "demo_model": (list(DEMO_MODELS), {
                "default": next(iter(DEMO_MODELS)),
                "tooltip": "Which bundled demo model to load."}),
        }}

    def load(self, demo_model):
        key = DEMO_MODELS.get(demo_model)
        if key is None:
            raise fail("ConceptLab Load Demo Model", f"Unknown demo model '{demo_model}'.",
                       f"Pick one of: {', '.join(DEMO_MODELS)}.")
        model, clip, vae, info = build_demo_model(key)
        return (model, clip, vae, json.dumps(info))


NODE_CLASS_MAPPINGS = {"ConceptLabLoadDemoModel": ConceptLabLoadDemoModel}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptLabLoadDemoModel": "ConceptLab Load Demo Model"}

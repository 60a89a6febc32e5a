"""Tiny models of every family the pack supports, built from the ComfyUI's own config and model
classes with seeded random weights: what the tests and ``python -m benchmarks families`` run the
capabilities on. Random weights are fine for mechanics (bit-identical images, gradients, patches);
quality is measured in the digits world.

Each family's builder lives in a module of its own (``flux.py``, ``sd3.py``, ``qwen_image.py``,
``zimage.py``) and registers itself with :func:`register`. A builder returns a :class:`Tiny`: the
MODEL (a ModelPatcher), a CLIP whose conditioning the model takes (the demo CLIP, 64 wide, unless
the family needs another), a VAE whose latents the model denoises, and the latent size to sample.

Import after ``comfy_runtime.bootstrap()`` (the builders import ComfyUI).
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import comfy_runtime as cr

#: family -> (builder, what it is). Filled by the family modules.
BUILDERS: dict[str, tuple[Callable[[], "Tiny"], str]] = {}
#: The family modules, imported by :func:`families`.
MODULES = ("flux", "sd3", "qwen_image", "zimage")


@dataclass
class Tiny:
    family: str
    model: object                 # ModelPatcher
    clip: object                  # comfy.sd.CLIP
    vae: object                   # comfy.sd.VAE
    width: int = 64               # latent image size in pixels (square)
    height: int = 64
    what: str = ""
    extra: dict = field(default_factory=dict)


class Unavailable(RuntimeError):
    """This ComfyUI cannot build the family's tiny model (its classes are missing or take other
    parameters, e.g. ComfyUI 0.3.75's Chroma and Flux.2)."""


def register(family: str, what: str):
    def deco(fn):
        BUILDERS[family] = (fn, what)
        return fn
    return deco


def families() -> dict:
    """Every registered family: ``{family: what}`` (imports the family modules once)."""
    for m in MODULES:
        importlib.import_module(f"{__name__}.{m}")
    return {k: v[1] for k, v in BUILDERS.items()}


def build(family: str) -> Tiny:
    families()
    if family not in BUILDERS:
        raise KeyError(f"no tiny model for {family!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[family][0]()


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def demo():
    return cr.pack_module("nodes.demo")


def seeded_(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Seeded normal weights of std ``scale`` (ComfyUI's ops leave weights uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for q in module.parameters():
            q.copy_(torch.randn(q.shape, generator=g) * scale)


def patcher(base) -> object:
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def model_from_config(config_class: str, unet_config: dict, scale: float = 0.05, seed: int = 1):
    """``comfy.supported_models.<config_class>(unet_config)``'s model, seeded, as a ModelPatcher."""
    import comfy.supported_models as sm
    if not hasattr(sm, config_class):
        raise Unavailable(f"ComfyUI {cr.comfy_version()} has no supported_models.{config_class}")
    mc = getattr(sm, config_class)(dict(unet_config))
    with torch.inference_mode():
        try:
            base = mc.get_model({})
        except TypeError as e:          # an older ComfyUI's model class takes other parameters
            raise Unavailable(f"ComfyUI {cr.comfy_version()}'s {config_class} model takes other "
                              f"parameters than this tiny model's ({e})") from e
    seeded_(base.diffusion_model, scale, seed)
    with torch.inference_mode():   # MMDiT's pos_embed is a buffer made with torch.empty (checkpoints fill it)
        g = torch.Generator().manual_seed(seed + 1)
        for name, b in base.diffusion_model.named_buffers():
            if name.endswith("pos_embed"):
                b.copy_(torch.randn(b.shape, generator=g) * scale)
    return patcher(base)


def demo_clip():
    """The demo models' tiny CLIP (64-wide conditioning, a 64-wide pooled vector)."""
    with torch.inference_mode():
        _, clip, _, _ = demo().build_demo_model("digits_unet")
    return clip


def vae(latent_channels: int, seed: int = 3):
    """A real ComfyUI VAE of the demo VAE's design (AutoencoderKL, 8x down) with
    ``latent_channels`` channels; seeded random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    d = demo()
    params = copy.deepcopy(d.VAE_PARAMS)
    params["embed_dim"] = params["ddconfig"]["z_channels"] = latent_channels
    with torch.inference_mode():
        probe = AutoencoderKL(**params)
        d._seeded_init_(probe, seed)
        out = comfy.sd.VAE(sd=probe.state_dict(), config={"params": params})
    # ComfyUI reads the count off a checkpoint's weights, but leaves 4 for a VAE given a config
    out.latent_channels = latent_channels
    return out

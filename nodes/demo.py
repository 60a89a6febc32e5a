"""The bundled demo models: tiny text-to-image models built from ComfyUI's own classes.

They let every Concept Lab capability run, and be measured, on a CPU with nothing to download.

* ``digits_unet``: an SD1.x-architecture latent diffusion model (ComfyUI's SD1.x UNet with a small
  ``unet_config``, v-prediction), a tiny CLIP text encoder (ComfyUI's ``SDClipModel`` with
  ComfyUI's shipped CLIP tokenizer) and a tiny ``AutoencoderKL`` VAE (8x downscale, 4 latent
  channels, so ComfyUI's stock EmptyLatentImage / VAEDecode work unchanged).
* ``digits_vision``: a CLIP_VISION model for the same world: ComfyUI's own CLIP vision transformer
  (``comfy.clip_vision.ClipVisionModel``, 64 px input, 8 px patches, 3 layers 64 wide) trained to
  embed a digit image by its class (a cosine classifier on the projected embedding, trained on
  the world's training handwriting only). It stands in for a real CLIP vision model wherever a
  node takes CLIP_VISION (Seed Search's semantic loss; ComfyUI's own CLIPVisionEncode, which
  reads the input size from the config).
* ``digits_dit``: ComfyUI's SD3 MMDiT (joint text/image attention, rectified flow) with patch
  size 1 on the same latents, sharing the text encoder and VAE of ``digits_unet``.

Weights come from ``demo/<name>.safetensors`` in this pack (trained by
``python -m benchmarks train``, see ``benchmarks/world/train.py``); when a file is missing the
architecture is built with a deterministic, seeded initialisation and the node says so in its
log line.
"""
from __future__ import annotations

import json
import logging
import os

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models

from ._runtime import fail
from ._schema import combo, io, schema

log = logging.getLogger("ConceptLab")

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(PACK_ROOT, "demo")

TEXT_CONFIG = os.path.join(DEMO_DIR, "clip_tiny.json")
VISION_CONFIG = os.path.join(DEMO_DIR, "digits_vision.json")
TEXT_DIM = 64

UNET_CONFIG = {
    "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": TEXT_DIM,
    "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
    "use_checkpoint": False, "use_spatial_transformer": True, "legacy": False,
    "num_heads": -1, "num_head_channels": 16,
}

VAE_PARAMS = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0, "attn_resolutions": [],
        "dropout": 0.0,
    },
}

#: The MMDiT demo model: ComfyUI's SD3 transformer (``comfy.ldm.modules.diffusionmodules.mmdit``,
#: joint text/image attention) with patch size 1 on the same 4-channel latents as the UNet model, so
#: each of the 8x8 latent pixels is one image token. ``depth`` fixes the width (64 x depth, one 64-wide
#: head per unit of depth, ComfyUI's MMDiT convention); ``num_blocks`` is the number of joint blocks.
#: Flux is not used because ComfyUI 0.3.68's Flux un-patchifies with a hard-coded patch size of 2.
DIT_CONFIG = {
    "in_channels": 4, "out_channels": 4, "patch_size": 1, "depth": 1, "num_blocks": 4,
    "mlp_ratio": 4.0, "adm_in_channels": TEXT_DIM, "qkv_bias": True,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": TEXT_DIM, "out_features": 64}},
    "pos_embed_max_size": None, "num_patches": None,
}
DIT_SHIFT = 1.0

#: CFG scales the demo models are measured at (python -m benchmarks world) and that the example
#: workflows use. High CFG empties the canvas: a one-digit prompt has fewer digits than the
#: unconditional average, and guidance extrapolates that difference.
DEFAULT_CFG = {"digits_unet": 3.0, "digits_dit": 3.0}

#: The node's menu values: short and stable, because API scripts type them. What each model is
#: goes in the tooltip (DEMO_MODEL_TOOLTIP), never in the value.
DEMO_MODELS = {
    "digits-unet": "digits_unet",
    "digits-dit": "digits_dit",
}
#: Values earlier releases used, kept loading and running: workflows saved with them (UI and API
#: format) still hold them. ConceptLab Load Demo Model's VALIDATE_INPUTS accepts them (ComfyUI
#: then skips its own "value not in list" check for that input) and load() maps them.
LEGACY_DEMO_MODELS = {
    "digits-unet (SD1.x architecture)": "digits-unet",
    "digits-dit (SD3 MMDiT architecture, ComfyUI 0.3.x)": "digits-dit",
}
DEMO_MODEL_TOOLTIP = (
    "Which bundled demo model to load. digits-unet: an SD1.x-architecture UNet (v-prediction), "
    "every ComfyUI version. digits-dit: an SD3 MMDiT (rectified flow), ComfyUI 0.3.x and newer. "
    "Both share a tiny CLIP text encoder and VAE; use a 64x64 latent, about 20 steps, CFG 3.")


def demo_model_key(value) -> str | None:
    """The weights key ('digits_unet', 'digits_dit') of a menu value, current or legacy."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return DEMO_MODELS.get(LEGACY_DEMO_MODELS.get(value, value))


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


def demo_weights_path(key: str, directory: str | None = None) -> str:
    return os.path.join(directory or DEMO_DIR, f"{key}.safetensors")


def _metadata(path: str) -> dict:
    """The JSON-decoded safetensors metadata of a demo weights file."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def dit_model_config():
    """ComfyUI model config of the DiT demo model: SD3's MMDiT on the SD1.x 4-channel latents."""
    import comfy.latent_formats
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    class DigitsMMDiTNet(OpenAISignatureMMDITWrapper):
        """ComfyUI's MMDiT, unchanged except for the patch-grid size: ComfyUI computes it as
        (h + 1) // p, right only for p == 2; here it is ceil(h / p) for any patch size."""

        def _grid_hw(self, hw):
            p = self.x_embedder.patch_size[0]
            return tuple(-(-int(v) // p) * p - 1 for v in hw)  # ComfyUI's (v + 1) // p = ceil(v / p)

        def cropped_pos_embed(self, hw, device=None):
            return super().cropped_pos_embed(self._grid_hw(hw), device=device)

        def unpatchify(self, x, hw=None):
            return super().unpatchify(x, hw=None if hw is None else self._grid_hw(hw))

    class DigitsSD3(comfy.model_base.SD3):
        def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
            comfy.model_base.BaseModel.__init__(self, model_config, model_type, device=device,
                                                unet_model=DigitsMMDiTNet)

    class DigitsMMDiT(comfy.supported_models.SD3):
        unet_config = dict(DIT_CONFIG)
        sampling_settings = {"shift": DIT_SHIFT}
        latent_format = comfy.latent_formats.SD15
        memory_usage_factor = 1.0

        def get_model(self, state_dict, prefix="", device=None):
            return DigitsSD3(self, device=device)

    return DigitsMMDiT(dict(DIT_CONFIG))


def unet_model_config():
    return comfy.supported_models.SD15(dict(UNET_CONFIG))


def _diffusion_base(key: str, meta: dict):
    """The ComfyUI BaseModel (untrained) of a demo model."""
    if key == "digits_dit":
        return dit_model_config().get_model({})
    prediction = meta.get("prediction", "eps")
    model_type = {"eps": comfy.model_base.ModelType.EPS,
                  "v": comfy.model_base.ModelType.V_PREDICTION}.get(prediction)
    if model_type is None:
        raise fail("ConceptLab Load Demo Model", f"The demo weights declare an unknown prediction type "
                   f"{prediction!r}.", "Retrain with python -m benchmarks train, or restore the shipped file.")
    return comfy.model_base.BaseModel(unet_model_config(), model_type=model_type)


def build_text_and_vae(sd):
    """CLIP and VAE of the demo models (shared by both), from a ``clip.*`` / ``vae.*`` state dict."""
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
    return clip, vae


def build_demo_model(key: str = "digits_unet", directory: str | None = None):
    """(MODEL, CLIP, VAE, info) for a demo model, built through ComfyUI's own classes.

    ``digits_unet`` holds the UNet, the text encoder and the VAE; ``digits_dit`` holds only the
    MMDiT and shares the text encoder and VAE of ``digits_unet`` (it was trained on them, frozen)."""
    import safetensors.torch

    path = demo_weights_path(key, directory)
    trained = os.path.isfile(path)
    sd = safetensors.torch.load_file(path) if trained else None
    meta = _metadata(path) if trained else {}
    prefix = "dit." if key == "digits_dit" else "unet."

    base = _diffusion_base(key, meta)
    if sd is not None:
        base.diffusion_model.load_state_dict(_split(sd, prefix), strict=True)
    else:
        _seeded_init_(base.diffusion_model, 1)
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())

    shared_path = demo_weights_path("digits_unet", directory)
    shared = sd if key == "digits_unet" else (
        safetensors.torch.load_file(shared_path) if os.path.isfile(shared_path) else None)
    clip, vae = build_text_and_vae(shared)

    family = "sd3" if key == "digits_dit" else "sd1"
    info = {"name": key, "trained": trained, "family": family, "weights": path if trained else None,
            "recommended": {"width": 64, "height": 64, "cfg": DEFAULT_CFG[key], "steps": 20}}
    if not trained:
        log.warning("ConceptLab: demo model %s has no trained weights at %s; using a seeded "
                    "untrained initialisation (architecture preview only).", key, path)
    return model, clip, vae, info


def build_demo_clip_vision(directory: str | None = None):
    """(CLIP_VISION, info) of the digits world: ComfyUI's ``ClipVisionModel`` with the tiny
    ``demo/digits_vision.json`` config and the weights of ``demo/digits_vision.safetensors``."""
    import comfy.clip_vision
    import safetensors.torch

    cv = comfy.clip_vision.ClipVisionModel(VISION_CONFIG)
    path = demo_weights_path("digits_vision", directory)
    trained = os.path.isfile(path)
    if trained:
        sd = _split(safetensors.torch.load_file(path), "vision.")
        missing, unexpected = cv.load_sd(sd)
        if missing or unexpected:
            raise fail("ConceptLab Load Demo CLIP Vision",
                       f"{path} does not match the demo CLIP vision config (missing {list(missing)[:3]}, "
                       f"unexpected {list(unexpected)[:3]}).",
                       "Restore the shipped file, or retrain it with python -m benchmarks train --model vision.")
    else:
        with torch.no_grad():
            _seeded_init_(cv.model, 4)
        log.warning("ConceptLab: demo CLIP vision model has no trained weights at %s; using a seeded "
                    "untrained initialisation (architecture preview only).", path)
    info = {"name": "digits_vision", "trained": trained, "weights": path if trained else None,
            "config": os.path.basename(VISION_CONFIG)}
    return cv, info


# --------------------------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------------------------
def _unknown_demo_model(value):
    return fail("ConceptLab Load Demo Model", f"Unknown demo model '{value}'.",
                f"Pick one of: {', '.join(DEMO_MODELS)}.")


class ConceptLabLoadDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabLoadDemoModel", display_name="ConceptLab Load Demo Model",
            category="ConceptLab/demo",
            description=("Loads one of Concept Lab's bundled demo models (tiny, CPU-friendly, nothing to "
                         "download) as ordinary MODEL, CLIP and VAE outputs, so every Concept Lab node "
                         "and ComfyUI's stock samplers can be tried in minutes. Both were trained on this "
                         "pack's digits world (real handwritten digits, coloured and placed by the "
                         "prompt, e.g. 'a red seven on the left and a blue two on the right'). "
                         "digits-unet is an SD1.x-architecture v-prediction model; digits-dit is an SD3 "
                         "MMDiT (flow) model and needs ComfyUI 0.3.x. Use a 64x64 empty latent, about 20 "
                         "steps and CFG 3 (high CFG empties the canvas)."),
            search_aliases=["demo model", "digits", "tiny model", "digits-unet", "digits-dit"],
            inputs=[combo("demo_model", list(DEMO_MODELS), default=next(iter(DEMO_MODELS)),
                                   tooltip=DEMO_MODEL_TOOLTIP)],
            outputs=[io.Model.Output(display_name="model", tooltip="The demo diffusion model."),
                     io.Clip.Output(display_name="clip", tooltip="Its text encoder."),
                     io.Vae.Output(display_name="vae", tooltip="Its VAE."),
                     io.String.Output(display_name="info",
                                      tooltip="JSON describing which demo model was loaded and from where.")])

    @classmethod
    def validate_inputs(cls, demo_model):
        """Accept the menu's values and the long values of earlier releases (old workflows);
        ComfyUI skips its own combo check for an input this method takes, in every version."""
        if demo_model_key(demo_model) is None:
            return _unknown_demo_model(demo_model).args[0]
        return True

    @classmethod
    def execute(cls, demo_model):
        key = demo_model_key(demo_model)
        if key is None:
            raise _unknown_demo_model(demo_model)
        model, clip, vae, info = build_demo_model(key)
        return io.NodeOutput(model, clip, vae, json.dumps(info))


class ConceptLabLoadDemoCLIPVision(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabLoadDemoCLIPVision", display_name="ConceptLab Load Demo CLIP Vision",
            category="ConceptLab/demo",
            description=("Loads the digits world's bundled CLIP vision model (tiny, nothing to download): "
                         "ComfyUI's own CLIP vision transformer, trained on the world's training handwriting "
                         "so that its image embedding tells the ten digits apart. Connect it wherever a "
                         "CLIP_VISION goes, for example to ConceptLab Seed Search / Seed Rank (their semantic "
                         "loss compares it against the references) or to ComfyUI 0.3.x's CLIPVisionEncode (older "
                         "ComfyUI resizes every image to 224 px there and cannot run it). It only understands "
                         "digits-world images (64x64, coloured digits on black)."),
            search_aliases=["demo clip vision", "clip vision", "image encoder", "digits"],
            inputs=[],
            outputs=[io.ClipVision.Output(display_name="clip_vision",
                                          tooltip="The demo CLIP vision model."),
                     io.String.Output(display_name="info", tooltip="JSON describing which weights were loaded.")])

    @classmethod
    def execute(cls):
        cv, info = build_demo_clip_vision()
        return io.NodeOutput(cv, json.dumps(info))


#: The bundled picture sets (demo/images/<set>/NN.png, written by benchmarks/showcase.py:
#: write_demo_images): real handwriting of held-out writers, never used in training.
DEMO_IMAGES_DIR = os.path.join(DEMO_DIR, "images")
DEMO_IMAGE_SETS = {
    "eight-references": "three held-out writers' eights (white, centred): references for Seed Search "
                        "and Seed Rank, which make the demo models draw their rare class 'an eight'",
    "three-subject": "one held-out writer's three (sample 1750) six times, in other colours, places and "
                     "sizes: a subject for Concept Neurons Extract ('a three')",
    "seven-subject": "one held-out writer's seven (sample 1753) six times: a second subject ('a seven')",
}
LOAD_IMAGES = "ConceptLab Load Demo Images"


def load_demo_images(image_set: str) -> torch.Tensor:
    """(B, 64, 64, 3) float images of a bundled picture set, as LoadImage gives them."""
    import numpy as np
    from PIL import Image
    if image_set not in DEMO_IMAGE_SETS:
        raise fail(LOAD_IMAGES, f"Unknown picture set '{image_set}'.", f"Pick one of: {', '.join(DEMO_IMAGE_SETS)}.")
    folder = os.path.join(DEMO_IMAGES_DIR, image_set)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".png")) if os.path.isdir(folder) else []
    if not files:
        raise fail(LOAD_IMAGES, f"The pack's pictures for '{image_set}' are missing ({folder}).",
                   "Reinstall Concept Lab (git pull or ComfyUI-Manager), or regenerate them with "
                   "'python -m benchmarks assets'.")
    arrays = []
    for f in files:
        with Image.open(os.path.join(folder, f)) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays))


class ConceptLabLoadDemoImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabLoadDemoImages", display_name=LOAD_IMAGES, category="ConceptLab/demo",
            description=("Loads a bundled set of demo pictures as an IMAGE batch: real handwriting of writers "
                         "the demo models never saw. The example workflows use them as the reference images "
                         "of Seed Search / Seed Rank and as the subject of Concept Neurons Extract, so they "
                         "run as soon as they are opened. With your own model, replace this node with Load "
                         "Image nodes of your concept or subject (batched together)."),
            search_aliases=["demo images", "reference images", "sample images", "handwriting", "digits"],
            inputs=[combo("image_set", list(DEMO_IMAGE_SETS), default="eight-references",
                                   tooltip="Which pictures. " + "; ".join(f"{k}: {v}" for k, v in DEMO_IMAGE_SETS.items())
                                           + ".")],
            outputs=[io.Image.Output(display_name="images", tooltip="The pictures, 64x64 each, as one batch."),
                     io.String.Output(display_name="info",
                                      tooltip="Which pictures these are (set, count, the writers' sample numbers).")])

    @classmethod
    def execute(cls, image_set):
        images = load_demo_images(image_set)
        info = {"image_set": image_set, "count": int(images.shape[0]), "size": list(images.shape[1:3]),
                "what": DEMO_IMAGE_SETS[image_set]}
        return io.NodeOutput(images, json.dumps(info), ui={"text": [f"{image_set}: {images.shape[0]} pictures"]})


NODES = [ConceptLabLoadDemoModel, ConceptLabLoadDemoCLIPVision, ConceptLabLoadDemoImages]

"""Seed search nodes: SeedSelect-style noise optimisation and best-of-N seed ranking.

Graph shapes::

    Load model -> CLIPTextEncode (+/-) -> ConceptLab Seed Search (optimise) -> NOISE  -> SamplerCustomAdvanced
                  EmptyLatentImage ---/   reference IMAGEs --/                 -> LATENT (the noise itself)
                                                                               -> IMAGE  (loss curve)

    ... -> ConceptLab Seed Rank (best-of-N) -> seed (INT) -> any KSampler's seed input

How the nodes differentiate through ComfyUI (the version differences live here, not in
``kernels/seed_search.py``): the search runs *inside* a custom ``comfy.samplers.KSAMPLER``
function passed to ``comfy.sample.sample_custom``. ComfyUI therefore prepares the conditioning
for the model's family (SD1.x / SD2.x / SDXL ``y`` / SD3 pooled vectors), applies CFG and the
model's patches, and hands our function the CFG-combined denoiser. Our function runs the kernel's
own short Euler loop with autograd (ComfyUI's k-diffusion samplers are ``no_grad``), with the
diffusion model's, the VAE's and the CLIP vision model's inference-tensor weights aliased as
ordinary tensors (``_runtime.gradients_through``, zero-copy; the incoming MODEL is not changed).
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.sample
import comfy.samplers

from ..kernels import memory as M
from ..kernels import seed_search as K
from ..kernels.autograd import activation_snapshots, checkpointed_modules, differentiable_weights
from . import _memory as MEM
from ._runtime import (Progress, check_interrupt, compute_dtype, fail, preview_image, frame_latents, gradients_through,
                       dit_blocks, interrupt_types, is_out_of_memory, latent_channels, load_for_compute, out_of_memory_guard, require_family,
                       train_usage_factor,
                       vae_frames, vae_ratio)
from ._schema import combo, graph_node_id, io, memory_input, numbered_inputs, numbered_values, schema

SEARCH = "ConceptLab Seed Search (optimise)"
RANK = "ConceptLab Seed Rank (best-of-N)"
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "flux2", "chroma", "qwen_image", "zimage")
MAX_REFERENCES = 10
#: What to lower when a node runs out of memory (named in its error).
SEARCH_LOWER = ("the resolution (the Empty Latent's size), the batch size, search_steps or semantic_steps, the "
                "CLIP vision model's size (or run without CLIP vision), or load the model in bf16 or fp16 "
                "(weight_dtype of the model loader)")
RANK_LOWER = ("batch_size (candidates per model call), the resolution (the Empty Latent's size) or batch, the "
              "CLIP vision model's size, or load the model in bf16 or fp16 (weight_dtype of the model loader)")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# ComfyUI version differences
# ---------------------------------------------------------------------------------------------
def schedule(model, steps: int, scheduler: str = "normal") -> torch.Tensor:
    """The model's sigma schedule for ``steps`` steps, as ComfyUI's schedulers make it."""
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def fix_latent(model, latent: dict) -> dict:
    """ComfyUI's fix_empty_latent_channels (an empty 4-channel latent for a 16-channel model), with
    the latent's own downscale ratio where it has one (0.33), as the stock samplers call it (an 8x
    empty latent becomes Flux.2's 16x one)."""
    fix = comfy.sample.fix_empty_latent_channels
    out = dict(latent)
    ratios = [latent.get(k) for k in ("downscale_ratio_spacial", "downscale_ratio_temporal")]
    if any(r is not None for r in ratios):
        out["samples"] = fix(model, latent["samples"], *ratios)
    else:
        out["samples"] = fix(model, latent["samples"])
    return out


def run_inside_sampler(model, positive, negative, latent_samples, cfg, sigmas, noise, seed, body, reserve=None):
    """Run ``body(denoise, to_x, sigmas)`` inside ComfyUI's own sampling machinery.

    ``comfy.sample.sample_custom`` loads the model, prepares the conditioning and builds the
    CFG denoiser exactly as every stock sampler does; our ``KSAMPLER`` function receives it and,
    instead of sampling, calls ``body`` with ``denoise(x, sigma) -> x0`` and ``to_x(z)``, the
    model's own scaling of unit noise (``noise_scaling``, as ComfyUI applies it at step 0).
    Returns what ``body`` returned.
    """
    holder = {}

    def search_function(model_k, x, sig, extra_args=None, callback=None, disable=None, **_):
        extra_args = extra_args or {}
        ms = model_k.inner_model.inner_model.model_sampling
        lat = model_k.latent_image
        s0 = float(sig[0])
        max_denoise = math.isclose(float(ms.sigma_max), s0, rel_tol=1e-05) or s0 > float(ms.sigma_max)

        def denoise(xx, s):
            check_interrupt()  # Cancel is honoured at every model call, not only per iteration
            return model_k(xx, s * xx.new_ones([xx.shape[0]]), **extra_args)

        def to_x(z):
            return ms.noise_scaling(sig[0], z.to(x), lat, max_denoise)

        holder["out"] = body(denoise, to_x, sig)
        return x

    with torch.inference_mode(False), _sampler_reserves(model, reserve):
        comfy.sample.sample_custom(
            model, noise.clone(), cfg, comfy.samplers.KSAMPLER(search_function), sigmas.clone(),
            positive, negative, latent_samples.clone(), disable_pbar=True, seed=seed)
    return holder["out"]


@contextlib.contextmanager
def _sampler_reserves(model, reserve):
    """ComfyUI's sampler asks ``load_models_gpu`` for its own inference estimate
    (``BaseModel.memory_required``); on a partially loaded model that call may load more weights
    than the search's working memory leaves room for. With ``reserve`` (bytes) the sampler asks
    for that instead while the block runs (an instance attribute over the method, removed on
    exit)."""
    base = getattr(model, "model", None)
    if reserve is None or base is None:
        yield
        return
    base.memory_required = lambda *a, **k: int(reserve)
    try:
        yield
    finally:
        del base.memory_required


# ---------------------------------------------------------------------------------------------
# differentiable VAE / CLIP vision pieces
# ---------------------------------------------------------------------------------------------
def _vae_module(vae):
    fsm = getattr(vae, "first_stage_model", None)
    if fsm is None:
        raise TypeError("not a VAE")
    return fsm


def vae_posterior_mean(vae, images_bchw: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's posterior mean (raw latent space) of images in [0, 1]; differentiable."""
    fsm = _vae_module(vae)
    x = (images_bchw * 2.0 - 1.0).to(vae.device, getattr(vae, "vae_dtype", torch.float32))
    if getattr(fsm, "bn", None) is not None:
        # Flux.2's VAE: its latents are the posterior mean folded into 2x2 patches and
        # batch-normed; the module's own encode makes them (its regulariser returns the mean)
        return fsm.encode(x).float()
    if vae_frames(vae):
        # a video VAE (Qwen-Image's Wan 2.1): each image is a one-frame video; its encode returns
        # the posterior mean (B, C, 1, h, w)
        return fsm.encode(x.unsqueeze(2))[:, :, 0].float()
    h = fsm.encoder(x)
    qc = getattr(fsm, "quant_conv", None)
    if qc is not None:
        h = qc(h)
    ch = getattr(vae, "latent_channels", h.shape[1] // 2)
    return h[:, :ch].float() if h.shape[1] >= 2 * ch else h.float()


def vae_decode(vae, latent_raw: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [0, 1]; differentiable (ComfyUI's VAE.decode is not)."""
    fsm = _vae_module(vae)
    z = latent_raw.to(vae.device, getattr(vae, "vae_dtype", torch.float32))
    out = fsm.decode(z.unsqueeze(2))[:, :, 0] if vae_frames(vae) else fsm.decode(z)   # video VAE: one frame
    return ((out.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def clip_vision_size(cv) -> int:
    """The CLIP vision model's input size (ComfyUI reads it from the model's config)."""
    return int(cv.image_size)


def clip_vision_embed(cv, images_bchw: torch.Tensor) -> torch.Tensor:
    """CLIP vision image embeddings with a differentiable resize / normalise."""
    size = clip_vision_size(cv)
    px = K.preprocess_for_vision(images_bchw, size, getattr(cv, "image_mean", CLIP_MEAN),
                                 getattr(cv, "image_std", CLIP_STD))
    out = cv.model(pixel_values=px.to(cv.load_device, clip_vision_compute_dtype(cv)), intermediate_output=-2)
    return out[2].float()


def clip_vision_compute_dtype(cv) -> torch.dtype:
    """The precision CLIP vision computes in: its stored fp16 / bf16 where the device is fast at
    it (ComfyUI's ``should_use_fp16`` / ``should_use_bf16``: a GPU), else fp32 through its
    manual-cast layers, which is how ComfyUI's own ``encode_image`` runs it. On a CPU, where
    ComfyUI stores CLIP vision in fp16, a half-precision matrix multiply takes about 100x the
    fp32 one (docs/scale.md); fp8 storage always computes in fp32."""
    stored = getattr(cv, "dtype", None) or torch.float32
    device = getattr(cv, "load_device", None)
    try:
        if stored == torch.float16 and comfy.model_management.should_use_fp16(device):
            return stored
        if stored == torch.bfloat16 and comfy.model_management.should_use_bf16(device):
            return stored
    except Exception:  # noqa: BLE001  (an older signature: fall back to the safe precision)
        pass
    return torch.float32


#: The decoder blocks that are checkpointed one by one while gradients flow through the VAE.
#: The VAE decoder blocks checkpointed one by one: SD / SDXL / Flux / Flux.2 VAEs (ResnetBlock,
#: AttnBlock, Upsample) and the Wan 2.1 VAE of Qwen-Image (ResidualBlock, AttentionBlock,
#: Resample; a one-frame decode has no causal cache, so each block is a function of its input).
#: Without them the Wan decoder kept 9.3 GiB for backward at 1024 px in bf16 (fit section).
CHECKPOINTED_BLOCKS = ("ResnetBlock", "AttnBlock", "Upsample", "ResidualBlock", "AttentionBlock", "Resample")


@contextlib.contextmanager
def checkpointed_blocks(module, class_names=CHECKPOINTED_BLOCKS, recast=None, offload=None):
    """Gradient checkpointing block by block inside ``module`` for the duration of the ``with``.

    The semantic loss decodes the latent with gradients, and a VAE decoder's activations at full
    resolution are larger than the diffusion model's (an SD-size decoder at 768 px: about 14 GB
    for one image). With each block's forward checkpointed (``kernels.autograd.checkpointed``,
    right for in-place code) only the blocks' inputs are kept; a block's insides are recomputed
    when its gradient is needed. The wrappers are instance attributes over the class's own
    ``forward``, removed on exit: nothing of the VAE changes (weights are untouched; the tests
    check them bit for bit)."""
    blocks = [m for m in module.modules() if type(m).__name__ in class_names]
    with checkpointed_modules(blocks, recast=recast, offload=offload) as n:
        yield n


@contextlib.contextmanager
def differentiable(model, vae, clip_vision=None, levers=None):
    """Autograd through the diffusion model, the VAE and the CLIP vision model, zero-copy.

    The diffusion model goes through ``_runtime.gradients_through`` (no trainable weights: the
    noise is the leaf); the VAE and CLIP vision modules get the same aliasing. One activation
    snapshot hook covers all three (ComfyUI's blocks update activations in place). The VAE
    decoder is checkpointed block by block; ``levers`` (``nodes/_memory.py``) add checkpointing
    inside the diffusion model, weight casts made again at backward and, with offloading, the
    checkpointed inputs kept in system memory until backward."""
    levers = levers or MEM.Levers()
    extra = [_vae_module(vae)] + ([clip_vision.model] if clip_vision is not None else [])
    dm = model.model.diffusion_model
    with contextlib.ExitStack() as stack:
        stack.enter_context(gradients_through(model, snapshot_saved=False))
        for m in extra:
            stack.enter_context(differentiable_weights(m, snapshot_saved=False))
        recast = stack.enter_context(MEM.recast_weights(dm, *extra)) if levers.recast else None
        host = MEM.HOST if levers.offload else None
        decoder = getattr(extra[0], "decoder", None)
        if decoder is not None:
            stack.enter_context(checkpointed_blocks(decoder, recast=recast, offload=host))
        if levers.checkpoint:
            stack.enter_context(MEM.checkpointed_units(dm, recast=recast, offload=host))
        mods = [dm] + extra
        weights = [t for m in mods for t in list(m.parameters()) + list(m.buffers())]
        stack.enter_context(activation_snapshots(weights, recast=recast))
        yield


# ---------------------------------------------------------------------------------------------
# the objective (SeedSelect: semantic + appearance)
# ---------------------------------------------------------------------------------------------
class Objective:
    """Builds ``step_loss(x0, i)`` and ``score(x0)`` for the kernels from the references."""

    def __init__(self, model, vae, clip_vision, refs_bchw, semantic_weight, appearance_weight,
                 appearance_target="mean"):
        self.base = model.model
        self.appearance_target = appearance_target
        self.vae, self.cv = vae, clip_vision
        self.w_sem, self.w_app = float(semantic_weight), float(appearance_weight)
        with torch.inference_mode(False), torch.no_grad():
            refs = refs_bchw.clone()
            self.ref_latents = vae_posterior_mean(vae, refs)
            if clip_vision is not None:
                ref_embeds = clip_vision_embed(clip_vision, refs)
            else:
                ref_embeds = K.latent_embedding(self.ref_latents)
            self.ref_dir = K.reference_direction(ref_embeds)
        self.embedding = "clip_vision" if clip_vision is not None else "vae_latent"

    def _raw(self, x0):
        raw = self.base.process_latent_out(x0)
        return raw[:, :, 0] if raw.ndim == 5 else raw      # video-shaped latents: the one frame

    def parts(self, x0, semantic=True, appearance=True) -> dict:
        raw = self._raw(x0)
        out = {}
        if semantic and self.w_sem:
            if self.cv is not None:
                emb = clip_vision_embed(self.cv, vae_decode(self.vae, raw))
            else:
                # The fallback embedding reads VAE posterior means. For a generated candidate the
                # latent itself is what the encoder would return for its decoded image (up to the
                # VAE's reconstruction error), so the decode / encode round trip is skipped.
                emb = K.latent_embedding(raw)
            out["semantic"] = K.semantic_loss(emb, self.ref_dir)
        if appearance and self.w_app:
            out["appearance"] = K.appearance_loss(raw, self.ref_latents, self.appearance_target)
        return out

    def step_loss_fn(self, n_steps: int, semantic_steps: int = 3):
        weights = K.step_weights(n_steps, K.SEMANTIC_STEP_WEIGHTS[-max(1, int(semantic_steps)):])

        def step_loss(x0, i):
            last = i == n_steps - 1
            if i not in weights and not last:
                return None
            p = self.parts(x0, semantic=i in weights, appearance=last)
            total = None
            if "semantic" in p:
                total = self.w_sem * weights[i] * p["semantic"]
            if "appearance" in p:
                a = self.w_app * p["appearance"]
                total = a if total is None else total + a
            return total
        return step_loss

    def score(self, x0):
        p = self.parts(x0)
        return self.w_sem * p.get("semantic", 0.0) + self.w_app * p.get("appearance", 0.0) + x0.new_zeros(x0.shape[0])


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def check_model(node, model, vae):
    require_family(node, model, FAMILIES, "Seed search")
    if getattr(vae, "first_stage_model", None) is None or not hasattr(vae.first_stage_model, "encoder"):
        raise fail(node, f"The 'vae' input is a {type(vae).__name__}, not a VAE with an encoder.",
                   "Connect the VAE output of your checkpoint loader (or ConceptLab Load Demo Model).")


def check_latent(node, model, latent) -> dict:
    if not isinstance(latent, dict) or not torch.is_tensor(latent.get("samples")):
        raise fail(node, "The 'latent' input is not a LATENT.",
                   "Connect an Empty Latent Image (it sets the size and batch).")
    latent = fix_latent(model, latent)
    s = latent["samples"]
    want = latent_channels(model.model)
    frames = frame_latents(model.model)       # Qwen-Image: an image is one frame (B, C, 1, H, W)
    if s.ndim != (5 if frames else 4) or (frames and s.shape[2] != 1) \
            or (want is not None and s.shape[1] != want):
        raise fail(node, f"The latent has shape {tuple(s.shape)}, but this model works on "
                   f"{want}-channel image latents (B, {want}, {'1, ' if frames else ''}H, W).",
                   "Use an Empty Latent Image made for this model (e.g. SD3 / SDXL latent nodes).")
    return latent


def gather_references(node, images, height: int, width: int) -> torch.Tensor:
    """1 to 10 reference images as (N, 3, H, W) in [0, 1] at the latent's pixel size.

    Each input may be a batch; inputs of different sizes are resized (bilinear, antialiased)."""
    out = []
    for name, img in images:
        if img is None:
            continue
        if not torch.is_tensor(img) or img.ndim != 4 or img.shape[-1] not in (1, 3, 4) \
                or not img.is_floating_point():
            what = type(img).__name__ if not torch.is_tensor(img) else f"a tensor of shape {tuple(img.shape)}"
            raise fail(node, f"The '{name}' input is {what}, not an IMAGE (B, H, W, 3).",
                       "Connect images, e.g. from Load Image.")
        x = img.detach().float().movedim(-1, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        if x.shape[-2:] != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.clamp(0, 1))
    if not out:
        raise fail(node, "No reference images were given.",
                   "Connect 1 to 10 images of the concept to the 'references' input.")
    refs = torch.cat(out)
    if refs.shape[0] > MAX_REFERENCES:
        raise fail(node, f"{refs.shape[0]} reference images were given; at most {MAX_REFERENCES} are used.",
                   f"Pass {MAX_REFERENCES} or fewer (a few typical images work best).")
    return refs


def pixel_size(vae, latent_samples) -> tuple:
    r = vae_ratio(vae)
    return latent_samples.shape[-2] * r, latent_samples.shape[-1] * r


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
class OptimisedNoise:
    """A NOISE for SamplerCustomAdvanced (ComfyUI 0.3.x): returns the optimised noise.

    ``seed`` is the seed the search started from (kept for metadata and samplers that read it)."""

    def __init__(self, samples: torch.Tensor, seed: int):
        self.samples = samples.detach().cpu().float()
        self.seed = int(seed)

    def generate_noise(self, input_latent):
        s = input_latent["samples"]
        if tuple(s.shape) != tuple(self.samples.shape):
            raise fail(SEARCH, f"The latent given to the sampler has shape {tuple(s.shape)}, but the "
                       f"optimised noise has shape {tuple(self.samples.shape)}.",
                       "Sample with the same latent (size and batch) you gave to Seed Search.")
        return self.samples.clone().to(s.dtype)


def loss_plot(curve: list, best_it: int, width: int = 320, height: int = 200) -> torch.Tensor:
    """The loss curve as a (1, H, W, 3) IMAGE, drawn with PIL (no matplotlib)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    L, R, T, B = 44, 10, 22, 24
    d.rectangle([L, T, width - R, height - B], outline="black")
    d.text((L, 4), "seed search objective (mean over batch)", fill="black")
    if curve:
        lo, hi = min(curve), max(curve)
        hi = hi if hi > lo else lo + 1e-6
        n = max(len(curve) - 1, 1)

        def px(i, v):
            return (L + i / n * (width - L - R), T + (hi - v) / (hi - lo) * (height - T - B))
        d.text((2, T - 4), f"{hi:.3g}", fill="black")
        d.text((2, height - B - 8), f"{lo:.3g}", fill="black")
        d.text((L, height - B + 6), "iteration", fill="black")
        d.text((width - R - 24, height - B + 6), str(len(curve) - 1), fill="black")
        pts = [px(i, v) for i, v in enumerate(curve)]
        if len(pts) > 1:
            d.line(pts, fill=(30, 90, 200), width=2)
        bi = min(max(int(best_it), 0), len(curve) - 1)
        x, y = pts[bi]
        d.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(200, 30, 30), width=2)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


# ---------------------------------------------------------------------------------------------
# shared input declarations
# ---------------------------------------------------------------------------------------------
def _common_inputs():
    return [
        io.Model.Input("model", tooltip="The diffusion model you will sample with (SD1.x, SD2.x, "
                                        "SDXL or SD3). It is not modified."),
        io.Vae.Input("vae", tooltip="The model's VAE: decodes candidates for the losses and encodes "
                                    "the references."),
        io.Conditioning.Input("positive", tooltip="The prompt you will sample with (e.g. 'an eight')."),
        io.Conditioning.Input("negative", tooltip="The negative prompt you will sample with."),
        io.Latent.Input("latent", tooltip="An empty latent: sets the image size and batch size."),
        io.Image.Input("references", tooltip="1 to 10 images of the concept (a batch). Any size: they "
                                             "are resized to the latent's pixel size."),
    ]


#: The reference inputs after the first: they appear one by one as the user connects them.
MORE_REFERENCES = ("references_2", "references_3")


def _optional_inputs():
    return [
        io.ClipVision.Input("clip_vision", optional=True,
                            tooltip="Optional. Semantic loss on CLIP vision "
                                    "embeddings (SeedSelect). Without it, a pooled "
                                    "embedding from the VAE's own encoder is used."),
        *numbered_inputs("more_references", MORE_REFERENCES, lambda name: io.Image.Input(
            name, optional=True, tooltip="Optional more references, of any size.")),
    ]


def _seed_cfg_inputs(seed_tip: str, cfg_tip: str):
    return [
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, tooltip=seed_tip),
        io.Float.Input("cfg", default=3.0, min=0.0, max=100.0, step=0.1, tooltip=cfg_tip),
    ]


def _loss_inputs():
    return [
        io.Float.Input("semantic_weight", default=10.0, min=0.0, max=1000.0, step=0.1,
                       tooltip="Weight of the semantic loss (1 - cosine to the "
                               "references' mean embedding). SeedSelect: 10."),
        io.Float.Input("appearance_weight", default=1.0, min=0.0, max=1000.0, step=0.1,
                       tooltip="Weight of the appearance loss (MSE of the final "
                               "latent to the references' VAE latents)."),
        combo("appearance_target", ["mean", "nearest"], default="mean",
              tooltip="mean: the references' mean latent "
                      "(SeedSelect). nearest: the closest "
                      "single reference (sharper when the "
                      "mean of different shapes is a blur)."),
    ]


def vit_shape(clip_vision):
    """A CLIP vision model's encoder shape for the estimate (kernels.memory.VitShape), or None."""
    if clip_vision is None:
        return None
    try:
        layers = [m for m in clip_vision.model.modules() if type(m).__name__ == "CLIPLayer"]
        first = layers[0]
        width = int(first.layer_norm1.weight.shape[0])
        mlp = int(first.mlp.fc1.weight.shape[0])
        patch = next(m.patch_embedding for m in clip_vision.model.modules()
                     if getattr(m, "patch_embedding", None) is not None)
        ps = int(patch.kernel_size[0]) if hasattr(patch, "kernel_size") else int(round(math.sqrt(patch.weight.shape[1] / 3)))
        return M.VitShape(clip_vision_size(clip_vision), ps, len(layers), width, mlp)
    except Exception:  # noqa: BLE001  (another vision architecture: no term for it)
        return None


def decode_bytes(vae, latent_shape) -> int:
    """ComfyUI's own estimate of decoding a latent of this shape (``VAE.memory_used_decode``, which
    is per image: ComfyUI's VAE.decode divides the batch by it), times the batch."""
    fn = getattr(vae, "memory_used_decode", None)
    if fn is None:
        return 0
    try:
        one = (1, *tuple(latent_shape)[1:])
        return int(fn(one, getattr(vae, "vae_dtype", torch.float32))) * int(latent_shape[0])
    except Exception:  # noqa: BLE001
        return 0


def memory_plan(model, vae, clip_vision, latent_samples, cfg, search_steps, semantic, requested, node=SEARCH):
    """The memory setting Seed Search runs with (``nodes/_memory.py``): the fastest whose estimate
    fits what ComfyUI reports free next to the MODEL, VAE and CLIP vision weights, or the forced one."""
    MEM.check_setting(node, requested)
    others = [m for m in (vae, clip_vision) if m is not None]

    def need(setting, _chunk):
        return memory_estimate(model, vae, clip_vision, latent_samples, cfg, search_steps, semantic, setting)
    return MEM.plan(model, requested, [0], need, 0, *others)


def memory_estimate(model, vae, clip_vision, latent_samples, cfg, search_steps=None, semantic=True,
                    setting="full"):
    """Bytes above the weights for one Seed Search iteration (``search_steps`` given) or one
    Seed Rank chunk of ``latent_samples`` (kernels/memory.py; docs/memory.md)."""
    base = model.model
    shape = tuple(latent_samples.shape)
    use_cv = clip_vision is not None and semantic
    dec = decode_bytes(vae, shape) if use_cv else 0
    vit = vit_shape(clip_vision) if use_cv else None
    cv_dtype = clip_vision_compute_dtype(clip_vision) if use_cv else torch.float32
    stored = getattr(clip_vision, "dtype", None) or torch.float32
    # a half or fp8 CLIP vision computing in fp32: backward keeps each layer's fp32 weight cast
    cast = (sum(p.numel() for p in clip_vision.model.parameters()) * 4
            if use_cv and cv_dtype != stored else 0)
    if search_steps is None:
        factor = float(getattr(base, "memory_usage_factor", 1.0) or 1.0)
        return M.seed_rank_estimate(shape, compute_dtype(base), factor, cfg, dec, vit, cv_dtype)
    levers = MEM.Levers.of(setting)
    step_shape = (M.call_batch(shape[0], cfg), *shape[1:])
    return M.seed_search_estimate(shape, compute_dtype(base), train_usage_factor(model), cfg, search_steps, dec,
                                  vit, cv_dtype, dit_blocks(model), vit_cast_bytes=cast,
                                  checkpoint=levers.checkpoint,
                                  unit_inputs=MEM.unit_input_bytes(model, step_shape, compute_dtype(base)),
                                  casts=0 if levers.recast else MEM.cast_bytes(base),
                                  offload=levers.offload, phases=True)


def _prepare(node, model, vae, latent, references, references_2, references_3, clip_vision,
             semantic_weight, appearance_weight, appearance_target="mean", need=None):
    check_model(node, model, vae)
    latent = check_latent(node, model, latent)
    if semantic_weight <= 0 and appearance_weight <= 0:
        raise fail(node, "Both loss weights are 0, so there is nothing to optimise.",
                   "Set semantic_weight and/or appearance_weight above 0.")
    h, w = pixel_size(vae, latent["samples"])
    refs = gather_references(node, [("references", references), ("references_2", references_2),
                                    ("references_3", references_3)], h, w)
    # one call, so that ComfyUI makes room for all three and for the work (``need``: the
    # kernels.memory estimate of the latent) before the long work starts
    patchers = [model] + [p for p in (getattr(vae, "patcher", None), getattr(clip_vision, "patcher", None))
                          if p is not None]
    load_for_compute(*patchers, memory_required=need(latent) if need is not None else 0)
    try:
        objective = Objective(model, vae, clip_vision, refs, semantic_weight, appearance_weight,
                              appearance_target)
    except interrupt_types():
        raise
    except Exception as e:  # noqa: BLE001  (turn shape errors from the encoders into a clear message)
        if is_out_of_memory(e):
            raise
        raise fail(node, f"Encoding the references failed: {e}.",
                   "Check that the VAE (and CLIP vision model) belong to this model.") from e
    return latent, objective


# ---------------------------------------------------------------------------------------------
# the work of the nodes (module-level: V3 nodes keep no state; tests and benchmarks call these)
# ---------------------------------------------------------------------------------------------
class SearchOutput(NamedTuple):
    """What Seed Search computes: its outputs, and the kernel's result (the loss curve, the best
    iterate, ...)."""

    noise: "OptimisedNoise"
    latent: dict
    loss_curve: torch.Tensor
    result: K.SearchResult
    info: str = ""
    memory: dict | None = None           # the memory plan it ran with (nodes/_memory.py)


def candidate_preview(model, vae, x0: torch.Tensor, in_search: bool = False) -> tuple:
    """A progress-bar preview of a candidate, ``x0`` (the model's latent space, first image): drawn
    by ComfyUI's latent previewer when the user has set one (the preview method the samplers use),
    else decoded by the model's VAE, without gradients. ``in_search``: called inside the
    differentiable search, which holds the VAE loaded: decode through its module (ComfyUI's
    ``VAE.decode`` would load models in the middle of the search); otherwise ComfyUI's own decode."""
    import latent_preview
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    with torch.no_grad():
        if previewer is not None:
            return previewer.decode_latent_to_preview_image("JPEG", x0[:1])
        raw = model.model.process_latent_out(x0[:1])
        if in_search:
            return preview_image(vae_decode(vae, raw[:, :, 0] if raw.ndim == 5 else raw))
        if raw.ndim == 5 and not vae_frames(vae):
            raw = raw[:, :, 0]      # an image VAE takes the one frame (0.3.75's decode refuses 5-D)
        images = vae.decode(raw)
        return preview_image(images.reshape(-1, *images.shape[-3:]))


class LiveSearch:
    """What Seed Search shows on its node while it runs: after each iteration the bar moves one
    step, with the candidate that iteration drew as the preview (the x0 prediction of the short
    sampler's last step, first image of the batch) and the objective as progress text.

    The picture: :func:`candidate_preview` (one decode of one image per iteration, which runs the
    short sampler and its backward pass several times)."""

    def __init__(self, model, vae, progress: Progress, iterations: int, step_loss, search_steps: int):
        self.model, self.vae, self.progress = model, vae, progress
        self.iterations, self._step_loss, self.last_step = iterations, step_loss, search_steps - 1
        self.x0, self.best = None, float("inf")

    def step_loss(self, x0, i):
        """The objective's step loss, keeping the last step's x0 prediction for the preview."""
        if i == self.last_step:
            self.x0 = x0[:1].detach()
        return self._step_loss(x0, i)

    def on_iteration(self, it: int, value: float) -> None:
        check_interrupt()
        self.best = min(self.best, value)
        self.progress.step(preview=self.preview(),
                           text=f"iteration {it + 1}/{self.iterations}: objective {value:.5f} (best {self.best:.5f})")

    def preview(self):
        return None if self.x0 is None else candidate_preview(self.model, self.vae, self.x0, in_search=True)

    def finish(self, res) -> None:
        """A search that stopped before its last iteration: says so, and ends the bar."""
        if res.iterations < self.iterations:
            self.progress.say(f"stopped after {res.iterations} of {self.iterations} iterations: the objective "
                              f"kept rising (best {self.best:.5f})")
        self.progress.finish()


@out_of_memory_guard(SEARCH, SEARCH_LOWER)
def search_noise(model, vae, positive, negative, latent, references, seed, cfg, iterations,
                 search_steps, learning_rate, lr_drop_after, norm_regulariser, norm_weight, semantic_steps,
                 semantic_weight, appearance_weight, appearance_target="mean", clip_vision=None,
                 references_2=None, references_3=None, unique_id=None, patience=3, **kwargs) -> SearchOutput:
    """Seed Search. ``unique_id``: the graph node to report progress on; ``memory``: the memory
    setting (``nodes/_memory.py``; "auto" picks the fastest that fits)."""
    requested = MEM.check_setting(SEARCH, kwargs.get("memory") or MEM.AUTO)
    planned = {}

    def need(lat):
        planned["plan"] = memory_plan(model, vae, clip_vision, lat["samples"], cfg, search_steps,
                                      semantic_weight > 0, requested)
        return planned["plan"].estimate
    latent, objective = _prepare(SEARCH, model, vae, latent, references, references_2, references_3,
                                 clip_vision, semantic_weight, appearance_weight, appearance_target, need=need)
    plan = planned["plan"]
    samples = latent["samples"]
    z0 = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    sigmas = schedule(model, search_steps)
    progress = Progress(iterations, node_id=unique_id)
    live = LiveSearch(model, vae, progress, iterations, objective.step_loss_fn(search_steps, semantic_steps),
                      search_steps)

    def body(denoise, to_x, sig):
        with differentiable(model, vae, clip_vision, plan.levers):
            return K.optimise_noise(
                z0, to_x, denoise, sig.float(), live.step_loss, iterations=iterations, lr=learning_rate,
                lr_drop_after=lr_drop_after, norm_weight=norm_weight if norm_regulariser else 0.0,
                patience=patience, on_iteration=live.on_iteration)

    # streamed weights: the sampler's own load call must leave the search's working memory free
    reserve = plan.estimate.total if plan.levers.offload else None
    res = run_inside_sampler(model, positive, negative, samples, cfg, sigmas, z0, seed, body, reserve)
    live.finish(res)
    best = res.best_z.detach().cpu().float()
    best_it = int(res.best_iteration.float().mean().round()) if len(res.curve) else 0
    plot = loss_plot(res.curve, best_it)
    info = search_info(res, best_it, objective.embedding, iterations) + "\n" + plan.describe()
    return SearchOutput(OptimisedNoise(best, seed), {"samples": best}, plot, res, info, plan.as_dict())


def search_info(res, best_it: int, embedding: str, iterations: int) -> str:
    """Seed Search's info output: what ran and what it reached."""
    lines = [f"embedding: {embedding}",
             f"iterations: {res.iterations} of {iterations}"
             + (" (stopped early: the objective kept rising)" if res.stopped_early else "")]
    if res.curve:
        lines.append(f"objective: {res.curve[0]:.5f} at the start, {min(res.curve):.5f} at best "
                     f"(iteration {best_it}, kept)")
    return "\n".join(lines)


class RankOutput(NamedTuple):
    """What Seed Rank computes: the best seed, the ranking text, and the ranking itself
    (``[(seed, score), ...]``, best first)."""

    best_seed: int
    text: str
    ranking: list


@out_of_memory_guard(RANK, RANK_LOWER)
def rank_seeds(model, vae, positive, negative, latent, references, seed, candidates, cfg, batch_size,
               semantic_weight, appearance_weight, appearance_target="mean", clip_vision=None,
               references_2=None, references_3=None, unique_id=None, **kwargs) -> RankOutput:
    """Seed Rank. ``unique_id``: the graph node to report progress on."""
    def chunk_need(lat):     # one chunk: min(candidates, batch_size // batch) latents per call
        s = lat["samples"]
        per = min(max(1, batch_size // s.shape[0]), candidates) * s.shape[0]
        return memory_estimate(model, vae, clip_vision, torch.empty((per, *s.shape[1:]), device="meta"), cfg,
                               None, semantic_weight > 0)
    latent, objective = _prepare(RANK, model, vae, latent, references, references_2, references_3,
                                 clip_vision, semantic_weight, appearance_weight, appearance_target,
                                 need=chunk_need)
    samples = latent["samples"]
    b = samples.shape[0]
    seeds = [seed + i for i in range(candidates)]
    per_call = max(1, batch_size // b)
    chunks = [seeds[i:i + per_call] for i in range(0, len(seeds), per_call)]
    progress = Progress(len(chunks), node_id=unique_id)
    sigmas = schedule(model, 1)
    scores, best = [], None
    for chunk in chunks:
        noise = torch.cat([comfy.sample.prepare_noise(samples, s, latent.get("batch_index")) for s in chunk])
        lat = samples.repeat(len(chunk), *[1] * (samples.ndim - 1))

        def body(denoise, to_x, sig):
            with torch.inference_mode(False), torch.no_grad():
                z = noise.to(sig.device)
                sc, x0 = K.one_step_scores(z, to_x, denoise, sig[0].float(), objective.score)
            per = sc.view(len(chunk), b).mean(1).cpu()
            return per, x0[int(per.argmin()) * b:][:1]          # the chunk's best candidate's first image

        per, x0 = run_inside_sampler(model, positive, negative, lat, cfg, sigmas, noise, chunk[0], body)
        scores.append(per)
        i = int(per.argmin())
        if best is None or float(per[i]) < best[1]:            # the preview: the best candidate so far
            best = (chunk[i], float(per[i]), candidate_preview(model, vae, x0))
        progress.step(preview=best[2], text=f"scored {sum(len(s) for s in scores)}/{candidates} seeds; best so "
                                            f"far: seed {best[0]} (score {best[1]:.5f})")
    ranking = K.rank(torch.cat(scores), seeds)
    lines = [f"embedding: {objective.embedding}, {objective.ref_latents.shape[0]} reference images; "
             "lower score is better"]
    lines += [f"{i + 1:>4}  seed {s:<12d} score {v:.5f}" for i, (s, v) in enumerate(ranking)]
    return RankOutput(ranking[0][0], "\n".join(lines), ranking)


def _references(more_references, references_2, references_3) -> dict:
    """The extra references as search_noise / rank_seeds take them, from the Autogrow group
    (ComfyUI 0.33) or the inputs of those names (0.3.75, and workflows saved before)."""
    return numbered_values(more_references, MORE_REFERENCES, references_2=references_2, references_3=references_3)


# ---------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------
_ALIASES = ["seed", "noise", "rare concept", "find seed", "best seed"]


class ConceptLabSeedSearch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabSeedSearch", display_name=SEARCH, category="ConceptLab/seed search",
            description=(
                "Finds initial noise that makes a rare concept appear (SeedSelect), from 1 to 10 reference "
                "images, without fine-tuning. It optimises the noise itself: each iteration runs a short "
                "sampler with gradients (checkpointed) through your model, and lowers 1 - cosine between the "
                "generated image's embedding and the references' (CLIP vision, or the VAE encoder without "
                "one) plus the distance of the final latent to the references' mean latent. A norm prior "
                "keeps the noise on the Gaussian shell (ReNO); the best iterate is kept and the search stops "
                "when the loss keeps rising. Outputs: NOISE for SamplerCustomAdvanced (ComfyUI 0.3.x), the "
                "noise as a LATENT, and the loss curve. Sample with the same prompt, latent and CFG."),
            search_aliases=["SeedSelect", "ReNO"] + _ALIASES + ["seed search", "noise optimization",
                                                                "optimise noise", "initial noise"],
            hidden=[io.Hidden.unique_id],
            inputs=[
                *_common_inputs(),
                *_seed_cfg_inputs("Seed of the starting noise (the noise a stock KSampler would "
                                  "draw with this seed).",
                                  "CFG scale inside the search; use the one you sample with."),
                io.Int.Input("iterations", default=30, min=1, max=500,
                             tooltip="Gradient steps at most (SeedSelect: 30)."),
                io.Int.Input("search_steps", default=6, min=1, max=100,
                             tooltip="Sampling steps of the short differentiable "
                                     "sampler inside each iteration (Euler)."),
                io.Float.Input("learning_rate", default=0.1, min=0.0001, max=10.0, step=0.001,
                               tooltip="Adam learning rate (SeedSelect: 0.1, then "
                                       "0.01)."),
                io.Int.Input("lr_drop_after", default=10, min=1, max=500,
                             tooltip="The learning rate drops 10x after this many "
                                     "iterations (SeedSelect: 3 of 30)."),
                io.Boolean.Input("norm_regulariser", default=True,
                                 tooltip="Keep the noise on the Gaussian shell "
                                         "(ReNO's norm prior). Off: plain "
                                         "SeedSelect."),
                io.Float.Input("norm_weight", default=1.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Weight of the norm prior (0 on the shell; it "
                                       "grows as ||z|| leaves sqrt(d))."),
                io.Int.Input("semantic_steps", default=3, min=1, max=3,
                             tooltip="Read the semantic loss on the images of the "
                                     "last 1-3 steps (SeedSelect: 3, weighted "
                                     "0.05/0.25/0.7). Fewer is faster."),
                *_loss_inputs(),
                *_optional_inputs(),
                memory_input(),
            ],
            outputs=[
                io.Noise.Output(display_name="noise",
                                tooltip="The optimised noise, for SamplerCustomAdvanced's noise input (use the same latent)."),
                io.Latent.Output(display_name="noise_latent",
                                 tooltip="The optimised unit-variance noise as a LATENT (what the sampler scales by "
                                         "sigma_max)."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="The objective per iteration; the red circle marks the kept (best) iterate."),
                io.String.Output(display_name="info",
                                 tooltip="What the search ran and reached: the embedding, the iterations, the "
                                         "objective at the start and at the kept iterate."),
            ])

    @classmethod
    def execute(cls, more_references=None, references_2=None, references_3=None, **inputs):
        out = search_noise(**inputs, **_references(more_references, references_2, references_3),
                           unique_id=graph_node_id(cls))
        return io.NodeOutput(out.noise, out.latent, out.loss_curve, out.info)


class ConceptLabSeedRank(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabSeedRank", display_name=RANK, category="ConceptLab/seed search",
            description=(
                "Best-of-N seeds: scores N random seeds (seed, seed+1, ...) with the same objective as Seed "
                "Search, read on a one-call prediction (the model's x0 estimate at the first sigma, batched), "
                "and outputs the best seed as an INT. Connect it to any stock KSampler's seed (same prompt, "
                "latent and CFG): the result is reproducible without this pack. Much cheaper per candidate "
                "than optimising, and works on every ComfyUI version."),
            search_aliases=_ALIASES + ["best-of-N", "best of n", "rank seeds", "seed picker"],
            hidden=[io.Hidden.unique_id],
            inputs=[
                *_common_inputs(),
                *_seed_cfg_inputs("First candidate seed; candidates are seed, seed+1, ...",
                                  "CFG scale of the scoring call; use the one you sample with."),
                io.Int.Input("candidates", default=32, min=1, max=4096, tooltip="How many seeds to score (N)."),
                io.Int.Input("batch_size", default=16, min=1, max=256,
                             tooltip="Candidates scored per model call (memory vs speed)."),
                *_loss_inputs(),
                *_optional_inputs(),
            ],
            outputs=[
                io.Int.Output(display_name="best_seed",
                              tooltip="The best seed; feed it to a KSampler (same latent, prompt and CFG)."),
                io.String.Output(display_name="ranking",
                                 tooltip="All candidates, best first: rank, seed and score (lower is better)."),
            ])

    @classmethod
    def execute(cls, more_references=None, references_2=None, references_3=None, **inputs):
        out = rank_seeds(**inputs, **_references(more_references, references_2, references_3),
                         unique_id=graph_node_id(cls))
        return io.NodeOutput(out.best_seed, out.text)


NODES = [ConceptLabSeedSearch, ConceptLabSeedRank]

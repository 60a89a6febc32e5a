"""Memory estimates for the long nodes, handed to ComfyUI's model management (issue 15).

ComfyUI's ``load_models_gpu(models, memory_required=...)`` frees (offloads) other models until
the weights plus ``memory_required`` bytes fit, and loads a model only partially (``--lowvram``
style) when they do not. ``memory_required`` is memory *above the loaded weights*. The functions
here compute it for Seed Search, Seed Rank and Concept Neurons Extract. They are pure functions
of shapes, dtypes and settings (no ComfyUI import); the nodes read the shapes off their inputs.

What dominates, and the factors (``docs/memory.md`` says where each comes from):

- A diffusion-model forward. ComfyUI estimates one *inference* forward as
  ``area * dtype_bytes * 0.01 * memory_usage_factor`` MiB, ``area`` = batch x latent pixels
  (``comfy.model_base.BaseModel.memory_required`` with SDPA/xformers attention, 0.3.x);
  ``memory_usage_factor`` is ComfyUI's per-family calibration (SD1.5 1.0, SDXL 0.8, Flux 3.1...).
  :func:`inference_forward_bytes` is that formula. A forward with autograd keeps every layer's
  saved inputs until backward: :data:`TRAIN_FORWARD_FACTOR` times the inference figure for a
  UNet, :data:`DIT_BLOCK_TRAIN_FACTOR` times it per transformer block for a DiT.
- Seed Search's backward is checkpointed per sampling step, so one step's activations live at a
  time, plus the VAE decode with gradients (the decoder checkpointed block by block:
  :data:`VAE_GRAD_FACTOR` times ComfyUI's own decode estimate ``VAE.memory_used_decode``) and
  the CLIP vision forward/backward (:func:`transformer_train_bytes`, counted per layer).
- Extract keeps one forward's activations for backward (batch: images x noise draws) plus the
  fp32 tensors made per trainable K/V weight (:func:`kv_train_bytes`).

The estimates are meant to be checked against ``python -m benchmarks scale`` (its
``peak_above_loaded`` figures are the same quantity: peak minus the loaded weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

MIB = 1 << 20

#: ComfyUI 0.3.x's inference estimate: MiB per (latent pixel x batch x dtype byte), before the
#: family's ``memory_usage_factor`` (``BaseModel.memory_required``, SDPA/xformers branch).
COMFY_MIB_PER_AREA_BYTE = 0.01

#: Activations autograd keeps through one UNet forward, as a multiple of ComfyUI's inference
#: estimate for the same batch and size. Counting the bytes saved for backward
#: (``saved_tensors_hooks``, weights excluded) in one forward of a full-size SD1.5 UNet gives 9.4x
#: (docs/memory.md); the whole Extract step measured by ``python -m benchmarks scale`` (cn-sd15:
#: full-size SD1.5, SDPA, fp32, 512 px, batch 4) peaks 8,636 MiB above the weights and its K/V
#: tensors, 13.2x the inference figure (655 MiB): activation snapshots, gradient buffers and the
#: layer being run come on top. Rounded up: 14.
TRAIN_FORWARD_FACTOR = 14.0

#: A UNet's activation load: the sum over its transformer blocks and, weighted by
#: :data:`UNET_RESBLOCK_WEIGHT`, its residual blocks, of their width times their share of the
#: latent's tokens (1/4 per level down), over the base width. :data:`TRAIN_FORWARD_FACTOR` was
#: measured on SD1.5, and what autograd keeps grows with this load, while ComfyUI's inference
#: ``memory_usage_factor`` (SDXL 0.8, for the attention peak of one layer) does not follow it.
#: SD1.5 and SD2.x: transformer load 8.8125, residual load 9.1875; SDXL (depths 2 and 10, no
#: attention at the top level): 20 and 9.25.
SD15_ACTIVATION_LOAD = (8.8125, 9.1875)

#: Bytes a residual block saves for backward per channel and token, relative to a transformer
#: block. Counted with a ``saved_tensors_hooks`` pack hook through one forward (fp32, batch 2,
#: 64x64 latent, SDPA, ComfyUI 0.33 classes, weights excluded): SD1.5 3,075 MiB, SDXL 5,275 MiB,
#: 1.716x, where transformer blocks alone would say 2.27x; the weight that matches both is 0.75.
UNET_RESBLOCK_WEIGHT = 0.75

#: DiTs (Flux, SD3, Qwen-Image, ...): activations autograd keeps *per transformer block*, as a
#: multiple of ComfyUI's inference estimate (whose ``memory_usage_factor`` is per model, not per
#: block: a 57-block Flux keeps 28x what a 2-block slice keeps, at the same inference figure).
#: Measured by ``python -m benchmarks scale`` (cn-flux: a full-width Flux slice, 1 double + 1
#: single block, fp32, 512 px): 644 MiB above the weights and K/V tensors for 2 blocks against
#: an inference figure of 508 MiB, 0.63x per block. Rounded up: 0.7. Only Flux was measured.
DIT_BLOCK_TRAIN_FACTOR = 0.7

#: A decode with gradients through a decoder checkpointed block by block, as a multiple of
#: ComfyUI's inference decode estimate (``VAE.memory_used_decode``): the kept block inputs plus
#: one block recomputed with its gradients. Counted in fake tensors (SD VAE in bf16, ``python -m
#: benchmarks scale --section fit``): 1.35x at 512 px and at 1024 px; rounded up: 1.4. With the
#: block inputs waiting in system memory ("checkpoint + offload") only the recomputed block is on
#: the device: 0.88x, rounded up: 0.95.
VAE_GRAD_FACTOR = 1.4
VAE_GRAD_FACTOR_OFFLOADED = 0.95

#: Per token and layer of a ViT encoder, tensors of the layer width saved for backward (two
#: layer-norm inputs and outputs, q, k, v, attention output, out-projection input, residual) and
#: of the MLP width (fc1 output, activation output).
VIT_WIDTH_TENSORS = 10
VIT_MLP_TENSORS = 2

def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype (or of its name: 'float16', 'bf16', ...)."""
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int) and size > 0:
        return size
    name = str(dtype).replace("torch.", "")
    table = {"float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2,
             "bf16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "float64": 8}
    if name not in table:
        raise ValueError(f"unknown dtype {dtype!r}")
    return table[name]


def latent_area(latent_shape: Sequence[int]) -> int:
    """batch x latent pixels (x frames) of a latent shape (B, C, H, W) or (B, C, T, H, W), as
    ComfyUI's ``memory_required`` counts it."""
    shape = [int(s) for s in latent_shape]
    if len(shape) < 3:
        raise ValueError(f"not a latent shape: {latent_shape}")
    return shape[0] * math.prod(shape[2:])


def inference_forward_bytes(latent_shape: Sequence[int], dtype, usage_factor: float = 1.0) -> int:
    """ComfyUI's estimate of one inference forward of the diffusion model on ``latent_shape``
    (computing in ``dtype``), SDPA/xformers branch of ``BaseModel.memory_required``."""
    return int(latent_area(latent_shape) * dtype_bytes(dtype) * COMFY_MIB_PER_AREA_BYTE * float(usage_factor) * MIB)


def train_forward_bytes(latent_shape: Sequence[int], dtype, usage_factor: float = 1.0, dit_blocks: int = 0,
                        unit_inputs: int = 0) -> int:
    """Activations one diffusion forward keeps for backward: :data:`TRAIN_FORWARD_FACTOR` x the
    inference figure for a UNet (``dit_blocks`` 0); for a DiT of ``dit_blocks`` transformer blocks
    :data:`DIT_FULL_FACTOR` x its blocks' inputs (``unit_inputs``: tokens x width per block, from
    the model's geometry), or, where they are not given, :data:`DIT_BLOCK_TRAIN_FACTOR` x the
    inference figure per block."""
    if dit_blocks and unit_inputs:
        return int(DIT_FULL_FACTOR * unit_inputs)
    factor = DIT_BLOCK_TRAIN_FACTOR * int(dit_blocks) if dit_blocks else TRAIN_FORWARD_FACTOR
    return int(factor * inference_forward_bytes(latent_shape, dtype, usage_factor))


def unet_train_usage(transformer_load: float, resblock_load: float = 0.0) -> float:
    """The usage factor for what a UNet keeps for backward (:func:`train_forward_bytes`): its
    activation load (see :data:`SD15_ACTIVATION_LOAD`) relative to SD1.5's."""
    def load(t, r):
        return float(t) + UNET_RESBLOCK_WEIGHT * float(r)
    return load(transformer_load, resblock_load) / load(*SD15_ACTIVATION_LOAD)


def call_batch(batch: int, cfg: float) -> int:
    """Samples per model call inside a sampler: cond and uncond are batched together unless
    CFG is 1 (ComfyUI skips the uncond then)."""
    return int(batch) * (1 if math.isclose(float(cfg), 1.0) else 2)


@dataclass(frozen=True)
class VitShape:
    """A ViT encoder (CLIP vision): input size, patch size, layers, width, MLP width."""
    image_size: int
    patch_size: int
    layers: int
    width: int
    mlp: int
    class_token: bool = True

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (1 if self.class_token else 0)


def transformer_train_bytes(vit: VitShape, batch: int, dtype) -> int:
    """Activations a ViT keeps for backward through ``batch`` images (SDPA attention: no
    tokens x tokens matrices kept), plus its input image at full precision."""
    per_token = VIT_WIDTH_TENSORS * vit.width + VIT_MLP_TENSORS * vit.mlp
    pixels = 3 * vit.image_size ** 2 * 4
    return int(batch * (vit.tokens * vit.layers * per_token * dtype_bytes(dtype) + pixels))


def transformer_inference_bytes(vit: VitShape, batch: int, dtype) -> int:
    """A ViT forward without gradients: a few layer-wide buffers at a time."""
    per_token = 4 * vit.width + 2 * vit.mlp
    return int(batch * vit.tokens * per_token * dtype_bytes(dtype))


@dataclass(frozen=True)
class Estimate:
    """Bytes above the loaded weights, by part; ``total`` is what ComfyUI is asked for."""
    parts: tuple  # ((name, bytes), ...)

    @property
    def total(self) -> int:
        return int(sum(b for _, b in self.parts))

    def as_dict(self) -> dict:
        return dict(self.parts)

    def describe(self) -> str:
        return ", ".join(f"{n} {b / MIB:.0f} MiB" for n, b in self.parts) + f" (total {self.total / MIB:.0f} MiB)"

    def with_allocator_margin(self) -> "Estimate":
        """The estimate with what a GPU's allocator needs beyond the tensors themselves
        (:data:`ALLOCATOR_FRAGMENTATION` of the work, plus :data:`ALLOCATOR_WORKSPACE`)."""
        margin = int(ALLOCATOR_FRAGMENTATION * self.total + ALLOCATOR_WORKSPACE)
        return Estimate(tuple(self.parts) + (("allocator margin (fragmentation, kernel workspace)", margin),))


#: What the CUDA caching allocator holds beyond the live tensors: blocks rounded up and freed
#: blocks kept split (about 10 % of what a step allocates), and the workspaces of cuDNN and the
#: attention kernels (0.25 GiB). The same margin the fit section adds to its counts
#: (benchmarks/fakemem.py); the nodes add it to the work they ask ComfyUI for, so that a partial
#: load leaves room for it. Without it, counted peaks came out up to 0.06 GiB above the card.
ALLOCATOR_FRAGMENTATION = 0.10
ALLOCATOR_WORKSPACE = 1 << 28


def seed_search_estimate(latent_shape: Sequence[int], model_dtype, usage_factor: float, cfg: float,
                         search_steps: int, decode_bytes: int = 0, vit: VitShape | None = None,
                         vit_dtype=None, dit_blocks: int = 0, vit_cast_bytes: int = 0, *,
                         checkpoint: bool = False, unit_inputs: int = 0, casts: int = 0,
                         offload: bool = False, phases: bool = False) -> Estimate:
    """One Seed Search iteration (step-level checkpointing): one step's diffusion activations
    with autograd on the CFG batch (all of them, or with ``checkpoint`` the units' inputs and one
    unit's: ``unit_inputs`` for the CFG batch), the weight casts backward keeps (``casts``; 0 when
    made again), the per-step latents the checkpointing keeps, the VAE decode with gradients
    (``decode_bytes``: ComfyUI's ``VAE.memory_used_decode`` for the latent; 0 without CLIP
    vision: the semantic loss then reads latents) and CLIP vision's forward/backward
    (``vit_cast_bytes``: the fp32 casts of its weights that backward keeps when it is stored in
    half precision or fp8 and computes in fp32). ``offload``: checkpointed inputs wait in system
    memory. ``phases``: the step and the loss (decode and CLIP vision) run one after the other
    (the search back-propagates each step's loss before building the step's graph), so only the
    larger counts; without it they are added (the estimate of earlier versions)."""
    b = int(latent_shape[0])
    shape = (call_batch(b, cfg), *latent_shape[1:])
    latent = math.prod(int(s) for s in latent_shape) * 4
    if checkpoint:
        step_bytes = checkpointed_forward_bytes(shape, model_dtype, usage_factor, dit_blocks, unit_inputs)
        if offload:         # the units' inputs wait in system memory: one unit on the device
            step_bytes -= int(unit_inputs)
        step = ("diffusion step, checkpointed", step_bytes)
    else:
        step = ("diffusion step with autograd", train_forward_bytes(shape, model_dtype, usage_factor, dit_blocks,
                                                                    unit_inputs))
    loss = []
    if decode_bytes:
        factor = VAE_GRAD_FACTOR_OFFLOADED if offload else VAE_GRAD_FACTOR
        loss.append(("VAE decode with gradients", int(factor * decode_bytes)))
    if vit is not None:
        loss.append(("CLIP vision with gradients", transformer_train_bytes(vit, b, vit_dtype or "float32")
                     + int(vit_cast_bytes)))
    parts = [("checkpointed step latents", latent * (int(search_steps) + 3))]
    if casts:
        parts.append(("weight casts kept for backward", int(casts)))
    if phases:
        loss_bytes = sum(v for _, v in loss)
        larger = step if step[1] >= loss_bytes else ("VAE decode and CLIP vision with gradients", loss_bytes)
        parts.append((larger[0] + " (the larger phase)", larger[1]))
    else:
        parts += [step] + loss
    return Estimate(tuple(parts))


def seed_rank_estimate(latent_shape: Sequence[int], model_dtype, usage_factor: float, cfg: float,
                       decode_bytes: int = 0, vit: VitShape | None = None, vit_dtype=None) -> Estimate:
    """One Seed Rank chunk (no gradients): one inference forward on the chunk's CFG batch, the
    decode of the chunk and CLIP vision's forward. ``latent_shape``: the chunk's latent."""
    b = int(latent_shape[0])
    shape = (call_batch(b, cfg), *latent_shape[1:])
    parts = [("diffusion forward", inference_forward_bytes(shape, model_dtype, usage_factor))]
    if decode_bytes:
        parts.append(("VAE decode", int(decode_bytes)))
    if vit is not None:
        parts.append(("CLIP vision", transformer_inference_bytes(vit, b, vit_dtype or "float32")))
    return Estimate(tuple(parts))


@dataclass(frozen=True)
class KVGeometry:
    """Extract's candidate K/V weights: how many elements (the rows a concept can shut) and the
    largest layer's element count."""
    candidates: int
    largest: int


#: A DiT's forward with autograd keeps about this many times its blocks' inputs (each block's
#: tokens x width), counted in fake tensors at 1024 px in bf16 (``python -m benchmarks scale
#: --probe fit-parts``, ComfyUI 0.33 classes): Flux.1 13.0x, Qwen-Image 13.4x, Flux.2 19.0x,
#: Z-Image 21.7x, SD3.5 Large 13.6x. Rounded up over the largest: 25.
DIT_FULL_FACTOR = 25.0

#: Checkpointing inside the diffusion model keeps every unit's inputs, and at backward the unit
#: that runs again holds its own activations and gradients: for a DiT about this many blocks'
#: inputs (counted as above: Flux.1 22, Qwen-Image 23, Flux.2 38, Z-Image 40, SD3.5 Large 30;
#: rounded up: 45); for a UNet, whose units differ in size, this many times all units' inputs
#: together (SDXL 2.6 at 1024 px, SD1.5 1.65 at 512 px; 3 on top of the inputs themselves).
DIT_UNIT_BLOCKS = 45.0
UNET_UNIT_SHARE = 3.0


def checkpointed_forward_bytes(latent_shape: Sequence[int], dtype, usage_factor: float, dit_blocks: int,
                               unit_inputs: int) -> int:
    """What one diffusion forward keeps for backward with checkpointing inside the model: the
    units' inputs (``unit_inputs``, counted by the node from the model's geometry) and, at
    backward, the activations of the unit that runs again (:data:`DIT_UNIT_BLOCKS`,
    :data:`UNET_UNIT_SHARE`)."""
    if dit_blocks:
        return int(unit_inputs * (1 + DIT_UNIT_BLOCKS / int(dit_blocks)))
    return int(unit_inputs * (1 + UNET_UNIT_SHARE))


def extract_estimate(latent_shape: Sequence[int], model_dtype, usage_factor: float, noise_draws: int,
                     kv_numel, kv_dtype=None, dit_blocks: int = 0, *, checkpoint: bool = False,
                     unit_inputs: int = 0, casts: int = 0, host_accumulators: bool = False) -> Estimate:
    """One Extract gradient evaluation on ``latent_shape[0] x noise_draws`` latents per forward
    (the node passes one chunk, draws 1): the forward with autograd (all its activations, or with
    ``checkpoint`` the units' inputs and one unit's), the weight casts backward keeps (``casts``:
    0 when they are made again at backward), and the K/V scores: one fp32 accumulator element per
    candidate weight (on the host with ``host_accumulators``) and three fp32 copies of the largest
    K/V layer while it runs (``kv_numel``: a :class:`KVGeometry`, or a plain element count).
    ``kv_dtype``: ignored (the scored layers keep no lifted copy of the weights; the argument
    stays for the calls recorded in docs/figures/scale.json)."""
    b = int(latent_shape[0]) * int(noise_draws)
    shape = (b, *latent_shape[1:])
    kv = kv_numel if isinstance(kv_numel, KVGeometry) else KVGeometry(int(kv_numel), 0)
    if checkpoint:
        forward = ("diffusion forward, checkpointed", checkpointed_forward_bytes(
            shape, model_dtype, usage_factor, dit_blocks, unit_inputs))
    else:
        forward = ("diffusion forward with autograd", train_forward_bytes(shape, model_dtype, usage_factor, dit_blocks,
                                                                          unit_inputs))
    parts = [forward]
    if casts:
        parts.append(("weight casts kept for backward", int(casts)))
    parts.append(("K/V scores (fp32 accumulators on the device, one layer at a time)",
                  (0 if host_accumulators else 4 * kv.candidates) + 3 * 4 * kv.largest))
    return Estimate(tuple(parts))

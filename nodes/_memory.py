"""Fitting the gradient nodes (Extract, Seed Search) on the GPU ComfyUI runs them on (issue 23).

The levers, each a ``with`` block that changes nothing of the MODEL (instance attributes over
class methods, module hooks; all removed on exit):

- :func:`checkpointed_units`: gradient checkpointing inside the diffusion model: each block
  (a UNet's ResBlocks and transformers, a DiT's blocks) keeps only its inputs and runs again at
  backward (``kernels.autograd.checkpointed``, right for ComfyUI's in-place code).
- :func:`recast_weights`: weight casts made again at backward instead of kept (a fp8 or half
  model computing in another precision holds no second copy of its weights during backward).
- :func:`scored_kv`: Extract's candidate K/V weights through ``kernels.concept_neurons
  .ScoredLayer``: each layer's weight under the search's multipliers is made when the layer runs,
  and its gradient is reduced into one fp32 accumulator inside backward (on the host when the
  device is short); no dense K/V gradients are held for the model.
- The rest is ComfyUI's: ``load_models_gpu`` with the node's estimate loads the model partially
  (weights streamed from the offload device at each forward) when weights and work do not fit.

The nodes pick the first setting of :data:`SETTINGS` whose estimate fits what ComfyUI reports
free (:func:`plan`), or the one the user forces, and say which in their info output.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

import comfy.model_management

from ..kernels import concept_neurons as KC
from ..kernels import memory as M
from ..kernels.autograd import checkpointed_modules
from ._schema import MEMORY_MODES

#: The memory settings, fastest first (the ``memory`` input's menu, nodes/_schema.py, with auto
#: first).
AUTO, *_settings = MEMORY_MODES
SETTINGS = tuple(_settings)
FULL, RECAST, CHECKPOINT, OFFLOAD = SETTINGS
CHOICES = MEMORY_MODES


@dataclass(frozen=True)
class Levers:
    """What a setting switches on."""
    checkpoint: bool = False
    recast: bool = False
    offload: bool = False

    @classmethod
    def of(cls, setting: str) -> "Levers":
        return {FULL: cls(), RECAST: cls(recast=True), CHECKPOINT: cls(checkpoint=True, recast=True),
                OFFLOAD: cls(checkpoint=True, recast=True, offload=True)}[setting]


@dataclass
class Plan:
    """The setting a node runs with, why, and what it asked ComfyUI for."""
    setting: str
    levers: Levers
    estimate: M.Estimate
    weights: int = 0                       # bytes of the weights the node computes with
    available: int | None = None           # what ComfyUI reported free (+ offloadable models)
    forced: bool = False
    chunk: int = 0                         # Extract: latents per forward (0: all)
    options: dict = field(default_factory=dict)   # setting -> bytes it would need in all

    def describe(self) -> str:
        return describe(self.as_dict())

    def as_dict(self) -> dict:
        return {"setting": self.setting, "forced": self.forced, "chunk": self.chunk,
                "weights_bytes": int(self.weights), "work_bytes": int(self.estimate.total),
                "available_bytes": None if self.available is None else int(self.available),
                "estimate": self.estimate.as_dict(), "options": {k: int(v) for k, v in self.options.items()}}


def describe(plan: dict) -> str:
    """One line for a node's info output: the setting, whether forced, and the estimate."""
    gib = float(1 << 30)
    weights, work = plan.get("weights_bytes", 0), plan.get("work_bytes", 0)
    text = (f"memory: {plan.get('setting')} ({'forced' if plan.get('forced') else 'auto'}); estimated "
            f"{(weights + work) / gib:.2f} GiB (weights {weights / gib:.2f} + work {work / gib:.2f})")
    if plan.get("available_bytes") is not None:
        text += f", {plan['available_bytes'] / gib:.2f} GiB available"
    if plan.get("chunk"):
        text += f"; {plan['chunk']} latent(s) per forward"
    return text


def check_setting(node: str, setting: str) -> str:
    from ._runtime import fail
    if setting not in CHOICES:
        raise fail(node, f"Unknown memory setting {setting!r}.", f"Use one of: {', '.join(CHOICES)}.")
    return setting


def available_bytes(device) -> int:
    """Bytes a node's models and work can have on ``device``: what ComfyUI reports free, plus what
    the models loaded there now hold (ComfyUI offloads them for a node that asks), minus what it
    keeps in reserve."""
    mm = comfy.model_management
    free = int(mm.get_free_memory(device))
    held = 0
    for lm in list(getattr(mm, "current_loaded_models", [])):
        if getattr(lm, "device", None) == device:
            try:
                held += int(lm.model_loaded_memory())
            except Exception:  # noqa: BLE001
                pass
    reserve = int(getattr(mm, "extra_reserved_memory", lambda: 0)())
    return max(0, free + held - reserve)


def plan(model, requested: str, chunks: list, need: Callable, batch: int = 0, *models) -> Plan:
    """The setting a node runs with. ``need(setting, chunk)``: the work's estimate (bytes above the
    weights) with ``chunk`` latents per forward; ``chunks``: the chunk sizes to try, largest
    first (``[0]`` where the node has no chunks). Auto takes the first setting of
    :data:`SETTINGS` (and its largest chunk) whose weights plus work fit what ComfyUI reports
    available; "recompute casts" only where the model computes in another precision than it
    stores (else it is "full"). When nothing fits, the lightest: ComfyUI may still make room.
    A forced setting takes its largest chunk that fits. ``models``: other models the node loads
    with it (the VAE, CLIP vision), whose weights count too."""
    weights = sum(weight_bytes(m) for m in (model, *models))
    floor = stream_floor(model) + sum(weight_bytes(m) for m in models)
    estimate = need

    def need(s, c):     # what is asked of ComfyUI: the work and the allocator's margin
        return estimate(s, c).with_allocator_margin()
    available = available_bytes(model.load_device)
    casts = cast_bytes(model.model) > 0
    options, fits = {}, {}
    for s in SETTINGS:
        resident = floor if s == OFFLOAD else weights
        c = next((c for c in chunks if resident + need(s, c).total <= available), None)
        fits[s] = c
        options[s] = resident + need(s, chunks[-1] if c is None else c).total
    if requested != AUTO:
        s, forced = requested, True
    else:
        forced = False
        s = next((s for s in SETTINGS if fits[s] is not None and (s != RECAST or casts)), OFFLOAD)
    c = fits[s] if fits[s] is not None else chunks[-1]
    return Plan(s, Levers.of(s), need(s, c), floor if s == OFFLOAD else weights, available, forced,
                c if c and c < batch else 0, options)


def weight_bytes(model) -> int:
    """Bytes of a model's weights (a MODEL, VAE or CLIP vision: whatever ComfyUI loads)."""
    for get in (lambda m: m.model_size(), lambda m: m.patcher.model_size()):
        try:
            return int(get(model))
        except Exception:  # noqa: BLE001
            continue
    module = getattr(model, "model", None) or getattr(model, "first_stage_model", None)
    if isinstance(module, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    return 0


def stream_floor(model) -> int:
    """What a diffusion model's weights need on the device at least when ComfyUI streams them (its
    partial loading): the two largest checkpoint units' weights (one computing, one arriving)."""
    units = checkpoint_units(model.model.diffusion_model)
    sizes = sorted((sum(p.numel() * p.element_size() for p in u.parameters()) for u in units), reverse=True)
    return int(sum(sizes[:2]))


def cast_bytes(base) -> int:
    """Bytes of the weight casts a backward keeps when a model computes in another precision than
    it stores (ComfyUI's manual cast: fp8 weights computing in bf16, half weights in fp32 on a
    CPU): its weights in the compute dtype; 0 when it computes in its stored precision."""
    compute = getattr(base, "manual_cast_dtype", None)
    if compute is None:
        return 0
    size = torch.empty((), dtype=compute).element_size()
    return int(sum(p.numel() for p in base.diffusion_model.parameters() if p.dim() >= 2) * size)


def kv_geometry(base, layers: dict) -> M.KVGeometry:
    """Extract's K/V layers as the estimate counts them: candidate elements and the largest layer."""
    from ..kernels.layers import fused_kv_start
    rows = sum((l["shape"][0] - (fused_kv_start(tuple(l["shape"]), l["kind"])
                                 if l["kind"] in ("qkv", "qkv_gqa") else 0)) * l["shape"][-1] for l in layers.values())
    largest = max((math.prod(l["shape"]) for l in layers.values()), default=0)
    return M.KVGeometry(int(rows), int(largest))


def unit_input_bytes(model, latent_shape, dtype, text_tokens: int = 256) -> int:
    """What checkpointing keeps for one forward of ``latent_shape`` latents: every unit's inputs.
    A DiT's blocks each take its tokens (image + text: ``text_tokens``, ComfyUI's T5 padding for
    Flux.1 by default) at its width; a UNet's units take the latent at their level's resolution
    and channels."""
    dm = model.model.diffusion_model
    batch, area = int(latent_shape[0]), math.prod(int(d) for d in latent_shape[2:])
    size = torch.empty((), dtype=dtype).element_size()
    if hasattr(dm, "input_blocks"):                 # a UNet
        load = _unet_unit_load(dm)
        return int(load * area * batch * size)
    width = _dit_width(dm)
    patch = getattr(dm, "patch_size", 2)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else int(patch or 1)
    tokens = area // (patch * patch) + int(text_tokens)
    blocks = sum(len(c) for c in dm.children() if isinstance(c, torch.nn.ModuleList))
    return int(blocks * tokens * width * batch * size)


def _dit_width(dm) -> int:
    """A DiT's width: the most common input width of the Linear layers of its first block (its
    attention and MLP projections read the hidden state; modulation and MLP outputs are fewer)."""
    from collections import Counter
    for lst in (c for c in dm.children() if isinstance(c, torch.nn.ModuleList) and len(c)):
        widths = Counter(m.in_features for m in lst[0].modules() if isinstance(m, torch.nn.Linear))
        if widths:
            return int(widths.most_common(1)[0][0])
    return 0


def _unet_unit_load(dm) -> float:
    """Sum over a UNet's units of their input channels x their share of the latent's pixels."""
    level, total = 0, 0.0
    for part in (list(dm.input_blocks), [dm.middle_block], list(dm.output_blocks)):
        for blk in part:
            down = up = False
            for unit in blk.children():
                ch = getattr(unit, "channels", None) or getattr(unit, "in_channels", None)
                if ch is None:
                    w = getattr(unit, "weight", None)
                    ch = w.shape[1] if w is not None and w.dim() > 1 else 0
                total += float(ch) / 4 ** level
                name = type(unit).__name__
                down |= name == "Downsample"
                up |= name == "Upsample"
            if blk is not dm.middle_block:
                level += 1 if down else 0
                level -= 1 if up else 0
    return total


# --------------------------------------------------------------------------------------------
# checkpointing inside the diffusion model
# --------------------------------------------------------------------------------------------
_PLAIN_OPS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.GroupNorm,
              torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.SiLU, torch.nn.GELU, torch.nn.Identity,
              torch.nn.Dropout, torch.nn.Upsample)


def _highest_modules_with_forward(module: torch.nn.Module) -> list:
    """ComfyUI's own walk (TrainLoraNode's, ``comfy_extras.nodes_train``) where the running ComfyUI
    has it: the highest children that are not containers (ModuleList, Sequential: a UNet's
    TimestepEmbedSequential blocks are walked into); the same walk otherwise."""
    try:
        from comfy_extras.nodes_train import find_all_highest_child_module_with_forward as find
        return list(find(module))
    except Exception:  # noqa: BLE001  (not importable here: the same rule)
        out = []

        def walk(m, top):
            if not top and not isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
                out.append(m)
                return
            for c in m.children():
                walk(c, False)
        walk(module, True)
        return out


def checkpoint_units(diffusion_model: torch.nn.Module) -> list:
    """The blocks checkpointing wraps: ComfyUI's highest modules with a forward, without single
    ops (a Linear or a norm keeps no more than its input anyway) and modules without weights."""
    return [m for m in _highest_modules_with_forward(diffusion_model)
            if not isinstance(m, _PLAIN_OPS) and any(True for _ in m.parameters())]


@contextlib.contextmanager
def checkpointed_units(diffusion_model: torch.nn.Module, trains: Callable = lambda m: False,
                       recast=None, offload=None) -> Iterator[int]:
    """Checkpoint every unit of :func:`checkpoint_units` for the ``with`` (yields how many);
    ``offload``: where the units' inputs wait for backward (the host), or None (the device)."""
    with checkpointed_modules(checkpoint_units(diffusion_model), trains=trains, recast=recast,
                              offload=offload) as n:
        yield n


#: Where checkpointed inputs wait for backward with "checkpoint + offload": system memory.
HOST = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# weight casts made again at backward
# --------------------------------------------------------------------------------------------
def _cast_again(module, dtype, device) -> torch.Tensor:
    """The weight cast a ComfyUI op makes for a forward: its own ``cast_bias_weight`` (with the
    layer's weight functions, e.g. a LoRA applied at forward time)."""
    import comfy.ops
    probe = torch.empty(0, dtype=dtype, device=device)
    out = comfy.ops.cast_bias_weight(module, probe)
    weight = out[0]
    if len(out) > 2 and hasattr(comfy.ops, "uncast_bias_weight"):      # 0.33: release its buffers
        weight = weight.clone()
        comfy.ops.uncast_bias_weight(module, out[0], out[1], out[2])
    return weight


@contextlib.contextmanager
def recast_weights(*modules: torch.nn.Module) -> Iterator[Callable]:
    """A ``recast`` for ``kernels.autograd.activation_snapshots``: knows which ComfyUI op made a
    weight cast (forward hooks on the ops that cast: ``comfy_cast_weights``), and makes it again
    with that op's own cast. Yields the function."""
    state = threading.local()
    handles = []

    def pre(m, _args):
        stack = getattr(state, "stack", None)
        if stack is None:
            stack = state.stack = []
        stack.append(m)

    def post(m, _args, _out):
        stack = getattr(state, "stack", [])
        if stack and stack[-1] is m:
            stack.pop()

    for root in modules:
        for m in root.modules():
            if hasattr(m, "comfy_cast_weights") and getattr(m, "weight", None) is not None:
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))

    def recast(cast: torch.Tensor):
        stack = getattr(state, "stack", None)
        if not stack:
            return None
        m = stack[-1]
        if tuple(m.weight.shape) != tuple(cast.shape):
            return None
        dtype, device = cast.dtype, cast.device
        return lambda: _cast_again(m, dtype, device)

    try:
        yield recast
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# Extract's K/V weights, scored inside backward
# --------------------------------------------------------------------------------------------
def _stored_weight(module) -> Callable[[], torch.Tensor]:
    """The weight a ComfyUI op computes with: its tensor with the layer's weight functions applied
    (a partially loaded model applies its patches at forward time there)."""
    def theta():
        w = module.weight
        functions = getattr(module, "weight_function", None) or ()
        if functions:
            w = w.clone()           # ComfyUI's patch functions may work on the tensor in place
            for f in functions:
                w = f(w)
        return w
    return theta


@contextlib.contextmanager
def scored_kv(diffusion_model: torch.nn.Module, layers: dict, multipliers: dict | None = None,
              acc_device=None, mode: str = "multiply") -> Iterator[dict]:
    """Every candidate K/V layer (``layers``: name -> {"shape", "kind"}) runs through
    ``kernels.concept_neurons.scored_linear`` for the ``with``: yields {name: ScoredLayer}.
    ``multipliers``: name -> the search's current multipliers (host tensors), or None; with
    ``mode="add"`` they are additive deltas instead (the dense fine-tune baseline)."""
    scored, wrapped = {}, []
    try:
        for name, spec in layers.items():
            owner = diffusion_model.get_submodule(name.rpartition(".")[0])
            layer = KC.ScoredLayer(name, _stored_weight(owner), tuple(spec["shape"]), spec["kind"],
                                   None if multipliers is None else multipliers.get(name), acc_device, mode)
            bias = getattr(owner, "bias", None)

            def forward(x, *a, _layer=layer, _bias=bias, **k):
                return KC.scored_linear(x, _layer, _bias)
            owner.forward = forward
            owner._conceptlab_scored = True
            wrapped.append(owner)
            scored[name] = layer
        yield scored
    finally:
        for m in wrapped:
            del m.forward
            del m._conceptlab_scored


def trains_inside(module: torch.nn.Module) -> bool:
    """Whether a block holds a scored K/V layer (it must be differentiated on its own)."""
    return any(getattr(m, "_conceptlab_scored", False) for m in module.modules())

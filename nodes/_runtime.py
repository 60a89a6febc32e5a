"""Shared machinery for every Concept Lab node: the one place that talks to ComfyUI internals.

- :class:`ConceptLabError` and :func:`fail`: errors that name the node, the problem and the fix.
- :func:`model_family` / :func:`require_family`: which model family a MODEL is.
- :func:`clone_model`: the only way nodes obtain a MODEL they may patch.
- :func:`gradients_through`: run a ComfyUI model with autograd, without copying or changing
  its weights (ComfyUI's weights are inference tensors; see ``kernels/autograd.py``).
- :class:`ModelGuard`: a bit-for-bit check that a MODEL came out of a node untouched.
- :class:`Progress` and :func:`check_interrupt`: progress bar and cancel.

Works on ComfyUI 0.3.75 and newer; every API used here exists there, or is feature-detected.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

import comfy.model_management
import comfy.utils

from ..kernels import memory
from ..kernels.autograd import WeightView, differentiable_weights
from ..kernels.fingerprint import diff_digests, state_digest

PACK = "ConceptLab"


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
class ConceptLabError(ValueError):
    """A user-facing error. Its text names the node, says what is wrong and how to fix it."""

    def __init__(self, node: str, problem: str, fix: str):
        self.node, self.problem, self.fix = node, problem, fix
        super().__init__(f"[{node}] {problem} Fix: {fix}")


def fail(node: str, problem: str, fix: str) -> ConceptLabError:
    return ConceptLabError(node, problem, fix)


# --------------------------------------------------------------------------------------------
# model families
# --------------------------------------------------------------------------------------------
# ComfyUI's supported_models config classes, by name, to our family labels. Names are stable
# across ComfyUI versions; unknown names fall back to the base-model class below.
_FAMILY_BY_CONFIG = {
    "SD15": "sd1", "SD15_instructpix2pix": "sd1",
    "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SD_X4Upscaler": "sd2",
    "SDXL": "sdxl", "SDXLRefiner": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
    "KOALA_700M": "sdxl", "KOALA_1B": "sdxl", "SDXL_instructpix2pix": "sdxl",
    "SD3": "sd3",                                   # SD3 and SD3.5 (one config class)
    "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux",
    "Flux2": "flux2",
    "Chroma": "chroma",
    "QwenImage": "qwen_image",
    "ZImage": "zimage",
    # variants of a listed class that the pack does not handle (pixel-space models: no latents)
    "ZImagePixelSpace": None, "ChromaRadiance": None,
}

FAMILY_NAMES = {
    "sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "Flux.1",
    "flux2": "Flux.2", "chroma": "Chroma", "qwen_image": "Qwen-Image", "zimage": "Z-Image",
}
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
DIT_FAMILIES = ("flux", "sd3", "flux2", "chroma", "qwen_image", "zimage")


def _base_model(model):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "diffusion_model"):
        return None
    return inner


def model_family(model) -> str:
    """A family of FAMILY_NAMES ('sd1', ..., 'zimage'), or 'unknown:<ConfigClass>' for a ComfyUI
    MODEL of an architecture the pack does not know."""
    base = _base_model(model)
    if base is None:
        return "unknown:not-a-model"
    cfg = getattr(base, "model_config", None)
    name = type(cfg).__name__ if cfg is not None else ""
    # the config class or the nearest listed ancestor (a model defined as a subclass of SD3's
    # config, as the demo DiT is, is an SD3); None marks variants the pack does not handle
    for klass in type(cfg).__mro__ if cfg is not None else ():
        if klass.__name__ in _FAMILY_BY_CONFIG:
            fam = _FAMILY_BY_CONFIG[klass.__name__]
            return fam if fam is not None else f"unknown:{name}"
    if type(base).__name__ == "BaseModel" and "context_dim" in getattr(cfg, "unet_config", {}):
        return "sd2" if getattr(cfg, "unet_config", {}).get("use_linear_in_transformer") else "sd1"
    return f"unknown:{name or type(base).__name__}"


def family_label(family: str) -> str:
    return FAMILY_NAMES.get(family, family.split(":", 1)[-1])


def require_family(node: str, model, allowed: Iterable[str], what: str = "this node") -> str:
    """Return the model's family, or raise a clear error if ``what`` does not support it."""
    if _base_model(model) is None:
        raise fail(node, f"The 'model' input is a {type(model).__name__}, not a diffusion MODEL.",
                   "Connect the MODEL output of a checkpoint loader (or ConceptLab Load Demo Model).")
    allowed = tuple(allowed)
    fam = model_family(model)
    if fam not in allowed:
        names = ", ".join(family_label(a) for a in allowed)
        raise fail(node, f"{what} does not support {family_label(fam)} models.",
                   f"Use a model of a supported family ({names}).")
    return fam


# --------------------------------------------------------------------------------------------
# non-destructive patching
# --------------------------------------------------------------------------------------------
def latent_channels(base) -> int | None:
    """Channels of a ComfyUI BaseModel's latents: its latent format's declared count (16 for SD3
    and Flux, 4 for the SD UNets, 128 for Flux.2)."""
    return getattr(getattr(base, "latent_format", None), "latent_channels", None)


def frame_latents(base) -> bool:
    """Whether a ComfyUI BaseModel denoises video-shaped latents (B, C, T, H, W), an image being
    one frame: Qwen-Image, on Wan 2.1's latent format (``latent_dimensions`` 3). ComfyUI's
    samplers add the frame axis to a 4-D empty latent (``fix_empty_latent_channels``)."""
    return getattr(getattr(base, "latent_format", None), "latent_dimensions", 2) == 3


def vae_frames(vae) -> bool:
    """Whether a ComfyUI VAE is a video VAE (5-D latents; Wan 2.1's, which Qwen-Image ships):
    its ``encode`` takes an image batch as the frames of one video."""
    return getattr(vae, "latent_dim", 2) == 3


def vae_ratio(vae) -> int:
    """Pixels per latent pixel of an image VAE (8 for SD, SDXL, SD3, Flux and Qwen-Image VAEs)."""
    ratio = None
    if hasattr(vae, "spacial_compression_encode"):          # 0.3.x: also video VAEs' (t, h, w)
        try:
            ratio = vae.spacial_compression_encode()
        except Exception:  # noqa: BLE001
            ratio = None
    if not isinstance(ratio, int):
        ratio = getattr(vae, "downscale_ratio", 8)
    return ratio if isinstance(ratio, int) and ratio > 0 else 8


def clone_model(model):
    """A ModelPatcher clone: shares weights, owns its patch lists. Patch this, never the input."""
    return model.clone()


def diffusion_key(param_name: str) -> str:
    """The ModelPatcher patch key of a diffusion-model parameter name."""
    return "diffusion_model." + param_name


# --------------------------------------------------------------------------------------------
# gradients through inference tensors
# --------------------------------------------------------------------------------------------
def load_for_compute(*models, memory_required: float = 0, patched_weights: bool = False) -> None:
    """Have ComfyUI place the models on their compute device (weights patched as configured).

    ``memory_required``: bytes the node's work needs above the weights (``kernels/memory.py``);
    ComfyUI offloads other models to make room for it, and loads a model only partially (its
    lowvram mode: weights cast to the device layer by layer) when it cannot fit otherwise.

    ``patched_weights``: the caller reads or trains the module's weight tensors themselves
    (Extract's K/V aliases, the fingerprint). A partially loaded model keeps the layers it left
    on the offload device *unpatched* and applies its patches (a LoRA, Apply's shut neurons) at
    each forward; ComfyUI is therefore asked with ``force_patch_weights`` (0.3.x), which patches
    those weights in place on the offload device (ComfyUI keeps backups), so the tensors hold what
    the model computes with. It changes nothing for layers loaded whole. See docs/memory.md."""
    mm = comfy.model_management
    models = list(models)
    if hasattr(memory_required, "total"):           # a kernels.memory.Estimate
        _OOM_STATE.estimate = memory_required.describe()
        memory_required = memory_required.total
    need = int(max(0, memory_required))
    extra = {}
    if patched_weights:
        import inspect
        if "force_patch_weights" in inspect.signature(mm.load_models_gpu).parameters:
            extra["force_patch_weights"] = True
    mm.load_models_gpu(models, memory_required=need, **extra)


#: The last estimate load_for_compute passed on this thread (for the out-of-memory message).
_OOM_STATE = threading.local()


def compute_dtype(base) -> torch.dtype:
    """The dtype a ComfyUI BaseModel computes in (for memory estimates): its inference dtype
    (0.3.x), else its manual cast dtype, else its weights' dtype."""
    fn = getattr(base, "get_dtype_inference", None)
    candidates = []
    if fn is not None:
        try:
            candidates.append(fn())
        except Exception:  # noqa: BLE001
            pass
    candidates.append(getattr(base, "manual_cast_dtype", None))
    try:
        candidates.append(base.get_dtype())
    except Exception:  # noqa: BLE001
        pass
    candidates.append(next((p.dtype for p in base.parameters() if p.is_floating_point()), None))
    return next((d for d in candidates if isinstance(d, torch.dtype)), torch.float32)


def dit_blocks(model) -> int:
    """Transformer blocks of a DiT's diffusion model (for the memory estimates: a DiT keeps
    activations per block), 0 for a UNet. Counted as the top-level block lists (Flux: double +
    single blocks, SD3: joint blocks, Qwen-Image: transformer blocks, ...)."""
    if model_family(model) not in DIT_FAMILIES:
        return 0
    dm = _base_model(model).diffusion_model
    return sum(len(c) for c in dm.children() if isinstance(c, torch.nn.ModuleList))


def unet_activation_load(diffusion_model) -> tuple | None:
    """(transformer load, residual-block load) of a ComfyUI UNet: the sum over its transformer
    blocks (resp. ResBlocks) of width x share of the latent's tokens (1/4 per level down), over
    the base width (``kernels.memory.unet_train_usage`` combines them); None when the model is
    not laid out as input / middle / output blocks."""
    parts = [getattr(diffusion_model, n, None) for n in ("input_blocks", "middle_block", "output_blocks")]
    base = getattr(diffusion_model, "model_channels", None)
    if any(p is None for p in parts) or not base:
        return None

    def load(module, level):
        t = r = 0.0
        for sub in module.modules():
            blocks = getattr(sub, "transformer_blocks", None)
            width = getattr(sub, "in_channels", None)
            if blocks is not None and width:
                t += len(blocks) * width / 4 ** level
            elif type(sub).__name__ == "ResBlock" and getattr(sub, "out_channels", None):
                r += sub.out_channels / 4 ** level
        return t, r

    level, t, r = 0, 0.0, 0.0
    for blk in parts[0]:
        dt, dr = load(blk, level)
        t, r = t + dt, r + dr
        level += any(type(m).__name__ == "Downsample" for m in blk.children())
    dt, dr = load(parts[1], level)
    t, r = t + dt, r + dr
    for blk in parts[2]:
        dt, dr = load(blk, level)
        t, r = t + dt, r + dr
        level -= any(type(m).__name__ == "Upsample" for m in blk.children())
    return t / base, r / base


def train_usage_factor(model) -> float:
    """The usage factor the training estimates (Extract, Seed Search) scale by: a UNet's
    activation load relative to SD1.5's, where it has one; else ComfyUI's per-model
    ``memory_usage_factor`` (DiTs are counted per block on top of it)."""
    base = _base_model(model)
    if model_family(model) not in DIT_FAMILIES:
        load = unet_activation_load(base.diffusion_model)
        if load and load[0] + load[1] > 0:
            return memory.unet_train_usage(*load)
    return float(getattr(base, "memory_usage_factor", 1.0) or 1.0)


def lowvram_patched(model) -> bool:
    """Whether a loaded MODEL has layers whose patches ComfyUI applies at forward time (layers
    of a partially loaded model that carry weight patches)."""
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module):
        return False
    for m in base.modules():
        for attr in ("weight_function", "bias_function"):
            fns = getattr(m, attr, None)
            if fns is None:
                continue
            fns = fns if isinstance(fns, (list, tuple)) else [fns]
            if any(getattr(f, "is_lowvram_patch", False) or type(f).__name__ == "LowVramPatch" for f in fns):
                return True
    return False


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch running out of memory: ComfyUI's own test where it has one
    (``model_management.is_oom``, 0.3.x), else ``OOM_EXCEPTION`` / ``torch.OutOfMemoryError``, or
    the CPU allocator's "can't allocate memory"."""
    mm = comfy.model_management
    is_oom = getattr(mm, "is_oom", None)
    if is_oom is not None:
        try:
            if is_oom(e):
                return True
        except Exception:  # noqa: BLE001
            pass
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(mm, "OOM_EXCEPTION", None))
                  if isinstance(k, type) and k is not Exception)
    if kinds and isinstance(e, kinds):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def out_of_memory_as_error(node: str, lower: str) -> Iterator[None]:
    """Turn torch's out-of-memory error inside the block into a :class:`ConceptLabError` that
    names the node and the settings to lower (``lower``), and the estimate the node passed to
    :func:`load_for_compute` inside the block. The node's own ``with`` blocks have restored the
    model by then (their ``finally``); the allocator's cache is emptied."""
    _OOM_STATE.estimate = ""
    try:
        yield
    except BaseException as e:
        if isinstance(e, ConceptLabError) or not is_out_of_memory(e):
            raise
        estimate = getattr(_OOM_STATE, "estimate", "")
        try:
            comfy.model_management.soft_empty_cache()
        except Exception:  # noqa: BLE001
            pass
        need = f" It estimated {estimate} above the model's weights." if estimate else ""
        raise fail(node, f"Ran out of memory ({type(e).__name__}).{need} The MODEL is unchanged.",
                   f"Lower {lower}; or close other models / workflows, or start ComfyUI with --lowvram.") from e


@contextlib.contextmanager
def comfy_training_mode() -> Iterator[None]:
    """ComfyUI's own switch for differentiable code paths, on for the duration of the block.

    ``comfy.model_management.in_training`` (ComfyUI 0.3.7x and later; its TrainLoraNode sets it
    the same way) makes model code take plain-torch paths that autograd can go through: on
    ComfyUI 0.33, Flux's RoPE otherwise runs comfy_kitchen's ``apply_rope`` custom op, which has
    no backward ("Trying to backward through comfy_kitchen.apply_rope.default"). The old value
    is restored on exit; older ComfyUI has no such switch and needs none."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    old = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = old


@contextlib.contextmanager
def gradients_through(
    model,
    trainable: Iterable[str] | Callable[[str], bool] = (),
    grad_dtype: torch.dtype | None = torch.float32,
    snapshot_saved: bool = True,
) -> Iterator[WeightView]:
    """Autograd through a ComfyUI MODEL's diffusion model, zero-copy.

    Leaves ``torch.inference_mode`` (ComfyUI runs nodes inside it) and aliases every weight
    of ``model.model.diffusion_model`` as a normal tensor over the same storage, so backward
    works without a second copy of the model. ``trainable`` names (relative to the diffusion
    model) get ``requires_grad``; for them, weights in fp16/bf16 are lifted to ``grad_dtype``.
    On exit the original parameter objects are restored. ComfyUI's differentiable code paths are
    switched on meanwhile (:func:`comfy_training_mode`). ComfyUI's forward code updates
    activations in place (``x += ...``); ``snapshot_saved`` (see ``kernels.autograd``) makes
    that safe for backward.

    Call after the model is loaded for compute (``load_for_compute``), so that the aliases
    point at the weights on the compute device, with the patcher's patches already applied.
    """
    base = _base_model(model)
    if base is None:
        raise TypeError("gradients_through() needs a ComfyUI MODEL (ModelPatcher)")
    with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
        with differentiable_weights(base.diffusion_model, trainable, grad_dtype, snapshot_saved) as view:
            yield view


# --------------------------------------------------------------------------------------------
# bit-for-bit guard
# --------------------------------------------------------------------------------------------
def _patch_signature(model) -> tuple:
    patches = getattr(model, "patches", {}) or {}
    objs = getattr(model, "object_patches", {}) or {}
    opts = getattr(model, "model_options", {}) or {}
    topts = opts.get("transformer_options", {}) if isinstance(opts, dict) else {}
    return (
        tuple(sorted((k, len(v)) for k, v in patches.items())),
        tuple(sorted((k, id(v)) for k, v in objs.items())),
        tuple(sorted(opts.keys())) if isinstance(opts, dict) else (),
        repr(sorted((k, repr(type(v))) for k, v in topts.items())),
    )


@dataclass
class ModelGuard:
    """Snapshot of a MODEL's weights (bitwise) and patch state; ``check()`` after a node ran.

    Compares SHA-256 digests of every tensor in the underlying module's state dict (the same
    nn.Module ComfyUI caches and shares between workflows) and the patcher's own patch lists.
    """

    model: object
    digests: dict
    patches: tuple

    @classmethod
    def of(cls, model) -> "ModelGuard":
        return cls(model, cls._digest(model), _patch_signature(model))

    @staticmethod
    def _digest(model) -> dict:
        module = model.model if hasattr(model, "model") else model
        return state_digest(module.state_dict())

    def changes(self) -> list[str]:
        changed = diff_digests(self.digests, self._digest(self.model))
        if _patch_signature(self.model) != self.patches:
            changed.append("<patcher state: patches / object_patches / model_options>")
        return changed

    def check(self, node: str = "node") -> None:
        changed = self.changes()
        if changed:
            raise AssertionError(
                f"{node} modified the incoming MODEL: {len(changed)} tensor(s)/state changed, "
                f"e.g. {changed[:5]}")


# --------------------------------------------------------------------------------------------
# progress and cancel
# --------------------------------------------------------------------------------------------
def interrupt_types() -> tuple[type[BaseException], ...]:
    """The exception ComfyUI raises on cancel."""
    return (comfy.model_management.InterruptProcessingException,)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def send_progress_text(text: str, node_id) -> None:
    """Show ``text`` under the node in the front end (``PromptServer.send_progress_text``, over the
    websocket), where a server runs and the node's id is known; nothing otherwise (a node called
    from Python, as the tests and benchmarks do)."""
    import sys
    server = getattr(sys.modules.get("server"), "PromptServer", None)
    instance = getattr(server, "instance", None)
    if instance is None or node_id is None or not hasattr(instance, "send_progress_text"):
        return
    instance.send_progress_text(text, node_id)


def preview_image(images: torch.Tensor) -> tuple:
    """A progress-bar preview of the first image of ``images`` ((B, 3, H, W) or (B, H, W, 3) in
    [0, 1]): ComfyUI's ``("JPEG", PIL image, max size)``, the size its latent previews use
    (``--preview-size``)."""
    import numpy as np
    from PIL import Image
    from comfy.cli_args import args
    img = images[0].detach().float().cpu()
    if img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.movedim(0, -1)
    arr = (img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return ("JPEG", Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr), getattr(args, "preview_size", 512))


class Progress:
    """A ComfyUI progress bar (the green bar on the node) that also checks for cancel, with a
    preview image on the bar and a line of text under the node where the caller has them."""

    def __init__(self, total: int, node_id: str | None = None):
        self.total = max(int(total), 1)
        self.done = 0
        self.node_id = node_id
        self._bar = comfy.utils.ProgressBar(self.total, node_id=node_id)

    def step(self, n: int = 1, preview=None, text: str | None = None) -> None:
        """Advance the bar by ``n`` (once per value: ComfyUI's front end shows every update).
        ``preview``: a ``preview_image`` tuple shown on the node; ``text``: progress text."""
        check_interrupt()
        self.done = min(self.done + n, self.total)
        if text:
            self.say(text)
        self._bar.update_absolute(self.done, self.total, preview)

    def say(self, text: str) -> None:
        """Progress text under the node (no bar movement)."""
        send_progress_text(text, self.node_id)

    def finish(self) -> None:
        """The bar at its end, when the work stopped early (a search that converged)."""
        if self.done < self.total:
            self.step(self.total - self.done)


def out_of_memory_guard(node: str, lower: str):
    """Decorator form of :func:`out_of_memory_as_error` for a node's FUNCTION (keeps the
    signature: ``functools.wraps``)."""
    import functools

    def deco(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with out_of_memory_as_error(node, lower):
                return fn(*args, **kwargs)
        return run
    return deco

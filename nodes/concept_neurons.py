"""Concept neurons (Cones): extract a subject as a small set of shut K/V weights, save, load,
apply (with a strength), combine several, and describe them.

Graph shapes::

    MODEL, CLIP, VAE, IMAGE (1-10 photos of the subject; 3-10 views work best), "a three"
        -> ConceptLab Concept Neurons Extract -> CONCEPT_NEURONS -> ConceptLab Concept Neurons Save
    ConceptLab Concept Neurons Load -> CONCEPT_NEURONS --\\
    MODEL ------------------------------------------------ ConceptLab Concept Neurons Apply -> MODEL -> KSampler
    several CONCEPT_NEURONS -> ConceptLab Concept Neurons Combine -> CONCEPT_NEURONS (+ overlap STRING)

Candidates (``kernels/layers.py``): cross-attention K/V in the SD UNets; in the MMDiT families
(SD3, Flux) the K and V rows of the text stream's fused QKV projection in the joint/double-stream
blocks. Flux's single-stream blocks are not searched: their ``linear1`` projects text and image
tokens together, so no weight there reads only the text. The model call of the loss takes every
cond ComfyUI's ``extra_conds`` builds (pooled vector, Flux's guidance), so families need no branches.

Extraction never changes the incoming MODEL: gradients run through ``_runtime.gradients_through``
(zero-copy aliases, the K/V weights lifted to fp32) and the masks are applied to those aliases by
temporarily substituting ``theta * multiplier`` tensors, restored in a ``finally``. Apply returns a
clone with ModelPatcher weight patches (``-W * mask``, scaled by the strength).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..kernels import concept_neurons as K
from ..kernels import memory as M
from ..kernels.fingerprint import combined_digest, tensor_digest
from ..kernels.autograd import activation_snapshots
from ..kernels.layers import concept_kv_layers
from ._runtime import (
    Progress, clone_model, diffusion_key, fail, family_label, frame_latents, gradients_through,
    compute_dtype, dit_blocks, latent_channels, load_for_compute, out_of_memory_guard, require_family, train_usage_factor, vae_frames,
    vae_ratio)
from ._schema import combo, graph_node_id, io, memory_input, numbered_inputs, numbered_values, schema

log = logging.getLogger("ConceptLab")

PACK_VERSION = "0.1.0"
FORMAT = "conceptlab.concept_neurons"
FORMAT_VERSION = 1
FOLDER = "concept_neurons"
DEMO_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "concept_neurons")
SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "flux", "zimage", "qwen_image", "flux2", "chroma")

EXTRACT = "ConceptLab Concept Neurons Extract"
SAVE = "ConceptLab Concept Neurons Save"
LOAD = "ConceptLab Concept Neurons Load"
APPLY = "ConceptLab Concept Neurons Apply"
COMBINE = "ConceptLab Concept Neurons Combine"
INFO = "ConceptLab Concept Neurons Info"

#: Reference images Extract takes: Cones learns the subject from a few views of it (3 to 10 work
#: best, as in the paper's setting); 1 or 2 run, with a note in the info output, more than 10
#: are refused (like Seed Search's references: a few typical views, and memory bounded).
MAX_REFERENCES = 10
GOOD_REFERENCES = 3
#: What to lower when Extract runs out of memory (named in its error).
EXTRACT_LOWER = ("the number of reference images, their resolution, prior_images or noise_draws (each gradient "
                 "runs the model on (images + prior images) x noise draws latents at once), or load the model "
                 "in bf16 or fp16 (weight_dtype of the model loader)")

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_LAYERS = 4096
MAX_LAYER_NUMEL = 1 << 31


# --------------------------------------------------------------------------------------------
# models/concept_neurons (registered once, at import, in both ComfyUI versions)
# --------------------------------------------------------------------------------------------
# Names are checked as text, never by where links lead: a name that escapes (an absolute path, a
# drive letter, a '..' component) is refused, and links inside a concept folder (a symlinked
# sub-folder or file, e.g. models kept on another disk) are followed, as ComfyUI's folder_paths
# lists and opens them. Only the machine's user can make links there; a /prompt client can only
# send names.
def register_folder() -> None:
    """Register models/concept_neurons (plus the pack's demo concepts). ComfyUI reads
    extra_model_paths.yaml before it loads custom nodes: a 'concept_neurons:' entry there creates
    the folder entry first, with the user's path and no file-type filter. That path stays first
    (Save writes there), models/concept_neurons is added after it, and only .safetensors files
    are listed."""
    fnp = folder_paths.folder_names_and_paths
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in fnp:
        fnp[FOLDER] = ([default], {".safetensors"})
    paths, exts = fnp[FOLDER]
    for folder in (default, DEMO_FOLDER):
        if folder not in paths:
            paths.append(folder)
    if set(exts) != {".safetensors"}:
        fnp[FOLDER] = (paths, {".safetensors"})


register_folder()


def save_dir() -> str:
    return os.path.abspath(folder_paths.get_folder_paths(FOLDER)[0])


def escapes(name: str) -> bool:
    """Whether a file name would leave the folder it is joined to: empty, a NUL, an absolute
    path (either separator, UNC), a drive letter ('C:...'), or a '..' component."""
    return (not name or "\x00" in name or os.path.isabs(name) or name[0] in "/\\"
            or re.match(r"[A-Za-z]:", name) is not None or ".." in re.split(r"[\\/]", name))


def find_concept_file(filename: str) -> tuple:
    """(path, dangling link) of a name inside the concept folders: the first folder where it is a
    file (links followed), else (None, the first link there that leads nowhere, or None)."""
    dangling = None
    if escapes(filename):
        return None, None
    for base in folder_paths.get_folder_paths(FOLDER):
        full = os.path.join(base, filename)
        if os.path.isfile(full):
            return full, None
        if dangling is None and os.path.islink(full):
            dangling = full
    return None, dangling


def concept_files() -> list:
    """The names Load's menu offers: every .safetensors in the concept folders (through links,
    as ComfyUI lists them) that Load can open; dangling links and names Load would refuse are
    left out."""
    try:
        names = folder_paths.get_filename_list(FOLDER)
    except Exception:  # noqa: BLE001  (an unreadable folder must not break the node list)
        return []
    return sorted(n for n in names if find_concept_file(n)[0] is not None)


# --------------------------------------------------------------------------------------------
# the CONCEPT_NEURONS object
# --------------------------------------------------------------------------------------------
@dataclass
class ConceptNeurons:
    """A set of shut K/V weights, with what is needed to refuse the wrong model."""

    indices: dict                     # {param name (diffusion model): sorted int64 flat indices}
    layers: dict                      # {param name: {"shape": [..], "kind": "k"|"v"|"qkv"}}
    fingerprint: str                  # combined digest of the base K/V weights (as fp16)
    family: str
    class_word: str = ""
    names: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(int(v.numel()) for v in self.indices.values())

    @property
    def candidates(self) -> int:
        return sum(K.candidate_count(tuple(l["shape"]), l["kind"]) for l in self.layers.values())

    @property
    def shut_fraction(self) -> float:
        return self.count / max(self.candidates, 1)

    def encoded(self) -> dict:
        return {n: K.encode_indices(self.indices[n]) for n in sorted(self.indices)}


def effective_weights(model, layer_names) -> dict:
    """The K/V weights this MODEL computes with (its own patches applied, another clone's not).

    ComfyUI shares one module between a MODEL and its clones and patches it in place when a
    clone is loaded, so the module's tensors are read only after loading this MODEL (with its
    patches in the tensors also where ComfyUI loaded it only partially)."""
    load_for_compute(model, patched_weights=True)
    base = model.model
    return {n: comfy.utils.get_attr(base, diffusion_key(n)).detach() for n in layer_names}


def kv_fingerprint(model, layer_names) -> str:
    """Digest of the K/V weights a MODEL computes with, cast to fp16 (fp32 and fp16 copies of one
    checkpoint agree)."""
    digests = {}
    for n, w in effective_weights(model, layer_names).items():
        digests[n] = tensor_digest(w.detach().to("cpu", torch.float16))
    return combined_digest(digests)


def model_layers(model, include_self_attention: bool = False) -> dict:
    dm = model.model.diffusion_model
    shapes = {n: tuple(p.shape) for n, p in dm.named_parameters()}
    return {l.name: {"shape": list(shapes[l.name]), "kind": l.kind}
            for l in concept_kv_layers(shapes, include_self_attention)}


# --------------------------------------------------------------------------------------------
# file format
# --------------------------------------------------------------------------------------------
def _tensor_key(i: int) -> str:
    return f"layer.{i:04d}"


def write_file(concept: ConceptNeurons, path: str) -> int:
    """Write ``concept`` to ``path`` (a new file; refuses to overwrite). Returns bytes written."""
    import safetensors.torch
    blobs = concept.encoded()
    names = list(blobs)
    tensors = {_tensor_key(i): blobs[n] for i, n in enumerate(names)}
    layers = [{"name": n, "shape": concept.layers[n]["shape"], "kind": concept.layers[n]["kind"],
               "count": int(concept.indices[n].numel())} for n in names]
    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "pack_version": PACK_VERSION,
        "codec": K.CODEC, "family": concept.family, "fingerprint": concept.fingerprint,
        "class_word": concept.class_word, "names": json.dumps(concept.names),
        "layers": json.dumps(layers), "settings": json.dumps(concept.settings, default=str),
        "stats": json.dumps(concept.stats, default=str),
    }
    if os.path.exists(path):
        raise FileExistsError(path)
    tmp = path + ".partial"
    safetensors.torch.save_file(tensors, tmp, metadata=meta)
    try:
        os.link(tmp, path)  # atomic, never overwrites
    finally:
        os.unlink(tmp)
    return os.path.getsize(path)


def read_file(path: str, node: str = LOAD) -> ConceptNeurons:
    """Read and validate a concept file; every problem is a clear ConceptLabError."""
    name = os.path.basename(path)
    fix_corrupt = "Re-extract the concept or restore the file from a backup; do not edit concept files by hand."
    try:
        size = os.path.getsize(path)
    except OSError:
        raise fail(node, f"Concept file '{name}' does not exist.", "Pick a file from the list (models/concept_neurons).")
    if size > MAX_FILE_BYTES:
        raise fail(node, f"'{name}' is {size} bytes, far larger than any concept file.", fix_corrupt)
    import safetensors
    try:
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if len(keys) > MAX_LAYERS:
                raise fail(node, f"'{name}' declares {len(keys)} layers.", fix_corrupt)
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ == "ConceptLabError":
            raise
        raise fail(node, f"'{name}' is not a readable safetensors file (truncated or corrupt: {e}).", fix_corrupt)
    if meta.get("format") != FORMAT:
        raise fail(node, f"'{name}' is not a Concept Lab concept-neurons file.",
                   "Load it with the node that made it; this node reads files saved by ConceptLab Concept Neurons Save.")
    if meta.get("format_version") != str(FORMAT_VERSION) or meta.get("codec") != K.CODEC:
        raise fail(node, f"'{name}' uses format {meta.get('format_version')} / codec {meta.get('codec')}, "
                   f"this pack reads format {FORMAT_VERSION} / {K.CODEC}.", "Update Concept Lab, or re-extract the concept.")
    try:
        layers = json.loads(meta["layers"])
        settings = json.loads(meta.get("settings", "{}"))
        stats = json.loads(meta.get("stats", "{}"))
        names = json.loads(meta.get("names", "[]"))
        fingerprint, family = str(meta["fingerprint"]), str(meta["family"])
        assert isinstance(layers, list) and len(layers) == len(tensors)
    except Exception:  # noqa: BLE001
        raise fail(node, f"'{name}' has damaged metadata.", fix_corrupt) from None
    indices, shapes = {}, {}
    for i, l in enumerate(layers):
        try:
            lname, shape, kind, count = str(l["name"]), [int(d) for d in l["shape"]], str(l["kind"]), int(l["count"])
        except Exception:  # noqa: BLE001
            raise fail(node, f"'{name}' has a damaged layer entry ({i}).", fix_corrupt) from None
        numel = math.prod(shape) if shape else 0
        if not shape or any(d <= 0 for d in shape) or numel > MAX_LAYER_NUMEL or kind not in ("k", "v", "qkv", "qkv_gqa"):
            raise fail(node, f"'{name}' declares an impossible layer {lname} {shape}.", fix_corrupt)
        blob = tensors.get(_tensor_key(i))
        if blob is None:
            raise fail(node, f"'{name}' lacks the indices of layer {lname}.", fix_corrupt)
        try:
            idx = K.decode_indices(blob, count, numel)
        except K.CorruptIndices as e:
            raise fail(node, f"'{name}' is corrupt in layer {lname}: {e}.", fix_corrupt) from None
        cand = K.candidate_mask(tuple(shape), kind)
        if cand is not None and idx.numel() and not bool(cand.reshape(-1)[idx].all()):
            raise fail(node, f"'{name}' shuts weights of layer {lname} that are not K/V weights.", fix_corrupt)
        indices[lname] = idx
        shapes[lname] = {"shape": shape, "kind": kind}
    return ConceptNeurons(indices=indices, layers=shapes, fingerprint=fingerprint, family=family,
                          class_word=str(meta.get("class_word", "")), names=list(names),
                          settings=settings, stats=stats)


def safe_path(filename: str, node: str = LOAD) -> str:
    """The file a Load name stands for, inside the concept folders; a clear error otherwise."""
    fix = "Pick a file from the list; concept files live in models/concept_neurons."
    if escapes(filename):
        raise fail(node, f"'{filename}' is not a file name inside the concept folder "
                   "(absolute paths, drive letters and '..' are refused).", fix)
    path, dangling = find_concept_file(filename)
    if path is not None:
        return path
    if dangling is not None:
        raise fail(node, f"'{filename}' is a link to '{os.readlink(dangling)}', which does not exist.",
                   "Connect the disk the link points to, or fix or remove the link in "
                   "models/concept_neurons.")
    raise fail(node, f"Concept file '{filename}' was not found.", fix)


def next_save_path(prefix: str, node: str = SAVE) -> str:
    """``<folder>/<prefix>_00001_.safetensors`` with the first free counter (like SaveImage).

    The prefix is checked as text (no absolute path, drive letter or '..'; letters, digits,
    '-', '_', '.', spaces and '/' sub-folders), and where it leads is checked with links resolved
    (as ComfyUI 0.33's folder_paths.is_within_directory does for its own saves): a sub-folder
    that is a link to somewhere outside the save folder is refused. Load still follows links."""
    prefix = (prefix or "concept").strip()
    parts = [part for part in re.split(r"[\\/]", prefix) if part not in ("", ".")]
    if escapes(prefix) or not re.fullmatch(r"[\w\-. /]+", prefix) or not parts:
        raise fail(node, f"The file name prefix '{prefix}' is not allowed.",
                   "Use letters, digits, '-', '_' and optional sub-folders, e.g. 'my_subject/three'; "
                   "no '..' or absolute paths.")
    full_prefix = os.path.join(save_dir(), *parts)
    folder, target = os.path.realpath(save_dir()), os.path.realpath(os.path.dirname(full_prefix))
    try:
        inside = os.path.commonpath((folder, target)) == folder
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        raise fail(node, f"The file name prefix '{prefix}' leads out of {save_dir()} through a link "
                   f"(it would write into {target}); like ComfyUI's own save nodes, Save writes only "
                   "inside its folder.",
                   "Use a prefix without that linked sub-folder, or a real sub-folder; to keep concepts "
                   "on another disk, link models/concept_neurons itself or add the folder in "
                   "extra_model_paths.yaml.")
    os.makedirs(os.path.dirname(full_prefix), exist_ok=True)
    counter = 1
    while True:
        path = f"{full_prefix}_{counter:05d}_.safetensors"
        if not os.path.lexists(path):
            return path
        counter += 1


# --------------------------------------------------------------------------------------------
# checks against a MODEL
# --------------------------------------------------------------------------------------------
def check_compatible(concept: ConceptNeurons, model, node: str = APPLY) -> None:
    fam = require_family(node, model, SUPPORTED, "Concept neurons")
    if concept.family != fam:
        raise fail(node, f"This concept was made for a {family_label(concept.family)} model, "
                   f"the connected MODEL is {family_label(fam)}.",
                   "Connect the model the concept was extracted from (or re-extract it on this model).")
    have = model_layers(model, include_self_attention=True)
    for n, l in concept.layers.items():
        if n not in have or list(have[n]["shape"]) != list(l["shape"]):
            raise fail(node, f"The concept's layer {n} {l['shape']} does not exist with that shape in the "
                       "connected MODEL: it was made for another model.",
                       "Connect the model the concept was extracted from (or re-extract it on this model).")
    if kv_fingerprint(model, sorted(concept.layers)) != concept.fingerprint:
        raise fail(node, "The concept was made for a different set of base weights (K/V fingerprint mismatch): "
                   "it would shut the wrong neurons on this model.",
                   "Connect the exact checkpoint the concept was extracted from (or re-extract it on this model).")


def apply_concept(model, concept: ConceptNeurons, strength: float = 1.0, node: str = APPLY):
    """A clone of ``model`` whose shut weights are scaled by ``1 - strength`` (0 at strength 1)."""
    check_compatible(concept, model, node)
    out = clone_model(model)
    if strength == 0 or concept.count == 0:
        return out
    patches = {}
    weights = effective_weights(model, [n for n, idx in concept.indices.items() if idx.numel()])
    for n, w in weights.items():
        patches[diffusion_key(n)] = (K.shut_diff(w.to("cpu"), concept.indices[n], 1.0),)
    out.add_patches(patches, float(strength))
    return out


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
@dataclass
class ExtractSettings:
    procedure: str = "iterative"
    budget_fraction: float = 0.004
    target_loss_ratio: float = 0.0          # 0: off; else stop at this x starting loss
    iterations: int = 40                    # gradient evaluations (rounds for iterative)
    prior_weight: float = 0.3
    prior_images: int = 8
    noise_draws: int = 4                    # noise/sigma draws per image per gradient
    rate: float = 0.1                       # accumulated procedure: multiplier step
    include_self_attention: bool = False
    prior_steps: int = 20
    prior_cfg: float = 3.0
    seed: int = 0
    fixed_noise: bool = True                # same noise/sigma draws for every gradient
    sigma_range: tuple = (0.0, 1.0)         # fraction of the schedule used (uniform timesteps)
    memory: str = "auto"                    # nodes/_memory.py: auto, full, recompute casts, checkpoint, ...
    chunk: int = 0                          # latents per forward (0: as the memory plan says)


def encode_text(clip, text: str):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def _latent_noise(base, batch: int, hw: tuple) -> torch.Tensor:
    return torch.zeros(batch, latent_channels(base), *hw)


def extra_model_conds(base, cond, pooled, hw: tuple) -> dict:
    """The conds ComfyUI's own ``extra_conds`` builds for this model from a text condition, as
    the sampler would: cross-attention context, the pooled/ADM vector ('y': SDXL's size
    embeddings, SD3's and Flux's pooled text) and whatever else the family needs (Flux.1-dev's
    'guidance', default 3.5). Every family goes through the same call; no per-family branches."""
    return base.extra_conds(pooled_output=pooled, cross_attn=cond, width=hw[1] * 8, height=hw[0] * 8,
                            device=cond.device, noise=_latent_noise(base, 1, hw).to(cond.device))


def _model_kwargs(base, cond, pooled, batch: int, hw: tuple) -> dict:
    """Keyword arguments for ``base.apply_model``: every cond of :func:`extra_model_conds`,
    repeated to the batch with ComfyUI's own ``process_cond``."""
    kw = {}
    for k, c in extra_model_conds(base, cond, pooled, hw).items():
        if k == "c_concat":  # inpaint/instruct conditioning images: not part of this loss
            continue
        kw[k] = c.process_cond(batch_size=batch, device=cond.device, area=(hw[0], hw[1], 0, 0)).cond
    return kw


def guidance_distilled(base, cond, pooled, hw: tuple) -> bool:
    """True for models that take the guidance strength as a cond (Flux dev/schnell, Flux.2): they
    are sampled with cfg 1, the guidance is already inside the model. Chroma takes a guidance cond
    too, but ComfyUI gives it 0 (an input of its modulation approximator) and it is sampled with
    real CFG."""
    guidance = extra_model_conds(base, cond, pooled, hw).get("guidance")
    return guidance is not None and bool(torch.as_tensor(guidance.cond).ne(0).any())


def sample_prior(model, clip, prompt: str, n: int, hw: tuple, steps: int, cfg: float, seed: int, batch: int = 0):
    """n latents generated by the model itself from the class prompt (ComfyUI's own sampler, as the
    stock KSampler runs it, no grad). ``batch``: images per sampler call (0: all n at once); the
    noise is drawn for all n first, as one KSampler call would, so the images do not depend on it."""
    import comfy.sample
    cond, pooled = encode_text(clip, prompt)
    pos = [[cond, {"pooled_output": pooled}]]
    neg_c, neg_p = encode_text(clip, "")
    neg = [[neg_c, {"pooled_output": neg_p}]]
    base = model.model
    if guidance_distilled(base, cond, pooled, hw):
        cfg = 1.0
    empty = _latent_noise(base, n, hw)
    fix = getattr(comfy.sample, "fix_empty_latent_channels", None)
    empty = fix(model, empty) if fix is not None else empty
    noise = comfy.sample.prepare_noise(empty, seed)
    batch = batch or n
    out = [comfy.sample.sample(model, noise[i:i + batch], steps, cfg, "euler", "normal", pos, neg,
                               empty[i:i + batch], seed=seed, disable_pbar=True)
           for i in range(0, n, batch)]
    return torch.cat(out)


class ConceptLoss:
    """The concept-implanting loss on a ComfyUI MODEL and its gradient w.r.t. weight multipliers.

    ``L = mean_subject(w(s) |x0_hat - x0|^2) + lambda * mean_prior(w(s) |x0_hat - x0|^2)`` with
    the model's own forward process (``model_sampling.noise_scaling``) at uniformly drawn schedule
    points and ``w(s) = min(1/s^2, 5) + 1`` (the min-SNR-capped v-loss in x0 terms; the same
    weighting for EPS, V and FLOW models so that the objective is comparable across them).

    How a gradient is taken (``plan``, from :func:`memory_plan`): the batch of (images + prior
    images) x noise draws latents runs ``plan.chunk`` latents per forward, each chunk's loss is
    back-propagated at once (the gradients add up to the whole batch's); the K/V weights run
    through scored layers (``nodes/_memory.py``: ``dL/dW`` reduced into one accumulator per layer
    inside backward, on the host when the device is short); with checkpointing, every block of the
    diffusion model keeps only its inputs and runs again at backward; weight casts are made again
    at backward instead of kept. Each of these gives the plain gradient (tested to 1e-5).
    """

    def __init__(self, model, subject, prior, cond, pooled, settings: ExtractSettings, layers: dict, plan=None):
        self.model, self.base = model, model.model
        self.settings = settings
        self.layers = layers
        self.names = sorted(layers)
        self.plan = plan
        with torch.inference_mode(False):  # normal tensors (ComfyUI hands inference tensors)
            self.x0 = torch.cat([subject, prior]).float().clone()
            self.cond = cond.clone()
            self.pooled = pooled.clone() if pooled is not None else None
            sig = self.base.model_sampling.sigmas.float().cpu().clone()
        self.n_subject, self.n_prior = subject.shape[0], prior.shape[0]
        self.gen = torch.Generator().manual_seed(settings.seed + 1)
        lo, hi = settings.sigma_range
        a, b = int(lo * (len(sig) - 1)), max(int(hi * (len(sig) - 1)), int(lo * (len(sig) - 1)) + 1)
        self.sigmas = sig[a:b + 1]
        self.evaluations = 0
        self.copied_bytes = 0
        #: how many chunks a gradient runs (None: all); only a memory count sets it (the peak of a
        #: gradient is reached by its second chunk), never a node
        self.chunks_limit = None
        self._model_kw = {}   # (batch, latent size, device) -> apply_model's conds; fixed per extraction

    def batch(self):
        if self.settings.fixed_noise:  # the same draws every evaluation: comparable losses
            self.gen = torch.Generator().manual_seed(self.settings.seed + 1)
        r = self.settings.noise_draws
        x0 = self.x0.repeat(r, *[1] * (self.x0.ndim - 1))      # (B, C, H, W) or (B, C, 1, H, W)
        sigma = self.sigmas[torch.randint(0, len(self.sigmas), (x0.shape[0],), generator=self.gen)]
        noise = torch.randn(x0.shape, generator=self.gen)
        return x0, sigma, noise

    def sample_weights(self, batch: int) -> torch.Tensor:
        """Each latent's weight in the loss (the batch is noise draws x (subject, prior) latents):
        1 / (draws x subjects) for a subject latent, prior_weight / (draws x priors) for a prior
        one, so that ``sum(w * per_sample)`` is the loss above."""
        n = self.n_subject + self.n_prior
        draws = batch // n
        w = torch.empty(draws, n)
        w[:, :self.n_subject] = 1.0 / (draws * self.n_subject)
        if self.n_prior:
            w[:, self.n_subject:] = self.settings.prior_weight / (draws * self.n_prior)
        return w.reshape(-1)

    def per_sample(self, x0, sigma, noise):
        """The weighted denoising error of each latent (``w(s) |x0_hat - x0|^2``)."""
        ms = self.base.model_sampling
        dev = comfy.model_management.get_torch_device()
        x0, sigma, noise = x0.to(dev), sigma.to(dev), noise.to(dev)
        x = ms.noise_scaling(sigma.view(-1, *[1] * (x0.ndim - 1)), noise, x0)
        key = (x.shape[0], tuple(x.shape[-2:]), dev)
        kw = self._model_kw.get(key)
        if kw is None:
            pooled = self.pooled.to(dev) if self.pooled is not None else None
            kw = self._model_kw[key] = _model_kwargs(self.base, self.cond.to(dev), pooled, *key[:2])
        den = self.base.apply_model(x, sigma, **kw)
        w = torch.clamp(1.0 / sigma.float() ** 2, max=5.0) + 1.0
        return (den.float() - x0.float()).pow(2).mean(dim=tuple(range(1, x0.ndim))) * w

    def loss_on(self, x0, sigma, noise):
        """The loss of a whole batch in one forward (the plain way; the tests' reference)."""
        per = self.per_sample(x0, sigma, noise)
        return (per * self.sample_weights(per.shape[0]).to(per)).sum()

    def __call__(self, multipliers: dict):
        """(loss, {name: dL/dm}) for weights ``theta * m``. ``dL/dm_i = theta_i * dL/dtheta'_i``,
        which is the Taylor score of weight i at the current point (times its multiplier)."""
        return self.gradient(multipliers, "multiply")

    def gradient(self, leaves: dict, mode: str = "multiply") -> tuple:
        """(loss, {name: dL/dleaf}) with each K/V weight ``theta * leaf`` (``mode="multiply"``: the
        search's multipliers) or ``theta + leaf`` (``"add"``: the fine-tune baseline's deltas)."""
        from . import _memory as MEM
        plan = self.plan
        levers = plan.levers if plan is not None else MEM.Levers()
        acc_device = "cpu" if levers.offload else None
        dm = self.base.diffusion_model
        with contextlib.ExitStack() as stack:
            stack.enter_context(gradients_through(self.model, snapshot_saved=False))
            scored = stack.enter_context(MEM.scored_kv(dm, self.layers, leaves, acc_device, mode))
            recast = stack.enter_context(MEM.recast_weights(dm)) if levers.recast else None
            if levers.checkpoint:
                stack.enter_context(MEM.checkpointed_units(dm, MEM.trains_inside, recast,
                                                           MEM.HOST if levers.offload else None))
            weights = list(dm.parameters()) + list(dm.buffers())
            stack.enter_context(activation_snapshots(weights, recast=recast))
            x0, sigma, noise = self.batch()  # made here: outside inference mode
            weight = self.sample_weights(x0.shape[0])
            chunk = plan.chunk if plan is not None and plan.chunk else x0.shape[0]
            total = 0.0
            for a in range(0, x0.shape[0], chunk)[:self.chunks_limit]:
                part = slice(a, a + chunk)
                per = self.per_sample(x0[part], sigma[part], noise[part])
                loss = (per * weight[part].to(per)).sum()
                loss.backward()
                total += float(loss.detach())
                del per, loss
            grads = {n: scored[n].multiplier_grads() for n in self.names}
        self.evaluations += 1
        return total, grads


def max_latent_side(base) -> Optional[int]:
    """The largest latent side the diffusion model can take, where it has one: SD3's MMDiT has a
    learned position embedding of ``pos_embed_max_size`` patches a side. None: no limit."""
    dm = base.diffusion_model
    size = getattr(dm, "pos_embed_max_size", None)
    if not size or getattr(dm, "pos_embed", None) is None:
        return None
    patch = getattr(getattr(dm, "x_embedder", None), "patch_size", (1,))
    return int(size) * int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def check_references(images, vae, base, node: str = EXTRACT) -> torch.Tensor:
    """The reference images as (N, H, W, 3), or a clear error: an IMAGE batch of 1 to 10 images,
    each side at least one latent pixel of the VAE and at most what the model can take."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4) \
            or not images.is_floating_point():
        what = type(images).__name__ if not torch.is_tensor(images) else f"a tensor of shape {tuple(images.shape)}"
        raise fail(node, f"The 'images' input is {what}, not an IMAGE (B, H, W, 3).",
                   "Connect images of the subject, e.g. from Load Image (several: Image Batch).")
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    if n < 1:
        raise fail(node, "No reference images were given.",
                   f"Connect 1 to {MAX_REFERENCES} images of the subject to the 'images' input "
                   f"({GOOD_REFERENCES} to {MAX_REFERENCES} different views work best).")
    if n > MAX_REFERENCES:
        raise fail(node, f"{n} reference images were given; at most {MAX_REFERENCES} are used.",
                   f"Pass {MAX_REFERENCES} or fewer ({GOOD_REFERENCES} to {MAX_REFERENCES} different views "
                   "of the subject work best).")
    r = vae_ratio(vae)
    if h < r or w < r:
        raise fail(node, f"The reference images are {w}x{h} pixels; the VAE needs at least {r}x{r} "
                   f"(it makes one latent pixel from {r}x{r} pixels).",
                   "Use pictures of the subject at the model's resolution (64x64 for the demo models, "
                   "512x512 for SD1.x, 1024x1024 for SDXL, SD3 and Flux); enlarge small ones with "
                   "Upscale Image.")
    most = max_latent_side(base)
    if most is not None and max(h, w) // r > most:
        raise fail(node, f"The reference images are {w}x{h} pixels; this model's position embedding "
                   f"covers at most {most * r}x{most * r}.",
                   "Scale the images down to the model's resolution (Upscale Image / ImageScale), "
                   "e.g. 1024x1024.")
    images = images.float()
    return images.expand(-1, -1, -1, 3) if images.shape[-1] == 1 else images[..., :3]


def images_to_latents(vae, images: torch.Tensor, base, node: str = EXTRACT) -> torch.Tensor:
    """One latent per image, shaped as the model denoises them: (N, C, H, W), or (N, C, 1, H, W)
    on video-shaped latents (Qwen-Image). A video VAE (Qwen-Image's Wan 2.1) would encode a batch
    as the frames of one video, so it gets the images one at a time."""
    images = images[:, :, :, :3]
    if vae_frames(vae):
        lat = torch.cat([vae.encode(images[i:i + 1]) for i in range(images.shape[0])])
    else:
        lat = vae.encode(images)
    frames = frame_latents(base)
    if frames and lat.ndim == 4:
        lat = lat.unsqueeze(2)                          # an image VAE's latent as one frame
    if lat.ndim != (5 if frames else 4):
        raise fail(node, f"The VAE makes latents of shape {tuple(lat.shape)}, the MODEL denoises "
                   f"{'video-shaped (B, C, 1, H, W)' if frames else 'image (B, C, H, W)'} latents: "
                   "the VAE does not belong to this model.", "Connect the VAE of the same checkpoint.")
    want = latent_channels(base)
    if lat.shape[1] != want:
        raise fail(node, f"The VAE makes {lat.shape[1] if lat.ndim > 1 else '?'}-channel latents, the MODEL "
                   f"denoises {want}-channel latents: the VAE does not belong to this model.",
                   f"Connect the VAE of the same checkpoint (one that makes {want}-channel latents; "
                   "Flux and SD3 checkpoints use a 16-channel VAE, SD1.x/SD2.x/SDXL a 4-channel one).")
    return base.process_latent_in(lat.float())


def memory_estimate(model, subject, prior, settings: ExtractSettings, layers: dict, setting: str = "full",
                    chunk: int = 0) -> M.Estimate:
    """Bytes above the weights for one gradient evaluation with a memory ``setting`` and ``chunk``
    latents per forward (0: the whole batch) (kernels/memory.py; docs/memory.md)."""
    from . import _memory as MEM
    base = model.model
    n_prior = int(prior) if isinstance(prior, int) else int(prior.shape[0])
    batch = (int(subject.shape[0]) + n_prior) * int(settings.noise_draws)
    shape = (chunk or batch, *subject.shape[1:])
    levers = MEM.Levers.of(setting)
    return M.extract_estimate(shape, compute_dtype(base), train_usage_factor(model), 1, MEM.kv_geometry(base, layers),
                              dit_blocks=dit_blocks(model), checkpoint=levers.checkpoint,
                              unit_inputs=MEM.unit_input_bytes(model, shape, compute_dtype(base)),
                              casts=0 if levers.recast else MEM.cast_bytes(base),
                              host_accumulators=levers.offload)


def memory_plan(model, subject, n_prior: int, settings: ExtractSettings, layers: dict, requested: str,
                node: str = EXTRACT):
    """The memory setting and chunk Extract runs with (``nodes/_memory.py``): the fastest setting,
    with the most latents per forward, whose estimate fits what ComfyUI reports free; or the
    setting the user forced, with the most latents per forward that fits."""
    from . import _memory as MEM
    MEM.check_setting(node, requested)
    batch = (int(subject.shape[0]) + int(n_prior)) * int(settings.noise_draws)
    if settings.chunk:
        chunks = [min(int(settings.chunk), batch)]
    else:
        chunks = list(dict.fromkeys([batch] + [2 ** k for k in range(batch.bit_length() - 1, -1, -1) if 2 ** k < batch]))

    def need(s, c):
        return memory_estimate(model, subject, n_prior, settings, layers, s, c)
    return MEM.plan(model, requested, chunks, need, batch)


class ReportedLoss:
    """The extraction loss as the search calls it, reporting each gradient evaluation under the
    node (progress text): the loss against the starting loss, and the K/V weights shut so far (read
    off the multipliers the search hands over: 0 is shut)."""

    def __init__(self, loss, progress: Progress, settings: ExtractSettings, layers: dict):
        self.loss, self.progress, self.settings = loss, progress, settings
        self.candidates = sum(K.candidate_count(tuple(l["shape"]), l["kind"]) for l in layers.values())
        self.start, self.calls = None, 0

    def __call__(self, multipliers: dict):
        value, grads = self.loss(multipliers)
        self.calls += 1
        self.start = value if self.start is None else self.start
        shut = sum(int((m == 0).sum()) for m in multipliers.values())
        if self.settings.procedure == "accumulated":
            scaled = sum(int((m < 1).sum()) for m in multipliers.values())
            weights = (f"{scaled:,} K/V weights scaled down ({shut:,} to zero); the "
                       f"{K.budget_count(self.candidates, self.settings.budget_fraction):,} with the highest "
                       "summed scores are shut at the end")
        else:
            weights = f"{shut:,} of {self.candidates:,} K/V weights shut"
        self.progress.say(f"gradient {self.calls}/{self.settings.iterations}: loss {value:.5f} "
                          f"(start {self.start:.5f}); {weights}")
        return value, grads


def run_search(loss: ConceptLoss, layers: dict, settings: ExtractSettings, step=None) -> K.SearchResult:
    """Run the chosen procedure with scores as multiplier gradients (see :class:`ConceptLoss`)."""
    names = sorted(layers)
    ones = {n: torch.ones(layers[n]["shape"]) for n in names}
    cands = {n: K.candidate_mask(tuple(layers[n]["shape"]), layers[n]["kind"]) for n in names}
    total = sum(K.candidate_count(tuple(layers[n]["shape"]), layers[n]["kind"]) for n in names)
    count = K.budget_count(total, settings.budget_fraction)
    target = settings.target_loss_ratio or None

    # The kernels work on "weights" theta0 * mask; here theta0 is all ones, so the weights they
    # hand over are the multipliers themselves and their Taylor scores m * dL/dm are exactly the
    # Taylor scores theta * dL/dtheta of the real weights (see ConceptLoss.__call__).
    if settings.procedure == "iterative":
        res = K.iterative_shutting(ones, loss, count, settings.iterations, cands, target, step)
    elif settings.procedure == "accumulated":
        res = K.accumulated_scaledown(ones, loss, count, settings.iterations, settings.rate, cands, target, step)
    else:
        raise ValueError(settings.procedure)
    return res


def extract(model, clip, vae, images: torch.Tensor, class_prompt: str, settings: ExtractSettings,
            node_id=None, node: str = EXTRACT, prior_latents: Optional[torch.Tensor] = None,
            **kwargs) -> ConceptNeurons:
    fam = require_family(node, model, SUPPORTED, "Concept-neuron extraction")
    images = check_references(images, vae, model.model, node)
    if not class_prompt.strip():
        raise fail(node, "The class prompt is empty.", "Type the subject's class, e.g. 'a dog' or 'a three'.")
    if settings.procedure not in K.PROCEDURES:
        raise fail(node, f"Unknown procedure {settings.procedure!r}.", f"Use one of {', '.join(K.PROCEDURES)}.")
    t0 = time.perf_counter()
    layers = model_layers(model, settings.include_self_attention)
    if not layers:
        raise fail(node, "This MODEL has no cross-attention K/V weights to search.",
                   "Use an SD1.x, SD2.x, SDXL, SD3 or Flux model.")
    progress = Progress(settings.iterations + 2, node_id)
    base = model.model
    with torch.inference_mode():
        cond, pooled = encode_text(clip, class_prompt)
        subject = images_to_latents(vae, images, base, node)
    progress.step()
    n_prior = settings.prior_images if prior_latents is None else int(prior_latents.shape[0])
    plan = memory_plan(model, subject, n_prior, settings, layers, kwargs.get("memory") or settings.memory, node)
    if prior_latents is None and settings.prior_images > 0:
        with torch.inference_mode():
            prior_raw = sample_prior(model, clip, class_prompt, settings.prior_images, tuple(subject.shape[-2:]),
                                     settings.prior_steps, settings.prior_cfg, settings.seed,
                                     batch=max(1, plan.chunk // max(1, settings.noise_draws)) if plan.chunk else 0)
        prior_latents = base.process_latent_in(prior_raw.float())
    elif prior_latents is None:
        prior_latents = subject[:0]
    progress.step()
    load_for_compute(model, memory_required=plan.estimate, patched_weights=True)
    loss = ConceptLoss(model, subject, prior_latents, cond, pooled, settings, layers, plan)
    log.info("%s: %s", node, plan.describe())
    res = run_search(ReportedLoss(loss, progress, settings, layers), layers, settings, step=progress.step)
    progress.finish()
    fp = kv_fingerprint(model, sorted(layers))
    cn = ConceptNeurons(indices={n: res.indices[n] for n in sorted(layers)}, layers=layers, fingerprint=fp,
                        family=fam, class_word=class_prompt.strip(), names=[class_prompt.strip()],
                        settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()})
    if images.shape[0] < GOOD_REFERENCES:
        log.warning("%s: only %d reference image(s); %s", node, images.shape[0], few_references_note(images.shape[0]))
    cn.stats = {"evaluations": res.evaluations, "loss_start": res.losses[0] if res.losses else None,
                "loss_end": res.losses[-1] if res.losses else None, "stopped_early": res.stopped_early,
                "seconds": round(time.perf_counter() - t0, 2), "images": int(images.shape[0]),
                "prior_images": int(prior_latents.shape[0]), "losses": [round(x, 5) for x in res.losses],
                "memory": plan.as_dict()}
    return cn


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
def few_references_note(n: int) -> str:
    return (f"Cones learns the subject from a few views of it ({GOOD_REFERENCES} to {MAX_REFERENCES} work "
            f"best); with {n}, the concept may hold that picture rather than the subject.")


def info_text(concept: ConceptNeurons) -> str:
    blobs = concept.encoded()
    nbytes = sum(int(b.numel()) for b in blobs.values())
    lines = [f"concept: {', '.join(concept.names) or concept.class_word}  (class '{concept.class_word}', "
             f"{family_label(concept.family)})",
             f"shut: {concept.count} of {concept.candidates} K/V weights ({100 * concept.shut_fraction:.3f}%), "
             f"index bytes {nbytes} ({nbytes / max(concept.count, 1):.2f} B per weight)"]
    for n in sorted(concept.indices):
        c = int(concept.indices[n].numel())
        if c:
            lines.append(f"  {n}: {c}")
    n_images = concept.stats.get("images") if isinstance(concept.stats, dict) else None
    if isinstance(n_images, int) and 0 < n_images < GOOD_REFERENCES:
        lines.append(f"note: {n_images} reference image(s). {few_references_note(n_images)}")
    if concept.settings:
        s = concept.settings
        lines.append(f"settings: procedure {s.get('procedure')}, budget {s.get('budget_fraction')}, "
                     f"iterations {s.get('iterations')}, prior weight {s.get('prior_weight')}")
    memory = concept.stats.get("memory") if isinstance(concept.stats, dict) else None
    if isinstance(memory, dict):
        from . import _memory as MEM
        lines.append(MEM.describe(memory))
    return "\n".join(lines)


def combine(concepts: list, node: str = COMBINE) -> tuple:
    concepts = [c for c in concepts if c is not None]
    if not concepts:
        raise fail(node, "No concepts connected.", "Connect at least one CONCEPT_NEURONS input.")
    first = concepts[0]
    for c in concepts[1:]:
        if c.fingerprint != first.fingerprint or c.family != first.family:
            raise fail(node, "The concepts were extracted from different models.",
                       "Combine only concepts made on the same checkpoint.")
    labelled = [(", ".join(c.names) or c.class_word or f"concept {i + 1}", c.indices) for i, c in enumerate(concepts)]
    report = K.overlap_report(labelled)
    layers = {}
    for c in concepts:
        layers.update(c.layers)
    merged = ConceptNeurons(indices=K.union(c.indices for c in concepts), layers=layers,
                            fingerprint=first.fingerprint, family=first.family,
                            class_word=" + ".join(c.class_word for c in concepts),
                            names=[n for c in concepts for n in (c.names or [c.class_word])],
                            settings={"combined": [c.settings for c in concepts]})
    for n in merged.layers:
        merged.indices.setdefault(n, torch.zeros(0, dtype=torch.int64))
    lines = [f"union: {report['union_count']} weights"]
    for p in report["pairs"]:
        lines.append(f"{p['a']} & {p['b']}: {p['shared']} shared of {p['a_count']} / {p['b_count']} "
                     f"(Jaccard {p['jaccard']:.3f})")
    return merged, "\n".join(lines)


# --------------------------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------------------------
_TT_CONCEPT = "Concept neurons: the shut K/V weights of one or more subjects."


_CONCEPT = io.Custom("CONCEPT_NEURONS")
_ALIASES = ["Cones", "concept neurons"]


class ConceptLabConceptNeuronsExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabConceptNeuronsExtract", display_name=EXTRACT, category="ConceptLab/concept neurons",
            description=("Finds the concept neurons of a subject (Cones): the few cross-attention K/V weights "
                         "whose shutting makes the plain class prompt draw this subject. Uses the reference "
                         "images, the class prompt and prior images the model generates from it. The MODEL is "
                         "not changed; connect the output to Save or Apply."),
            search_aliases=_ALIASES + ["extract concept", "subject", "personalize", "personalization", "DreamBooth"],
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The model to find the subject's neurons in (SD1.x, SD2.x, SDXL, SD3, Flux)."),
                io.Clip.Input("clip", tooltip="The model's text encoder (encodes the class prompt)."),
                io.Vae.Input("vae", tooltip="The model's VAE (encodes the reference images)."),
                io.Image.Input("images", tooltip=f"1 to {MAX_REFERENCES} images of the subject (a batch; "
                                                 f"{GOOD_REFERENCES} to {MAX_REFERENCES} different views work best), "
                                                 "at the model's resolution: at least 8x8 pixels, e.g. 64x64 for "
                                                 "the demo models, 512x512 for SD1.x, 1024x1024 for SDXL, SD3 and "
                                                 "Flux."),
                io.String.Input("class_prompt", default="a three", multiline=False,
                                tooltip="The plain class of the subject, e.g. 'a dog'. After applying "
                                        "the concept this prompt draws the subject."),
                combo("procedure", list(K.PROCEDURES), default="iterative",
                               tooltip="iterative: shut the top-scored weights in rounds; "
                                       "accumulated: multiplicative scale-down, summed scores."),
                io.Float.Input("budget_percent", default=0.4, min=0.001, max=20.0, step=0.01,
                               tooltip="How many K/V weights may be shut, in percent of all candidates."),
                io.Int.Input("iterations", default=40, min=1, max=5000,
                             tooltip="Gradient evaluations (rounds for the iterative procedure)."),
                io.Float.Input("prior_weight", default=0.3, min=0.0, max=10.0, step=0.05,
                               tooltip="lambda: weight of the prior-preservation loss."),
                io.Int.Input("prior_images", default=8, min=0, max=64,
                             tooltip="How many class images the model generates for prior preservation."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed for prior images and noise."),
                io.Float.Input("target_loss_ratio", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Stop early once the loss falls to this fraction of the "
                                       "starting loss (0: use the whole budget)."),
                io.Boolean.Input("include_self_attention", default=False, optional=True,
                                 tooltip="Also search self-attention K/V (attn1). Off in the paper's description."),
                io.Int.Input("noise_draws", default=4, min=1, max=64, optional=True,
                             tooltip="Noise levels drawn per image per gradient."),
                io.Float.Input("scale_down_rate", default=0.1, min=0.001, max=1.0, step=0.001, optional=True,
                               tooltip="accumulated procedure: how far the top-scored weight's "
                                       "multiplier moves per iteration."),
                memory_input(),
            ],
            outputs=[_CONCEPT.Output(display_name="concept", tooltip=_TT_CONCEPT),
                     io.String.Output(display_name="info", tooltip="Statistics of the extraction.")])

    @classmethod
    @out_of_memory_guard(EXTRACT, EXTRACT_LOWER)
    def execute(cls, model, clip, vae, images, class_prompt, procedure, budget_percent, iterations,
                prior_weight, prior_images, seed, target_loss_ratio=0.0, include_self_attention=False,
                noise_draws=4, scale_down_rate=0.1, memory="auto"):
        s = ExtractSettings(procedure=procedure, budget_fraction=budget_percent / 100.0,
                            target_loss_ratio=target_loss_ratio, iterations=iterations,
                            prior_weight=prior_weight, prior_images=prior_images, noise_draws=noise_draws,
                            rate=scale_down_rate, include_self_attention=include_self_attention, seed=seed)
        cn = extract(model, clip, vae, images, class_prompt, s, node_id=graph_node_id(cls), memory=memory)
        return io.NodeOutput(cn, info_text(cn))


class ConceptLabConceptNeuronsSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabConceptNeuronsSave", display_name=SAVE, category="ConceptLab/concept neurons",
            description=("Saves concept neurons to models/concept_neurons as a small .safetensors file "
                         "(compressed indices + what is needed to refuse the wrong model). Never overwrites: "
                         "a counter is appended like SaveImage does."),
            search_aliases=_ALIASES + ["save concept"],
            is_output_node=True,
            inputs=[_CONCEPT.Input("concept", tooltip=_TT_CONCEPT),
                    io.String.Input("filename_prefix", default="concept",
                                    tooltip="File name prefix inside models/concept_neurons.")],
            outputs=[io.String.Output(display_name="filename",
                                      tooltip="The saved file's name inside models/concept_neurons.")])

    @classmethod
    def execute(cls, concept, filename_prefix):
        path = next_save_path(filename_prefix)
        while True:
            try:
                nbytes = write_file(concept, path)
                break
            except FileExistsError:  # a concurrent save took the name: take the next one
                path = next_save_path(filename_prefix)
        back = read_file(path, SAVE)  # verify: the file holds exactly what we meant to save
        if any(not torch.equal(back.indices[n], concept.indices[n]) for n in concept.indices):
            raise fail(SAVE, "The saved file does not read back identically.", "Check the disk; the file was kept.")
        rel = os.path.relpath(path, save_dir())
        log.info("ConceptLab: saved concept neurons to %s (%d bytes)", path, nbytes)
        return io.NodeOutput(rel, ui={"text": [f"{rel} ({nbytes} bytes)"]})


class ConceptLabConceptNeuronsLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabConceptNeuronsLoad", display_name=LOAD, category="ConceptLab/concept neurons",
            description=("Loads concept neurons saved by Save (from models/concept_neurons or the pack's demo "
                         "folder). Corrupt, truncated, hostile or foreign files are refused with a clear message; "
                         "whether the concept fits the MODEL is checked when it is applied."),
            search_aliases=_ALIASES + ["load concept"],
            inputs=[combo("concept_file", concept_files() or ["(no concept files)"],
                                   tooltip="A concept file in models/concept_neurons.")],
            outputs=[_CONCEPT.Output(display_name="concept", tooltip=_TT_CONCEPT),
                     io.String.Output(display_name="info", tooltip="Statistics of the loaded concept.")])

    @classmethod
    def fingerprint_inputs(cls, concept_file):
        try:
            p = safe_path(concept_file)
            return f"{os.path.getmtime(p)}:{os.path.getsize(p)}"
        except Exception:  # noqa: BLE001
            return concept_file

    @classmethod
    def execute(cls, concept_file):
        cn = read_file(safe_path(concept_file))
        return io.NodeOutput(cn, info_text(cn))


class ConceptLabConceptNeuronsApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabConceptNeuronsApply", display_name=APPLY, category="ConceptLab/concept neurons",
            description=("Applies concept neurons to a MODEL: returns a patched copy where the concept's weights "
                         "are shut (strength 1) or scaled by 1 - strength. The incoming MODEL is unchanged. "
                         "Then prompt with the plain class ('a three') to draw the subject."),
            search_aliases=_ALIASES + ["apply concept", "subject", "personalize"],
            inputs=[io.Model.Input("model", tooltip="The model the concept was extracted from."),
                    _CONCEPT.Input("concept", tooltip=_TT_CONCEPT),
                    io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                                   tooltip="1 shuts the neurons (zero); between 0 and 1 scales them by 1 - strength.")],
            outputs=[io.Model.Output(tooltip="A patched copy of the model.")])

    @classmethod
    def execute(cls, model, concept, strength):
        return io.NodeOutput(apply_concept(model, concept, strength))


#: Combine's inputs after the two it needs: they appear one by one as the user connects them.
MORE_CONCEPTS = ("concept_3", "concept_4")


class ConceptLabConceptNeuronsCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabConceptNeuronsCombine", display_name=COMBINE, category="ConceptLab/concept neurons",
            description=("Combines several concepts into one (the union of their neurons), e.g. two subjects "
                         "in one image, and reports how much they overlap."),
            search_aliases=_ALIASES + ["combine concepts", "merge concepts", "multi-subject", "two subjects"],
            inputs=[_CONCEPT.Input("concept_1", tooltip="First concept."),
                    _CONCEPT.Input("concept_2", tooltip="Second concept."),
                    *numbered_inputs("more_concepts", MORE_CONCEPTS, lambda name: _CONCEPT.Input(
                        name, optional=True, tooltip="Another concept (optional)."))],
            outputs=[_CONCEPT.Output(display_name="concept", tooltip="The union of the inputs."),
                     io.String.Output(display_name="overlap", tooltip="Pairwise overlap of the inputs' neuron sets.")])

    @classmethod
    def execute(cls, concept_1, concept_2, more_concepts=None, concept_3=None, concept_4=None):
        more = numbered_values(more_concepts, MORE_CONCEPTS, concept_3=concept_3, concept_4=concept_4)
        return io.NodeOutput(*combine([concept_1, concept_2, *more.values()]))


class ConceptLabConceptNeuronsInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabConceptNeuronsInfo", display_name=INFO, category="ConceptLab/concept neurons",
            description="Describes concept neurons: how many weights are shut per layer, bytes, class word, settings.",
            search_aliases=_ALIASES + ["concept info"],
            is_output_node=True,
            inputs=[_CONCEPT.Input("concept", tooltip=_TT_CONCEPT)],
            outputs=[io.String.Output(display_name="text", tooltip="A short statistics text.")])

    @classmethod
    def execute(cls, concept):
        text = info_text(concept)
        return io.NodeOutput(text, ui={"text": [text]})


NODES = [ConceptLabConceptNeuronsExtract, ConceptLabConceptNeuronsSave, ConceptLabConceptNeuronsLoad,
         ConceptLabConceptNeuronsApply, ConceptLabConceptNeuronsCombine, ConceptLabConceptNeuronsInfo]

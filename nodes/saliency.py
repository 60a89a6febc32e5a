"""Attention saliency nodes: DAAM for UNets, ConceptAttention for multimodal DiTs (SD3, Flux).

Graph shape (any sampler works, because capture is a MODEL patch)::

    model -> ConceptLab Saliency Capture -> (MODEL) -> KSampler / SamplerCustomAdvanced -> VAEDecode
                                        \\-> (SALIENCY_RECORDING) ----------------------\\
                                                       ConceptLab Saliency Maps <- IMAGE
                                                        -> SALIENCY, overlay IMAGE, MASK
                                                       ConceptLab Mask From Concept -> MASK

The capture node clones the MODEL and adds patches only (an ``attn2`` replace per UNet
cross-attention layer, a ``dit`` double-block replace per SD3 joint block or Flux
double-stream block, and a chained
``model_function_wrapper``). The incoming MODEL is never touched. The recording keeps running
sums, so memory does not grow with steps; it always holds the most recent sampling run (a run
that starts at a higher noise level than the previous call resets it).

Both paths leave the sampled image bit for bit unchanged: attention outputs are computed by
ComfyUI's own attention function, and the probabilities / concept stream are computed beside it.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

import comfy.ldm.modules.attention as comfy_attention

from ..kernels import saliency as K
from ._runtime import UNET_FAMILIES, clone_model, fail, family_label, model_family, require_family
from .architectures import dit_scale, dit_stream
from ._schema import ACCEPT_OLD_NAMES, choice_inputs, chosen, combo, io, schema

log = logging.getLogger("ConceptLab")

CAPTURE = "ConceptLab Saliency Capture"
MAPS = "ConceptLab Saliency Maps"
MASK_NODE = "ConceptLab Mask From Concept"
METHODS = ("auto", "daam", "conceptattention", "crossattention")
DIT_SALIENCY_FAMILIES = ("sd3", "flux", "flux2", "chroma", "zimage", "qwen_image")


# ---------------------------------------------------------------------------------------------
# parsing helpers
# ---------------------------------------------------------------------------------------------
def parse_concepts(text: str) -> list:
    """'seven, two; sky' -> ['seven', 'two', 'sky'] (lower-cased, duplicates dropped)."""
    words = []
    for w in re.split(r"[,;\n]+", text or ""):
        w = w.strip().lower()
        if w and w not in words:
            words.append(w)
    return words


_STOP = {"a", "an", "the", "on", "in", "of", "and", "with", "at", "to", "is", "by", "for"}


def prompt_words(prompt: str) -> list:
    """The content words of a prompt (weights syntax and punctuation stripped), in order."""
    plain = re.sub(r":[0-9.]+\)", ")", prompt or "")
    words = []
    for w in re.findall(r"[a-zA-Z][a-zA-Z'-]*", plain):
        w = w.lower()
        if w not in _STOP and w not in words:
            words.append(w)
    return words


def parse_layers(text: str, n_layers: int, default: list) -> list:
    """'auto' -> default; 'all' -> every layer; '2,3' / '-2,-1' / '1-3' -> those indices."""
    text = (text or "auto").strip().lower()
    if text in ("", "auto"):
        return list(default)
    if text == "all":
        return list(range(n_layers))
    out = []
    for part in re.split(r"[,\s]+", text):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        idx = list(range(int(m.group(1)), int(m.group(2)) + 1)) if m else [int(part)]
        for i in idx:
            i = i + n_layers if i < 0 else i
            if not 0 <= i < n_layers:
                raise ValueError(f"layer {part} is out of range (this model has {n_layers})")
            if i not in out:
                out.append(i)
    return sorted(out)


def _token_ids(clip, text: str) -> list:
    """Flat token ids of the first text encoder ComfyUI's CLIP tokenizer uses for ``text``."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    return [int(t[0]) for chunk in tokens[key] for t in chunk]


def _word_ids(clip, word: str) -> list:
    """Token ids of a word encoded alone, without start, end and padding tokens."""
    ids = _token_ids(clip, word)
    start, rest = ids[0], ids[1:]
    end = rest[-1] if rest else start
    core = []
    for t in rest:
        if t == end:
            break
        core.append(t)
    return core


# ---------------------------------------------------------------------------------------------
# the recording
# ---------------------------------------------------------------------------------------------
_TOLD: dict = {}


def reference_tokens_told(diffusion_model) -> bool:
    """Whether this ComfyUI tells the blocks how many tokens reference images (ReferenceLatent)
    append to the image's (``transformer_options['reference_image_num_tokens']``, ComfyUI 0.33).
    Without it a capture cannot tell the sampled image's tokens from a reference's."""
    name = type(diffusion_model).__module__
    if name not in _TOLD:
        import sys
        try:
            _TOLD[name] = "reference_image_num_tokens" in inspect.getsource(sys.modules[name])
        except (OSError, TypeError, KeyError):
            _TOLD[name] = False
    return _TOLD[name]


@dataclass
class SaliencyRecording:
    """What the capture patches write while sampling, read by ConceptLab Saliency Maps."""

    words: list
    method: str                      # daam | conceptattention | crossattention
    family: str
    layers: list                     # indices of the recorded attention layers
    sigma_hi: float
    sigma_lo: float
    groups: list = field(default_factory=list)          # DAAM: token positions per word
    concept_embeds: Optional[torch.Tensor] = None       # DiT: (C, D) raw text-encoder vectors
    pooled_zero: bool = True                            # DiT: concepts modulated without pooled text
    compare: tuple = ()             # DiT: other methods to record in the same run (comparisons)
    method_note: str = ""           # how 'method' was chosen (auto's reason), for the user
    maps: dict = field(default_factory=dict)            # name -> K.RunningMaps
    steps: int = 0
    calls: int = 0
    skipped_calls: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # per model call
    _sigma: float = float("inf")
    _last_sigma: float = float("-inf")
    _latent_hw: tuple = ()
    _cond_rows: list = field(default_factory=list)
    _rows: object = None                                # rows() of the current call
    _chunk: int = 0
    _grids: dict = field(default_factory=dict)          # (tokens, latent hw) -> layer grid (h, w)
    _cache: dict = field(default_factory=dict)          # per-run constants (DiT concept inputs)
    _active: bool = False
    _concepts: Optional[torch.Tensor] = None
    _concept_vec: Optional[torch.Tensor] = None
    _y: Optional[torch.Tensor] = None
    reference_tokens_told: bool = True  # DiT: ComfyUI says how many tokens reference images add

    # ---- run / call bookkeeping -------------------------------------------------------------
    def begin_call(self, x: torch.Tensor, sigma: torch.Tensor, cond_or_uncond, c: dict) -> None:
        s = float(sigma.max())
        if s > self._last_sigma + 1e-6 * max(1.0, abs(self._last_sigma)) and self.calls:
            self._reset()                                   # a new sampling run started
        if s != self._last_sigma:
            if self.sigma_lo <= s <= self.sigma_hi:
                self.steps += 1
        self._last_sigma = s
        self._sigma = s
        self.calls += 1
        chunks = max(len(cond_or_uncond), 1)
        self._chunk = x.shape[0] // chunks
        self._cond_rows = [i for i, flag in enumerate(cond_or_uncond) if flag == 0]
        self._latent_hw = tuple(x.shape[-2:])
        self._active = bool(self._cond_rows) and self.sigma_lo <= s <= self.sigma_hi
        self._rows = self._row_index() if self._active else None
        self._concepts = None
        self._concept_vec = None
        self._y = c.get("y") if isinstance(c, dict) else None
        if self._active and not self.reference_tokens_told and isinstance(c, dict) and c.get("ref_latents"):
            raise fail(CAPTURE, "The positive carries a reference image (ReferenceLatent: Flux Kontext, Flux.2 "
                       "or Qwen-Image editing), and this ComfyUI does not tell custom nodes how many tokens "
                       "it adds to the image's, so the maps cannot be placed on the image.",
                       "Update ComfyUI to 0.33 or newer, or sample without ReferenceLatent while capturing.")

    def end_call(self) -> None:
        self._active = False
        self._rows = None
        self._concepts = None
        self._concept_vec = None
        self._y = None

    def _reset(self) -> None:
        self.maps = {}
        self._cache = {}
        self.steps = 0
        self.skipped_calls = 0
        self.run_id = uuid.uuid4().hex[:12]

    def rows(self):
        """Batch rows of the current call that belong to the positive prompt: a slice when they
        are contiguous (the usual single positive chunk; indexing is then a view), else a list.
        Worked out once per model call."""
        if self._rows is None:
            self._rows = self._row_index()
        return self._rows

    def _row_index(self):
        b = self._chunk
        cr = self._cond_rows
        if cr == list(range(cr[0], cr[0] + len(cr))):
            return slice(cr[0] * b, (cr[-1] + 1) * b)
        return [r for ci in cr for r in range(ci * b, (ci + 1) * b)]

    def add(self, name: str, token_maps: torch.Tensor) -> None:
        """token_maps: (len(rows()), N, C), the positive rows of the call, in rows() order.

        Sums are kept per layer resolution on the layer's own grid; :meth:`result` upsamples
        each once (bilinear upsampling is linear, so this equals upsampling every call)."""
        b = self._chunk
        key = (token_maps.shape[1], self._latent_hw)
        hw = self._grids.get(key)
        if hw is None:
            hw = self._grids[key] = K.grid_shape(token_maps.shape[1], *self._latent_hw)
        per_res = self.maps.get(name)
        if per_res is None:
            per_res = self.maps[name] = {}
        acc = per_res.get(hw)
        if acc is None:
            acc = per_res[hw] = K.RunningMaps(b, len(self.words), *hw)
        if token_maps.shape[0] == b and acc.shape[0] == b:     # the usual single positive chunk
            acc.add_tokens(token_maps)
            return
        h, w = hw
        for part in token_maps.split(b):
            if part.shape[0] != b or acc.shape[0] != b:
                self.skipped_calls += 1                      # e.g. ComfyUI split the batch
                continue
            acc.add(part.transpose(1, 2).reshape(b, -1, h, w).cpu())

    def result(self, name: Optional[str] = None) -> Optional[torch.Tensor]:
        """(B, C, H, W) mean map on the latent grid, or None if nothing was recorded."""
        per_res = self.maps.get(name or self.method)
        if not per_res:
            return None
        height, width = self._latent_hw
        total = sum(K.resize(acc.sum, height, width) for acc in per_res.values())
        count = sum(acc.count for acc in per_res.values())
        return total / count.clamp(min=1).view(-1, 1, 1, 1)

    def state_bytes(self) -> int:
        return sum(acc.nbytes() for per_res in self.maps.values() for acc in per_res.values())


# ---------------------------------------------------------------------------------------------
# UNet: DAAM through attn2 replace patches
# ---------------------------------------------------------------------------------------------
def unet_cross_attention_layers(diffusion_model) -> list:
    """(block_name, block_number, transformer_index) of every cross-attention layer, in the
    order ComfyUI's UNet runs them: input blocks, middle block, output blocks."""
    keys = []

    def scan(name, number, module):
        for sub in module.modules():
            blocks = getattr(sub, "transformer_blocks", None)
            if blocks is not None:
                for t, blk in enumerate(blocks):
                    if getattr(blk, "attn2", None) is not None:
                        keys.append((name, number, t))
    for i, blk in enumerate(diffusion_model.input_blocks):
        scan("input", i, blk)
    scan("middle", 0, diffusion_model.middle_block)
    for i, blk in enumerate(diffusion_model.output_blocks):
        scan("output", i, blk)
    return keys


_ATTENTION_KEYWORDS: dict = {}


def _attention_call():
    """ComfyUI's attention function, and which optional keywords this version's accepts
    (inspected once per function: a signature lookup costs more than a small attention)."""
    fn = comfy_attention.optimized_attention
    accepted = _ATTENTION_KEYWORDS.get(fn)
    if accepted is None:
        try:
            params = inspect.signature(inspect.unwrap(fn)).parameters
        except (TypeError, ValueError):
            accepted = frozenset()
        else:
            if any(p.kind == p.VAR_KEYWORD for p in params.values()):
                accepted = frozenset(("attn_precision", "transformer_options"))
            else:
                accepted = frozenset(n for n in ("attn_precision", "transformer_options")
                                     if n in params)
        _ATTENTION_KEYWORDS[fn] = accepted
    return fn, accepted


class _DaamPatch:
    """attn2 replace: ComfyUI's own attention for the output, DAAM maps beside it."""

    def __init__(self, rec: SaliencyRecording, previous=None):
        self.rec, self.previous = rec, previous
        self._selection = {}

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            fn, accepted = _attention_call()
            kw = {}
            if "attn_precision" in accepted:
                kw["attn_precision"] = extra_options.get("attn_precision")
            if "transformer_options" in accepted:
                kw["transformer_options"] = extra_options
            out = fn(q, k, v, heads, **kw)
        rec = self.rec
        if rec._active:
            rows = rec._rows
            key = (k.shape[1], q.device)
            sel = self._selection.get(key)
            if sel is None:   # the (tokens, words) 0/1 matrix, once per prompt length and device
                sel = self._selection[key] = K.token_selection(rec.groups, k.shape[1]).to(q.device)
            rec.add("daam", K.daam_token_maps(q[rows], k[rows], heads, rec.groups, sel))
        return out


# ---------------------------------------------------------------------------------------------
# MMDiTs: ConceptAttention through dit double_block replace patches; each architecture's text
# stream is reached through its adapter in nodes/architectures/
# ---------------------------------------------------------------------------------------------
#: ``auto`` picks ConceptAttention only for DiTs at the scale of the models it was shown on (Flux:
#: 3072 wide, 19 double-stream blocks; SD3-medium / SD3.5-medium: 1536 wide, 24 joint blocks;
#: SD3.5-large: 2432 wide, 38), where image and text tokens share one attention-output space, the
#: method's premise. Below that it picks raw cross-attention: on the 64-wide, 4-block demo DiT
#: ConceptAttention scores 0.088 mIoU against cross-attention's 0.306 and its mask falls on the
#: background. See docs/saliency-method-choice.md for the numbers and what only real weights can
#: confirm.
CONCEPTATTENTION_MIN_WIDTH = 1024
CONCEPTATTENTION_MIN_BLOCKS = 12


def auto_method(fam: str, diffusion_model) -> tuple:
    """The method ``auto`` stands for on this model, and a sentence saying why."""
    if fam in UNET_FAMILIES:
        return "daam", f"auto: DAAM ({family_label(fam)} UNet cross-attention)."
    stream = dit_stream(diffusion_model, fam)
    if stream is None:                     # _patch_dit refuses the model with its own message
        return "conceptattention", ""
    width, blocks = dit_scale(stream)
    size = f"{width} wide, {blocks} {stream.kind} blocks"
    rule = (f"ConceptAttention is chosen from {CONCEPTATTENTION_MIN_WIDTH} wide and "
            f"{CONCEPTATTENTION_MIN_BLOCKS} blocks")
    if width >= CONCEPTATTENTION_MIN_WIDTH and blocks >= CONCEPTATTENTION_MIN_BLOCKS:
        return "conceptattention", (f"auto: ConceptAttention ({family_label(fam)} DiT, {size}; "
                                    f"{rule}).")
    return "crossattention", (f"auto: cross-attention ({family_label(fam)} DiT, {size}; {rule}: "
                              "on smaller DiTs its maps miss the words). Set method to "
                              "'conceptattention' to use it anyway.")


class _ConceptAttentionBlock:
    """One joint / double-stream block: run ComfyUI's block unchanged, carry the concept tokens
    beside it through the text stream's own weights."""

    def __init__(self, rec: SaliencyRecording, stream, index: int, record: bool, previous=None):
        self.rec, self.stream, self.index, self.record, self.previous = (
            rec, stream, index, record, previous)
        # Some architectures' original_block costs more than running the block directly
        # (SD3's goes through torch.utils.checkpoint); the adapter says how ComfyUI runs an
        # unpatched block.
        self._direct = stream.direct(index) if previous is None else None

    def _run(self, args, extra):
        if self.previous is not None:
            return self.previous(args, extra)
        if self._direct is None:
            return extra["original_block"](args)
        return self._direct(args)

    def _initial_concepts(self, like: torch.Tensor, vec: torch.Tensor):
        """The concept tokens entering the first block, and the modulation input they use in the
        block whose ``vec`` is given. The parts that do not change within a run (the concepts'
        text projection, the pooled text's share) are computed once per run."""
        rec = self.rec
        cache = rec._cache
        key = ("concepts", like.dtype, like.device)
        emb = cache.get(key)
        if emb is None:
            raw = rec.concept_embeds.to(device=like.device, dtype=like.dtype)
            emb = cache[key] = self.stream.text_in(raw.unsqueeze(0))
        emb = emb.expand(like.shape[0], -1, -1)
        concept_vec = vec
        y_emb = self.stream.pooled_embedder
        if rec.pooled_zero and rec._y is not None and y_emb is not None:
            # vec = t_emb (+ guidance) + y_emb(y): swap y_emb(y) for y_emb(0). The difference
            # depends only on the pooled text, which is the same call after call: reuse it.
            y = rec._y[rec.rows()].to(device=vec.device, dtype=vec.dtype)
            if self.stream.pooled_dim is not None:
                y = y[:, :self.stream.pooled_dim]
            last = cache.get("pooled")
            if last is None or last[0].shape != y.shape or not torch.equal(last[0], y):
                last = cache["pooled"] = (y, y_emb(y) - y_emb(torch.zeros_like(y)))
            concept_vec = self.stream.remove_pooled(vec, last[1])
        return emb, concept_vec

    def __call__(self, args, extra):
        rec = self.rec
        if not rec._active:
            return self._run(args, extra)
        options = args.get("transformer_options", {}) or {}
        earlier = options.get("optimized_attention_override")
        stash = {}

        def override(func, *a, **kw):
            out = earlier(func, *a, **kw) if earlier is not None else func(*a, **kw)
            # the joint attention: the call over the most tokens (text + image). SD3.5 Medium's
            # MMDiT-X blocks run an image-only self-attention after it, which must not count.
            n = self.stream.tokens_major(a[1]).shape[1]
            if not stash or n > stash["n"]:
                stash["q"], stash["k"], stash["v"], stash["o"], stash["n"] = a[0], a[1], a[2], out, n
            return out

        result = self._run(dict(args, transformer_options=dict(
            options, optimized_attention_override=override)), extra)
        self.observe(args, stash)
        return result

    def observe(self, args, stash: dict) -> None:
        """The concepts' step through this block, from the block's inputs ``args`` (txt, vec) and
        its joint attention call ``stash`` (q, k, v, o; empty when none was seen). ``__call__``
        calls it after running the block; on models without block replaces the adapter's
        ``hook`` calls it after the model ran the block."""
        rec = self.rec
        if not rec._active:
            return
        if not stash:                         # no attention call seen (unknown block type)
            rec.skipped_calls += 1
            return
        st = self.stream
        rows = rec._rows
        txt, vec = args["txt"], st.concept_inputs(args, rows)
        # the concepts enter at the first block; the modulation input is this block's own (the
        # same vector for every block on SD3 and Flux.1, a per-block slice on Chroma)
        emb, rec._concept_vec = self._initial_concepts(txt[rows], vec)
        if rec._concepts is None:
            rec._concepts = emb
        block = st.blocks[self.index]
        heads = st.heads(block)
        q, k, v = (st.tokens_major(stash[n][rows]) for n in "qkv")
        img = st.image_slice(block, txt.shape[1], k.shape[1])
        (q_c, k_c, v_c), inter = st.pre(block, rec._concepts, rec._concept_vec)
        o_c = K.concept_attention(q_c, k_c, v_c, k[:, img], v[:, img], heads)
        # reference images (ReferenceLatent: Flux.1 Kontext, Flux.2, Qwen-Image-Edit) follow the
        # sampled image's tokens: the concepts read them, as the text does; the maps cover the
        # sampled image only
        refs = sum((args.get("transformer_options") or {}).get("reference_image_num_tokens") or ())
        own = slice(img.start, img.stop - refs) if refs else img
        if self.record:
            if rec.method == "conceptattention" or "conceptattention" in rec.compare:
                rec.add("conceptattention", K.concept_saliency(stash["o"][rows, own], o_c))
            if rec.method == "crossattention" or "crossattention" in rec.compare:
                rec.add("crossattention", K.cross_attention_saliency(q[:, own], k_c, heads))
        nxt = st.post(block, o_c, inter)
        if nxt is not None:                   # None after SD3's last block (context pre_only)
            rec._concepts = nxt


class _CallWrapper:
    """model_function_wrapper: tells the recording about each model call, chains any earlier one."""

    def __init__(self, rec: SaliencyRecording, previous=None):
        self.rec, self.previous = rec, previous

    def __call__(self, apply_model, args):
        self.rec.begin_call(args["input"], args["timestep"], args.get("cond_or_uncond", [0]),
                            args.get("c", {}))
        try:
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            self.rec.end_call()


def _existing_replace(model, name: str, key: tuple):
    to = model.model_options.get("transformer_options", {})
    return to.get("patches_replace", {}).get(name, {}).get(key)


def _concept_embeddings(clip, words: list, stream) -> torch.Tensor:
    """(C, D): each concept word encoded alone; the conditioning vector of its first token.

    The tokenizer output read is the one that makes the model's text sequence (the adapter's
    ``token_key``). The first token is where the word's tokens part from the empty prompt's:
    after the start token when that encoder has one (CLIP, and the CLIP part that leads SD3's
    sequence), first when it has none (T5, which alone makes Flux's sequence), after the prompt
    template (Qwen-Image's Qwen2.5-VL), whose head the encoder then drops from its output."""
    empty = clip.tokenize("")
    key = stream.token_key(empty)
    empty_ids = [t[0] for chunk in empty[key] for t in chunk]
    rows = []
    for w in words:
        tokens = clip.tokenize(w)
        ids = [t[0] for chunk in tokens[key] for t in chunk]
        first = next((i for i, (a, b) in enumerate(zip(ids, empty_ids)) if a != b), 0)
        cond = clip.encode_from_tokens(tokens)
        cond = cond[0] if isinstance(cond, (tuple, list)) else cond
        first = max(0, first - max(0, len(ids) - cond.shape[1]))     # tokens dropped in front
        rows.append(cond[0, first].float().cpu())
    return torch.stack(rows)


def _sigma_range(model, start: float, end: float) -> tuple:
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start)), float(ms.percent_to_sigma(end))


class ConceptLabSaliencyCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabSaliencyCapture", display_name=CAPTURE, category="ConceptLab/saliency",
            description=(
                "Records where each word of the prompt lands in the image while you sample, with any "
                "sampler. Put it between the model loader and the sampler, and feed its recording plus "
                "the decoded image to 'ConceptLab Saliency Maps'. UNet models (SD1.x, SD2.x, SDXL) use "
                "DAAM: cross-attention probabilities of the word's tokens, summed over heads, layers and "
                "steps. Multimodal DiTs (SD3's joint blocks, Flux's double-stream blocks) use "
                "ConceptAttention: the concept words travel through "
                "the text stream's own weights, one way, and the maps come from attention-output dot "
                "products. On DiTs smaller than SD3 and Flux (such as the demo DiT) 'auto' uses raw "
                "cross-attention of the image to the concept words instead. The sampled image stays bit "
                "for bit the same; memory does not grow with steps."),
            search_aliases=["DAAM", "ConceptAttention", "attention map", "cross-attention", "heatmap", "saliency",
                            "word attribution", "where is the word"],
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with."),
                io.Clip.Input("clip", tooltip="The model's text encoder: finds the words' tokens "
                                              "in the prompt (UNet) or encodes the concepts (DiT)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt, exactly as in your "
                                        "CLIPTextEncode (convert the text there to an "
                                        "input and feed both from one string). UNet "
                                        "maps are read at these tokens."),
                io.String.Input("concepts", default="",
                                tooltip="Comma-separated words to map, e.g. 'seven, "
                                        "two'. Empty: every content word of the "
                                        "prompt. UNet: each must occur in the "
                                        "prompt. DiT: any words (add background "
                                        "words such as 'sky' for cleaner masks)."),
                combo("method", list(METHODS), default="auto",
                               tooltip="auto: DAAM on UNets; on DiTs, "
                                       "ConceptAttention at the scale of SD3 and "
                                       "Flux (at least 1024 wide, 12 blocks), "
                                       "crossattention on smaller DiTs, where "
                                       "ConceptAttention's maps miss the words. "
                                       "crossattention (DiT only): raw image-query"
                                       " / concept-key maps. The viewer of "
                                       "ConceptLab Saliency Maps says which ran."),
                io.String.Input("layers", default="auto",
                                tooltip="Which attention layers to read, by index in "
                                        "execution order: 'auto', 'all', '2,3', '-2,-1' "
                                        "or '1-3'. auto: every cross-attention layer on "
                                        "UNets (DAAM); the later half of the joint "
                                        "(SD3) or double-stream (Flux) blocks on DiTs."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Record from this point of the sampling "
                                       "schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Record up to this point (1 = last step)."),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="The model with capture patches (a clone; the input model is unchanged). "
                                        "Sample with it."),
                io.Custom("SALIENCY_RECORDING").Output(display_name="recording",
                    tooltip="The recording; connect it to 'ConceptLab Saliency Maps' together with the decoded image."),
            ])

    @classmethod
    def execute(cls, model, clip, prompt, concepts, method, layers, start_percent, end_percent):
        fam = model_family(model)
        allowed = UNET_FAMILIES + DIT_SALIENCY_FAMILIES
        require_family(CAPTURE, model, allowed, "Saliency capture")
        if start_percent > end_percent:
            raise fail(CAPTURE, f"start_percent ({start_percent}) is after end_percent "
                       f"({end_percent}).", "Set start_percent <= end_percent.")
        words = parse_concepts(concepts) or prompt_words(prompt)
        if not words:
            raise fail(CAPTURE, "No concepts to map: both 'concepts' and 'prompt' are empty.",
                       "Type the words to map into 'concepts', or connect the positive prompt.")
        is_unet = fam in UNET_FAMILIES
        dm = model.model.diffusion_model
        if method == "auto":
            method, note = auto_method(fam, dm)
        else:
            note = f"method: {method} (set on the node)."
        if is_unet and method != "daam":
            raise fail(CAPTURE, f"'{method}' needs a multimodal DiT; this is a "
                       f"{family_label(fam)} UNet.", "Set method to 'daam' or 'auto'.")
        if not is_unet and method == "daam":
            raise fail(CAPTURE, "DAAM reads UNet cross-attention; this is a "
                       f"{family_label(fam)} DiT.",
                       "Set method to 'conceptattention', 'crossattention' or 'auto'.")
        hi, lo = _sigma_range(model, start_percent, end_percent)
        m = clone_model(model)
        if is_unet:
            rec = cls._patch_unet(m, dm, clip, prompt, words, method, layers, fam, hi, lo)
        else:
            rec = cls._patch_dit(m, dm, clip, words, method, layers, fam, hi, lo)
        rec.method_note = note
        log.info("%s: %s", CAPTURE, note)
        previous = m.model_options.get("model_function_wrapper")
        m.set_model_unet_function_wrapper(_CallWrapper(rec, previous))
        return io.NodeOutput(m, rec)

    @staticmethod
    def _layers(text, n, default):
        try:
            return parse_layers(text, n, default)
        except ValueError as exc:
            raise fail(CAPTURE, f"Bad 'layers' value '{text}': {exc}.",
                       f"Use 'auto', 'all' or indices between 0 and {n - 1}.") from None

    @classmethod
    def _patch_unet(cls, m, dm, clip, prompt, words, method, layers, fam, hi, lo):
        if not (prompt or "").strip():
            raise fail(CAPTURE, "DAAM needs the positive prompt to find the words' tokens, and "
                       "'prompt' is empty.", "Connect or paste the positive prompt text.")
        prompt_ids = _token_ids(clip, prompt)
        groups, missing = [], []
        for w in words:
            pos = K.find_token_positions(prompt_ids, _word_ids(clip, w))
            groups.append(pos)
            if not pos:
                missing.append(w)
        if missing:
            raise fail(CAPTURE, f"These concepts do not occur in the prompt: {', '.join(missing)}.",
                       "With a UNet, map only words that are in the prompt (or add them to it).")
        keys = unet_cross_attention_layers(dm)
        chosen = cls._layers(layers, len(keys), range(len(keys)))
        rec = SaliencyRecording(words=words, method=method, family=fam, layers=chosen,
                                sigma_hi=hi, sigma_lo=lo, groups=groups)
        for i in chosen:
            key = keys[i]
            prev = _existing_replace(m, "attn2", key)
            m.set_model_attn2_replace(_DaamPatch(rec, prev), *key)
        return rec

    @classmethod
    def _patch_dit(cls, m, dm, clip, words, method, layers, fam, hi, lo):
        stream = dit_stream(dm, fam)
        if stream is None:
            raise fail(CAPTURE, f"This {family_label(fam)} model has no joint (SD3) or "
                       "double-stream (Flux) blocks that ConceptAttention knows.",
                       "Use an SD3- or Flux-style model, or a UNet with DAAM.")
        n = len(stream.blocks)
        chosen = cls._layers(layers, n, range(n // 2, n))
        embeds = _concept_embeddings(clip, words, stream)
        ctx_in = getattr(stream.text_in, "in_features", None)
        if ctx_in is not None and embeds.shape[-1] != ctx_in:
            raise fail(CAPTURE, f"The CLIP's vectors have {embeds.shape[-1]} channels, the "
                       f"model's text input has {ctx_in}.",
                       "Connect the CLIP that belongs to this model.")
        rec = SaliencyRecording(words=words, method=method, family=fam, layers=chosen,
                                sigma_hi=hi, sigma_lo=lo, concept_embeds=embeds,
                                reference_tokens_told=reference_tokens_told(dm))
        for i in range(max(chosen) + 1):      # concepts must pass every block up to the last read
            stream.hook(m, i, lambda prev, i=i: _ConceptAttentionBlock(rec, stream, i, i in chosen, prev))
        return rec


# ---------------------------------------------------------------------------------------------
# maps, masks, overlay
# ---------------------------------------------------------------------------------------------
@dataclass
class Saliency:
    """Typed saliency for downstream nodes: per-image, per-word maps at image resolution."""

    words: list
    method: str
    maps: torch.Tensor               # (B, C, H, W) in [0, 1]: refined if 'refine' is not none
    threshold_mode: str = "fixed"
    threshold: float = 0.5
    refine: str = "none"
    coarse: Optional[torch.Tensor] = None    # (B, C, H, W) the unrefined maps, normalised
    images: Optional[torch.Tensor] = None    # (B, H, W, 3) the images the maps belong to
    method_note: str = ""                    # how the capture chose its method

    def index(self, word: str) -> int:
        w = word.strip().lower()
        if w not in self.words:
            raise KeyError(w)
        return self.words.index(w)


def _save_temp_png(array: np.ndarray, prefix: str) -> dict:
    import folder_paths
    from PIL import Image
    folder = os.path.join(folder_paths.get_temp_directory(), "conceptlab")
    os.makedirs(folder, exist_ok=True)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}.png"
    Image.fromarray(array).save(os.path.join(folder, name), compress_level=1)
    return {"filename": name, "subfolder": "conceptlab", "type": "temp"}


_THRESHOLD_MODE_TOOLTIP = (
    "How maps become masks. mean: above the map's own mean (the ConceptAttention "
    "protocol); otsu: Otsu's threshold; fixed: above 'threshold'; argmax: the "
    "pixel goes to the strongest concept, if that map is above 'threshold'.")
#: The threshold modes that use 'threshold'.
THRESHOLD_USED_BY = ("fixed", "argmax")


def _threshold_input() -> io.Float.Input:
    return io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                          tooltip="Used by 'fixed' and 'argmax'. Maps are 0..1 (raw maps "
                                  "normalised; with refine = crf, each concept's "
                                  "probability). DAAM's paper used 0.4 on raw maps.")


def _threshold_inputs() -> list:
    """'threshold_mode' and 'threshold', side by side (Saliency Maps: its viewer reads both)."""
    return [
        combo("threshold_mode", list(K.THRESHOLD_MODES), default="fixed", tooltip=_THRESHOLD_MODE_TOOLTIP),
        _threshold_input(),
    ]


def _threshold_choice_inputs() -> list:
    """'threshold_mode' with 'threshold' under the modes that use it (Mask From Concept): one
    io.DynamicCombo where ComfyUI has it (0.33; the widget 'threshold_mode.threshold' shows only
    for fixed and argmax), else the same two flat inputs as Saliency Maps (nodes/_schema.py)."""
    return choice_inputs("threshold_mode", K.THRESHOLD_MODES, "fixed", _THRESHOLD_MODE_TOOLTIP,
                         [_threshold_input()], THRESHOLD_USED_BY)


_REFINE_TOOLTIP = (
    "Image-guided refinement of the coarse (latent-grid) maps, using the decoded image. crf: a "
    "fully connected CRF (the standard refinement of attention / class-activation maps in "
    "weakly supervised segmentation): background plus one label per word, pixels close by and "
    "of similar colour want the same label; maps become each word's probability. guided: He et "
    "al.'s guided filter (edges of the image transferred to the map; cheaper). none: the raw "
    "maps, upsampled.")


def image_maps(raw: torch.Tensor, rgb: torch.Tensor, blur: bool, refine: str) -> tuple:
    """(coarse, maps) at image resolution from a recording's (B, C, h, w) latent-grid maps:
    optional 3x3 blur, each map normalised, upsampled (bilinear) and normalised again
    (``coarse``), then refined with the (B, H, W, 3) images as the guide (``maps``).
    ConceptLab Saliency Maps and the benchmark both use this."""
    grid = K.blur3x3(raw) if blur else raw
    coarse = K.normalise(K.resize(K.normalise(grid), rgb.shape[1], rgb.shape[2]))
    return coarse, K.refine_maps(coarse, rgb, refine)


class ConceptLabSaliencyMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabSaliencyMaps", display_name=MAPS, category="ConceptLab/saliency",
            description=(
                "Turns a saliency recording into per-word heat maps for the decoded image: a SALIENCY "
                "object for downstream nodes, colour-mapped overlays (one per image and word, image-"
                "major) and masks (same order). The coarse attention maps are refined with the image "
                "by default (a fully connected CRF; 'refine'), so masks follow the objects' edges. The "
                "node shows an interactive viewer: pick a word and slide the threshold."),
            search_aliases=["DAAM", "ConceptAttention", "heatmap", "heat map", "attention map", "saliency map",
                            "overlay", "mask", "segmentation"],
            is_output_node=True,
            inputs=[
                io.Custom("SALIENCY_RECORDING").Input("recording", tooltip="From 'ConceptLab Saliency Capture'."),
                io.Image.Input("images", tooltip="The decoded images of the sampling run that used "
                                                 "the capture model (this also makes the node run "
                                                 "after the sampler)."),
                *_threshold_inputs(),
                io.Boolean.Input("blur", default=False,
                                 tooltip="3x3 blur of the latent-grid maps before upsampling "
                                         "(smoother raw masks; with a refinement it only "
                                         "blunts the maps, so it is off by default)."),
                combo("refine", list(K.REFINE_METHODS), default=K.REFINE_DEFAULT,
                               tooltip=_REFINE_TOOLTIP),
            ],
            outputs=[
                io.Custom("SALIENCY").Output(display_name="saliency",
                    tooltip="Per-word maps at image resolution, for 'ConceptLab Mask From Concept'."),
                io.Image.Output(display_name="overlay",
                                tooltip="Each image with each word's heat map on top (batch = images x words)."),
                io.Mask.Output(display_name="masks",
                               tooltip="Each word's mask (batch = images x words, same order as the overlay)."),
            ])

    @classmethod
    def execute(cls, recording, images, threshold_mode, threshold, blur, refine=K.REFINE_DEFAULT):
        if not isinstance(recording, SaliencyRecording):
            raise fail(MAPS, f"'recording' is a {type(recording).__name__}.",
                       "Connect the 'recording' output of ConceptLab Saliency Capture.")
        raw = recording.result()
        if raw is None:
            raise fail(MAPS, "The recording is empty: no sampling step ran with the capture "
                       "model inside the recorded range.",
                       "Sample with the MODEL output of ConceptLab Saliency Capture, and check "
                       "its start/end percent.")
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise fail(MAPS, "'images' is not an IMAGE batch.", "Connect a VAE Decode output.")
        b = images.shape[0]
        if raw.shape[0] != b:
            raise fail(MAPS, f"The recording has {raw.shape[0]} image(s), 'images' has {b}.",
                       "Decode the latents of the same sampler run that used the capture model.")
        if refine not in K.REFINE_METHODS:
            raise fail(MAPS, f"Unknown refine method '{refine}'.",
                       f"Use one of: {', '.join(K.REFINE_METHODS)}.")
        rgb = images[..., :3].detach().float().cpu()
        coarse, maps = image_maps(raw, rgb, blur, refine)
        masks = K.masks_from_maps(maps, threshold_mode, threshold)
        overlays = torch.stack([K.overlay(rgb[i], maps[i, j]) for i in range(b)
                                for j in range(len(recording.words))])
        sal = Saliency(list(recording.words), recording.method, maps, threshold_mode, threshold,
                       refine, coarse, rgb, getattr(recording, "method_note", ""))
        ui = {"concept_lab_saliency": [cls._viewer_payload(sal, rgb)]}
        return io.NodeOutput(sal, overlays, masks.flatten(0, 1), ui=ui)

    @staticmethod
    def _viewer_payload(sal: Saliency, rgb: torch.Tensor) -> dict:
        base = [_save_temp_png((rgb[i].numpy() * 255).round().astype(np.uint8), "sal_image")
                for i in range(rgb.shape[0])]
        maps = [[_save_temp_png((sal.maps[i, j].numpy() * 255).round().astype(np.uint8),
                                "sal_map") for j in range(len(sal.words))]
                for i in range(rgb.shape[0])]
        return {"words": sal.words, "method": sal.method, "method_note": sal.method_note,
                "threshold": float(sal.threshold),
                "images": base, "maps": maps}


class ConceptLabMaskFromConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ConceptLabMaskFromConcept", display_name=MASK_NODE, category="ConceptLab/saliency",
            description=("One word's saliency as a MASK (one per image), e.g. to inpaint or composite "
                         "exactly where the model put that word."),
            search_aliases=["DAAM", "ConceptAttention", "mask", "word mask", "concept mask", "inpaint mask",
                            "segmentation", "heatmap"],
            inputs=[
                io.Custom("SALIENCY").Input("saliency", tooltip="From 'ConceptLab Saliency Maps'."),
                io.String.Input("concept", default="", tooltip="One of the recorded words."),
                *_threshold_choice_inputs(),
                io.Int.Input("grow", default=0, min=0, max=64,
                             tooltip="Dilate the mask by this many pixels (for inpainting)."),
                combo("refine", ["as saliency maps"] + list(K.REFINE_METHODS),
                               default="as saliency maps",
                               tooltip="as saliency maps: the maps exactly as 'ConceptLab Saliency Maps' "
                                       "made them. Otherwise refine the unrefined maps again here. "
                                       + _REFINE_TOOLTIP),
            ],
            outputs=[io.Mask.Output(display_name="mask",
                                    tooltip="1 where the concept is, 0 elsewhere (batch = images).")],
            **ACCEPT_OLD_NAMES)

    @classmethod
    def execute(cls, saliency, concept, threshold_mode, threshold=None, grow=0, refine="as saliency maps",
                **_other):
        # (the positional order of the V1 node: Python callers pass threshold fourth)
        # threshold_mode: {"threshold_mode": mode, "threshold": value} (io.DynamicCombo, ComfyUI
        # 0.33) or the mode, with 'threshold' flat (0.3.75, and prompts saved before on any version)
        threshold_mode, carried = chosen(threshold_mode, "threshold_mode", threshold=threshold)
        if threshold_mode not in K.THRESHOLD_MODES:
            raise fail(MASK_NODE, f"Unknown threshold_mode {threshold_mode!r}.",
                       f"Use one of: {', '.join(K.THRESHOLD_MODES)}.")
        threshold = carried.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise fail(MASK_NODE, f"threshold is {threshold!r}.", "Use a number from 0 to 1.")
        if not isinstance(saliency, Saliency):
            raise fail(MASK_NODE, f"'saliency' is a {type(saliency).__name__}.",
                       "Connect the 'saliency' output of ConceptLab Saliency Maps.")
        try:
            j = saliency.index(concept)
        except KeyError:
            raise fail(MASK_NODE, f"'{concept}' was not recorded (recorded: "
                       f"{', '.join(saliency.words)}).",
                       "Type one of the recorded words, or add it to the capture's concepts.") \
                from None
        maps = saliency.maps
        if refine != "as saliency maps" and refine != saliency.refine:
            if refine not in K.REFINE_METHODS:
                raise fail(MASK_NODE, f"Unknown refine method '{refine}'.",
                           f"Use 'as saliency maps' or one of: {', '.join(K.REFINE_METHODS)}.")
            if saliency.coarse is None or saliency.images is None:
                raise fail(MASK_NODE, "This SALIENCY carries no unrefined maps to refine.",
                           "Set refine to 'as saliency maps', or re-run ConceptLab Saliency Maps.")
            maps = K.refine_maps(saliency.coarse, saliency.images, refine)
        masks = K.masks_from_maps(maps, threshold_mode, threshold)[:, j]
        if grow:
            masks = torch.nn.functional.max_pool2d(masks.unsqueeze(1), 2 * grow + 1, stride=1,
                                                   padding=grow).squeeze(1)
        return io.NodeOutput(masks)


NODES = [ConceptLabSaliencyCapture, ConceptLabSaliencyMaps, ConceptLabMaskFromConcept]

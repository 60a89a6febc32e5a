"""Z-Image (ComfyUI's ``supported_models.ZImage``, a Lumina 2 config; ``comfy.ldm.lumina.model``
``NextDiT``). The caption goes through ``cap_embedder`` and the ``context_refiner`` layers alone,
the image through ``noise_refiner`` alone; then the joint ``layers`` run on [caption; image] with
ONE weight set for both, modulated by the timestep alone (``adaLN_modulation``, tanh gates; no
pooled text). docs/families-zimage.md says why the concepts travel as below.

- The concepts' way in (``text_in``) is the caption's: ``cap_embedder``, then every
  ``context_refiner`` layer, the concepts attending to each other only (nothing else is a
  caption of theirs), every concept at the first caption rotary position (axis 0 = 1, the other
  axes 0), so the maps do not depend on the order of the words. The result depends on nothing
  that changes during a run, so the capture computes it once per run.
- In joint layer i the concepts go through that layer's own modulation, norms, QKV, q/k RMS
  norm and rotary embedding (the layer's own attention code, with the attention call itself
  intercepted), attend to [the image's keys; their own keys], and go on through the layer's
  output projection, gates and feed-forward. Nothing attends to them: the caption and image
  tokens are computed by ComfyUI, untouched.
- The hook: Lumina's ``_forward`` has no dit block-replace patches. It calls every
  ``transformer_options["patches"]["double_block"]`` patch after each joint layer, with the
  layer's caption / image / modulation inputs, ``x`` and ``block_index``, and writes back only
  what a patch returns; it sets ``block_type`` "double" and ``block_index`` before each joint
  layer, and every attention call honours ``optimized_attention_override``. :meth:`ZImageStream.hook`
  installs, on the clone only, one override that keeps a reference to the q, k, v (head-major,
  rotary applied, K/V heads repeated to the query heads) and output of each hooked joint
  layer's attention call, computed as ComfyUI computes them, and one ``double_block`` patch that
  hands them to the capture and returns nothing. ComfyUI versions without those per-layer
  patches (0.3.75) are refused.
- ComfyUI hands the joint attention (B, heads, T, d) tensors, caption first (padded to a multiple
  of 32 tokens with ``cap_pad_token`` in Z-Image), then the image tokens, then the image's pad
  tokens; the maps read only the real image tokens, and the concepts attend only to them.
"""
from __future__ import annotations

import inspect

import torch

from .base import TextStream

#: The rotary position of every concept: the first caption position (embed_cap: index + 1).
CONCEPT_POSITION = 1.0

CANDIDATES_NOTE = (
    "Z-Image: the K and V rows of context_refiner.N.attention.qkv, the caption refiner layers. "
    "They are the only K/V weights that read the text alone: the caption refiner runs on the "
    "caption tokens only, before any image token exists; the noise refiner reads only the "
    "image; and the joint layers project caption and image tokens with one shared weight set, so "
    "shutting a weight there would change how the image reads itself as much as the text.")


def layer_patches_supported(dm) -> bool:
    """Whether this ComfyUI's NextDiT calls ``patches["double_block"]`` after each joint layer,
    with its index (ComfyUI 0.33 does, 0.3.75 does not). True when the source cannot be read."""
    try:
        src = inspect.getsource(type(dm)._forward)
    except (OSError, TypeError, AttributeError):
        return True
    return '"double_block"' in src and '"block_index"' in src


class _CaptionPath:
    """Raw text-encoder vectors (1, C, cap_feat_dim) -> the concepts as they enter the first
    joint layer: ``cap_embedder``, then each ``context_refiner`` layer (attention among the
    concepts only) at the concepts' rotary positions."""

    def __init__(self, stream: "ZImageStream"):
        self.stream = stream
        proj = stream.dm.cap_embedder[-1]
        self.in_features, self.out_features = proj.in_features, proj.out_features

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        dm = self.stream.dm
        c = dm.cap_embedder(raw)
        freqs = self.stream.freqs(c.shape[1], c.device)
        for layer in dm.context_refiner:
            c = layer(c, None, freqs, transformer_options={})
        return c


class _LayerTap:
    """The capture's hook on one model clone: an attention override that keeps each hooked joint
    layer's q, k, v and output, and a ``double_block`` patch (after the layer) that hands them to
    that layer's capture patch. Changes nothing the model computes."""

    def __init__(self, stream: "ZImageStream", model):
        self.stream, self.model = stream, model
        self.blocks = {}                        # block index -> capture patch (observe(args, stash))
        self.stash = {}
        to = model.model_options.setdefault("transformer_options", {})
        self.previous = to.get("optimized_attention_override")
        to["optimized_attention_override"] = self.attention
        model.set_model_patch(self.after_layer, "double_block")

    def attention(self, func, *args, **kwargs):
        out = self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)
        to = kwargs.get("transformer_options") or {}
        if to.get("block_type") == "double" and to.get("block_index") in self.blocks:
            self.stash[to["block_index"]] = {"q": args[0], "k": args[1], "v": args[2], "o": out}
        return out

    def after_layer(self, args):
        i = args.get("block_index")
        stash = self.stash.pop(i, None)
        patch = self.blocks.get(i)
        if patch is not None:
            x, p = args["x"], self.stream.dm.patch_size
            self.stream.n_image = (x.shape[-2] // p) * (x.shape[-1] // p)
            if args["vec"].shape[0] != args["img"].shape[0]:
                stash = None                    # reference latents (omni): other modulation rows
            patch.observe(args, stash or {})
        return {}


class ZImageStream(TextStream):
    kind = "joint"
    candidates_note = CANDIDATES_NOTE

    @staticmethod
    def matches(dm) -> bool:
        return all(hasattr(dm, a) for a in ("context_refiner", "noise_refiner", "layers", "cap_embedder"))

    def __init__(self, dm):
        self.dm = dm
        self.blocks = dm.layers
        self.text_in = _CaptionPath(self)
        self.n_image = None                     # real image tokens of the current call
        self._freqs = {}
        self._tap = None

    def width(self) -> int:
        return int(self.dm.dim)

    def describe(self, unet_config: dict) -> tuple:
        dm, att = self.dm, self.blocks[0].attention
        line = (f"NextDiT: {len(dm.context_refiner)} caption-refiner, {len(dm.noise_refiner)} "
                f"noise-refiner and {len(self.blocks)} joint layers, {self.width()} wide, "
                f"{att.n_local_heads} heads of {att.head_dim} ({att.n_local_kv_heads} K/V heads)")
        if not layer_patches_supported(dm):
            line += "; this ComfyUI calls no per-layer patches, so Saliency Capture needs a newer one"
        return None, line

    def freqs(self, count: int, device) -> torch.Tensor:
        """The rotary embedding of ``count`` concepts, as ``embed_cap`` makes a caption's."""
        key = (count, device)
        f = self._freqs.get(key)
        if f is None:
            ids = torch.zeros(1, count, 3, dtype=torch.float32, device=device)
            ids[:, :, 0] = CONCEPT_POSITION
            f = self._freqs[key] = self.dm.rope_embedder(ids).movedim(1, 2)
        return f

    def hook(self, model, index: int, make) -> None:
        from .._runtime import fail
        if self._tap is None or self._tap.model is not model:
            if not layer_patches_supported(self.dm):
                raise fail("ConceptLab Saliency Capture",
                           "This ComfyUI's Z-Image model (comfy/ldm/lumina/model.py) calls no "
                           "per-layer patches, so the capture cannot read its joint layers.",
                           "Update ComfyUI (0.33 has them).")
            self._tap = _LayerTap(self, model)
        self._tap.blocks[index] = make(None)

    @staticmethod
    def heads(block) -> int:
        return block.attention.n_local_heads

    def image_slice(self, block, n_txt: int, n_tokens: int) -> slice:
        end = n_tokens if self.n_image is None else min(n_txt + self.n_image, n_tokens)
        return slice(n_txt, end)

    @staticmethod
    def tokens_major(t):
        return t.transpose(1, 2)               # (B, heads, T, d) -> (B, T, heads, d)

    @staticmethod
    def _projected(attention, x, freqs) -> tuple:
        """q, k, v of tokens ``x`` as ``attention`` (a JointAttention) makes them: its QKV, q/k
        RMS norm, rotary embedding and K/V head repeat, read at its attention call, which is
        skipped (its output projection then runs on zeros, and is discarded)."""
        got = {}

        def take(func, q, k, v, *args, **kwargs):
            got["qkv"] = (q, k, v)
            return q.new_zeros(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])
        attention(x, None, freqs, transformer_options={"optimized_attention_override": take})
        return tuple(t.transpose(1, 2) for t in got["qkv"])

    def pre(self, block, c, vec):
        from comfy.ldm.lumina import model as lumina
        scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(vec).chunk(4, dim=1)
        x = lumina.modulate(block.attention_norm1(c), scale_msa)
        qkv = self._projected(block.attention, x, self.freqs(c.shape[1], c.device))
        return qkv, (c, gate_msa, scale_mlp, gate_mlp)

    @staticmethod
    def post(block, o_c, inter):
        from comfy.ldm.lumina import model as lumina
        c, gate_msa, scale_mlp, gate_mlp = inter
        c = c + lumina.apply_gate(gate_msa.unsqueeze(1).tanh(), block.attention_norm2(
            lumina.clamp_fp16(block.attention.out(o_c))))
        return c + lumina.apply_gate(gate_mlp.unsqueeze(1).tanh(), block.ffn_norm2(
            lumina.clamp_fp16(block.feed_forward(lumina.modulate(block.ffn_norm1(c), scale_mlp)))))

"""One small adapter per multimodal-DiT architecture: how a capability reaches its text stream.

ConceptAttention (nodes/saliency.py) carries concept tokens beside the real text tokens through
each joint / double-stream block, one way: the concepts read the image, nothing reads them.
Every architecture names its text-stream weights differently and feeds its blocks differently,
so that knowledge lives here, one module per architecture, behind one small interface
(:class:`Stream`). The capture code never tests for a family.

A stream adapter is built from a diffusion model (``matches(dm)`` says whether it applies) and
offers:

- ``dm``, ``blocks``: the model and its joint / double-stream blocks, in execution order (the
  ones ComfyUI's ``("double_block", i)`` dit replace patches wrap);
- ``kind``: "joint" or "double-stream" (for messages);
- ``text_in(raw)``: the model's own projection of text-encoder vectors into its stream;
- ``pooled_embedder``, ``pooled_dim``: the module that adds the pooled text vector to the
  modulation vector (None when there is none), and how many columns of ``y`` it reads;
- ``width()``: the stream's hidden width (``auto``'s scale rule);
- ``token_key(empty_tokens)``: which tokenizer output makes the model's text sequence, so that a
  concept word's vector is read from the same encoder;
- ``concept_rows(vec, rows)``: the modulation input of the block for the positive rows (a tensor,
  or whatever structure the architecture passes its blocks);
- ``concept_inputs(args, rows)``: what ``pre`` takes as ``vec``, from the block's inputs
  ``args`` (by default ``concept_rows(args["vec"], rows)``; Qwen-Image adds the concepts' rotary
  embedding);
- ``remove_pooled(vec, delta)``: the same with the pooled text's contribution ``delta`` removed;
- ``heads(block)``, ``image_slice(block, n_txt, n_tokens)``, ``tokens_major(t)``: how the
  block's attention tensors are laid out, as ComfyUI hands them to its attention function;
- ``pre(block, c, vec)`` -> ``((q, k, v), inter)``: the concepts through the text stream's
  modulation, norm and QKV (tokens-major, ``(B, C, heads * d)`` or ``(B, C, heads, d)``);
- ``post(block, o_c, inter)``: the concepts' attention output through the text stream's
  projection and MLP, the next block's concepts (None after a block whose text output is unused);
- ``direct(index)``: a callable that runs block ``index`` the way ComfyUI runs an unpatched block,
  when its ``original_block`` would cost more (None otherwise);
- ``hook(model, index, make)``: puts the capture's patch for block ``index`` on a MODEL clone,
  ``make(previous)`` building it (by default a ``("double_block", index)`` dit replace around the
  one already there; Z-Image, whose model has no block replaces, taps its per-layer patches and
  attention calls and calls the patch's ``observe(args, stash)`` itself);
- ``candidates_note`` (optional): which weights are this architecture's concept-neuron
  candidates, and why (Model Info shows it).
"""
from __future__ import annotations

from typing import Optional

import importlib

#: family (nodes/_runtime.py FAMILY_NAMES) -> "module:Class" of its adapter, in this package.
STREAMS_BY_FAMILY = {
    "sd3": "sd3:SD3Stream",
    "flux": "flux:FluxStream",
    "flux2": "flux2:Flux2Stream",
    "chroma": "chroma:ChromaStream",
    "qwen_image": "qwen_image:QwenImageStream",
    "zimage": "zimage:ZImageStream",
}


def stream_class(family: str):
    """The adapter class of ``family``, or None."""
    ref = STREAMS_BY_FAMILY.get(family)
    if ref is None:
        return None
    module, name = ref.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name, None)


def dit_stream(diffusion_model, family: Optional[str] = None) -> Optional[object]:
    """The text-stream adapter of a multimodal DiT of ``family``, or None for other models.
    Without a family, the first adapter whose ``matches`` accepts the model (SD3, then Flux.1)."""
    if family is not None:
        cls = stream_class(family)
        return cls(diffusion_model) if cls is not None and cls.matches(diffusion_model) else None
    for fam in ("sd3", "flux"):
        cls = stream_class(fam)
        if cls.matches(diffusion_model):
            return cls(diffusion_model)
    return None


def dit_scale(stream) -> tuple:
    """(width, blocks) of a DiT's text stream (``auto``'s rule in nodes/saliency.py)."""
    return int(stream.width()), len(stream.blocks)

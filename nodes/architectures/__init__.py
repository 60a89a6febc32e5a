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
- ``remove_pooled(vec, delta)``: the same with the pooled text's contribution ``delta`` removed;
- ``heads(block)``, ``image_slice(block, n_txt, n_tokens)``, ``tokens_major(t)``: how the
  block's attention tensors are laid out, as ComfyUI hands them to its attention function;
- ``pre(block, c, vec)`` -> ``((q, k, v), inter)``: the concepts through the text stream's
  modulation, norm and QKV (tokens-major, ``(B, C, heads * d)`` or ``(B, C, heads, d)``);
- ``post(block, o_c, inter)``: the concepts' attention output through the text stream's
  projection and MLP, the next block's concepts (None after a block whose text output is unused);
- ``direct(index)``: a callable that runs block ``index`` the way ComfyUI runs an unpatched block,
  when its ``original_block`` would cost more (None otherwise).
"""
from __future__ import annotations

from typing import Optional

from . import flux, sd3

#: Adapters in the order they are tried.
STREAMS = (sd3.SD3Stream, flux.FluxStream)


def dit_stream(diffusion_model) -> Optional[object]:
    """The text-stream adapter of a multimodal DiT, or None for other models."""
    for stream in STREAMS:
        if stream.matches(diffusion_model):
            return stream(diffusion_model)
    return None


def dit_scale(stream) -> tuple:
    """(width, blocks) of a DiT's text stream (``auto``'s rule in nodes/saliency.py)."""
    return int(stream.width()), len(stream.blocks)

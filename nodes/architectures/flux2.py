"""Flux.2 (ComfyUI's ``comfy.ldm.flux`` with ``image_model="flux2"``): Flux.1's double-stream blocks
with global modulation. The text stream is each double-stream block's ``txt_norm1/2``,
``txt_attn`` (QKV without bias, RMS q/k norm, projection) and ``txt_mlp`` (SiLU-gated); the blocks
have no ``txt_mod`` of their own: the model computes one text modulation for all of them
(``double_stream_modulation_txt``) and its ``("double_block", i)`` replace receives ``vec`` as
the block does, ``((img_mod1, img_mod2), (txt_mod1, txt_mod2))``, each a ``ModulationOut`` of
(B, 1, width) tensors. Concepts use the text half for the positive rows. Flux.2 has no pooled text
vector (``vector_in`` is None): the modulation holds the timestep and guidance only, so nothing is
removed from it.

Positions: ``txt_ids_dims=[3]`` gives text token i the position ids (0, 0, 0, i) (image tokens:
(0, row, column, 0)). Concepts take text position 0's, (0, 0, 0, 0), whose rotation is the
identity: they stand to the image as every Flux.1 text token does, and their maps do not depend
on where their word would sit in a prompt (ComfyUI pads Flux.2 prompts on the left to 512 tokens,
so that place moves with the prompt's length). Their q and k are used as the text stream makes
them, as on Flux.1."""
from __future__ import annotations

import dataclasses

import torch

from .flux import FluxStream


def select_rows(x, rows):
    """``x`` (a tensor, a ModulationOut-like dataclass of tensors, or tuples of these) at the batch
    rows ``rows``."""
    if torch.is_tensor(x):
        return x[rows]
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: select_rows(getattr(x, f.name), rows)
                                         for f in dataclasses.fields(x)})
    if isinstance(x, (tuple, list)):
        return type(x)(select_rows(i, rows) for i in x)
    return x


class _NormedTextIn:
    """``txt_in`` after the model's own ``txt_norm`` (a Flux.2 option), as one callable with the
    linear's widths."""

    def __init__(self, norm, linear):
        self.norm, self.linear = norm, linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight

    def __call__(self, x):
        return self.linear(self.norm(x))


#: Model Info's line on the concept-neuron candidates of the Flux-derived families.
CANDIDATES_NOTE = ("candidates: the K and V rows of each double-stream block's text QKV "
                   "(double_blocks.N.txt_attn.qkv), which read the text alone; the single-stream "
                   "blocks' fused linear1 projects text and image tokens together, so none of its "
                   "weights is a candidate")


class Flux2Stream(FluxStream):
    """Double-stream blocks whose modulation comes precomputed in ``vec``: ``(img, txt)`` pairs of
    (mod1, mod2). Chroma passes its blocks the same structure (see chroma.py)."""

    candidates_note = CANDIDATES_NOTE
    modulation = "global modulation (one per stream for all blocks)"

    @staticmethod
    def matches(dm) -> bool:
        return (hasattr(dm, "double_blocks") and hasattr(dm, "txt_in")
                and hasattr(dm, "double_stream_modulation_txt"))

    def __init__(self, dm):
        super().__init__(dm)
        # The modulation is computed once for all blocks; a pooled vector's part could not be
        # taken out of the finished (shift, scale, gate) here, and Flux.2 has none (vec_in_dim None).
        self.pooled_embedder = self.pooled_dim = None
        norm = getattr(dm, "txt_norm", None)
        if norm is not None:
            self.text_in = _NormedTextIn(norm, dm.txt_in)

    def describe(self, unet_config: dict) -> tuple:
        singles = len(getattr(self.dm, "single_blocks", ()))
        text = getattr(self.text_in, "in_features", None)
        return None, (f"{len(self.blocks)} double-stream and {singles} single-stream blocks, "
                      f"{self.width()} wide, {self.modulation}, text input {text} wide")

    @staticmethod
    def concept_rows(vec, rows):
        return select_rows(vec, rows)

    @staticmethod
    def remove_pooled(vec, delta):
        return vec                           # no pooled part (pooled_embedder is None)

    @staticmethod
    def pre(block, c, vec):
        _, (mod1, mod2) = vec
        return FluxStream.modulated_pre(block, c, mod1, mod2)

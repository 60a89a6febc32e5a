"""Chroma (ComfyUI's ``comfy.ldm.chroma``): Flux.1's double-stream blocks built without modulation
of their own. The model's distilled-guidance "approximator" (``distilled_guidance_layer``) turns
the timestep, the guidance value and a modulation index into one vector per modulation, and the
model slices them per block (``get_modulations``): its ``("double_block", i)`` replace receives
``vec = ((img_mod1, img_mod2), (txt_mod1, txt_mod2))``, ``ChromaModulationOut`` views of
(B, 1, width), the structure Flux.2 passes (flux2.py). The text stream is each block's
``txt_norm1/2``, ``txt_attn`` and ``txt_mlp``; concepts use the text modulations of the positive
rows. Chroma reads no pooled text (T5 only; the approximator never sees the prompt), so nothing
is removed from the modulation.

Positions: every Chroma text token has position ids (0, 0, 0), as on Flux.1; concepts take the
same, whose rotation is the identity."""
from __future__ import annotations

from .flux2 import Flux2Stream


class ChromaStream(Flux2Stream):
    modulation = "modulation from the distilled-guidance approximator"

    @staticmethod
    def matches(dm) -> bool:
        return (hasattr(dm, "double_blocks") and hasattr(dm, "txt_in")
                and hasattr(dm, "distilled_guidance_layer"))

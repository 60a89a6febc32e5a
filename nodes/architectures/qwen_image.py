"""Qwen-Image (ComfyUI's ``comfy.ldm.qwen_image``, config ``QwenImage``): the text stream is each
``transformer_blocks.N``'s text half: ``txt_mod`` (shift, scale, gate for attention and MLP from
the timestep embedding alone; Qwen-Image has no pooled text vector), ``txt_norm1/2``, the
attention's ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj`` with the RMS norms ``norm_added_q`` /
``norm_added_k``, ``to_add_out`` and ``txt_mlp``. Text enters through ``txt_norm`` (RMS) and
``txt_in``. ComfyUI's ``("double_block", i)`` dit replace hands each block ``img``, ``txt``,
``vec`` (the timestep embedding) and ``pe`` (the rotary embedding of every token, text first).

The joint attention gets (B, heads, T, d) q / k / v, text tokens first, with the rotary
embedding applied to both text and image tokens; its output is (B, T, heads * d).

Rotary positions of the concepts. Qwen-Image places image tokens on a grid centred on 0 (frame
index 0, rows ``-h/2 .. h/2``, columns ``-w/2 .. w/2``, in patches) and text tokens on the
diagonal after it: prompt token j has position ``txt_start + j`` on all three axes, with
``txt_start = max(h/2, w/2)``. Every concept token takes the position of the prompt's first
token, ``(txt_start,) * 3`` (read from the block's own ``pe``, so it follows the latent size):

- RoPE makes attention depend on relative offsets. With the first text position, each concept
  meets every image token at the same offset the prompt's first token does, so its attention to
  the image is made the way the text's is.
- One shared position keeps the concepts interchangeable: successive positions
  (``txt_start + j``) would give each concept its own offsets to the image, a bias that depends
  only on the order of the words. Among themselves, concepts attend at offset 0.
- Position 0 (no rotation, what the Flux.1 adapter uses, where text ids are 0) is the centre
  image patch's position here: every concept would lean towards the centre of the picture.
"""
from __future__ import annotations

import torch

from .base import TextStream


class _TextIn:
    """Qwen-Image's text input: ``txt_norm`` (RMS) then ``txt_in``, as the model runs them."""

    def __init__(self, norm, linear):
        self.norm, self.linear = norm, linear
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def __call__(self, raw):
        return self.linear(self.norm(raw))


def _rope(x, pe):
    from comfy.ldm.flux.math import apply_rope1   # ComfyUI's own rotation, as the block uses it
    return apply_rope1(x, pe)


class QwenImageStream(TextStream):
    kind = "double-stream"

    @staticmethod
    def matches(dm) -> bool:
        return hasattr(dm, "transformer_blocks") and hasattr(dm, "txt_norm") and hasattr(dm, "txt_in")

    def __init__(self, dm):
        self.dm = dm
        self.blocks = dm.transformer_blocks
        self.text_in = _TextIn(dm.txt_norm, dm.txt_in)

    def describe(self, unet_config: dict) -> tuple:
        """The checkpoints model detection tells apart: Qwen-Image-Edit-2511 (reference images at
        timestep 0) and Qwen-Image-Layered (an extra timestep condition); base and Edit-2509
        load alike."""
        label = ("Qwen-Image-Layered" if unet_config.get("use_additional_t_cond") else
                 "Qwen-Image-Edit-2511" if unet_config.get("default_ref_method") == "index_timestep_zero"
                 else None)
        heads = self.heads(self.blocks[0]) if len(self.blocks) else 0
        return label, (f"{len(self.blocks)} double-stream blocks, {self.width()} wide ({heads} "
                       "heads), RoPE on text and image tokens")

    def concept_inputs(self, args: dict, rows):
        """(timestep embedding of the positive rows, rotary embedding of the first text token).
        Under Qwen-Image-Edit's ``index_timestep_zero`` the embedding has a second half for the
        reference tokens; the positive rows are in the first, which the text stream reads."""
        pe = args["pe"]                                   # (B, 1, T, d/2, 2, 2), text first
        return self.concept_rows(args["vec"], rows), pe[:1, :, :1]

    @staticmethod
    def heads(block) -> int:
        return block.attn.heads

    @staticmethod
    def tokens_major(t):
        return t.transpose(1, 2)               # (B, heads, T, d) -> (B, T, heads, d)

    @staticmethod
    def pre(block, c, vec):
        temb, pe = vec
        mod1, mod2 = block.txt_mod(temb).chunk(2, dim=-1)
        x, gate1 = block._modulate(block.txt_norm1(c), mod1)
        attn = block.attn
        b, n = x.shape[0], x.shape[1]

        def head_major(t):
            return t.view(b, n, attn.heads, -1).transpose(1, 2).contiguous()
        q = attn.norm_added_q(head_major(attn.add_q_proj(x)))
        k = attn.norm_added_k(head_major(attn.add_k_proj(x)))
        v = head_major(attn.add_v_proj(x))
        pe = pe.to(q.device).expand(b, -1, n, *pe.shape[3:]).contiguous()
        q, k = _rope(q, pe), _rope(k, pe)
        return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), (c, gate1, mod2)

    @staticmethod
    def post(block, o_c, inter):
        c, gate1, mod2 = inter
        c = c + gate1 * block.attn.to_add_out(o_c)
        x, gate2 = block._modulate(block.txt_norm2(c), mod2)
        return torch.addcmul(c, gate2, block.txt_mlp(x))

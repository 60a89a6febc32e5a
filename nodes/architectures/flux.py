"""Flux.1 (ComfyUI's ``comfy.ldm.flux``): the text stream is each double-stream block's ``txt_*``
weights (``txt_mod``, ``txt_norm1/2``, ``txt_attn`` QKV + RMS q/k norm + projection, ``txt_mlp``).

ComfyUI hands Flux's attention (B, heads, T, d) tensors with the rotary embedding already applied
to q and k, text tokens first (image first in blocks with ``flipped_img_txt``, in older
ComfyUI). Concepts have position id 0, where the rotation is the identity, so their q and k are
used as the text stream makes them. Single-stream blocks are not used (as in the reference):
one fused linear there projects text and image tokens together."""
from __future__ import annotations

import torch

from .base import TextStream


class FluxStream(TextStream):
    kind = "double-stream"

    @staticmethod
    def matches(dm) -> bool:
        return hasattr(dm, "double_blocks") and hasattr(dm, "txt_in")

    def __init__(self, dm):
        self.dm = dm
        self.blocks = dm.double_blocks
        self.text_in = dm.txt_in
        self.pooled_embedder = getattr(dm, "vector_in", None)
        self.pooled_dim = getattr(getattr(dm, "params", None), "vec_in_dim", None)   # y[:, :vec_in_dim]

    @staticmethod
    def token_key(empty_tokens: dict) -> str:
        # T5 alone makes Flux's text sequence (CLIP-L gives only the pooled vector)
        if "t5xxl" in empty_tokens:
            return "t5xxl"
        return "l" if "l" in empty_tokens else next(iter(empty_tokens))

    @staticmethod
    def heads(block) -> int:
        return block.num_heads

    @staticmethod
    def image_slice(block, n_txt: int, n_tokens: int) -> slice:
        if getattr(block, "flipped_img_txt", False):
            return slice(0, n_tokens - n_txt)
        return slice(n_txt, n_tokens)

    @staticmethod
    def tokens_major(t):
        return t.transpose(1, 2)               # (B, heads, T, d) -> (B, T, heads, d)

    @staticmethod
    def pre(block, c, vec):
        return FluxStream.modulated_pre(block, c, *block.txt_mod(vec))

    @staticmethod
    def modulated_pre(block, c, mod1, mod2):
        """``pre`` with the text stream's two modulations (shift, scale, gate) already made."""
        x = torch.addcmul(mod1.shift, block.txt_norm1(c), 1 + mod1.scale)
        qkv = block.txt_attn.qkv(x)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = block.txt_attn.norm(q, k, v)
        return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), (c, mod1, mod2)

    @staticmethod
    def post(block, o_c, inter):
        c, mod1, mod2 = inter
        c = c + mod1.gate * block.txt_attn.proj(o_c)
        x = torch.addcmul(mod2.shift, block.txt_norm2(c), 1 + mod2.scale)
        return c + mod2.gate * block.txt_mlp(x)


"""SD3 and SD3.5 (ComfyUI's MMDiT / MMDiT-X, ``joint_blocks``): the text stream is each joint
block's ``context_block``. ComfyUI hands the joint attention (B, T, heads * d) tensors, text
tokens first; the last block's context is ``pre_only`` (its text output is unused)."""
from __future__ import annotations

from .base import TextStream


class SD3Stream(TextStream):
    kind = "joint"

    @staticmethod
    def matches(dm) -> bool:
        return hasattr(dm, "joint_blocks")

    def __init__(self, dm):
        self.dm = dm
        self.blocks = dm.joint_blocks
        self.text_in = dm.context_embedder              # raw text-encoder vectors -> stream
        self.pooled_embedder = getattr(dm, "y_embedder", None)
        self.pooled_dim = None                          # reads the whole pooled vector

    @staticmethod
    def heads(block) -> int:
        return block.x_block.attn.num_heads

    @staticmethod
    def image_slice(block, n_txt: int, n_tokens: int) -> slice:
        return slice(n_txt, n_tokens)

    @staticmethod
    def tokens_major(t):
        return t                               # already (B, T, heads*d)

    @staticmethod
    def pre(block, c, vec):
        return block.context_block.pre_attention(c, vec)

    @staticmethod
    def post(block, o_c, inter):
        cb = block.context_block
        return None if cb.pre_only else cb.post_attention(o_c, *inter)

    def direct(self, index: int):
        """Run a joint block as ComfyUI runs an unpatched one: its ``original_block`` for patched
        blocks goes through torch.utils.checkpoint, which costs more than the whole capture on
        small models and computes the same numbers."""
        dm, block = self.dm, self.blocks[index]
        if not (hasattr(dm, "use_checkpoint") and hasattr(block, "context_block") and hasattr(block, "x_block")):
            return None

        def run(args):
            txt, img = block(args["txt"], args["img"], c=args["vec"], use_checkpoint=dm.use_checkpoint,
                             transformer_options=args["transformer_options"])
            return {"txt": txt, "img": img}
        return run

"""SD3 and SD3.5 (ComfyUI's MMDiT / MMDiT-X, ``joint_blocks``): the text stream is each joint
block's ``context_block`` (``adaLN_modulation``, ``norm1``, ``attn.qkv``, the q/k norms ``attn.ln_q``
/ ``attn.ln_k``, ``attn.proj``, ``norm2``, ``mlp``), reached through its own ``pre_attention`` /
``post_attention``. ComfyUI hands the joint attention (B, T, heads * d) tensors, text tokens
first; the last block's context is ``pre_only`` (its text output is unused).

SD3.5 (what ComfyUI's model detection finds in the checkpoint):

- RMS q/k norms (``qk_norm: "rms"``, SD3.5 Large and Medium): ``context_block.pre_attention``
  applies the context block's own ``ln_q`` / ``ln_k`` to the concepts, as to the prompt's tokens.
- MMDiT-X (``x_block_self_attn_layers``, SD3.5 Medium's blocks 0-12): the image stream also runs
  an image-only self-attention (``x_block.attn2``) through the same attention function, after
  the joint one. The capture reads the joint call (the one over text and image tokens: the most
  tokens), so the image's queries, keys, values and outputs are the joint attention's; the
  concepts never meet ``attn2``, which has no text side."""
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

    def describe(self, unet_config: dict) -> tuple:
        """SD3.5 carries RMS q/k norms; SD3.5 Medium is also MMDiT-X. SD3 Medium has neither."""
        x_layers = sorted(unet_config.get("x_block_self_attn_layers") or [])
        qk = unet_config.get("qk_norm")
        n, width = len(self.blocks), self.width()
        parts = [f"MMDiT-X (image self-attention in joint blocks {_ranges(x_layers)})" if x_layers
                 else "MMDiT", f"{n} joint blocks, {width} wide"]
        if qk:
            parts.append(f"{str(qk).upper()} q/k norm")
        known = {(24, 1536, True): "SD3.5 Medium", (38, 2432, False): "SD3.5 Large"}
        label = known.get((n, width, bool(x_layers))) if qk else None
        if label is None:
            label = "SD3.5" if qk or x_layers else ("SD3 Medium" if (n, width) == (24, 1536) else "SD3")
        return label, ", ".join(parts)

    @staticmethod
    def heads(block) -> int:
        return block.x_block.attn.num_heads

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


def _ranges(indices: list) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)

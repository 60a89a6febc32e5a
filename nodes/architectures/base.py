"""The defaults every text-stream adapter shares (see the package doc for the interface)."""
from __future__ import annotations


class TextStream:
    kind = "double-stream"
    pooled_embedder = None
    pooled_dim = None

    def width(self) -> int:
        """The stream's hidden width: what its text input projects to."""
        w = getattr(self.text_in, "out_features", None)
        return int(w if w is not None else self.text_in.weight.shape[0])

    @staticmethod
    def token_key(empty_tokens: dict) -> str:
        """A CLIP-style encoder leads the sequence: its tokens ('l'), else the only one."""
        return "l" if "l" in empty_tokens else next(iter(empty_tokens))

    @staticmethod
    def concept_rows(vec, rows):
        return vec[rows]

    @staticmethod
    def remove_pooled(vec, delta):
        return vec - delta

    def direct(self, index: int):
        """None: the block's own ``original_block`` is how ComfyUI runs it."""
        return None

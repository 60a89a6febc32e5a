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

    def describe(self, unet_config: dict) -> tuple:
        """(label, architecture) for Model Info: a label for the checkpoint's kind (None: the
        family's own) and one line on the text stream's blocks. ``unet_config`` is what ComfyUI's
        model detection read from the checkpoint."""
        return None, f"{len(self.blocks)} {self.kind} blocks, {self.width()} wide"

    @staticmethod
    def token_key(empty_tokens: dict) -> str:
        """A CLIP-style encoder leads the sequence: its tokens ('l'), else the only one."""
        return "l" if "l" in empty_tokens else next(iter(empty_tokens))

    @staticmethod
    def concept_rows(vec, rows):
        return vec[rows]

    def concept_inputs(self, args: dict, rows):
        """What ``pre`` needs besides the concepts, from a block's inputs ``args``: the
        modulation input of the positive rows (architectures that rotate text tokens add the
        concepts' rotary embedding)."""
        return self.concept_rows(args["vec"], rows)

    @staticmethod
    def remove_pooled(vec, delta):
        return vec - delta

    @staticmethod
    def image_slice(block, n_txt: int, n_tokens: int) -> slice:
        """Text tokens first, then the image's (SD3, Qwen-Image)."""
        return slice(n_txt, n_tokens)

    def direct(self, index: int):
        """None: the block's own ``original_block`` is how ComfyUI runs it."""
        return None

    def hook(self, model, index: int, make) -> None:
        """Put the capture's patch for block ``index`` on the clone ``model``: ``make(previous)``
        builds it around the dit replace already there (or None). ComfyUI's
        ``("double_block", index)`` dit replace patch, which SD3, Flux and Qwen-Image honour."""
        replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {})
        previous = replaces.get("dit", {}).get(("double_block", index))
        model.set_model_patch_replace(make(previous), "dit", "double_block", index)

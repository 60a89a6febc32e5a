"""Concept Lab kernels: the algorithms, in pure torch.

Nothing in this package imports ComfyUI. Node adapters in ``nodes/`` translate ComfyUI
types (MODEL, CLIP, LATENT, ...) into the tensors and callables these functions take.
"""

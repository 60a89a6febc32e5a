"""The "digits world": a small, fully measurable synthetic world for tiny text-to-image models.

Scenes are black 64x64 RGB canvases holding one to three real handwritten digits (scikit-learn's
bundled 8x8 ``load_digits`` set, upscaled smoothly), each painted in a named colour at a named
position, with a templated caption ("a red seven on the left and a blue two on the right") and an
exact per-digit pixel mask. The judge (``judge.py``) reads images back with tools no generative
model wrote: connected components, a classifier trained on real digits from writers that the
training scenes never use, nearest-palette colour and thirds-of-the-canvas positions.

Modules:
  scenes  the world: configuration, scene rendering, datasets, class-frequency long tail, subjects
  judge   the reader: digit classifier, ``find_digits`` / ``read_scene``, ``subject_similarity``

Pure numpy / scipy / scikit-learn / Pillow; no ComfyUI import anywhere in this package.
"""
from __future__ import annotations

__all__ = ["scenes", "judge"]

"""The saliency check of a rendered image: the mask of the subject's word must cover the subject.

Where is the subject? ``subject = "foreground"`` (the default) takes every pixel that differs from
the image's background colour, estimated as the median colour of its border: right for
catalogue shots on a plain backdrop (and for the digits world, drawn on black). ``subject =
"mask"`` only asks that the word's mask is neither empty nor the whole image, for busy scenes
where no backdrop colour exists.

Readings (each between 0 and 1): ``subject_area`` and ``mask_area`` (fractions of the image),
``coverage`` (the part of the subject inside the mask) and ``precision`` (the part of the mask
on the subject). An image is flagged, with the reason, when the mask is empty, when no subject
is found, or when coverage is under ``min_coverage``.
"""
from __future__ import annotations

import io

import numpy as np


def _rgb(png: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def foreground(rgb: np.ndarray, tolerance: float = 0.12) -> np.ndarray:
    """Pixels whose colour differs from the border's median colour by more than ``tolerance``
    in some channel."""
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3),
                             rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    return np.abs(rgb - background).max(axis=-1) > tolerance


def saliency_check(image_png: bytes, mask_png: bytes, min_coverage: float = 0.5, subject: str = "foreground",
                   tolerance: float = 0.12) -> tuple[dict, list]:
    """(readings, flags) for one image and its word mask (Mask To Image, saved as PNG)."""
    rgb = _rgb(image_png)
    mask = _rgb(mask_png)[..., 0] > 0.5
    if mask.shape != rgb.shape[:2]:
        from PIL import Image
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(rgb.shape[1::-1])) > 127
    readings = {"mask_area": round(float(mask.mean()), 4)}
    flags = []
    if not mask.any():
        flags.append("the word's mask is empty: the model did not attend to the subject's word")
    if subject == "mask":
        if mask.all():
            flags.append("the word's mask covers the whole image: it does not locate the subject")
        return readings, flags
    fg = foreground(rgb, tolerance)
    readings["subject_area"] = round(float(fg.mean()), 4)
    if not fg.any():
        flags.append("no subject found: the image is all background")
        return readings, flags
    inter = float((fg & mask).sum())
    readings["coverage"] = round(inter / float(fg.sum()), 4)
    readings["precision"] = round(inter / float(mask.sum()), 4) if mask.any() else 0.0
    if mask.any() and readings["coverage"] < min_coverage:
        flags.append(f"the word's mask covers {100 * readings['coverage']:.0f}% of the subject "
                     f"(at least {100 * min_coverage:.0f}% wanted)")
    return readings, flags

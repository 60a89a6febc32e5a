"""The judge of the digits world: reads images back with tools no generative model wrote.

Pieces
------
* ``digit_vector``: the one normalisation every digit goes through (real 8x8 grids, rendered
  glyphs, crops of generated images): crop to the ink's bounding box (ink >= 20% of the peak),
  pad to a square keeping the aspect ratio, resample to 16x16, scale to peak 1.
* ``Judge``: an RBF support-vector classifier (sigmoid-calibrated probabilities) on those
  vectors, trained only on real digits of the *non-held-out* pseudo-writer blocks
  (``scenes.train_indices``), augmented with renderings of the same samples at scales 12..30 px,
  random ink cut-offs, some Gaussian blur and +-1 px shifts, so that crops cut out of 64 px
  scenes and generated images are classified like real digits. Training takes ~5-10 s on 2 cores;
  the trained judge is memoised in-process (``get_judge``) and pickled under
  ``~/.cache/conceptlab/`` (``CONCEPTLAB_CACHE`` overrides the folder), keyed by a hash of the
  judge settings, the writer split (the only part of the world it depends on) and the numpy /
  scikit-learn versions. A cache file that fails to load is ignored and retrained.
* ``find_digits`` / ``read_scene``: connected components of the foreground of a black-background
  image (threshold on the brightest channel, 8-connectivity), specks dropped, small fragments
  merged into a nearby larger component, then per component: class (+ probabilities), colour
  (nearest palette chromaticity), position (thirds of the canvas from the mask centroid).
* ``subject_similarity``: a rank score in [0, 1] of how much a digit looks like one specific
  handwriting sample rather than its class in general (see the function).
* ``evaluate_judge``, ``validate_subject_similarity``, ``check_scene``: measurements.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from . import scenes as S

JUDGE_VERSION = 1
VEC_SIZE = 16  # side of the normalised digit vector
BBOX_REL = 0.2  # ink below this fraction of the peak is ignored by digit_vector


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

def digit_vector(grey: np.ndarray, size: int = VEC_SIZE, rel: float = BBOX_REL) -> np.ndarray:
    """Normalised (size, size) float32 image of a digit given as a 2-D ink array (0 = background,
    any scale): pixels below ``rel`` x peak are zeroed, the rest is cropped to its bounding box,
    padded to a centred square, resampled (bilinear up / box down) and scaled to peak 1. An empty
    input gives zeros."""
    g = np.asarray(grey, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError("digit_vector wants a 2-D ink array")
    peak = float(g.max()) if g.size else 0.0
    if peak <= 0:
        return np.zeros((size, size), np.float32)
    g = np.where(g >= rel * peak, g, 0.0).astype(np.float32)
    rows, cols = np.flatnonzero(g.any(1)), np.flatnonzero(g.any(0))
    g = g[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = g.shape
    n = max(h, w)
    sq = np.zeros((n, n), np.float32)
    sq[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = g
    method = Image.BILINEAR if n < size else Image.BOX
    out = np.asarray(Image.fromarray(sq).resize((size, size), method), dtype=np.float32)
    out = np.clip(out, 0.0, None)
    return out / max(float(out.max()), 1e-6)


def _shift(v: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(v)
    h, w = v.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        v[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _augmented_render(sample_index: int, rng: np.random.Generator) -> np.ndarray:
    """A random re-rendering of a real sample, as a 2-D ink array (augmentation for training)."""
    grid = S.real_digits()[0][sample_index]
    scale = int(rng.integers(12, 31))
    up = np.asarray(Image.fromarray(np.ascontiguousarray(grid, np.float32))
                    .resize((scale, scale), Image.BICUBIC), dtype=np.float32)
    if rng.random() < 0.35:
        up = ndimage.gaussian_filter(up, float(rng.uniform(0.4, 1.2)))
    up = np.clip(up, 0.0, 1.0)
    up[up < rng.uniform(0.05, 0.3)] = 0.0
    return up


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeSettings:
    """Training settings of the digit classifier (all part of the cache key)."""

    augment: int = 4        # augmented renderings per real training sample
    shift_frac: float = 0.3  # fraction of augmented vectors shifted by +-1 px
    C: float = 10.0
    gamma: str = "scale"
    seed: int = 0


class Judge:
    """Digit classifier trained on real digits of the non-held-out writer blocks of ``cfg``."""

    def __init__(self, cfg: S.WorldConfig = S.WorldConfig(), settings: JudgeSettings = JudgeSettings(),
                 model=None):
        """Train (a few seconds), or wrap an already trained ``model`` (from the disk cache)."""
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC
        self.cfg = cfg
        self.settings = settings
        if model is not None:
            self.model, self.n_train = model, None
            return
        images, labels = S.real_digits()
        rng = np.random.default_rng(settings.seed)
        X, Y = [], []
        for i in S.train_indices(cfg):
            X.append(digit_vector(images[i]))
            Y.append(labels[i])
            for _ in range(settings.augment):
                v = digit_vector(_augmented_render(int(i), rng))
                if rng.random() < settings.shift_frac:
                    v = _shift(v, int(rng.integers(-1, 2)), int(rng.integers(-1, 2)))
                X.append(v)
                Y.append(labels[i])
        X = np.stack(X).reshape(len(X), -1)
        self.n_train = len(X)
        # Sigmoid-calibrated SVM (3-fold, one final SVM): SVC(probability=True) is deprecated.
        self.model = CalibratedClassifierCV(SVC(C=settings.C, gamma=settings.gamma),
                                            method="sigmoid", cv=3, ensemble=False)
        self.model.fit(X, np.asarray(Y))

    def predict_proba(self, inks: Sequence[np.ndarray]) -> np.ndarray:
        """(n, 10) class probabilities of 2-D ink arrays (any size; 8x8 grids or crops)."""
        if len(inks) == 0:
            return np.zeros((0, 10))
        X = np.stack([digit_vector(g).ravel() for g in inks])
        p = np.zeros((len(X), 10))
        p[:, self.model.classes_] = self.model.predict_proba(X)
        return p

    def predict(self, inks: Sequence[np.ndarray]) -> np.ndarray:
        """(n,) predicted classes: argmax of ``predict_proba``."""
        return self.predict_proba(inks).argmax(1).astype(np.int64) if len(inks) else \
            np.zeros(0, dtype=np.int64)


def _cache_dir() -> Path:
    return Path(os.environ.get("CONCEPTLAB_CACHE", Path.home() / ".cache" / "conceptlab"))


def _training_world(cfg: S.WorldConfig) -> S.WorldConfig:
    """The judge depends only on which samples it may train on: a config reduced to the writer
    split, so worlds that differ in anything else share one judge."""
    return S.WorldConfig(n_writer_blocks=cfg.n_writer_blocks, heldout_blocks=tuple(cfg.heldout_blocks))


def _cache_key(cfg: S.WorldConfig, settings: JudgeSettings) -> str:
    import sklearn
    blob = json.dumps({"judge": asdict(settings), "blocks": cfg.n_writer_blocks,
                       "heldout": sorted(cfg.heldout_blocks), "v": JUDGE_VERSION,
                       "vec": [VEC_SIZE, BBOX_REL], "np": np.__version__, "sk": sklearn.__version__},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_judge(cfg: S.WorldConfig = S.WorldConfig(), settings: JudgeSettings = JudgeSettings(),
              disk_cache: bool = True) -> Judge:
    """The judge for ``cfg``'s writer split: memoised in-process, and on disk under
    ``~/.cache/conceptlab/world_judge_<key>.pkl`` (folder overridable with ``CONCEPTLAB_CACHE``)
    unless ``disk_cache=False``. The key hashes the judge settings, the writer split, this
    module's normalisation constants and the numpy / scikit-learn versions; only the fitted
    scikit-learn model is pickled. Training, when needed, takes ~5-10 s on 2 cores."""
    return _get_judge(_training_world(cfg), settings, disk_cache)


@functools.lru_cache(maxsize=4)
def _get_judge(cfg: S.WorldConfig, settings: JudgeSettings, disk_cache: bool) -> Judge:
    path = _cache_dir() / f"world_judge_{_cache_key(cfg, settings)}.pkl"
    if disk_cache and path.is_file():
        try:
            with open(path, "rb") as f:
                payload = pickle.load(f)
            j = Judge(cfg, settings, model=payload["model"])
            j.n_train = payload.get("n_train")
            return j
        except Exception:  # stale / partial / incompatible cache: retrain
            pass
    j = Judge(cfg, settings)
    if disk_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                pickle.dump({"model": j.model, "n_train": j.n_train}, f)  # sklearn objects only
            os.replace(tmp, path)  # atomic: concurrent writers never leave a half file
        except OSError:
            pass
    return j


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

@dataclass
class Detection:
    """One digit found in an image.

    ``bbox`` = (y0, x0, y1, x1) end-exclusive; ``centroid`` = (y, x) of the mask; ``ink`` = the
    brightest channel / 255 inside the mask, cropped to the bbox (0 outside the mask);
    ``probs`` = class probabilities; ``rgb`` = ink-weighted mean colour of the bright core."""

    mask: np.ndarray = field(repr=False)
    bbox: tuple
    centroid: tuple
    area: int
    cls: int
    prob: float
    colour: str
    position: str
    rgb: tuple
    probs: np.ndarray = field(repr=False)
    ink: np.ndarray = field(repr=False)

    @property
    def word(self) -> str:
        return S.DIGIT_WORDS[self.cls]


def _as_float_rgb(image) -> np.ndarray:
    """float32 (H, W, 3) in 0..255 from uint8 / float [0, 1] / float [0, 255] / grey / CHW."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image (H, W, 3), got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3].astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.floating) and a.max() <= 1.0 + 1e-6:
        a = a * 255.0
    return a


def nearest_colour(rgb, palette=S.DEFAULT_PALETTE) -> tuple:
    """``(name, distance)`` of the palette colour whose chromaticity (colour / brightest channel)
    is nearest to that of ``rgb``: brightness does not matter, hue and saturation do."""
    c = np.asarray(rgb, dtype=np.float64)
    c = c / max(c.max(), 1e-6)
    best = min(((float(np.linalg.norm(c - np.asarray(p, float) / max(p))), n) for n, p in palette))
    return best[1], best[0]


def find_digits(image, judge: Optional[Judge] = None, cfg: S.WorldConfig = S.WorldConfig(),
                threshold: Optional[float] = None, min_threshold: float = 25.0, min_area: int = 6,
                min_peak: float = 60.0, merge_dist: int = 2, frag_frac: float = 0.5) -> list:
    """Digits in a black-background image, as ``Detection`` objects (unsorted).

    Foreground = brightest channel > ``threshold`` (0..255 scale; float images in [0, 1] are
    rescaled). ``threshold=None`` adapts it to the background noise: the larger of
    ``min_threshold`` and median + 5 x (robust sigma from the median absolute deviation) of the
    brightest channel, the background being most of the image. On a clean scene (exact black
    background) that is ``min_threshold``, below every painted pixel, so masks are exact.

    Components (8-connected) smaller than ``min_area`` pixels or never brighter than ``min_peak``
    are specks and dropped. A component smaller than ``frag_frac`` x a larger one is
    a fragment and is merged into it when within ``merge_dist`` pixels (chessboard) or when its
    centroid lies in the larger one's bounding box. Clean scenes keep digits ``min_gap`` = 2
    blank pixels apart (distance 3 > ``merge_dist``), so distinct clean digits are never merged.
    """
    judge = judge or get_judge(cfg)
    img = _as_float_rgb(image)
    H, W = img.shape[:2]
    v = img.max(-1)
    if threshold is None:
        med = float(np.median(v))
        mad = float(np.median(np.abs(v - med)))
        threshold = max(min_threshold, med + 5.0 * 1.4826 * mad)
    lab, n = ndimage.label(v > threshold, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = np.asarray(ndimage.sum_labels(np.ones_like(v), lab, idx), dtype=np.int64)
    peaks = np.asarray(ndimage.maximum(v, lab, idx), dtype=np.float64)
    keep = [k for k in range(n) if areas[k] >= min_area and peaks[k] >= min_peak]
    slices = ndimage.find_objects(lab)
    parent = {k: k for k in keep}

    def root(k):
        while parent[k] != k:
            k = parent[k]
        return k

    # merge fragments: smallest first, into the largest qualifying neighbour
    for k in sorted(keep, key=lambda k: areas[k]):
        sl = slices[k]
        ys, xs = np.nonzero(lab[sl] == k + 1)
        cy, cx = ys.mean() + sl[0].start, xs.mean() + sl[1].start
        best = None
        for j in keep:
            if j == k or areas[k] >= frag_frac * areas[j]:
                continue
            sj = slices[j]
            y0, y1 = sj[0].start - merge_dist, sj[0].stop + merge_dist
            x0, x1 = sj[1].start - merge_dist, sj[1].stop + merge_dist
            inside = sj[0].start <= cy < sj[0].stop and sj[1].start <= cx < sj[1].stop
            near = False
            overlaps = sl[0].start < y1 and sl[0].stop > y0 and sl[1].start < x1 and sl[1].stop > x0
            if not inside and overlaps:
                grown = ndimage.maximum_filter(lab == j + 1, size=2 * merge_dist + 1)
                near = bool(grown[sl][lab[sl] == k + 1].any())
            if (inside or near) and (best is None or areas[j] > areas[best]):
                best = j
        if best is not None:
            parent[k] = best
    groups: dict = {}
    for k in keep:
        groups.setdefault(root(k), []).append(k)

    masks, inks = [], []
    for members in groups.values():
        m = np.isin(lab, np.asarray(members) + 1)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        bbox = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
        masks.append((m, bbox))
        y0, x0, y1, x1 = bbox
        inks.append(np.where(m[y0:y1, x0:x1], v[y0:y1, x0:x1] / 255.0, 0.0))
    probs = judge.predict_proba(inks)
    out = []
    for (m, bbox), ink, p in zip(masks, inks, probs):
        ys, xs = np.nonzero(m)
        vals = v[ys, xs]
        core = vals >= 0.5 * vals.max()
        rgb = (img[ys[core], xs[core]] * vals[core, None]).sum(0) / vals[core].sum()
        colour, _ = nearest_colour(rgb, cfg.palette)
        cy, cx = float(ys.mean()), float(xs.mean())
        out.append(Detection(mask=m, bbox=bbox, centroid=(cy, cx), area=int(m.sum()),
                             cls=int(np.argmax(p)), prob=float(np.max(p)), colour=colour,
                             position=S.position_of_x(cx, W), rgb=tuple(float(c) for c in rgb),
                             probs=p, ink=ink.astype(np.float32)))
    return out


def read_scene(image, judge: Optional[Judge] = None, cfg: S.WorldConfig = S.WorldConfig(),
               **kwargs) -> list:
    """``find_digits`` sorted left to right (by centroid x)."""
    return sorted(find_digits(image, judge, cfg, **kwargs), key=lambda d: d.centroid[1])


def check_scene(image, caption: str, judge: Optional[Judge] = None,
                cfg: S.WorldConfig = S.WorldConfig(), **kwargs) -> dict:
    """Compare what the judge reads with what a templated caption asks for.

    For each requested digit (``scenes.parse_caption``) the detection at its position (or, for a
    caption without positions, the detections in order left to right) is compared: ``class_ok``,
    ``colour_ok`` (True when the caption names no colour). ``count_ok``: as many digits found as
    asked; ``all_ok``: everything right."""
    want = S.parse_caption(caption)
    found = read_scene(image, judge, cfg, **kwargs)
    items = []
    by_pos = {}
    for d in found:
        by_pos.setdefault(d.position, []).append(d)
    for n, (cls, colour, position) in enumerate(want):
        if position is not None:
            cands = by_pos.get(position, [])
            det = max(cands, key=lambda d: d.area) if cands else None
        else:
            det = found[n] if n < len(found) else None
        items.append({"cls": cls, "colour": colour, "position": position, "found": det is not None,
                      "class_ok": bool(det is not None and det.cls == cls),
                      "colour_ok": bool(det is not None and (colour is None or det.colour == colour)),
                      "read_cls": None if det is None else det.cls,
                      "read_colour": None if det is None else det.colour})
    count_ok = len(found) == len(want)
    return {"digits": items, "n_wanted": len(want), "n_found": len(found), "count_ok": count_ok,
            "all_ok": count_ok and all(i["class_ok"] and i["colour_ok"] for i in items)}


# --------------------------------------------------------------------------------------------
# Subject similarity
# --------------------------------------------------------------------------------------------

def _reference_scales(cfg: S.WorldConfig) -> list:
    lo, hi = cfg.scale_range
    return sorted({int(round(s)) for s in np.linspace(lo, hi, 5)})


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.ravel().astype(np.float64)
    v = v - v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-9)


@functools.lru_cache(maxsize=64)
def _class_references(cfg: S.WorldConfig, cls: int) -> tuple:
    """``(indices, vectors)`` of every real sample of ``cls``: the unit-normalised mean of its
    ``digit_vector`` over renderings at 5 scales spanning ``cfg.scale_range``."""
    idx = np.flatnonzero(S.real_digits()[1] == cls)
    scales = _reference_scales(cfg)
    vecs = []
    for i in idx:
        m = np.mean([_unit(digit_vector(S.render_glyph(int(i), s, float(cfg.ink_threshold))[0]))
                     for s in scales], axis=0)
        vecs.append(m / max(float(np.linalg.norm(m)), 1e-9))
    return idx, np.stack(vecs)


def _query_ink(crop_or_image, judge: Optional[Judge], cfg: S.WorldConfig):
    if isinstance(crop_or_image, Detection):
        return crop_or_image.ink
    a = np.asarray(crop_or_image)
    if a.ndim == 2:
        return a.astype(np.float32)
    dets = find_digits(a, judge, cfg)
    if not dets:
        return None
    return max(dets, key=lambda d: d.area).ink


def subject_similarity(crop_or_image, subject_index: int, cfg: S.WorldConfig = S.WorldConfig(),
                       pool: Union[str, Sequence[int]] = "all", judge: Optional[Judge] = None) -> float:
    """How much a digit looks like the specific handwriting sample ``subject_index`` rather than
    its class in general: a rank score in [0, 1].

    The query is a ``Detection``, a 2-D ink crop (any size, e.g. an 8x8 grid) or an RGB image (its
    largest detected digit; no digit found gives 0.0). Every digit is represented by its
    ``digit_vector`` (mean-centred, unit norm); real samples by the mean of that over renderings
    at 5 scales. The score is the fraction of the reference pool (other real samples of the
    subject's class: ``pool="all"`` (default), ``"train"``, ``"heldout"``, or explicit indices;
    the subject itself always excluded) that lie *farther* from the query than the subject does
    (ties count half). A generic member of the class scores ~0.5 on average, a rendering of the
    subject itself ~1.
    """
    ink = _query_ink(crop_or_image, judge, cfg)
    if ink is None or float(np.max(ink)) <= 0:
        return 0.0
    cls = S.sample_class(subject_index)
    idx, vecs = _class_references(cfg, cls)
    if isinstance(pool, str):
        if pool == "all":
            allowed = idx
        elif pool == "train":
            allowed = S.train_indices(cfg, cls)
        elif pool == "heldout":
            allowed = S.heldout_indices(cfg, cls)
        else:
            raise ValueError("pool must be 'all', 'train', 'heldout' or a list of indices")
    else:
        allowed = np.asarray(pool)
    sel = np.isin(idx, allowed) & (idx != subject_index)
    if not sel.any():
        raise ValueError("empty reference pool")
    q = _unit(digit_vector(ink))
    d_ref = np.linalg.norm(vecs[sel] - q, axis=1)
    d_sub = float(np.linalg.norm(vecs[np.flatnonzero(idx == subject_index)[0]] - q))
    return float(np.mean((d_ref > d_sub) + 0.5 * (d_ref == d_sub)))


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def evaluate_judge(cfg: S.WorldConfig = S.WorldConfig(), n_scenes: int = 300, seed: int = 1234,
                   judge: Optional[Judge] = None) -> dict:
    """Measure the judge.

    * ``heldout_real_acc``: class accuracy on the held-out writers' real 8x8 digits (+ per class).
    * On ``n_scenes`` clean scenes built from *held-out* samples (1..3 digits, uniform classes,
      random colours / positions / scales): ``scene_class_acc``, ``scene_colour_acc``,
      ``scene_position_acc`` per ground-truth digit (a digit counts as wrong if no detection
      overlaps it with IoU >= 0.5), ``scene_count_acc`` (right number of detections),
      ``mask_iou_mean`` / ``mask_iou_min`` / ``mask_iou_frac_ge_0.9`` of matched masks."""
    judge = judge or get_judge(cfg)
    images, labels = S.real_digits()
    te = S.heldout_indices(cfg)
    pred = judge.predict([images[i] for i in te])
    ok = pred == labels[te]
    per_class = {int(c): float(ok[labels[te] == c].mean()) for c in range(10)}

    rng = np.random.default_rng(seed)
    pools = [S.heldout_indices(cfg, c) for c in range(10)]
    n_digits = 0
    cls_ok = col_ok = pos_ok = count_ok = 0
    ious = []
    for _ in range(n_scenes):
        k = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
        classes = rng.integers(0, 10, size=k)
        idxs = [int(pools[c][rng.integers(len(pools[c]))]) for c in classes]
        scene = S.make_scene(rng, cfg, sample_indices=idxs)
        dets = find_digits(scene.image, judge, cfg)
        count_ok += len(dets) == len(scene.digits)
        for rec in scene.digits:
            n_digits += 1
            gt = rec.mask
            best, best_iou = None, 0.0
            for d in dets:
                iou = _iou(gt, d.mask)
                if iou > best_iou:
                    best, best_iou = d, iou
            if best is None or best_iou < 0.5:
                ious.append(best_iou)
                continue
            ious.append(best_iou)
            cls_ok += best.cls == rec.cls
            col_ok += best.colour == rec.colour
            pos_ok += best.position == rec.position
    ious = np.asarray(ious)
    return {"heldout_real_acc": float(ok.mean()), "heldout_real_n": int(len(te)),
            "heldout_real_per_class": per_class,
            "scene_digits": n_digits, "scene_class_acc": cls_ok / n_digits,
            "scene_colour_acc": col_ok / n_digits, "scene_position_acc": pos_ok / n_digits,
            "scene_count_acc": count_ok / n_scenes, "mask_iou_mean": float(ious.mean()),
            "mask_iou_min": float(ious.min()), "mask_iou_frac_ge_0.9": float((ious >= 0.9).mean())}


def validate_subject_similarity(cfg: S.WorldConfig = S.WorldConfig(), n_subjects: int = 100,
                                seed: int = 0, judge: Optional[Judge] = None) -> dict:
    """For ``n_subjects`` held-out subjects: ``own`` = score of the subject's own rendering in a
    clean scene (random colour, position and scale, read back with ``find_digits``) and ``other``
    = score of another random same-class sample rendered the same way (expected ~0.5)."""
    judge = judge or get_judge(cfg)
    rng = np.random.default_rng(seed)
    labels = S.real_digits()[1]
    subjects = rng.choice(S.heldout_indices(cfg), size=n_subjects, replace=False)
    own, other = [], []
    for s in subjects:
        s = int(s)
        same = np.flatnonzero(labels == labels[s])
        o = int(rng.choice(same[same != s]))
        for idx, acc in ((s, own), (o, other)):
            colour = cfg.colour_names[int(rng.integers(len(cfg.palette)))]
            position = S.POSITIONS[int(rng.integers(3))]
            scene = S.render_subject(cfg, idx, colour, position, rng=rng)
            acc.append(subject_similarity(scene.image, s, cfg, judge=judge))
    own, other = np.asarray(own), np.asarray(other)
    return {"own_mean": float(own.mean()), "own_p10": float(np.percentile(own, 10)),
            "other_mean": float(other.mean()), "other_std": float(other.std()), "n": n_subjects}

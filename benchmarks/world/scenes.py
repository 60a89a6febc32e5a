"""Scenes of the digits world: real handwriting, named colours, named positions, exact masks.

Source data
-----------
Every digit drawn here is a *real* handwritten digit from scikit-learn's bundled
``sklearn.datasets.load_digits()`` (1,797 8x8 images, values 0..16, shipped inside the package, so
nothing is downloaded). That set is the test part of UCI "optdigits", written by 13 people, but
scikit-learn gives no writer ids. We therefore define **pseudo-writers**: the samples are cut into
``WorldConfig.n_writer_blocks`` contiguous index blocks (sample ``i`` belongs to block
``i * n_blocks // 1797``). This is an approximation: the file is believed to be grouped by writer,
but block edges need not coincide with writer changes, so a block may mix two writers. Each block
holds ~138 samples, ~14 of each class.

The blocks in ``WorldConfig.heldout_blocks`` (default: the last 3 of 13, ~414 samples) are held
out entirely: training scenes (``make_scene`` / ``make_dataset`` without explicit sample indices)
never draw from them. They serve as *subjects* (one specific handwriting sample a model never saw,
composed into scenes with ``render_subject`` / ``compose_scene``) and as the judge's held-out test
set (``benchmarks.world.judge``).

Rendering
---------
A digit is drawn by upscaling its 8x8 grid to ``scale x scale`` pixels with bicubic interpolation,
dividing by 16 and clipping to [0, 1] (the digit's *ink*), and zeroing ink below
``WorldConfig.ink_threshold``. The remaining pixels are exactly the pixels the digit paints (its
mask); each gets ``round(ink * colour)``. Every painted pixel is therefore non-zero in the image
(its brightest channel is at least ``ink_threshold`` x 215 with the default palette), the
background is exactly 0, and the masks of different digits are disjoint and at least ``min_gap``
blank pixels apart (chessboard distance), so they never touch.

Positions are thirds of the canvas: a digit "on the left" has its mask centroid placed at
x = W/6 (+ jitter), "in the center" at W/2, "on the right" at 5W/6; the centroid is guaranteed to
stay inside its third. Vertically digits are centred (+ jitter).

Captions are templated, digits listed left to right::

    "a red seven on the left, a green one in the center and a blue two on the right"

Class frequencies (the long tail)
---------------------------------
Each digit's class is drawn independently with per-digit probabilities ``p`` (see
``digit_class_probs``). By default the two **rare classes are 8 and 9**: their per-digit
probability is solved so that each appears in ``rare_scene_freq = 1.5%`` of scenes (<= 2%); the
eight head classes 0..7 share the rest uniformly (~12.3% of digits each; ~24% of scenes each).
``head_profile="zipf"`` makes the head Zipf-distributed in numeric order instead, and
``class_weights`` overrides everything with explicit per-digit probabilities.
``class_frequencies(cfg)`` returns the resulting per-class *scene* frequency
P(class appears in a scene) = sum_k P(k digits) * (1 - (1 - p_c)^k), which is exact for this
sampler.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS = ("left", "center", "right")
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}

#: Default palette: five named colours whose *chromaticities* (colour / brightest channel) are far
#: apart, so a digit's colour stays recognisable at any ink level.
DEFAULT_PALETTE = (
    ("red", (235, 45, 45)),
    ("green", (45, 215, 70)),
    ("blue", (60, 100, 255)),
    ("yellow", (240, 220, 40)),
    ("white", (240, 240, 240)),
)

N_REAL = 1797  # samples in sklearn's load_digits


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a digits world. Frozen and hashable (see ``settings_hash``).

    Attributes:
        size: canvas side in pixels (square, RGB, black background).
        min_digits, max_digits: digits per scene (at most 3: one per position).
        count_probs: probabilities of min_digits..max_digits digits per scene (None: uniform).
        scale_range: inclusive range of the side, in pixels, that the 8x8 grid is upscaled to.
            Crowded scenes may shrink a digit towards the low end so that digits never touch.
        palette: ``(name, (r, g, b))`` pairs.
        jitter: maximum offset in pixels (each axis, uniform integer) of a digit from its slot.
        min_gap: minimum number of blank pixels between two digits' masks.
        ink_threshold: upscaled ink below this (fraction of full ink) is not painted.
        rare_classes: the tail classes.
        rare_scene_freq: fraction of scenes that contain each rare class.
        head_profile: "uniform" or "zipf" distribution over the other classes.
        zipf_exponent: exponent of the Zipf head (head classes ranked in numeric order).
        class_weights: explicit per-digit class probabilities (10 numbers, normalised); overrides
            rare_classes / rare_scene_freq / head_profile.
        seed: seed of ``make_dataset``.
        n_writer_blocks: number of contiguous pseudo-writer blocks.
        heldout_blocks: pseudo-writer blocks that training scenes never use.
    """

    size: int = 64
    min_digits: int = 1
    max_digits: int = 3
    count_probs: Optional[tuple] = None
    scale_range: tuple = (16, 24)
    palette: tuple = DEFAULT_PALETTE
    jitter: int = 2
    min_gap: int = 2
    ink_threshold: float = 0.15
    rare_classes: tuple = (8, 9)
    rare_scene_freq: float = 0.015
    head_profile: str = "uniform"
    zipf_exponent: float = 1.0
    class_weights: Optional[tuple] = None
    seed: int = 0
    n_writer_blocks: int = 13
    heldout_blocks: tuple = (10, 11, 12)

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits <= len(POSITIONS):
            raise ValueError("need 1 <= min_digits <= max_digits <= 3")
        n_counts = self.max_digits - self.min_digits + 1
        if self.count_probs is not None and len(self.count_probs) != n_counts:
            raise ValueError("count_probs needs one probability per digit count")
        lo, hi = self.scale_range
        if not 8 <= lo <= hi <= self.size // 2:
            raise ValueError("scale_range must satisfy 8 <= lo <= hi <= size/2")
        if len({n for n, _ in self.palette}) != len(self.palette) or not self.palette:
            raise ValueError("palette names must be unique and non-empty")
        rare = self.rare_classes
        if any(not 0 <= c <= 9 for c in rare) or len(set(rare)) != len(rare):
            raise ValueError("rare_classes must be distinct digits 0..9")
        if self.head_profile not in ("uniform", "zipf"):
            raise ValueError("head_profile must be 'uniform' or 'zipf'")
        w = self.class_weights
        if w is not None and (len(w) != 10 or min(w) < 0 or sum(w) <= 0):
            raise ValueError("class_weights needs 10 non-negative numbers")
        if any(not 0 <= b < self.n_writer_blocks for b in self.heldout_blocks):
            raise ValueError("heldout_blocks must be block numbers below n_writer_blocks")
        if not 0 < self.ink_threshold < 1:
            raise ValueError("ink_threshold must be in (0, 1)")

    @property
    def colour_names(self) -> tuple:
        return tuple(n for n, _ in self.palette)

    def colour_rgb(self, name: str) -> np.ndarray:
        """RGB triple (float) of the palette colour ``name``."""
        for n, rgb in self.palette:
            if n == name:
                return np.asarray(rgb, dtype=np.float32)
        raise KeyError(f"colour {name!r} is not in the palette {self.colour_names}")

    def settings_hash(self) -> str:
        """Short stable hash of all settings (for cache keys)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Real digits and pseudo-writers
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def real_digits() -> tuple:
    """``(images, labels)``: all 1,797 real digits as float32 (N, 8, 8) ink in [0, 1], int labels.

    Arrays are read-only (shared cache)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def writer_blocks(n_blocks: int = 13) -> np.ndarray:
    """Pseudo-writer block id of every sample: contiguous index blocks (an approximation, see the
    module docstring)."""
    return (np.arange(N_REAL) * n_blocks) // N_REAL


def _pool(cfg: WorldConfig, heldout: bool, cls: Optional[int]) -> np.ndarray:
    blocks = writer_blocks(cfg.n_writer_blocks)
    sel = np.isin(blocks, cfg.heldout_blocks)
    if not heldout:
        sel = ~sel
    if cls is not None:
        sel &= real_digits()[1] == cls
    return np.flatnonzero(sel)


def train_indices(cfg: WorldConfig, cls: Optional[int] = None) -> np.ndarray:
    """Indices of samples training scenes may use (not in a held-out block), optionally of one class."""
    return _pool(cfg, False, cls)


def heldout_indices(cfg: WorldConfig, cls: Optional[int] = None) -> np.ndarray:
    """Indices of held-out samples (subjects, judge test set), optionally of one class."""
    return _pool(cfg, True, cls)


subject_indices = heldout_indices  # subjects are exactly the held-out samples


def is_heldout(cfg: WorldConfig, sample_index: int) -> bool:
    return int(writer_blocks(cfg.n_writer_blocks)[sample_index]) in cfg.heldout_blocks


def sample_class(sample_index: int) -> int:
    return int(real_digits()[1][sample_index])


# --------------------------------------------------------------------------------------------
# Class frequencies
# --------------------------------------------------------------------------------------------

def count_distribution(cfg: WorldConfig) -> tuple:
    """``(counts, probs)``: possible numbers of digits per scene and their probabilities."""
    ks = np.arange(cfg.min_digits, cfg.max_digits + 1)
    if cfg.count_probs is None:
        pk = np.full(len(ks), 1.0 / len(ks))
    else:
        pk = np.asarray(cfg.count_probs, dtype=np.float64)
        pk = pk / pk.sum()
    return ks, pk


def _scene_freq(p, ks, pk):
    p = np.asarray(p, dtype=np.float64)
    return sum(w * (1.0 - (1.0 - p) ** k) for k, w in zip(ks, pk))


def digit_class_probs(cfg: WorldConfig) -> np.ndarray:
    """Per-digit class probabilities (10,) used by the sampler (see module docstring)."""
    if cfg.class_weights is not None:
        w = np.asarray(cfg.class_weights, dtype=np.float64)
        return w / w.sum()
    ks, pk = count_distribution(cfg)
    rare = list(cfg.rare_classes)
    head = [c for c in range(10) if c not in rare]
    p = np.zeros(10)
    if rare:
        lo, hi = 0.0, 1.0 / len(rare)  # bisection: scene frequency is increasing in p
        if _scene_freq(hi, ks, pk) < cfg.rare_scene_freq:
            raise ValueError("rare_scene_freq is unreachable")
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if _scene_freq(mid, ks, pk) < cfg.rare_scene_freq:
                lo = mid
            else:
                hi = mid
        p[rare] = 0.5 * (lo + hi)
    if head:
        ranks = np.arange(1, len(head) + 1, dtype=np.float64)
        w = np.ones(len(head)) if cfg.head_profile == "uniform" else ranks ** -cfg.zipf_exponent
        p[head] = (1.0 - p.sum()) * w / w.sum()
    return p / p.sum()


def class_frequencies(cfg: WorldConfig) -> np.ndarray:
    """Per-class scene frequency (10,): probability that a scene contains at least one digit of
    that class. Exact for the sampler used by ``make_scene`` (independent classes per digit)."""
    ks, pk = count_distribution(cfg)
    return _scene_freq(digit_class_probs(cfg), ks, pk)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def digit_phrase(cls: int, colour: Optional[str] = None, position: Optional[str] = None) -> str:
    """"a red seven on the left", "an eight", "a seven in the center"..."""
    words = ([colour] if colour else []) + [DIGIT_WORDS[cls]]
    s = f"{_article(words[0])} {' '.join(words)}"
    return f"{s} {POSITION_PHRASES[position]}" if position else s


def class_prompt(cls: int, colour: Optional[str] = None, position: Optional[str] = None) -> str:
    """Single-digit prompt for per-class evaluation: "a seven", "a red seven", "an eight on the left"."""
    return digit_phrase(cls, colour, position)


def class_prompts(colour: Optional[str] = None, position: Optional[str] = None) -> list:
    """``class_prompt`` for the ten classes, index = class."""
    return [class_prompt(c, colour, position) for c in range(10)]


def caption_for(digits: Sequence) -> str:
    """Caption of a list of digits (objects with ``cls``, ``colour``, ``position``), listed left to
    right: "p1", "p1 and p2", "p1, p2 and p3"."""
    order = sorted(digits, key=lambda d: POSITIONS.index(d.position))
    phrases = [digit_phrase(d.cls, d.colour, d.position) for d in order]
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_PHRASE_RE = re.compile(
    r"\ban?\s+(?:(?P<colour>[a-z]+)\s+)?(?P<word>" + "|".join(DIGIT_WORDS) + r")\b"
    r"(?:\s+(?P<pos>on the left|in the center|on the right))?")


def parse_caption(caption: str) -> list:
    """Inverse of ``caption_for`` / ``class_prompt``: a list of ``(cls, colour | None, position |
    None)`` in caption order. Unknown words in the colour slot are returned as they are."""
    rev = {v: k for k, v in POSITION_PHRASES.items()}
    out = []
    for m in _PHRASE_RE.finditer(caption.lower()):
        out.append((DIGIT_WORDS.index(m.group("word")), m.group("colour"),
                    rev.get(m.group("pos")) if m.group("pos") else None))
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def render_glyph(sample_index: int, scale: int, ink_threshold: float = 0.15) -> tuple:
    """Upscale real sample ``sample_index`` to ``scale x scale`` (bicubic) and return
    ``(ink, offset)``: ``ink`` float32 (h, w) cropped tightly to the painted pixels (ink >=
    ink_threshold; 0 elsewhere), ``offset`` = (row, col) of the crop inside the scale x scale box.
    Read-only (cached)."""
    grid = real_digits()[0][sample_index]
    up = np.asarray(Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32))
                    .resize((scale, scale), Image.BICUBIC), dtype=np.float32)
    ink = np.clip(up, 0.0, 1.0)
    ink[ink < ink_threshold] = 0.0
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    ink = np.ascontiguousarray(ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    ink.setflags(write=False)
    return ink, (int(rows[0]), int(cols[0]))


@dataclass
class DigitSpec:
    """What to draw: a real sample in a colour at a position; ``scale`` None = sampled / default."""

    sample_index: int
    colour: str = "white"
    position: str = "center"
    scale: Optional[int] = None


@dataclass
class DigitRecord:
    """One painted digit of a scene.

    ``bbox`` = (y0, x0, y1, x1), end-exclusive, of the painted pixels; ``crop_mask`` is the exact
    mask inside the bbox; ``mask`` (property) is the full-canvas mask."""

    cls: int
    colour: str
    position: str
    sample_index: int
    scale: int
    bbox: tuple
    crop_mask: np.ndarray = field(repr=False)
    canvas_size: int = 64

    @property
    def word(self) -> str:
        return DIGIT_WORDS[self.cls]

    @property
    def mask(self) -> np.ndarray:
        m = np.zeros((self.canvas_size, self.canvas_size), dtype=bool)
        y0, x0, y1, x1 = self.bbox
        m[y0:y1, x0:x1] = self.crop_mask
        return m

    @property
    def centroid(self) -> tuple:
        """(y, x) centroid of the mask in canvas pixels."""
        ys, xs = np.nonzero(self.crop_mask)
        return float(ys.mean() + self.bbox[0]), float(xs.mean() + self.bbox[1])


@dataclass
class Scene:
    """A rendered scene. Unpacks as ``image, caption, digits = scene``."""

    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    digits: list  # list[DigitRecord], left to right

    def __iter__(self) -> Iterator:
        return iter((self.image, self.caption, self.digits))

    def label_map(self) -> np.ndarray:
        """(H, W) uint8: 0 background, i + 1 for the pixels of ``digits[i]``."""
        lab = np.zeros(self.image.shape[:2], dtype=np.uint8)
        for i, d in enumerate(self.digits):
            y0, x0, y1, x1 = d.bbox
            lab[y0:y1, x0:x1][d.crop_mask] = i + 1
        return lab


def slot_center_x(cfg: WorldConfig, position: str) -> float:
    """x of the centre of a position's third of the canvas."""
    return cfg.size * (2 * POSITIONS.index(position) + 1) / 6.0


def position_of_x(x: float, size: int) -> str:
    """Position name of an x coordinate: thirds of the canvas."""
    return POSITIONS[min(2, max(0, int(3 * x // size)))]


@functools.lru_cache(maxsize=65536)
def _glyph_info(sample_index: int, scale: int, ink_threshold: float, gap: int) -> tuple:
    """Cached ``(ink, mask, cy, cx, grown)`` of a glyph; ``grown`` is the mask dilated by ``gap``
    pixels (chessboard), padded by ``gap`` on every side."""
    ink, _ = render_glyph(sample_index, scale, ink_threshold)
    mask = ink > 0
    ys, xs = np.nonzero(mask)
    grown = np.pad(mask, gap)
    if gap:
        grown = ndimage.maximum_filter(grown, size=2 * gap + 1)
    for a in (mask, grown):
        a.setflags(write=False)
    return ink, mask, float(ys.mean()), float(xs.mean()), grown


def _try_place(cfg, glyph, position, jx, jy, occupied):
    """Top-left (y0, x0) of the glyph, or None if it would leave its third or come within
    ``min_gap`` pixels of ``occupied`` (the grown masks of digits already placed)."""
    H = W = cfg.size
    ink, mask, cy, cx, _ = glyph
    h, w = ink.shape
    if h > H or w > W:
        return None
    x0 = int(round(slot_center_x(cfg, position) + jx - cx))
    y0 = int(round(H / 2.0 + jy - cy))
    x0 = min(max(x0, 0), W - w)
    y0 = min(max(y0, 0), H - h)
    if position_of_x(x0 + cx, W) != position:
        return None
    if occupied[y0:y0 + h, x0:x0 + w][mask].any():
        return None
    return y0, x0


def compose_scene(cfg: WorldConfig, specs: Sequence, rng: Optional[np.random.Generator] = None,
                  max_tries: int = 12) -> Scene:
    """Render explicitly given digits (``DigitSpec`` objects, at distinct positions).

    With ``rng``, digits without a fixed ``scale`` draw one from ``cfg.scale_range`` and every
    digit is jittered; if a digit would leave its third or come within ``cfg.min_gap`` pixels of
    another, it is redrawn with a shrinking scale bound (then without jitter at the smallest
    scale). Without ``rng`` the placement is deterministic: no jitter, default scale = middle of
    the range. Any sample index may be used, held-out subjects included.
    """
    positions = [s.position for s in specs]
    if len(set(positions)) != len(positions) or any(p not in POSITIONS for p in positions):
        raise ValueError(f"need distinct positions from {POSITIONS}, got {positions}")
    H = W = cfg.size
    lo, hi = cfg.scale_range
    image = np.zeros((H, W, 3), dtype=np.uint8)
    occupied = np.zeros((H, W), dtype=bool)  # painted pixels grown by min_gap
    records = []
    for spec in sorted(specs, key=lambda s: POSITIONS.index(s.position)):
        rgb = cfg.colour_rgb(spec.colour)
        placed = None
        cap = hi
        attempts = max_tries if rng is not None else 0
        for t in range(attempts + 1):
            if t == attempts:  # fallback: deterministic, smallest allowed scale, no jitter
                scale = spec.scale if spec.scale is not None else \
                    (lo if rng is not None else (lo + hi) // 2)
                jx = jy = 0
            else:
                scale = spec.scale if spec.scale is not None else int(rng.integers(lo, cap + 1))
                jx, jy = (int(v) for v in rng.integers(-cfg.jitter, cfg.jitter + 1, size=2))
            glyph = _glyph_info(int(spec.sample_index), int(scale), float(cfg.ink_threshold),
                                int(cfg.min_gap))
            placed = _try_place(cfg, glyph, spec.position, jx, jy, occupied)
            if placed is not None:
                break
            cap = max(lo, cap - 1)
        if placed is None:
            raise ValueError(f"cannot place sample {spec.sample_index} at {spec.position}")
        y0, x0 = placed
        ink, mask, _, _, grown = glyph
        h, w = ink.shape
        region = image[y0:y0 + h, x0:x0 + w]
        region[mask] = np.rint(ink[mask][:, None] * rgb[None, :]).astype(np.uint8)
        g = cfg.min_gap  # OR the grown mask into `occupied`, clipped to the canvas
        gy0, gx0 = y0 - g, x0 - g
        cy0, cx0 = max(gy0, 0), max(gx0, 0)
        cy1, cx1 = min(gy0 + grown.shape[0], H), min(gx0 + grown.shape[1], W)
        occupied[cy0:cy1, cx0:cx1] |= grown[cy0 - gy0:cy1 - gy0, cx0 - gx0:cx1 - gx0]
        records.append(DigitRecord(cls=sample_class(spec.sample_index), colour=spec.colour,
                                   position=spec.position, sample_index=int(spec.sample_index),
                                   scale=int(scale), bbox=(y0, x0, y0 + h, x0 + w),
                                   crop_mask=mask.copy(), canvas_size=H))
    return Scene(image=image, caption=caption_for(records), digits=records)


class _Sampler:
    """Draws training-scene digit specs; holds per-config tables (class pools, probabilities)."""

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        self.ks, self.pk = count_distribution(cfg)
        self.p = digit_class_probs(cfg)
        self.pools = [train_indices(cfg, c) for c in range(10)]
        for c in range(10):
            if self.p[c] > 0 and len(self.pools[c]) == 0:
                raise ValueError(f"class {c} has no training samples")

    def specs(self, rng, classes=None, colours=None, positions=None, sample_indices=None):
        cfg = self.cfg
        given = next((len(x) for x in (sample_indices, classes, colours, positions)
                      if x is not None), None)
        k = int(given if given is not None else rng.choice(self.ks, p=self.pk))
        if positions is None:
            positions = [POSITIONS[i] for i in sorted(rng.choice(3, size=k, replace=False))]
        if sample_indices is None:
            if classes is None:
                classes = rng.choice(10, size=k, p=self.p)
            sample_indices = [int(self.pools[int(c)][rng.integers(len(self.pools[int(c)]))])
                              for c in classes]
        if colours is None:
            names = cfg.colour_names
            colours = [names[int(i)] for i in rng.integers(0, len(names), size=k)]
        if not len(sample_indices) == len(colours) == len(positions) == k:
            raise ValueError("classes / colours / positions / sample_indices lengths differ")
        return [DigitSpec(int(i), c, p) for i, c, p in zip(sample_indices, colours, positions)]


@functools.lru_cache(maxsize=8)
def _sampler(cfg: WorldConfig) -> _Sampler:
    return _Sampler(cfg)


def make_scene(rng: np.random.Generator, cfg: WorldConfig = WorldConfig(),
               classes: Optional[Sequence[int]] = None, colours: Optional[Sequence[str]] = None,
               positions: Optional[Sequence[str]] = None,
               sample_indices: Optional[Sequence[int]] = None) -> Scene:
    """One random training scene. Anything not given is sampled: the number of digits
    (``count_distribution``), distinct positions, classes (``digit_class_probs``), colours
    (uniform over the palette), and a handwriting sample of each class from the *training*
    pool (held-out blocks are never used unless ``sample_indices`` names them explicitly).
    Returns a ``Scene`` (image uint8 HxWx3, caption, per-digit ``DigitRecord`` with exact masks).
    """
    specs = _sampler(cfg).specs(rng, classes, colours, positions, sample_indices)
    return compose_scene(cfg, specs, rng=rng)


def render_subject(cfg: WorldConfig, sample_index: int, colour: str = "white",
                   position: str = "center", scale: Optional[int] = None,
                   rng: Optional[np.random.Generator] = None) -> Scene:
    """A one-digit scene of one specific handwriting sample (typically a held-out subject)."""
    return compose_scene(cfg, [DigitSpec(sample_index, colour, position, scale)], rng=rng)


def render_class_prompt_scene(cfg: WorldConfig, cls: int, rng: np.random.Generator,
                              colour: Optional[str] = None, position: str = "center",
                              heldout: bool = False) -> Scene:
    """A one-digit reference scene for ``class_prompt(cls, colour)``: a random sample of the class
    (training pool, or held-out pool with ``heldout=True``); colour random if not given."""
    pool = heldout_indices(cfg, cls) if heldout else train_indices(cfg, cls)
    colour = colour or cfg.colour_names[int(rng.integers(len(cfg.palette)))]
    return compose_scene(cfg, [DigitSpec(int(rng.choice(pool)), colour, position)], rng=rng)


@dataclass
class Dataset:
    """``make_dataset`` output: ``images`` (N, H, W, 3) uint8, ``captions`` (N str), ``records``
    (N lists of ``DigitRecord``, left to right), and the ``config``."""

    images: np.ndarray
    captions: list
    records: list
    config: WorldConfig

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i) -> Scene:
        return Scene(self.images[i], self.captions[i], self.records[i])

    def label_maps(self) -> np.ndarray:
        """(N, H, W) uint8 label maps (0 background, i + 1 = records[n][i])."""
        return np.stack([self[i].label_map() for i in range(len(self))]) if len(self) else \
            np.zeros((0, self.config.size, self.config.size), np.uint8)

    def class_presence(self) -> np.ndarray:
        """(N, 10) bool: which classes each scene contains."""
        out = np.zeros((len(self), 10), dtype=bool)
        for n, recs in enumerate(self.records):
            for r in recs:
                out[n, r.cls] = True
        return out


def make_dataset(cfg: WorldConfig = WorldConfig(), n: int = 20000,
                 seed: Optional[int] = None) -> Dataset:
    """``n`` training scenes, deterministic from ``seed`` (default ``cfg.seed``). ~20k scenes
    take a few seconds."""
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    images = np.zeros((n, cfg.size, cfg.size, 3), dtype=np.uint8)
    captions, records = [], []
    for i in range(n):
        s = make_scene(rng, cfg)
        images[i] = s.image
        captions.append(s.caption)
        records.append(s.digits)
    return Dataset(images=images, captions=captions, records=records, config=cfg)

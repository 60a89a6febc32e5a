"""Attention saliency: DAAM for UNet cross-attention, ConceptAttention for multimodal DiTs.

Pure torch. The node adapter (``nodes/saliency.py``) hands these functions the projected
queries, keys and values that ComfyUI's attention layers compute anyway, and keeps the
running sums in a :class:`RunningMaps`.

Shapes follow ComfyUI's attention convention: ``q``/``k``/``v`` are ``(batch, tokens,
heads * dim_head)``.

- DAAM (Tang et al. 2023): per cross-attention layer, the softmax attention probabilities of
  each prompt token, summed over heads, upsampled to the latent grid and summed over layers and
  timesteps. A word's map is the sum over its sub-tokens.
- ConceptAttention (Helbling et al. 2025): concept tokens run through the text stream's own
  weights; saliency is the dot product of image-token and concept-token attention *outputs*,
  softmaxed over concepts. The one-way attention (concepts see image tokens, never the other way
  round) lives in :func:`concept_attention`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# token lookup
# ---------------------------------------------------------------------------------------------
def find_token_positions(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list:
    """Every position at which ``word_ids`` occurs as a contiguous run inside ``prompt_ids``.

    Returns the flat list of all matched positions (a word used twice contributes both runs)."""
    word_ids, n = list(word_ids), len(word_ids)
    if n == 0:
        return []
    out = []
    for start in range(len(prompt_ids) - n + 1):
        if list(prompt_ids[start:start + n]) == word_ids:
            out.extend(range(start, start + n))
    return out


def grid_shape(n_tokens: int, height: int, width: int) -> tuple:
    """(h, w) of an attention layer's token grid, given the latent's (height, width).

    UNet levels halve the grid with rounding up; this finds the factor 2**k whose rounded-up
    grid has ``n_tokens`` cells, so non-square and odd sizes work."""
    for k in range(8):
        f = 2 ** k
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == n_tokens:
            return h, w
    raise ValueError(f"no grid of a {height}x{width} latent has {n_tokens} tokens")


def to_latent_grid(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C) token maps -> (B, C, height, width), bilinear from the layer's own grid."""
    b, n, c = maps.shape
    h, w = grid_shape(n, height, width)
    grid = maps.transpose(1, 2).reshape(b, c, h, w)
    if (h, w) == (height, width):
        return grid
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# DAAM
# ---------------------------------------------------------------------------------------------
def token_selection(groups: Sequence[Sequence[int]], n_tokens: int) -> torch.Tensor:
    """(n_tokens, len(groups)) 0/1 matrix: column c sums the probabilities of word c's tokens."""
    sel = torch.zeros(n_tokens, len(groups), dtype=torch.float32)
    for c, g in enumerate(groups):
        for t in g:
            if t < n_tokens:
                sel[t, c] = 1.0
    return sel


def token_columns(groups: Sequence[Sequence[int]], n_tokens: int) -> tuple:
    """The prompt positions DAAM reads, as ``(columns, combine)``: ``columns`` a long tensor of
    positions below ``n_tokens``, ``combine`` a (len(columns), len(groups)) 0/1 matrix that sums
    them per word, or None when every word is exactly one position of its own (then the
    columns are already the words, in order)."""
    in_range = [[t for t in g if t < n_tokens] for g in groups]
    firsts = [g[0] for g in in_range if len(g) == 1]
    if len(firsts) == len(groups) and len(set(firsts)) == len(firsts):
        return torch.tensor(firsts, dtype=torch.long), None
    cols = sorted({t for g in in_range for t in g})
    where = {t: i for i, t in enumerate(cols)}
    combine = torch.zeros(len(cols), len(groups), dtype=torch.float32)
    for c, g in enumerate(in_range):
        for t in g:
            combine[where[t], c] = 1.0
    return torch.tensor(cols, dtype=torch.long), combine


def daam_token_maps(q: torch.Tensor, k: torch.Tensor, heads: int,
                    groups: Sequence[Sequence[int]],
                    selection=None) -> torch.Tensor:
    """Cross-attention probability maps of word groups, summed over heads.

    q: (B, N, heads*d) image queries; k: (B, T, heads*d) prompt keys; groups: token positions of
    each word (sub-tokens, every occurrence); ``selection``: :func:`token_columns` (or the
    :func:`token_selection` matrix) of them, if already built. Returns (B, N, len(groups)) in
    float32: for each image token, the summed probability mass it puts on each word's tokens.
    The softmax runs over all T keys, exactly as in the model's own attention."""
    b, n, inner = q.shape
    t = k.shape[1]
    d = inner // heads
    words = (token_selection(groups, t) if selection is None
             else selection_matrix(selection, t)).to(device=q.device)      # (T, G)
    g = words.shape[1]
    qh = q.to(torch.float32).reshape(b, n, heads, d).transpose(1, 2)
    kh = k.to(torch.float32).reshape(b, t, heads, d).transpose(1, 2)
    if g <= d:
        # The probability mass on each word is the attention output for values that are the
        # words' 0/1 indicator columns: one fused attention call (torch SDPA), so the (N x T)
        # probabilities are never written out. Same softmax, same 1/sqrt(d) scale.
        values = torch.zeros(t, d, device=q.device)
        values[:, :g] = words
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, values.expand(b, heads, t, d))
        return out[..., :g].sum(dim=1)                                         # (B, N, G)
    probs = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2) * d ** -0.5), dim=-1)   # (B, h, N, T)
    return probs.sum(dim=1) @ words


def selection_matrix(selection, n_tokens: int) -> torch.Tensor:
    """:func:`token_columns` ``(columns, combine)`` or a :func:`token_selection` matrix, as the
    (n_tokens, words) 0/1 matrix that sums each word's token probabilities."""
    if isinstance(selection, torch.Tensor):
        return selection.float()
    cols, combine = selection
    cols = cols.cpu()
    if combine is None:
        combine = torch.eye(len(cols))
    out = torch.zeros(n_tokens, combine.shape[1])
    out[cols] = combine.float().cpu()
    return out


# ---------------------------------------------------------------------------------------------
# ConceptAttention
# ---------------------------------------------------------------------------------------------
def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads*d) or (B, T, heads, d) -> (B, heads, T, d)."""
    b, t = x.shape[:2]
    return x.reshape(b, t, heads, -1).transpose(1, 2)


def concept_attention(q_c: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor,
                      k_img: torch.Tensor, v_img: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention output of concept tokens that attend to the image tokens and to each other.

    One-way by construction: the image and prompt tokens are computed elsewhere and never see
    these keys. Each input is (B, T, heads*d) or (B, T, heads, d), as ComfyUI's blocks hand them
    out. Returns (B, C, heads*d) in the input dtype."""
    flat = [t.reshape(t.shape[0], t.shape[1], -1) for t in (q_c, k_c, v_c, k_img, v_img)]
    q_c, k_c, v_c, k_img, v_img = flat
    k = torch.cat((k_img, k_c), dim=1)
    v = torch.cat((v_img, v_c), dim=1)
    out = F.scaled_dot_product_attention(_heads(q_c, heads), _heads(k, heads), _heads(v, heads))
    b, h, c, d = out.shape
    return out.transpose(1, 2).reshape(b, c, h * d)


def concept_saliency(o_img: torch.Tensor, o_c: torch.Tensor) -> torch.Tensor:
    """ConceptAttention maps: softmax over concepts of <image output, concept output>.

    o_img: (B, N, D) image tokens' attention outputs (before the output projection);
    o_c: (B, C, D) concept tokens' attention outputs. Returns (B, N, C) float32."""
    o_img = o_img.reshape(o_img.shape[0], o_img.shape[1], -1).float()
    o_c = o_c.reshape(o_c.shape[0], o_c.shape[1], -1).float()
    return torch.softmax(o_img @ o_c.transpose(1, 2), dim=-1)


def cross_attention_saliency(q_img: torch.Tensor, k_c: torch.Tensor, heads: int) -> torch.Tensor:
    """The raw cross-attention baseline: image queries against concept keys, averaged over heads,
    softmaxed over concepts. Returns (B, N, C) float32."""
    q = _heads(q_img, heads)
    scores = q.float() @ _heads(k_c, heads).float().transpose(-1, -2)
    return torch.softmax(scores.mean(dim=1) * (q.shape[-1] ** -0.5), dim=-1)


# ---------------------------------------------------------------------------------------------
# accumulation
# ---------------------------------------------------------------------------------------------
class RunningMaps:
    """Running sums of (B, C, H, W) maps: memory is fixed, however many steps and layers add.

    ``add`` takes maps for some batch rows; ``mean`` divides by how many times each row was
    added (layers x steps), so rows that saw no call read as zeros."""

    def __init__(self, batch: int, concepts: int, height: int, width: int):
        self.sum = torch.zeros(batch, concepts, height, width, dtype=torch.float32)
        self.count = torch.zeros(batch, dtype=torch.float32)

    @property
    def shape(self) -> tuple:
        return tuple(self.sum.shape)

    def nbytes(self) -> int:
        return self.sum.numel() * self.sum.element_size() + self.count.numel() * 4

    def add(self, maps: torch.Tensor, rows: Optional[Sequence[int]] = None) -> None:
        maps = maps.detach().to(device=self.sum.device, dtype=torch.float32)
        if rows is None:
            self.sum += maps
            self.count += 1
        else:
            idx = torch.as_tensor(list(rows), dtype=torch.long)
            self.sum.index_add_(0, idx, maps)
            self.count.index_add_(0, idx, torch.ones(len(idx)))

    def add_tokens(self, maps: torch.Tensor) -> None:
        """Add (B, H*W, C) token maps for every row (row-major tokens): the per-call fast path,
        without a reshaped copy."""
        maps = maps.detach()
        if maps.device != self.sum.device or maps.dtype != torch.float32:
            maps = maps.to(device=self.sum.device, dtype=torch.float32)
        b, c = self.sum.shape[:2]
        self.sum.view(b, c, -1).add_(maps.transpose(1, 2))
        self.count += 1

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1).view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# post-processing: normalise, resize, threshold, colour
# ---------------------------------------------------------------------------------------------
def normalise(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each (H, W) map of a (..., H, W) tensor to [0, 1]."""
    flat = maps.flatten(-2)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp(min=eps)).view_as(maps)


def resize(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height, width), bilinear."""
    if tuple(maps.shape[-2:]) == (height, width):
        return maps
    return F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)


def blur3x3(maps: torch.Tensor) -> torch.Tensor:
    """3x3 box blur of (B, C, H, W) maps, edges replicated."""
    b, c, h, w = maps.shape
    x = F.pad(maps.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(x, 3, stride=1).reshape(b, c, h, w)


def _window_sum(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sum over [i - r, i + r] (cut at the ends) along ``dim``, by a running sum: O(1) a pixel."""
    n = x.shape[dim]
    c = torch.cumsum(x, dim=dim)
    c = torch.cat((torch.zeros_like(c.narrow(dim, 0, 1)), c), dim=dim)      # c[j] = sum x[:j]
    idx = torch.arange(n, device=x.device)
    hi = (idx + radius + 1).clamp(max=n)
    lo = (idx - radius).clamp(min=0)
    return c.index_select(dim, hi) - c.index_select(dim, lo)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1) x (2r+1) window of each (H, W) plane of (..., H, W); windows are cut
    at the border (the mean is over the pixels inside the image). Cost does not grow with r."""
    if radius <= 0:
        return x
    h, w = x.shape[-2:]
    ones = torch.ones(h, w, dtype=x.dtype, device=x.device)
    count = _window_sum(_window_sum(ones, radius, -2), radius, -1)
    return _window_sum(_window_sum(x, radius, -2), radius, -1) / count


def guided_filter(maps: torch.Tensor, guide: torch.Tensor, radius: int,
                  eps: float = 1e-2) -> torch.Tensor:
    """Edge-aware refinement of coarse maps by an image: He, Sun and Tang's guided filter
    (ECCV 2010 / TPAMI 2013), colour-guide form.

    In every (2r+1)^2 window the output is modelled as an affine function of the guide's colour,
    ``q = a . I + b``, fitted by ridge-regularised least squares to the input map ``p``
    (``eps`` is the ridge weight, in the guide's squared units); each pixel averages the fits
    of the windows that cover it. Where the map changes inside a window, the output follows the
    guide's edges there; flat guide regions get the window's mean map. Nothing in it knows what
    is foreground: it transfers image edges to the map, as CAM refinement by guided filtering
    or CRFs does in weakly supervised segmentation.

    maps: (B, C, H, W); guide: (B, H, W, K) (ComfyUI's IMAGE layout; K = 3 for RGB, 1 for
    grey), values in about [0, 1]. Returns (B, C, H, W) float32."""
    p = maps.float()
    g = guide.float().permute(0, 3, 1, 2)                                  # (B, K, H, W)
    if g.shape[0] != p.shape[0] or g.shape[-2:] != p.shape[-2:]:
        raise ValueError(f"guide is {tuple(guide.shape)}, maps are {tuple(maps.shape)}")
    b, k = g.shape[:2]
    mean_i = box_mean(g, radius)                                           # (B, K, H, W)
    mean_p = box_mean(p, radius)                                           # (B, C, H, W)
    ip = g.unsqueeze(1) * p.unsqueeze(2)                                   # (B, C, K, H, W)
    cov_ip = box_mean(ip, radius) - mean_i.unsqueeze(1) * mean_p.unsqueeze(2)
    ii = g.unsqueeze(1) * g.unsqueeze(2)                                   # (B, K, K, H, W)
    sigma = box_mean(ii, radius) - mean_i.unsqueeze(1) * mean_i.unsqueeze(2)
    sigma = sigma + eps * torch.eye(k, dtype=sigma.dtype, device=sigma.device).view(1, k, k, 1, 1)
    a = _solve_spd(sigma, cov_ip)                                         # (B, C, K, H, W)
    bias = mean_p - (a * mean_i.unsqueeze(1)).sum(2)
    return (box_mean(a, radius) * g.unsqueeze(1)).sum(2) + box_mean(bias, radius)


def _solve_spd(sigma: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Per-pixel solution of sigma x = rhs: sigma (B, K, K, H, W) symmetric positive definite,
    rhs (B, C, K, H, W). K = 1 and 3 in closed form (elementwise, fast on large images)."""
    k = sigma.shape[1]
    if k == 1:
        return rhs / sigma[:, :1, 0].unsqueeze(1)
    if k == 3:
        s00, s01, s02 = sigma[:, 0, 0], sigma[:, 0, 1], sigma[:, 0, 2]
        s11, s12, s22 = sigma[:, 1, 1], sigma[:, 1, 2], sigma[:, 2, 2]
        c00, c01, c02 = s11 * s22 - s12 * s12, s02 * s12 - s01 * s22, s01 * s12 - s02 * s11
        c11, c12, c22 = s00 * s22 - s02 * s02, s01 * s02 - s00 * s12, s00 * s11 - s01 * s01
        det = (s00 * c00 + s01 * c01 + s02 * c02).unsqueeze(1)
        r0, r1, r2 = rhs[:, :, 0], rhs[:, :, 1], rhs[:, :, 2]
        inv = [[c00, c01, c02], [c01, c11, c12], [c02, c12, c22]]
        return torch.stack([(inv[i][0].unsqueeze(1) * r0 + inv[i][1].unsqueeze(1) * r1
                             + inv[i][2].unsqueeze(1) * r2) / det for i in range(3)], dim=2)
    out = torch.linalg.solve(sigma.permute(0, 3, 4, 1, 2).unsqueeze(1),   # (B, 1, H, W, K, K)
                             rhs.permute(0, 1, 3, 4, 2).unsqueeze(-1))     # (B, C, H, W, K, 1)
    return out.squeeze(-1).permute(0, 1, 4, 2, 3)


def _gaussian_affinity(feats: torch.Tensor) -> torch.Tensor:
    """exp(-|f_i - f_j|^2 / 2) for all pixel pairs, zero diagonal, symmetrically normalised
    (D^-1/2 K D^-1/2, the default of the reference dense-CRF implementation), so a message
    is a weighted average of the other pixels' labels and the weights do not depend on the
    image size. feats: (N, F). Returns (N, N)."""
    sq = (feats * feats).sum(1)
    k = torch.exp(-0.5 * (sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T).clamp(min=0))
    k.fill_diagonal_(0.0)
    d = k.sum(1).clamp(min=1e-12).rsqrt()
    return k * d[:, None] * d[None, :]


def dense_crf(maps: torch.Tensor, image: torch.Tensor, background: float = 0.5,
              iterations: int = 5, spatial: float = 0.3, colour: float = 0.05,
              appearance_weight: float = 10.0, smoothness_weight: float = 1.0,
              max_side: int = 64) -> torch.Tensor:
    """Refine coarse concept maps by the image with a fully connected CRF (Kraehenbuehl and
    Koltun, NeurIPS 2011), the standard refinement of class-activation maps in weakly
    supervised segmentation (e.g. DeepLab v1, SEC, AffinityNet).

    Labels are 'background' and each concept. Unary: the normalised maps as the concepts'
    scores and ``background`` as the background's score (a pixel is labelled by the largest
    score before refinement, so ``background`` plays the role of the mask threshold), made
    probabilities and taken as -log. Pairwise (Potts), with kernels symmetrically normalised:
    an appearance kernel (pixels within about ``spatial`` x the image side of each other and
    of similar colour, ``colour`` in 0..1 units, want the same label) and a smoothness kernel
    (neighbours within a few pixels). Mean-field inference, ``iterations`` rounds, exact sums
    over all pixel pairs at a working size whose longer side is at most ``max_side`` (the maps
    come from a latent grid far coarser than that; the pair matrix then takes 64 MB); the
    result is upsampled and edge-aligned to the full image by :func:`guided_filter`.

    maps: (B, C, H, W) in [0, 1]; image: (B, H, W, 3) in [0, 1]. Returns (B, C, H, W): each
    concept's marginal probability (a pixel is that concept's where it is >= 0.5)."""
    b, c, h, w = maps.shape
    scale = min(1.0, max_side / max(h, w))
    hh, ww = max(1, round(h * scale)), max(1, round(w * scale))
    img = image[..., :3].float().permute(0, 3, 1, 2)
    small_img = img if (hh, ww) == (h, w) else F.interpolate(img, size=(hh, ww), mode="area")
    small = maps.float() if (hh, ww) == (h, w) else F.interpolate(
        maps.float(), size=(hh, ww), mode="bilinear", align_corners=False)
    dev = maps.device
    ys, xs = torch.meshgrid(torch.arange(hh, dtype=torch.float32, device=dev),
                            torch.arange(ww, dtype=torch.float32, device=dev), indexing="ij")
    pos = torch.stack((ys, xs), -1).reshape(-1, 2)
    theta = max(spatial * max(hh, ww), 1e-3)
    smooth = _gaussian_affinity(pos / max(1.0, 0.03 * max(hh, ww))) if smoothness_weight else None
    out = []
    for i in range(b):
        scores = torch.cat((torch.full((1, hh, ww), float(background), device=dev),
                            small[i].clamp(0, 1)))
        prob = scores.clamp(min=1e-4)
        unary = -torch.log(prob / prob.sum(0, keepdim=True)).reshape(c + 1, -1).T   # (N, L)
        rgb = small_img[i].reshape(3, -1).T
        kernel = appearance_weight * _gaussian_affinity(
            torch.cat((pos / theta, rgb / max(colour, 1e-4)), 1))
        if smooth is not None:
            kernel = kernel + smoothness_weight * smooth
        q = torch.softmax(-unary, 1)
        for _ in range(iterations):
            q = torch.softmax(-unary + kernel @ q, 1)
        out.append(q.T.reshape(c + 1, hh, ww)[1:])
    q = torch.stack(out)
    if (hh, ww) != (h, w):
        q = F.interpolate(q, size=(h, w), mode="bilinear", align_corners=False)
        q = guided_filter(q, image[..., :3], radius=max(1, round(1 / scale)), eps=1e-3).clamp(0, 1)
    return q


REFINE_METHODS = ("crf", "guided", "none")
REFINE_DEFAULT = "crf"


def refine_maps(maps: torch.Tensor, image: torch.Tensor,
                method: str = REFINE_DEFAULT) -> torch.Tensor:
    """Image-guided refinement of normalised (B, C, H, W) maps at image resolution, with the
    (B, H, W, 3) image in [0, 1] as the guide. Returns maps in [0, 1].

    crf: :func:`dense_crf` with its defaults (each concept's probability). guided:
    :func:`guided_filter` with a window of a third of the image side and a small ridge weight
    (1e-4), renormalised. none: the maps unchanged."""
    if method == "none":
        return maps
    if method == "crf":
        return dense_crf(maps, image)
    if method == "guided":
        radius = max(1, max(maps.shape[-2:]) // 3)
        return normalise(guided_filter(maps, image[..., :3], radius, eps=1e-4))
    raise ValueError(f"unknown refine method {method!r}; expected one of {REFINE_METHODS}")


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist = torch.histc(values.float().flatten(), bins=bins, min=0.0, max=1.0)
    p = hist / hist.sum().clamp(min=1)
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    w0 = torch.cumsum(p, 0)
    m0 = torch.cumsum(p * centres, 0)
    mt = m0[-1]
    between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp(min=1e-12)
    return float(centres[int(torch.argmax(between))])


THRESHOLD_MODES = ("mean", "otsu", "fixed", "argmax")


def masks_from_maps(maps: torch.Tensor, mode: str = "mean", value: float = 0.5) -> torch.Tensor:
    """Binary masks (float 0/1) from normalised (B, C, H, W) maps.

    mean: each map above its own mean (ConceptAttention's zero-shot protocol); otsu: each map
    above its Otsu threshold; fixed: above ``value``; argmax: the pixel goes to the concept with
    the largest map, and only if that map is at least ``value``."""
    if mode == "mean":
        return (maps > maps.mean(dim=(-2, -1), keepdim=True)).float()
    if mode == "fixed":
        return (maps >= value).float()
    if mode == "otsu":
        out = torch.zeros_like(maps)
        for i in range(maps.shape[0]):
            for j in range(maps.shape[1]):
                out[i, j] = (maps[i, j] > otsu_threshold(maps[i, j])).float()
        return out
    if mode == "argmax":
        best = maps.argmax(dim=1, keepdim=True)
        onehot = torch.zeros_like(maps).scatter_(1, best, 1.0)
        return onehot * (maps >= value).float()
    raise ValueError(f"unknown threshold mode {mode!r}; expected one of {THRESHOLD_MODES}")


# Anchor colours of matplotlib's "inferno" (0, 1/6, ..., 1), interpolated linearly.
_INFERNO = torch.tensor([
    [0.001, 0.000, 0.014], [0.258, 0.039, 0.406], [0.578, 0.148, 0.404], [0.865, 0.317, 0.226],
    [0.988, 0.645, 0.040], [0.961, 0.902, 0.329], [0.988, 1.000, 0.645]], dtype=torch.float32)


def colormap(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) values in [0, 1] -> (..., H, W, 3) inferno colours."""
    x = values.clamp(0, 1) * (len(_INFERNO) - 1)
    lo = x.floor().long().clamp(max=len(_INFERNO) - 2)
    frac = (x - lo.float()).unsqueeze(-1)
    return _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """Blend a colour-mapped (H, W) heat map over an (H, W, 3) image in [0, 1]."""
    return (image * (1 - alpha) + colormap(heat) * alpha).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# segmentation figures
# ---------------------------------------------------------------------------------------------
def iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    pred, truth = pred.bool(), truth.bool()
    union = (pred | truth).sum().item()
    return 1.0 if union == 0 else (pred & truth).sum().item() / union


def pixel_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return (pred.bool() == truth.bool()).float().mean().item()


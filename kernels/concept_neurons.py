"""Concept neurons (Cones): scores, the two search procedures, budgets, index coding, set algebra.

Pure torch (no ComfyUI). A *concept neuron* is one scalar weight of a candidate K/V projection
(``kernels.layers.concept_kv_layers``); *shutting* it sets it to zero. Weights are addressed by
their flat index into the layer's weight tensor (row-major), so a concept is a sorted set of
integers per layer.

- Score (first-order Taylor estimate of the loss change when weight i is zeroed):
  ``s_i = theta_i * dL/dtheta_i``. ``s_i > 0``: shutting it lowers the concept-implanting loss.
- Procedure ``iterative``: repeat {gradient at the currently masked weights; shut the
  ``budget / rounds`` unshut candidates with the largest positive scores}.
- Procedure ``accumulated``: a multiplicative scale-down of the weights along the scores
  (``theta <- theta - rho * theta0^2 * grad``, i.e. each weight's multiplier ``c_i`` drops by
  ``rho * theta0_i * grad_i``), scores summed over iterations; the shut set is the budget's
  largest accumulated scores. ``rho`` is normalised per step (the largest positive score moves its
  multiplier by ``rate``), so the result does not hinge on the gradient's absolute scale.
- Budget: a fraction of all candidate weights (never an absolute score threshold), optionally
  stopped early at a target loss (relative to the starting loss).
- Storage: per layer, the sorted indices are delta-coded (gaps), split into little-endian byte
  planes (all low bytes, all next bytes, ...), each plane its own zlib stream (Huffman only);
  stored as a uint8 tensor.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import torch

from .layers import fused_kv_start

PROCEDURES = ("iterative", "accumulated")
CODEC = "delta-byteplanes-zlib-v2"

GradFn = Callable[[Mapping[str, torch.Tensor]], tuple]
"""grad_fn(current_weights) -> (loss: float, grads: {name: tensor like the weight})."""


# --------------------------------------------------------------------------------------------
# candidates and scores
# --------------------------------------------------------------------------------------------
def candidate_mask(shape: tuple, kind: str) -> Optional[torch.Tensor]:
    """Bool mask of the candidate weights in a layer, or None when every weight is a candidate.

    For a fused QKV projection (``kind == "qkv"``) the K and V rows (the 2nd and 3rd thirds of
    the output rows) are candidates; Q rows are not. ``"qkv_gqa"`` (fewer K/V heads than query
    heads): the rows after the first ``shape[1]`` (``layers.fused_kv_start``)."""
    if kind not in ("qkv", "qkv_gqa"):
        return None
    rows = shape[0]
    if kind == "qkv" and rows % 3:
        raise ValueError(f"fused qkv weight has {rows} rows, not a multiple of 3")
    m = torch.zeros(shape, dtype=torch.bool)
    m[fused_kv_start(shape, kind):] = True
    return m


def candidate_count(shape: tuple, kind: str) -> int:
    n = math.prod(shape)
    return n - fused_kv_start(shape, kind) * shape[-1] if kind in ("qkv", "qkv_gqa") else n


def taylor_scores(weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> dict:
    """``s_i = theta_i * dL/dtheta_i`` per layer (fp32)."""
    return {n: weights[n].float() * grads[n].float() for n in weights}


def budget_count(total: int, fraction: float) -> int:
    """How many weights a budget fraction allows (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"budget fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(total * fraction)))


def top_positive(scores: Mapping[str, torch.Tensor], count: int,
                 excluded: Optional[Mapping[str, torch.Tensor]] = None,
                 candidates: Optional[Mapping[str, Optional[torch.Tensor]]] = None) -> dict:
    """Global top-``count`` strictly positive scores across layers, skipping ``excluded`` (bool
    masks) and non-candidates. Returns {name: sorted flat int64 indices} (layers may be empty)."""
    names = list(scores)
    flat = []
    for n in names:
        s = scores[n].detach().float().reshape(-1).clone()
        if excluded is not None and n in excluded:
            s[excluded[n].reshape(-1)] = float("-inf")
        cand = (candidates or {}).get(n)
        if cand is not None:
            s[~cand.reshape(-1)] = float("-inf")
        flat.append(s)
    sizes = [f.numel() for f in flat]
    allv = torch.cat(flat) if flat else torch.zeros(0)
    k = min(int(count), int((allv > 0).sum()))
    out = {n: torch.zeros(0, dtype=torch.int64) for n in names}
    if k <= 0:
        return out
    top = torch.topk(allv, k, sorted=False).indices
    offsets = torch.tensor([0] + sizes).cumsum(0)
    for i, n in enumerate(names):
        sel = top[(top >= offsets[i]) & (top < offsets[i + 1])] - offsets[i]
        out[n] = torch.sort(sel).values
    return out


def indices_to_mask(indices: torch.Tensor, shape: tuple) -> torch.Tensor:
    m = torch.zeros(math.prod(shape), dtype=torch.bool)
    if indices.numel():
        m[indices] = True
    return m.reshape(shape)


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1).to(torch.int64)


# --------------------------------------------------------------------------------------------
# the two procedures
# --------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    indices: dict
    """{layer name: sorted int64 flat indices of shut weights}"""
    losses: list = field(default_factory=list)
    """loss after each gradient evaluation (the first is the starting loss)"""
    evaluations: int = 0
    stopped_early: bool = False

    @property
    def count(self) -> int:
        return sum(int(v.numel()) for v in self.indices.values())


def _check_theta(theta0: Mapping[str, torch.Tensor]) -> dict:
    return {n: t.detach().float() for n, t in theta0.items()}


def _evaluate(res: "SearchResult", grad_fn: GradFn, current, step, target_loss_ratio) -> dict:
    """One gradient evaluation of a search: record the loss, tick progress, and mark the search
    stopped once the loss is at or below ``target_loss_ratio`` x the starting loss."""
    loss, grads = grad_fn(current)
    res.evaluations += 1
    res.losses.append(float(loss))
    if step:
        step()
    if target_loss_ratio is not None and len(res.losses) > 1 and loss <= target_loss_ratio * res.losses[0]:
        res.stopped_early = True
    return grads


def iterative_shutting(theta0: Mapping[str, torch.Tensor], grad_fn: GradFn, count: int, rounds: int,
                       candidates: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
                       target_loss_ratio: Optional[float] = None,
                       step: Optional[Callable[[], None]] = None) -> SearchResult:
    """Procedure (a): ``rounds`` rounds, each shutting up to ``ceil(count / rounds)`` more weights
    (largest positive Taylor scores at the current masked weights). Stops early once the loss is
    at or below ``target_loss_ratio`` x the starting loss. ``step()`` is called per gradient."""
    theta0 = _check_theta(theta0)
    shut = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in theta0.items()}
    res = SearchResult(indices={})
    per_round = max(1, math.ceil(count / max(rounds, 1)))
    done = 0
    for _ in range(max(rounds, 1)):
        current = {n: theta0[n].masked_fill(shut[n], 0.0) for n in theta0}
        grads = _evaluate(res, grad_fn, current, step, target_loss_ratio)
        if res.stopped_early:
            break
        take = min(per_round, count - done)
        if take <= 0:
            break
        new = top_positive(taylor_scores(current, grads), take, shut, candidates)
        added = 0
        for n, idx in new.items():
            if idx.numel():
                shut[n].view(-1)[idx] = True
                added += idx.numel()
        done += added
        if added == 0:
            break
    res.indices = {n: mask_to_indices(m) for n, m in shut.items()}
    return res


def accumulated_scaledown(theta0: Mapping[str, torch.Tensor], grad_fn: GradFn, count: int, iterations: int,
                          rate: float = 0.1,
                          candidates: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
                          target_loss_ratio: Optional[float] = None,
                          step: Optional[Callable[[], None]] = None) -> SearchResult:
    """Procedure (b): weights are scaled down along their scores (multipliers ``c`` in [0, 1],
    ``c_i -= rate * s_i / max(s+)`` with ``s_i = theta0_i * grad_i`` at the current weights, which
    is the ``theta <- theta - rho * theta0^2 * grad`` step with a per-step normalised rho); the
    scores are summed over iterations and the shut set is the ``count`` largest positive sums."""
    theta0 = _check_theta(theta0)
    mult = {n: torch.ones_like(t) for n, t in theta0.items()}
    acc = {n: torch.zeros_like(t) for n, t in theta0.items()}
    res = SearchResult(indices={})
    for _ in range(max(iterations, 1)):
        current = {n: theta0[n] * mult[n] for n in theta0}
        grads = _evaluate(res, grad_fn, current, step, target_loss_ratio)
        if res.stopped_early:
            break
        s = taylor_scores(theta0, grads)
        peak = 0.0
        for n in s:
            cand = (candidates or {}).get(n)
            if cand is not None:
                s[n] = s[n].masked_fill(~cand, 0.0)
            acc[n] += s[n]
            peak = max(peak, float(s[n].max()))
        if peak <= 0:
            continue
        for n in s:
            mult[n] = (mult[n] - rate * s[n].clamp_min(0) / peak).clamp_(0.0, 1.0)
    res.indices = top_positive(acc, count, None, candidates)
    return res


# --------------------------------------------------------------------------------------------
# set algebra and masks
# --------------------------------------------------------------------------------------------
def union(sets: Iterable[Mapping[str, torch.Tensor]]) -> dict:
    out: dict = {}
    for s in sets:
        for n, idx in s.items():
            out[n] = torch.unique(torch.cat([out.get(n, torch.zeros(0, dtype=torch.int64)), idx.to(torch.int64)]))
    return out


def intersection_count(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> int:
    total = 0
    for n in set(a) & set(b):
        if a[n].numel() and b[n].numel():
            total += int(torch.isin(a[n], b[n]).sum())
    return total


def overlap_report(named_sets: list) -> dict:
    """Pairwise overlaps of (name, {layer: indices}) sets: counts and Jaccard indices."""
    pairs = []
    for i in range(len(named_sets)):
        for j in range(i + 1, len(named_sets)):
            (na, a), (nb, b) = named_sets[i], named_sets[j]
            inter = intersection_count(a, b)
            size_a = sum(int(v.numel()) for v in a.values())
            size_b = sum(int(v.numel()) for v in b.values())
            uni = size_a + size_b - inter
            pairs.append({"a": na, "b": nb, "shared": inter, "a_count": size_a, "b_count": size_b,
                          "jaccard": inter / uni if uni else 0.0})
    return {"pairs": pairs, "union_count": sum(int(v.numel()) for v in union(s for _, s in named_sets).values())}


def shut_diff(weight: torch.Tensor, indices: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The additive patch ``-strength * W * mask`` (dense, the weight's shape and dtype): added to
    W it zeroes the shut weights at strength 1 and scales them by (1 - strength) in between."""
    flat = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
    if indices.numel():
        flat[indices.to(weight.device)] = -float(strength) * weight.reshape(-1)[indices.to(weight.device)].float()
    return flat.reshape(weight.shape).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# index coding
# --------------------------------------------------------------------------------------------
class CorruptIndices(ValueError):
    pass


def _deflate(data: bytes) -> bytes:
    # Huffman-only: the gap bytes of a sparse set are nearly random, LZ77 matching only adds cost
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return c.compress(data) + c.flush()


def encode_indices(indices: torch.Tensor) -> torch.Tensor:
    """Sorted unique int64 indices -> uint8 tensor: [width] then, per byte plane of the gaps (low
    byte first), [stream length, 4 bytes little-endian] + its zlib stream. One stream per plane
    lets each plane have its own Huffman code (the low plane is near-uniform, the high ones are
    small numbers): about 1.2 bytes per index at a 0.4 % density, close to the gaps' entropy."""
    idx = indices.to(torch.int64).reshape(-1)
    if idx.numel() == 0:
        return torch.tensor([0], dtype=torch.uint8)
    if bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0:
        raise ValueError("indices must be sorted, unique and non-negative")
    deltas = torch.cat([idx[:1], idx[1:] - idx[:-1] - 1])  # gaps: 0 for adjacent indices
    width = max(1, (int(deltas.max()).bit_length() + 7) // 8)
    out = bytearray([width])
    for b in range(width):
        stream = _deflate(((deltas >> (8 * b)) & 0xFF).to(torch.uint8).numpy().tobytes())
        out += len(stream).to_bytes(4, "little") + stream
    return torch.frombuffer(out, dtype=torch.uint8).clone()


def _inflate_exact(stream: bytes, size: int) -> bytes:
    try:
        d = zlib.decompressobj()
        raw = d.decompress(stream, size + 1)
        if d.unconsumed_tail or not d.eof or d.unused_data:
            raise CorruptIndices("compressed indices are truncated or longer than declared")
    except zlib.error as e:
        raise CorruptIndices(f"compressed indices do not decompress ({e})") from None
    if len(raw) != size:
        raise CorruptIndices(f"decompressed {len(raw)} bytes, expected {size}")
    return raw


def decode_indices(blob: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_indices`, validating everything: raises :class:`CorruptIndices`
    for a wrong width, a zlib error or checksum failure, a size mismatch or an index outside
    ``[0, numel)``. Never decompresses more than ``count`` bytes per plane."""
    if blob.dtype != torch.uint8 or blob.ndim != 1 or blob.numel() < 1:
        raise CorruptIndices("index blob is not a 1-D uint8 tensor")
    if count < 0 or count > numel:
        raise CorruptIndices(f"count {count} is impossible for a layer of {numel} weights")
    data = blob.numpy().tobytes()
    width = data[0]
    if count == 0:
        if width != 0 or len(data) != 1:
            raise CorruptIndices("empty index set carries data")
        return torch.zeros(0, dtype=torch.int64)
    if not 1 <= width <= 8:
        raise CorruptIndices(f"bad delta width {width}")
    deltas = torch.zeros(count, dtype=torch.int64)
    pos = 1
    for b in range(width):
        if pos + 4 > len(data):
            raise CorruptIndices("compressed indices are truncated")
        n = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4
        if n > len(data) - pos:
            raise CorruptIndices("compressed indices are truncated")
        raw = _inflate_exact(data[pos:pos + n], count)
        pos += n
        deltas |= torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64) << (8 * b)
    if pos != len(data):
        raise CorruptIndices("trailing bytes after the compressed indices")
    if bool((deltas < 0).any()):
        raise CorruptIndices("negative gap")
    idx = torch.cumsum(deltas + 1, 0) - 1
    if int(idx[-1]) >= numel or int(idx[0]) < 0:
        raise CorruptIndices(f"index {int(idx[-1])} is outside a layer of {numel} weights")
    return idx


def bytes_per_index(blobs: Mapping[str, torch.Tensor], count: int) -> float:
    return sum(int(b.numel()) for b in blobs.values()) / max(count, 1)


# --------------------------------------------------------------------------------------------
# scores reduced inside backward
# --------------------------------------------------------------------------------------------
class ScoredLayer:
    """One candidate K/V weight during a gradient evaluation, without dense gradients held for the
    model: the forward reads ``theta * m`` (the weight under the search's current multipliers),
    made one layer at a time when the layer runs; the backward adds this call's ``dL/dW`` over the
    candidate rows into an fp32 accumulator (on ``acc_device``: the compute device, or the host to
    keep the device free) and drops it. :meth:`multiplier_grads` then gives ``dL/dm = theta * dL/dW``,
    the gradient the search procedures take.

    ``theta``: a function returning the stored weight on a device (an alias of the model's own
    tensor, or its copy streamed from the offload device). ``multiplier``: None (all ones), or a
    tensor of the weight's shape; one made only of 0 and 1 (the iterative procedure's shut set) is
    applied as the indices of its zeros."""

    def __init__(self, name: str, theta: Callable[[], torch.Tensor], shape: tuple, kind: str,
                 multiplier: Optional[torch.Tensor] = None, acc_device: Optional[torch.device] = None,
                 mode: str = "multiply"):
        self.name, self.theta, self.shape, self.kind = name, theta, tuple(shape), kind
        self.row0 = fused_kv_start(self.shape, kind) if kind in ("qkv", "qkv_gqa") else 0
        self.acc_device = acc_device
        self.acc: Optional[torch.Tensor] = None
        self.calls = 0
        self.mode = mode
        self.zeros = self.dense = None
        if mode == "add":                  # W' = theta + delta (the dense fine-tune baseline)
            self.dense = None if multiplier is None else multiplier.reshape(self.shape).float()
        elif multiplier is not None:
            m = multiplier.reshape(self.shape)
            if bool(((m == 0) | (m == 1)).all()):
                zeros = torch.nonzero(m.reshape(-1) == 0).reshape(-1)
                self.zeros = zeros if zeros.numel() else None
            else:
                self.dense = m.float()

    def weight(self, device) -> torch.Tensor:
        """``theta * m`` (or ``theta + delta``) in fp32 on ``device`` (a copy of this one layer)."""
        w = self.theta().to(device=device, dtype=torch.float32, copy=True)
        if self.zeros is not None:
            w.view(-1).index_fill_(0, self.zeros.to(device), 0.0)
        elif self.dense is not None:
            if self.mode == "add":
                w.add_(self.dense.to(device))
            else:
                w.mul_(self.dense.to(device))
        return w

    def add(self, grad_w: torch.Tensor) -> None:
        rows = grad_w[self.row0:]
        dev = self.acc_device or rows.device
        if self.acc is None:
            self.acc = torch.zeros(rows.shape, dtype=torch.float32, device=dev)
        self.acc += rows.to(dev, torch.float32)
        self.calls += 1

    def multiplier_grads(self) -> torch.Tensor:
        """``dL/dm`` (``dL/ddelta`` in "add" mode) on the host, the weight's shape (0 outside the
        candidate rows)."""
        out = torch.zeros(self.shape, dtype=torch.float32)
        if self.acc is not None:
            acc = self.acc.to("cpu")
            if self.mode == "add":
                out[self.row0:] = acc
            else:
                out[self.row0:] = self.theta().detach()[self.row0:].to("cpu", torch.float32) * acc
        return out


class _ScoredLinear(torch.autograd.Function):
    """``y = x W'^T + b`` with ``W' = theta * m`` made by the layer, computed in fp32 (so the weight
    gradient is fp32 whatever the model's precision) and returned in ``x``'s dtype. Backward:
    ``dL/dW'`` (over the candidate rows) goes to the layer's accumulator, ``dL/dx`` back to autograd.
    Nothing of the layer is kept between forward and backward but ``x`` (by reference, checked)."""

    @staticmethod
    def forward(ctx, x, _anchor, layer, bias):
        w = layer.weight(x.device)
        y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
        ctx.layer, ctx.bias = layer, bias
        ctx.x, ctx.version = x, x._version
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, layer = ctx.x, ctx.layer
        if x._version != ctx.version:
            raise RuntimeError(f"scored K/V layer {layer.name}: its input was modified in place before "
                               "backward. This is a bug in the pack (kernels/concept_neurons.py).")
        g = gy.reshape(-1, gy.shape[-1]).float()
        layer.add(g.t() @ x.reshape(-1, x.shape[-1]).float())
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (g @ layer.weight(g.device)).reshape(x.shape).to(x.dtype)
        ctx.x = ctx.layer = None
        return gx, None, None, None


def scored_linear(x: torch.Tensor, layer: ScoredLayer, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A K/V projection through :class:`_ScoredLinear` (an anchor that requires grad makes autograd
    call its backward even when ``x`` does not: the text condition never does)."""
    anchor = torch.zeros((), requires_grad=torch.is_grad_enabled())
    return _ScoredLinear.apply(x, anchor, layer, bias)

"""Which weights are the concept-neuron candidates, found from parameter names alone.

Cones (Liu et al. 2023) searches the key and value projections of cross-attention, the only
weights that read the text condition. In ComfyUI's UNet naming they are
``...transformer_blocks.N.attn2.to_k.weight`` and ``...attn2.to_v.weight``; ``attn1`` is
self-attention (optional, off by default). In MMDiT models (Flux, SD3) the text stream's
fused QKV projection plays that role; its K and V rows are the candidates: SD3's
``joint_blocks.N.context_block.attn.qkv`` and Flux's ``double_blocks.N.txt_attn.qkv``. Flux's
single-stream blocks (``single_blocks.N.linear1``) are deliberately not candidates: one fused
linear projects the concatenated text and image tokens there, so its K/V rows read image tokens
as much as text and shutting them would not act on the text condition alone.

The same rule for the newer families: Flux.2 and Chroma keep Flux's ``double_blocks.N.txt_attn.qkv``;
Qwen-Image's text stream has separate ``transformer_blocks.N.attn.add_k_proj`` / ``add_v_proj``;
Z-Image (Lumina 2's NextDiT) shares one weight set between text and image tokens in its joint
``layers`` (not candidates), but its ``context_refiner.N`` layers run on the caption alone before
the joint layers, so their fused ``attention.qkv`` K/V rows read only text. Z-Image has as many
K/V heads as query heads (30 and 30), so its fused QKV splits in thirds; a Lumina model with fewer
K/V heads (Lumina 2.0: 24 and 8) has its K rows right after the query rows (``qkv_gqa``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

_UNET_KV = re.compile(r"(^|\.)attn(?P<which>[12])\.to_(?P<kv>[kv])\.weight$")
_FLUX_TXT_QKV = re.compile(r"(^|\.)double_blocks\.\d+\.txt_attn\.qkv\.weight$")
_SD3_CTX_QKV = re.compile(r"(^|\.)joint_blocks\.\d+\.context_block\.attn\.qkv\.weight$")
_QWEN_TXT_KV = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn\.add_(?P<kv>[kv])_proj\.weight$")
_ZIMAGE_CAPTION_QKV = re.compile(r"(^|\.)context_refiner\.\d+\.attention\.qkv\.weight$")


@dataclass(frozen=True)
class KVLayer:
    name: str
    """Qualified parameter name."""
    kind: str
    """"k", "v" (separate projections), "qkv" (fused; K and V are the 2nd and 3rd row thirds) or
    "qkv_gqa" (fused, fewer K/V heads than query heads: :func:`fused_kv_start`)."""
    cross: bool
    """True for cross-attention / text-stream weights, False for self-attention."""


def fused_kv_start(shape: tuple, kind: str) -> int:
    """The first K row of a fused QKV weight (rows, inputs). "qkv": three equal parts, Q, K, V.
    "qkv_gqa" (Lumina's JointAttention with fewer K/V heads than query heads, e.g. Lumina 2's
    24 and 8): as many Q rows as inputs (heads x head width = width), then K and V, equal."""
    return shape[-1] if kind == "qkv_gqa" else shape[0] // 3


def _caption_qkv_kind(shape) -> str:
    """Z-Image has as many K/V heads as query heads (thirds); a Lumina model with fewer does not."""
    return "qkv_gqa" if shape is not None and shape[0] != 3 * shape[-1] else "qkv"


def concept_kv_layers(names: Iterable[str], include_self_attention: bool = False) -> list[KVLayer]:
    """The K/V weights Cones searches, in a stable (sorted) order. ``names`` may be a mapping of
    name -> shape (as every caller passes): the fused caption QKV of a Lumina-style model with
    fewer K/V heads than query heads is then marked "qkv_gqa" instead of "qkv"."""
    shapes = names if isinstance(names, Mapping) else {}
    out = []
    for n in sorted(names):
        m = _UNET_KV.search(n)
        if m:
            cross = m.group("which") == "2"
            if cross or include_self_attention:
                out.append(KVLayer(n, m.group("kv"), cross))
            continue
        # MMDiT text stream (Flux double-stream / SD3 joint blocks). Flux single_blocks.*.linear1
        # mixes text and image tokens in one projection: not a candidate (module docstring).
        if _FLUX_TXT_QKV.search(n) or _SD3_CTX_QKV.search(n):
            out.append(KVLayer(n, "qkv", True))
            continue
        if _ZIMAGE_CAPTION_QKV.search(n):
            out.append(KVLayer(n, _caption_qkv_kind(shapes.get(n)), True))
            continue
        m = _QWEN_TXT_KV.search(n)
        if m:
            out.append(KVLayer(n, m.group("kv"), True))
    return out


def kv_weight_count(layers: Iterable[KVLayer], shapes: dict[str, tuple[int, ...]]) -> int:
    """How many scalar K/V weights the layers hold (for fused QKV, the rows from the first K row)."""
    total = 0
    for layer in layers:
        shape = shapes[layer.name]
        n = 1
        for d in shape:
            n *= d
        total += n - fused_kv_start(shape, layer.kind) * shape[-1] if layer.kind.startswith("qkv") else n
    return total

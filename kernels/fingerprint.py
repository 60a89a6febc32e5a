"""Bit-exact fingerprints of weights.

Used two ways: tests prove that a node left the incoming model's weights untouched, and
concept files (issue: concept neurons) record which base weights they were made for.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of the tensor's raw bytes, with dtype and shape folded in."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_digest(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Per-tensor digests of a state dict (or any name -> tensor mapping)."""
    return {k: tensor_digest(v) for k, v in sorted(tensors.items())}


def combined_digest(digests: Mapping[str, str]) -> str:
    """One SHA-256 over a mapping of per-tensor digests (order independent)."""
    h = hashlib.sha256()
    for k in sorted(digests):
        h.update(k.encode())
        h.update(b"=")
        h.update(digests[k].encode())
        h.update(b";")
    return h.hexdigest()


def diff_digests(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Names whose digest changed, appeared or disappeared."""
    names = set(before) | set(after)
    return sorted(n for n in names if before.get(n) != after.get(n))

"""Seed search in pure torch: optimise the initial noise (SeedSelect), keep it on the Gaussian
shell (ReNO / NAO norm prior), or rank random seeds by the same objective (best-of-N).

Everything here works on tensors and callables; nothing imports ComfyUI. The node adapter
(``nodes/seed_search.py``) supplies:

- ``denoise(x, sigma) -> x0``: the model's CFG-combined denoised prediction (k-diffusion form,
  as ComfyUI's sampler functions see it), differentiable in ``x``;
- ``to_x(z) -> x_T``: the model's own noise scaling of unit-variance noise ``z`` (EPS / v models:
  ``z * sigma_max`` or ``z * sqrt(1 + sigma_max^2)``; flow models: ``z``);
- ``step_loss(x0, i) -> per-sample loss or None``: the objective read at sampling step ``i``.

Conventions: latents and noise are ``(B, C, H, W)``; every loss is per sample (shape ``(B,)``),
so one call optimises or scores a batch of independent candidates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepLoss = Callable[[torch.Tensor, int], Optional[torch.Tensor]]

#: SeedSelect reads the semantic loss on the images decoded at the last three steps.
SEMANTIC_STEP_WEIGHTS = (0.05, 0.25, 0.7)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def norm_penalty(z: torch.Tensor) -> torch.Tensor:
    """ReNO's norm prior, per sample: ``0.5*||z||^2 - (d-1)*log||z||``, shifted to be 0 at its minimum.

    This is the negative log density of ``||z||`` under ``z ~ N(0, I_d)`` (a chi distribution),
    so it is smallest on the Gaussian shell ``||z|| = sqrt(d-1)``, where unit-variance noise lives.
    The shift (its value at the minimum) only makes it read as "0 on the shell"; gradients are
    ReNO's. Near the shell it is about ``(||z|| - sqrt(d))^2``: leaving the shell by 10% costs
    about ``0.01 d``.
    """
    d = z[0].numel()
    r = z.flatten(1).norm(dim=1).clamp_min(1e-8)
    value = 0.5 * r ** 2 - (d - 1) * torch.log(r)
    minimum = 0.5 * (d - 1) - 0.5 * (d - 1) * math.log(d - 1)
    return value - minimum


def reference_direction(ref_embeds: torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean of the (individually L2-normalised) reference embeddings, ``(D,)``."""
    e = F.normalize(ref_embeds.flatten(1).float(), dim=1)
    return F.normalize(e.mean(0), dim=0)


def semantic_loss(embeds: torch.Tensor, ref_dir: torch.Tensor) -> torch.Tensor:
    """``1 - cos(embedding, reference direction)`` per sample (0 = same direction)."""
    e = F.normalize(embeds.flatten(1).float(), dim=1)
    return 1.0 - e @ ref_dir.to(e)


def appearance_loss(latent: torch.Tensor, ref_latents: torch.Tensor, target: str = "mean") -> torch.Tensor:
    """Per-sample MSE between a latent and the references' latents ``(N, C, H, W)``.

    ``target="mean"``: to their element-wise mean (SeedSelect). ``"nearest"``: to the closest
    single reference (the minimum over references); the mean of a few different shapes can be a
    blur that reads as none of them, while each reference is a clean example.
    """
    x = latent.float().flatten(1)
    refs = ref_latents.to(latent.device, torch.float32).flatten(1)
    if target == "mean":
        return (x - refs.mean(0, keepdim=True)).pow(2).mean(1)
    if target == "nearest":
        return (x[:, None, :] - refs[None]).pow(2).mean(2).min(1).values
    raise ValueError(f"unknown appearance target {target!r} (mean or nearest)")


def step_weights(n_steps: int, weights: Sequence[float] = SEMANTIC_STEP_WEIGHTS) -> dict:
    """{step index: weight} for the semantic loss on the last ``len(weights)`` of ``n_steps``
    steps (renormalised to sum to 1 when there are fewer steps than weights)."""
    w = list(weights)[-n_steps:]
    s = sum(w)
    return {n_steps - len(w) + k: v / s for k, v in enumerate(w)}


# ---------------------------------------------------------------------------------------------
# differentiable preprocessing and embeddings
# ---------------------------------------------------------------------------------------------
def preprocess_for_vision(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                          crop: bool = True) -> torch.Tensor:
    """CLIP-style preprocessing that keeps the gradient.

    ``images``: ``(B, H, W, 3)`` in [0, 1] (ComfyUI's IMAGE layout) or ``(B, 3, H, W)``.
    Resizes the shorter side to ``size`` (bicubic; antialiased when shrinking), centre-crops
    (or squashes, ``crop=False``) to ``size x size`` and normalises with ``mean`` / ``std``.
    Unlike ComfyUI's ``clip_preprocess`` it does not round to 8 bits, which has zero gradient.
    """
    x = images
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.movedim(-1, 1)
    x = x[:, :3].float()
    h, w = x.shape[-2:]
    if crop:
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
    else:
        nh, nw = size, size
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=(nh < h or nw < w))
    if crop:
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    sd = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x.clamp(0, 1) - m) / sd


def latent_embedding(mu: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """A translation-invariant image embedding from a VAE posterior mean ``(B, C, H, W)``.

    The fallback semantic embedding when no CLIP vision model is given: the latent map minus its
    background (the per-channel spatial median), re-centred on the object's centroid and
    flattened (``C*H*W`` wide). The centroid uses softmax weights on each pixel's distance from
    the background, so the object is read wherever it sits; the shift is a differentiable
    ``grid_sample``. On a VAE whose latents are class-aligned (the digits world's demo VAE: a
    linear probe reads the class of every latent pixel) the map carries the class and the
    shape; colour and position matter less than in a plain latent MSE.
    """
    b, c, h, w = mu.shape
    mu = mu.float()
    flat = mu.flatten(2)                                                   # (B, C, N)
    bg = flat.median(dim=2, keepdim=True).values.detach()
    dist = (flat - bg).pow(2).sum(1)                                       # (B, N)
    wgt = torch.softmax(dist / (temperature * dist.mean(1, keepdim=True).clamp_min(1e-8)), dim=1)
    wgt = wgt.view(b, h, w)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=mu.device)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=mu.device)
    cy, cx = (wgt.sum(2) * ys).sum(1), (wgt.sum(1) * xs).sum(1)
    theta = torch.zeros(b, 2, 3, device=mu.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    centred = F.grid_sample(mu - bg.view(b, c, 1, 1), grid, align_corners=False, padding_mode="zeros")
    return centred.flatten(1)


# ---------------------------------------------------------------------------------------------
# the differentiable sampler
# ---------------------------------------------------------------------------------------------
def _euler_step(denoise: Denoise, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor):
    den = denoise(x, s)
    return x + (x - den) / s * (s_next - s), den


def sample_and_grad(z: torch.Tensor, to_x: Callable[[torch.Tensor], torch.Tensor], denoise: Denoise,
                    sigmas: torch.Tensor, step_loss: StepLoss, checkpoint: bool = True,
                    with_grad: bool = True) -> tuple:
    """Run Euler from ``to_x(z)`` along ``sigmas`` and return ``(loss, x_final, grad_z)``.

    ``loss`` is the per-sample sum of ``step_loss(x0_i, i)`` over the steps; ``grad_z`` is
    d(loss.sum())/dz (``None`` with ``with_grad=False``).

    ``checkpoint=True`` is gradient checkpointing at step granularity: a no-grad forward keeps
    only the ``len(sigmas)`` latents (and the x0 predictions of steps with a loss); the backward
    pass then recomputes one step at a time with grad and chains the vector-Jacobian products.
    A step's loss is differentiated separately, before the step's model graph exists. Peak
    memory is the larger of one step's model activations and one loss evaluation's, instead of
    all steps' activations plus the loss's; compute is one extra model forward. ``checkpoint=False`` builds the whole graph
    (the reference the tests compare against).
    """
    n = len(sigmas) - 1

    def forward(z_in):
        x, total = to_x(z_in), None
        for i in range(n):
            x, den = _euler_step(denoise, x, sigmas[i], sigmas[i + 1])
            li = step_loss(den, i)
            if li is not None:
                total = li if total is None else total + li
        return total, x

    if not with_grad:
        with torch.no_grad():
            total, x = forward(z)
        return total, x, None
    zl = z.detach().requires_grad_(True)
    if not checkpoint:
        total, x = forward(zl)
        (g,) = torch.autograd.grad(total.sum(), zl)
        return total.detach(), x.detach(), g
    with torch.no_grad():
        xs, dens = [to_x(zl)], {}
        for i in range(n):
            x_next, den = _euler_step(denoise, xs[-1], sigmas[i], sigmas[i + 1])
            xs.append(x_next)
            dens[i] = den
    g, total = None, None
    for i in reversed(range(n)):
        # The step's loss (decoding, an image encoder) is differentiated on its own first, from
        # the x0 prediction the no-grad pass kept, so its graph is freed before the model's graph
        # for the step is built: the peak is the larger of the two, not their sum.
        g_den = None
        d = dens.pop(i).detach().requires_grad_(True)
        li = step_loss(d, i)
        if li is not None:
            total = li.detach() if total is None else total + li.detach()
            if li.requires_grad:
                (g_den,) = torch.autograd.grad(li.sum(), d)
        del d, li
        if g_den is None and g is None:
            g = torch.zeros_like(xs[i])
            continue
        xi = xs[i].detach().requires_grad_(True)
        x_next, den = _euler_step(denoise, xi, sigmas[i], sigmas[i + 1])
        obj = x_next.new_zeros(())
        if g_den is not None:
            obj = obj + (den * g_den).sum()
        if g is not None:
            obj = obj + (x_next * g).sum()
        if obj.requires_grad:
            (g,) = torch.autograd.grad(obj, xi)
        else:
            g = torch.zeros_like(xi)
        del x_next, den, obj
    xT = to_x(zl)
    (gz,) = torch.autograd.grad(xT, zl, grad_outputs=g)
    return total, xs[-1].detach(), gz


# ---------------------------------------------------------------------------------------------
# the optimiser
# ---------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    best_z: torch.Tensor                 # (B, C, H, W): the best iterate of every candidate
    best_loss: torch.Tensor              # (B,): its objective (including the norm penalty)
    best_iteration: torch.Tensor         # (B,): at which iteration it was reached (0 = the start)
    curve: list = field(default_factory=list)        # per iteration: mean objective over the batch
    curve_parts: list = field(default_factory=list)  # per iteration: {"objective", "norm"} means
    iterations: int = 0                  # iterations run (gradient evaluations)
    stopped_early: bool = False
    final_x: Optional[torch.Tensor] = None           # the denoised latent of the last evaluation


def optimise_noise(z0: torch.Tensor, to_x, denoise: Denoise, sigmas: torch.Tensor, step_loss: StepLoss,
                   iterations: int = 30, lr: float = 0.1, lr_drop_after: int = 3, lr_drop: float = 0.1,
                   norm_weight: float = 1.0, patience: int = 3, checkpoint: bool = True,
                   on_iteration: Optional[Callable[[int, float], None]] = None) -> SearchResult:
    """SeedSelect's loop on a batch of candidates, with ReNO's norm prior and best iterate.

    Each iteration evaluates the objective ``sum_i step_loss(x0_i, i)`` of the current noise by
    running the short sampler with gradients, adds ``norm_weight * norm_penalty(z)``, remembers
    the best noise seen so far (per candidate), and takes an Adam step (AdamW without weight
    decay: decay would pull ``z`` off the Gaussian shell towards 0). The learning rate drops
    from ``lr`` to ``lr * lr_drop`` after ``lr_drop_after`` iterations (SeedSelect: 0.1 then
    0.01 after 3). A candidate whose objective has risen for more than ``patience`` consecutive
    iterations stops (its noise is frozen at its best); the loop ends when all have stopped, or
    after ``iterations`` gradient evaluations. The last evaluation is never wasted: its value
    counts for the best iterate.
    """
    z = z0.detach().clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=lr, weight_decay=0.0)
    b = z.shape[0]
    best_z = z.detach().clone()
    best_loss = torch.full((b,), float("inf"))
    best_it = torch.zeros(b, dtype=torch.long)
    prev = torch.full((b,), float("inf"))
    rises = torch.zeros(b, dtype=torch.long)
    stopped = torch.zeros(b, dtype=torch.bool)
    res = SearchResult(best_z, best_loss, best_it)
    for it in range(iterations):
        if it == lr_drop_after:
            for group in opt.param_groups:
                group["lr"] = lr * lr_drop
        loss, x_final, g = sample_and_grad(z, to_x, denoise, sigmas, step_loss, checkpoint=checkpoint)
        zn = z.detach().clone().requires_grad_(True)
        pen = norm_penalty(zn)
        (gp,) = torch.autograd.grad((norm_weight * pen).sum(), zn) if norm_weight else (torch.zeros_like(zn),)
        total = (loss.detach().cpu() + norm_weight * pen.detach().cpu()).float()
        res.curve.append(float(total.mean()))
        res.curve_parts.append({"objective": float(loss.detach().mean()), "norm": float(pen.detach().mean())})
        better = (total < best_loss) & ~stopped
        # per-candidate updates as selects, not boolean indexing (no data-dependent shapes)
        best_z = torch.where(_per_sample(better, best_z), z.detach().to(best_z), best_z)
        best_loss = torch.where(better, total, best_loss)
        best_it = torch.where(better, torch.full_like(best_it, it), best_it)
        res.best_z, res.best_loss, res.best_iteration = best_z, best_loss, best_it
        rises = torch.where(total > prev, rises + 1, torch.zeros_like(rises))
        prev = total
        stopped |= rises > patience
        res.iterations = it + 1
        res.final_x = x_final
        if on_iteration is not None:
            on_iteration(it, res.curve[-1])
        if bool(stopped.all()):
            res.stopped_early = True
            break
        if it == iterations - 1:
            break
        frozen = _per_sample(stopped.to(z.device), z)
        z.grad = torch.where(frozen, torch.zeros_like(z), (g + gp).to(z))
        opt.step()
        with torch.no_grad():
            z.copy_(torch.where(frozen, best_z.to(z), z))
    return res


def _per_sample(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample flags (B,) shaped to broadcast over a batch like ``like`` (B, ...)."""
    return flags.view(-1, *[1] * (like.ndim - 1))


# ---------------------------------------------------------------------------------------------
# best-of-N
# ---------------------------------------------------------------------------------------------
def one_step_scores(z: torch.Tensor, to_x, denoise: Denoise, sigma: torch.Tensor,
                    score: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
    """Seed Rank's cheap objective: one model call at the first sigma, read on its x0 prediction.
    Returns ``(scores (B,), x0 (B, C, H, W))``; no gradients."""
    with torch.no_grad():
        x0 = denoise(to_x(z), sigma)
        return score(x0).detach(), x0


def rank(scores: torch.Tensor, seeds: Sequence[int]) -> list:
    """``[(seed, score), ...]`` best (lowest score) first; ties keep the given order."""
    vals = [float(v) for v in scores.flatten()]
    order = sorted(range(len(vals)), key=lambda i: (vals[i], i))
    return [(int(seeds[i]), vals[i]) for i in order]

"""Train the digits-world demo models on a CPU, through ComfyUI's own model classes.

``python -m benchmarks train [--model unet|dit] [--world-seed S] [--rare 8 9] [--out demo/]``

Stages (each through the exact classes the pack's ``ConceptLab Load Demo Model`` builds, so the
weights load back into ComfyUI unchanged):

1. **VAE** — ComfyUI's ``AutoencoderKL`` (8x downscale, 4 latent channels), reconstruction +
   a small KL term. Afterwards its latent scale is folded into ``quant_conv``/``post_quant_conv``
   (an exact reparametrisation) so that ComfyUI's SD1.x latent scale (0.18215) gives latents of
   unit standard deviation.
   The latents are also centred per channel (folded into the same two convolutions), so the
   diffusion models see zero-mean, unit-variance latents.
2. **UNet + text encoder** (``--model unet``) — the SD1.x UNet (ComfyUI's ``UNetModel`` with the
   tiny ``unet_config``) and ComfyUI's ``SDClipModel`` with a tiny CLIP config and ComfyUI's CLIP
   tokenizer, trained jointly as a **v-prediction** model (ComfyUI's ``V_PREDICTION`` model type,
   as SD2.x uses) on ComfyUI's own discrete sigma schedule. v-prediction matters here: with the
   EPS objective a model this small, trained this briefly, predicts garbage at high noise (its
   x0 error is the eps error times sigma^2, up to 200x), and samples come out empty. Loss: x0
   error weighted by min(SNR, 5) + 1 (v-loss with the min-SNR cap), 10% caption dropout for
   classifier-free guidance, caption augmentation (colour and position words dropped at random,
   so plain class prompts such as "a seven" are in distribution), and an EMA of the weights.
3. **MMDiT** (``--model dit``, needs a ComfyUI with SD3 classes) — ComfyUI's SD3 MMDiT
   (``nodes.demo.DIT_CONFIG``) trained with the rectified-flow objective of SD3 (logit-normal
   times), on the latents of the trained UNet model's VAE and with its text encoder frozen.

4. **CLIP vision** (``--model vision``) — ComfyUI's CLIP vision transformer with the tiny
   ``demo/digits_vision.json`` config (64 px input, 8 px patches: one token per latent pixel), trained as a cosine classifier of the ten digits on its
   projected, L2-normalised image embedding (class prototypes, scale 16), on one-digit scenes of
   the *training* handwriting (random colour, position, scale, blur, noise and contrast, so that
   generated images read like real ones). The prototypes are dropped afterwards: what ships is the
   embedding, whose cosine to a class's references is Seed Search's semantic loss. The held-out
   writers and the judge (an SVM on other features) are never used.

Weights go to ``demo/digits_unet.safetensors`` (UNet, text encoder, VAE) and
``demo/digits_dit.safetensors`` (MMDiT only) and ``demo/digits_vision.safetensors``, fp16, with the configs, world settings and training
figures in the safetensors metadata.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import comfy_runtime as cr
from . import scenes as S

ROOT = Path(__file__).resolve().parents[2]


def _log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------------
def augment_caption(rng: np.random.Generator, digits) -> str:
    """A caption for a scene, with colour / position words dropped at random.

    Full captions ("a red seven on the left and a blue two on the right") half of the time;
    otherwise colour words, position words or both are left out, so that plain class prompts
    ("a seven") and partial prompts ("a red seven") are in distribution.
    """
    r = rng.random()
    keep_colour = r < 0.5 or (0.5 <= r < 0.7)
    keep_position = r < 0.5 or (0.7 <= r < 0.85)
    parts = []
    for d in sorted(digits, key=lambda d: d.centroid[1]):
        parts.append(S.class_prompt(d.cls, d.colour if keep_colour else None,
                                    d.position if keep_position else None))
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ------------------------------------------------------------------------------------------------
# stage 1: VAE
# ------------------------------------------------------------------------------------------------
def _vae_encode_moments(ae, x):
    return ae.quant_conv(ae.encoder(x))


def latent_class_targets(ds: S.Dataset, factor: int = 8, min_cover: float = 0.05):
    """Per latent pixel: the class of the digit covering most of its ``factor`` x ``factor`` block,
    and that coverage as a weight (0 where less than ``min_cover`` of the block is ink).
    Returns ``(target (N, h, w) int64, weight (N, h, w) float32)``."""
    lab = ds.label_maps()
    n, H, W = lab.shape
    cls_of = np.full((n, 4), -1, dtype=np.int64)
    for i, recs in enumerate(ds.records):
        for j, r in enumerate(recs):
            cls_of[i, j + 1] = r.cls
    classes = np.take_along_axis(cls_of, lab.reshape(n, -1).astype(np.int64), axis=1).reshape(n, H, W)
    h, w = H // factor, W // factor
    cover = np.stack([(classes == c).reshape(n, h, factor, w, factor).mean(axis=(2, 4)) for c in range(10)], 1)
    target = cover.argmax(1)
    weight = cover.max(1).astype(np.float32)
    weight[weight < min_cover] = 0.0
    return torch.from_numpy(target), torch.from_numpy(weight)


def train_vae(images: torch.Tensor, steps: int, batch: int = 64, lr: float = 2e-3, kl: float = 1e-6,
              log_every: int = 200, seed: int = 0, class_targets=None, class_weight: float = 0.1):
    """ComfyUI's AutoencoderKL trained for reconstruction, plus (``class_targets``) a semantic
    alignment term: a linear 1x1 probe must read each latent pixel's digit class from the
    posterior mean. This makes class a coarse, per-pixel property of the latent, like colour,
    which a diffusion model learns early, instead of a fine detail it learns last (the idea of
    VA-VAE, Yao et al. 2025, with class labels in place of a vision foundation model). The probe
    is discarded after training."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    demo = cr.pack_module("nodes.demo")
    torch.manual_seed(seed)
    ae = AutoencoderKL(**demo.VAE_PARAMS)
    _default_init_(ae)
    ae.train()
    probe = torch.nn.Conv2d(demo.VAE_PARAMS["embed_dim"], 10, 1)
    opt = torch.optim.AdamW([*ae.parameters(), *probe.parameters()], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        x = images[idx]
        moments = _vae_encode_moments(ae, x)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = ae.decoder(ae.post_quant_conv(z))
        # ink pixels matter more than the black background
        w = 1.0 + 4.0 * (x.amax(dim=1, keepdim=True) > -0.9).float()
        loss_rec = (w * (rec - x).abs()).mean() + (w * (rec - x) ** 2).mean()
        loss_kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = loss_rec + kl * loss_kl
        loss_cls = torch.zeros(())
        if class_targets is not None:
            target, weight = class_targets[0][idx], class_targets[1][idx]
            ce = torch.nn.functional.cross_entropy(probe(mean), target, reduction="none")
            loss_cls = (ce * weight).sum() / weight.sum().clamp_min(1e-6)
            loss = loss + class_weight * loss_cls
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} rec {loss_rec.item():.4f} kl {loss_kl.item():.1f} "
                 f"class {loss_cls.item():.3f} ({time.time() - t0:.0f}s)")
    ae.eval()
    return ae


@torch.no_grad()
def posterior_means(ae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The VAE encoder's posterior means, computed in batches."""
    return torch.cat([_vae_encode_moments(ae, images[i:i + batch]).chunk(2, dim=1)[0]
                      for i in range(0, images.shape[0], batch)])


@torch.no_grad()
def standardise_latents(ae, images: torch.Tensor, target_scale: float = 0.18215) -> dict:
    """Centre and rescale the VAE's latent space, exactly, so that ``latent * target_scale`` has zero
    mean per channel and unit standard deviation (what ComfyUI's SD1.x latent format feeds models).

    The encoder's mean head (``quant_conv``'s first half) gets ``(z - m) * c``, its log-variance
    head the matching ``+ 2 log c``, and ``post_quant_conv`` undoes both, so decode(encode(x)) is
    unchanged."""
    zc = ae.quant_conv.weight.shape[0] // 2
    z = posterior_means(ae, images[:2048])
    m = z.mean(dim=(0, 2, 3))
    c = 1.0 / (target_scale * (z - m.view(1, -1, 1, 1)).std().item())
    # decoder side first (it needs the old affine map): post(z) = W z + b, z = z'/c + m
    w = ae.post_quant_conv.weight
    ae.post_quant_conv.bias += w[:, :, 0, 0] @ m
    ae.post_quant_conv.weight /= c
    ae.quant_conv.weight[:zc] *= c
    ae.quant_conv.bias[:zc] = (ae.quant_conv.bias[:zc] - m) * c
    ae.quant_conv.bias[zc:] += 2 * math.log(c)
    return {"scale": c, "shift": m.tolist()}


def _default_init_(module: torch.nn.Module) -> None:
    """PyTorch's default initialisation (ComfyUI's ops skip weight init on purpose)."""
    bases = (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear, torch.nn.GroupNorm,
             torch.nn.LayerNorm, torch.nn.Embedding)
    with torch.no_grad():
        for m in module.modules():
            for base in bases:
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def to_model_images(imgs: np.ndarray) -> torch.Tensor:
    """uint8 NxHxWx3 -> float NCHW in [-1, 1] (ComfyUI's VAE input convention)."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------
# stage 2: UNet + text encoder
# ------------------------------------------------------------------------------------------------
class CaptionTokens:
    """ComfyUI's CLIP tokenizer, memoised (captions repeat a lot)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            pairs = self.tok.tokenize_with_weights(text)["l"][0]
            ids = self.cache[text] = [int(t[0]) for t in pairs]
        return ids


def encode_latents(ae, images: torch.Tensor) -> torch.Tensor:
    """Posterior means, already multiplied by the SD1.x latent scale (what the UNet sees)."""
    return posterior_means(ae, images) * 0.18215


class EMA:
    """Exponential moving average of parameters (with the usual warm-up of the decay)."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def _lr_at(base: float, step: int, frac: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay by elapsed wall-time fraction (to 5%)."""
    return base * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _batches(opt, lr: float, seconds: float, n: int, batch: int, records, drop: float, rng, g):
    """Yield ``(step, scene indices, captions)`` until ``seconds`` have passed,
    setting the learning rate of every parameter group (times its ``mult``) on the way."""
    t0, step = time.time(), 0
    while (elapsed := time.time() - t0) < seconds:
        frac = elapsed / seconds
        for grp in opt.param_groups:
            grp["lr"] = grp.get("mult", 1.0) * _lr_at(lr, step, frac)
        idx = torch.randint(0, n, (batch,), generator=g)
        yield step, idx, ["" if rng.random() < drop else augment_caption(rng, records[i]) for i in idx.tolist()]
        step += 1


def _optimiser_step(loss_fn, params, opt, ema: EMA, name: str, step: int) -> float:
    """One backward + clipped AdamW step + EMA update; returns the loss."""
    activation_snapshots = cr.pack_module("kernels.autograd").activation_snapshots
    # ComfyUI's blocks update activations in place: snapshot saved activations
    with activation_snapshots(params):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{name} training diverged at step {step} (loss {loss.item()})")
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.update()
    return loss.item()


def train_unet(base, clip_l, tokens: CaptionTokens, latents: torch.Tensor, records, seconds: float,
               batch: int = 48, lr: float = 2e-3, text_lr_mult: float = 3.0, drop: float = 0.1,
               snr_cap: float = 5.0, ema_decay: float = 0.999, seed: int = 0, log_every: int = 200):
    """Joint v-prediction training of ComfyUI's UNet and CLIP text model on the world's latents.

    ``base`` must be a ComfyUI BaseModel of type V_PREDICTION: ``apply_model`` returns the denoised
    estimate, and the loss is its squared error weighted by min(SNR, snr_cap) + 1 (the v-loss with
    its low-noise end capped). Returns the number of optimiser steps."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    unet = base.diffusion_model
    text = clip_l.transformer
    for p in text.parameters():
        p.requires_grad_(True)
    unet.train()
    text.train()
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "mult": 1.0},
                             {"params": list(text.parameters()), "mult": text_lr_mult}],
                            lr=lr, weight_decay=0.01)
    ema = EMA(params, ema_decay)
    sigmas = base.model_sampling.sigmas.float()
    t0, avg = time.time(), None
    for step, idx, captions in _batches(opt, lr, seconds, latents.shape[0], batch, records, drop, rng, g):
        x0 = latents[idx]
        sigma = sigmas[torch.randint(0, sigmas.shape[0], (batch,), generator=g)]
        x = x0 + torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
        weight = torch.clamp(1.0 / sigma ** 2, max=snr_cap) + 1.0

        def loss_fn():
            cond, _pooled = clip_l([tokens(c) for c in captions])
            denoised = base.apply_model(x, sigma, c_crossattn=cond)
            return ((denoised - x0).pow(2).mean(dim=(1, 2, 3)) * weight).mean()

        loss = _optimiser_step(loss_fn, params, opt, ema, "unet", step)
        avg = loss if avg is None else 0.98 * avg + 0.02 * loss
        if step % log_every == 0:
            _log(f"unet step {step} loss {avg:.4f} ({time.time() - t0:.0f}/{seconds:.0f}s)")
    ema.copy_to_params()
    unet.eval()
    text.eval()
    for p in text.parameters():
        p.requires_grad_(False)
    _log(f"unet+text trained: {ema.steps} steps in {time.time() - t0:.0f}s, loss {avg:.4f} (EMA weights kept)")
    return ema.steps


class TextCache:
    """Frozen text encoder outputs per caption (captions repeat a lot)."""

    def __init__(self, clip_l, tokens: CaptionTokens):
        self.clip_l, self.tokens, self.cache = clip_l, tokens, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]):
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            cond, pooled = self.clip_l([self.tokens(c) for c in missing])
            for i, c in enumerate(missing):
                self.cache[c] = (cond[i].float(), pooled[i].float())
        return (torch.stack([self.cache[c][0] for c in captions]),
                torch.stack([self.cache[c][1] for c in captions]))


def train_dit(base, text: TextCache, latents: torch.Tensor, records, seconds: float, batch: int = 48,
              lr: float = 1e-3, drop: float = 0.1, ema_decay: float = 0.999, seed: int = 0,
              log_every: int = 200):
    """Rectified-flow training of ComfyUI's MMDiT (``base``: a model_base.SD3) with a frozen text
    encoder: x_t = (1 - t) x0 + t eps with logit-normal t (SD3's choice), loss |v - (eps - x0)|^2,
    computed from ComfyUI's own denoised output as |x0_hat - x0|^2 / t^2."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    dit = base.diffusion_model
    dit.train()
    params = list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMA(params, ema_decay)
    t0, avg = time.time(), None
    for step, idx, captions in _batches(opt, lr, seconds, latents.shape[0], batch, records, drop, rng, g):
        cond, pooled = text(captions)
        x0 = latents[idx]
        t = torch.sigmoid(torch.randn((batch,), generator=g)).clamp(1e-3, 1.0)
        eps = torch.randn(x0.shape, generator=g)
        x = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps

        def loss_fn():
            denoised = base.apply_model(x, t, c_crossattn=cond, y=pooled)
            return ((denoised - x0).pow(2).mean(dim=(1, 2, 3)) / t ** 2).mean()

        loss = _optimiser_step(loss_fn, params, opt, ema, "dit", step)
        avg = loss if avg is None else 0.98 * avg + 0.02 * loss
        if step % log_every == 0:
            _log(f"dit step {step} loss {avg:.4f} ({time.time() - t0:.0f}/{seconds:.0f}s)")
    ema.copy_to_params()
    dit.eval()
    _log(f"dit trained: {ema.steps} steps in {time.time() - t0:.0f}s, loss {avg:.4f} (EMA weights kept)")
    return ema.steps


def save_demo(path: Path, modules: dict, meta: dict) -> int:
    """Save ``{prefix: module}`` state dicts as one fp16 safetensors file with JSON metadata."""
    import safetensors.torch
    sd = {}
    for prefix, module in modules.items():
        for k, v in module.state_dict().items():
            sd[prefix + k] = v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path.stat().st_size


def _training_seconds(args, remaining: float) -> float:
    seconds = min(args.unet_minutes * 60, remaining) if args.unet_minutes else remaining
    if seconds < 10:
        raise SystemExit(f"--minutes {args.minutes} leaves no time to train the diffusion model after data "
                         "and VAE; give it a larger budget")
    return seconds


def _world(args) -> S.WorldConfig:
    # half the training scenes hold one digit: plain class prompts ("a seven") are one-digit captions
    return S.WorldConfig(seed=args.world_seed, rare_classes=tuple(args.rare), count_probs=(0.5, 0.3, 0.2))


def _train_unet_model(args, demo, t_all: float) -> dict:
    import comfy.model_base
    import comfy.sd
    cfg = _world(args)
    _log(f"world: rare classes {cfg.rare_classes}, seed {cfg.seed}; making {args.scenes} scenes")
    ds = S.make_dataset(cfg, n=args.scenes)
    images = to_model_images(ds.images)
    t0 = time.time()
    ae = train_vae(images, steps=args.vae_steps, batch=args.vae_batch,
                   class_targets=latent_class_targets(ds) if args.class_weight > 0 else None,
                   class_weight=args.class_weight)
    norm = standardise_latents(ae, images)
    vae_s = time.time() - t0
    _log(f"vae trained in {vae_s:.0f}s; latents standardised (x{norm['scale']:.3f})")
    latents = encode_latents(ae, images)
    _log(f"latents {tuple(latents.shape)}, mean {latents.mean():.3f}, std {latents.std():.3f}")

    with torch.no_grad():  # ComfyUI's constructors write into fresh parameters
        base = comfy.model_base.BaseModel(demo.unet_model_config(),
                                          model_type=comfy.model_base.ModelType.V_PREDICTION)
        clip = comfy.sd.CLIP(target=demo._ClipTarget)
    _default_init_(base.diffusion_model)
    clip_l = clip.cond_stage_model.clip_l
    clip_l.to(torch.float32)  # ComfyUI may keep text encoders in fp16 on CPU; train in fp32
    _default_init_(clip_l.transformer)
    with torch.no_grad():
        for name, p in clip_l.transformer.named_parameters():
            if "position_embedding" in name or "token_embedding" in name:
                p.normal_(0, 0.02)
    t1 = time.time()
    remaining = args.minutes * 60 - (time.time() - t_all) - 30  # leave time to save
    seconds = _training_seconds(args, remaining)
    steps = train_unet(base, clip_l, CaptionTokens(clip.tokenizer), latents, ds.records,
                       seconds=seconds, batch=args.batch, lr=args.lr)
    unet_s = time.time() - t1
    meta = {"world": asdict(cfg), "prediction": "v", "vae_params": demo.VAE_PARAMS,
            "unet_config": demo.UNET_CONFIG, "text_config": json.loads(Path(demo.TEXT_CONFIG).read_text()),
            "training": {"scenes": args.scenes, "vae_steps": args.vae_steps, "vae_seconds": round(vae_s),
                         "unet_steps": steps, "unet_batch": args.batch, "unet_seconds": round(unet_s),
                         "seed": args.seed, "total_seconds": round(time.time() - t_all)}}
    out = Path(args.out) / "digits_unet.safetensors"
    size = save_demo(out, {"unet.": base.diffusion_model, "clip.": clip_l.transformer, "vae.": ae}, meta)
    _log(f"saved {out} ({size / 1e6:.1f} MB); total {time.time() - t_all:.0f}s")
    return meta["training"] | {"file": str(out), "bytes": size}


def _train_dit_model(args, demo, t_all: float) -> dict:
    import safetensors.torch
    from . import evaluate as E
    shared = Path(args.out) / "digits_unet.safetensors"
    if not shared.is_file():
        raise SystemExit(f"the DiT model reuses the UNet model's VAE and text encoder: train that first "
                         f"(python -m benchmarks train --model unet --out {args.out})")
    cfg = E.world_config_of(shared)
    _log(f"world of {shared.name}: rare classes {cfg.rare_classes}, seed {cfg.seed}; making {args.scenes} scenes")
    ds = S.make_dataset(cfg, n=args.scenes)
    clip, vae = demo.build_text_and_vae(safetensors.torch.load_file(str(shared)))
    latents = encode_latents(vae.first_stage_model.float().eval(), to_model_images(ds.images))
    clip_l = clip.cond_stage_model.clip_l
    clip_l.to(torch.float32)
    with torch.no_grad():
        base = demo.dit_model_config().get_model({})
    _default_init_(base.diffusion_model)
    t1 = time.time()
    remaining = args.minutes * 60 - (time.time() - t_all) - 30
    seconds = _training_seconds(args, remaining)
    steps = train_dit(base, TextCache(clip_l, CaptionTokens(clip.tokenizer)), latents, ds.records,
                      seconds=seconds, batch=args.batch, lr=args.dit_lr)
    meta = {"world": asdict(cfg), "prediction": "flow", "dit_config": demo.DIT_CONFIG,
            "shift": demo.DIT_SHIFT, "shares_text_and_vae_with": shared.name,
            "training": {"scenes": args.scenes, "dit_steps": steps, "dit_batch": args.batch,
                         "dit_seconds": round(time.time() - t1), "seed": args.seed,
                         "total_seconds": round(time.time() - t_all)}}
    out = Path(args.out) / "digits_dit.safetensors"
    size = save_demo(out, {"dit.": base.diffusion_model}, meta)
    _log(f"saved {out} ({size / 1e6:.1f} MB); total {time.time() - t_all:.0f}s")
    return meta["training"] | {"file": str(out), "bytes": size}


# ------------------------------------------------------------------------------------------------
# stage 4: CLIP vision (a digits-world stand-in for a real CLIP image encoder)
# ------------------------------------------------------------------------------------------------
def one_digit_scenes(cfg: S.WorldConfig, n: int, seed: int) -> tuple:
    """``n`` one-digit training scenes, classes uniform: (uint8 N x H x W x 3, int64 labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = np.stack([S.make_scene(rng, cfg, classes=[int(c)]).image for c in labels])
    return images, torch.from_numpy(labels).long()


def augment_for_vision(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generated-looking variants of clean scenes ``(B, 3, H, W)`` in [0, 1]: a random Gaussian blur
    (sigma 0..1.2 px), contrast 0.6..1.1, additive noise (std 0..0.04)."""
    b = x.shape[0]
    sig = torch.rand(b, generator=g) * 1.2
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sig[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)                                        # (B, 5)
    c = x.shape[1]
    xb = x.reshape(1, b * c, *x.shape[2:])
    kk = k.repeat_interleave(c, 0)
    xb = torch.nn.functional.conv2d(torch.nn.functional.pad(xb, (2, 2, 0, 0), mode="replicate"),
                                    kk.view(b * c, 1, 1, 5), groups=b * c)
    xb = torch.nn.functional.conv2d(torch.nn.functional.pad(xb, (0, 0, 2, 2), mode="replicate"),
                                    kk.view(b * c, 1, 5, 1), groups=b * c)
    x = xb.view_as(x)
    x = x * (0.6 + 0.5 * torch.rand(b, 1, 1, 1, generator=g))
    x = x + torch.randn(x.shape, generator=g) * (0.04 * torch.rand(b, 1, 1, 1, generator=g))
    return x.clamp(0, 1)


def _vision_embed(cv, x: torch.Tensor) -> torch.Tensor:
    """Projected embeddings of ``(B, 3, H, W)`` images in [0, 1]: the seed-search nodes'
    differentiable preprocessing (``clip_vision_size``, CLIP mean / std), then the model in
    whatever dtype it holds (fp32 while training)."""
    ss = cr.pack_module("nodes.seed_search")
    px = cr.pack_module("kernels.seed_search").preprocess_for_vision(
        x, ss.clip_vision_size(cv), ss.CLIP_MEAN, ss.CLIP_STD)
    return cv.model(pixel_values=px, intermediate_output=-2)[2]


def train_vision(cv, images: np.ndarray, labels: torch.Tensor, seconds: float, batch: int = 64,
                 lr: float = 1e-3, scale: float = 16.0) -> dict:
    """Cosine-classifier training of a ComfyUI ``ClipVisionModel``'s projected embedding."""
    snapshots = cr.pack_module("kernels.autograd").activation_snapshots
    model = cv.model
    model.to(torch.float32).train()
    protos = torch.nn.Parameter(torch.randn(10, model.visual_projection.weight.shape[0]) * 0.1)
    params = [p for p in model.parameters()] + [protos]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMA(model.parameters(), 0.995)
    g = torch.Generator().manual_seed(0)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    n = len(labels)
    t0, step, losses, correct = time.time(), 0, [], []
    while (elapsed := time.time() - t0) < seconds:
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(lr, step, elapsed / seconds, warmup=100)
        idx = torch.randint(0, n, (batch,), generator=g)
        x = augment_for_vision(x_all[idx].float() / 255.0, g)
        with snapshots(params):  # ComfyUI's CLIP layers add residuals in place
            emb = _vision_embed(cv, x)
        logits = scale * torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(protos, dim=-1).T
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        losses.append(float(loss))
        correct.append(float((logits.argmax(1) == labels[idx]).float().mean()))
        if step % 100 == 0:
            _log(f"vision step {step}: loss {np.mean(losses[-100:]):.4f}, train acc {np.mean(correct[-100:]):.3f}")
        step += 1
    ema.copy_to_params()
    model.eval()
    return {"steps": step, "final_loss": round(float(np.mean(losses[-100:])), 4),
            "train_accuracy": round(float(np.mean(correct[-100:])), 4)}


@torch.no_grad()
def vision_prototype_accuracy(cv, images: np.ndarray, labels: torch.Tensor, ref_images: np.ndarray,
                              ref_labels: torch.Tensor) -> float:
    """Nearest-class-mean accuracy of ``images`` with class means from ``ref_images``
    (the way Seed Search uses the embedding: cosine to the mean of a few references)."""
    def embed(ims):
        out = []
        for i in range(0, len(ims), 256):
            x = torch.from_numpy(ims[i:i + 256]).permute(0, 3, 1, 2).float() / 255.0
            out.append(torch.nn.functional.normalize(_vision_embed(cv, x).float(), dim=-1))
        return torch.cat(out)

    e, r = embed(images), embed(ref_images)
    means = torch.stack([torch.nn.functional.normalize(r[ref_labels == c].mean(0), dim=0) for c in range(10)])
    return float(((e @ means.T).argmax(1) == labels).float().mean())


def _train_vision_model(args, demo, t_all: float) -> dict:
    import comfy.clip_vision
    from . import evaluate as E
    shared = Path(args.out) / "digits_unet.safetensors"
    cfg = E.world_config_of(shared) if shared.is_file() else _world(args)
    _log(f"world: rare classes {cfg.rare_classes}, seed {cfg.seed}; making {args.scenes} one-digit scenes")
    images, labels = one_digit_scenes(cfg, args.scenes, cfg.seed + 7)
    with torch.no_grad():
        cv = comfy.clip_vision.ClipVisionModel(demo.VISION_CONFIG)
    _default_init_(cv.model)
    with torch.no_grad():
        emb = cv.model.vision_model.embeddings
        emb.class_embedding.normal_(0, 0.02)
        emb.position_embedding.weight.normal_(0, 0.02)
    t1 = time.time()
    seconds = max(10.0, args.minutes * 60 - (time.time() - t_all) - 60)
    stats = train_vision(cv, images, labels, seconds=seconds, batch=args.batch, lr=args.vision_lr)
    # held-out writers: never seen in training; class means from 3 held-out samples per class
    rng = np.random.default_rng(1)
    held, held_lab, refs, ref_lab = [], [], [], []
    for c in range(10):
        pool = S.heldout_indices(cfg, c)
        for j, i in enumerate(pool[:23]):
            sc = S.compose_scene(cfg, [S.DigitSpec(int(i), cfg.colour_names[int(rng.integers(len(cfg.palette)))],
                                                   S.POSITIONS[int(rng.integers(3))])], rng=rng).image
            (refs if j < 3 else held).append(sc)
            (ref_lab if j < 3 else held_lab).append(c)
    acc = vision_prototype_accuracy(cv, np.stack(held), torch.tensor(held_lab), np.stack(refs), torch.tensor(ref_lab))
    _log(f"vision: held-out writers, nearest mean of 3 references: accuracy {acc:.3f}")
    meta = {"world": asdict(cfg), "vision_config": json.loads(Path(demo.VISION_CONFIG).read_text()),
            "training": {"one_digit_scenes": args.scenes, "seconds": round(time.time() - t1), "seed": args.seed,
                         **stats, "heldout_nearest_mean_accuracy": round(acc, 4)}}
    out = Path(args.out) / "digits_vision.safetensors"
    size = save_demo(out, {"vision.": cv.model}, meta)
    _log(f"saved {out} ({size / 1e6:.2f} MB); total {time.time() - t_all:.0f}s")
    return meta["training"] | {"file": str(out), "bytes": size}


def main(args) -> dict:
    torch.manual_seed(args.seed)
    cr.bootstrap(pytorch_attention=True)
    demo = cr.pack_module("nodes.demo")
    t_all = time.time()
    if args.model == "dit":
        return _train_dit_model(args, demo, t_all)
    if args.model == "vision":
        return _train_vision_model(args, demo, t_all)
    return _train_unet_model(args, demo, t_all)


def add_arguments(p) -> None:
    p.add_argument("--model", choices=("unet", "dit", "vision"), default="unet",
                   help="unet: VAE + text encoder + SD1.x UNet; dit: the SD3 MMDiT on the unet model's "
                        "VAE and text encoder (needs COMFYUI_PATH to ComfyUI 0.3.x); vision: the digits "
                        "world's CLIP vision model")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world (scenes, writer split)")
    p.add_argument("--rare", type=int, nargs="+", default=[8, 9], help="the rare classes")
    p.add_argument("--scenes", type=int, default=20000)
    p.add_argument("--minutes", type=float, default=29.0, help="wall-time budget of the whole command")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--unet-minutes", type=float, default=0.0,
                   help="cap on the diffusion model's training time (0: whatever the budget leaves)")
    p.add_argument("--class-weight", type=float, default=0.1,
                   help="weight of the VAE's latent class-alignment term (0: off)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dit-lr", type=float, default=1e-3)
    p.add_argument("--vision-lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "demo"))

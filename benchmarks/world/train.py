"""Train the digits-world demo models on a CPU, through ComfyUI's own model classes.

``python -m benchmarks train [--world-seed S] [--rare 8 9] [--minutes M] [--out demo/]``

Stages (each through the exact classes the pack's ``ConceptLab Load Demo Model`` builds, so the
weights load back into ComfyUI unchanged):

1. **VAE** — ComfyUI's ``AutoencoderKL`` (8x downscale, 4 latent channels), reconstruction +
   a small KL term. Afterwards its latent scale is folded into ``quant_conv``/``post_quant_conv``
   (an exact reparametrisation) so that ComfyUI's SD1.x latent scale (0.18215) gives latents of
   unit standard deviation.
2. **UNet + text encoder** — ``comfy.supported_models.SD15`` with the tiny ``unet_config`` and
   ComfyUI's ``SDClipModel`` with a tiny CLIP config and ComfyUI's CLIP tokenizer, trained
   jointly with the EPS objective on ComfyUI's own discrete sigma schedule, 10% caption dropout
   for classifier-free guidance, and caption augmentation (colour and position words dropped at
   random, so plain class prompts such as "a seven" are in distribution).

Weights go to ``demo/digits_unet.safetensors`` (fp16) with the configs and world settings in
the safetensors metadata.
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


def train_vae(images: torch.Tensor, steps: int, batch: int = 64, lr: float = 2e-3, kl: float = 1e-6,
              log_every: int = 200, seed: int = 0):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    demo = cr.pack_module("nodes.demo")
    torch.manual_seed(seed)
    ae = AutoencoderKL(**demo.VAE_PARAMS)
    _default_init_(ae)
    ae.train()
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} rec {loss_rec.item():.4f} kl {loss_kl.item():.1f} "
                 f"({time.time() - t0:.0f}s)")
    ae.eval()
    return ae


@torch.no_grad()
def posterior_means(ae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The VAE encoder's posterior means, computed in batches."""
    return torch.cat([_vae_encode_moments(ae, images[i:i + batch]).chunk(2, dim=1)[0]
                      for i in range(0, images.shape[0], batch)])


@torch.no_grad()
def fold_latent_scale(ae, images: torch.Tensor, target_scale: float = 0.18215) -> float:
    """Rescale the VAE's latent space so that ``latent * target_scale`` has unit std (exact)."""
    std = posterior_means(ae, images[:2048]).std().item()
    c = 1.0 / (target_scale * std)
    zc = ae.quant_conv.weight.shape[0] // 2
    ae.quant_conv.weight[:zc] *= c
    ae.quant_conv.bias[:zc] *= c
    ae.quant_conv.bias[zc:] += 2 * math.log(c)
    ae.post_quant_conv.weight /= c
    return c


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


def train_unet(base, clip_l, tokens: CaptionTokens, latents: torch.Tensor, records, seconds: float,
               batch: int = 64, lr: float = 1e-3, drop: float = 0.1, seed: int = 0, log_every: int = 200):
    """Joint EPS training of ComfyUI's UNet and CLIP text model on the world's latents."""
    activation_snapshots = cr.pack_module("kernels.autograd").activation_snapshots
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    unet = base.diffusion_model
    text = clip_l.transformer
    for p in text.parameters():
        p.requires_grad_(True)
    unet.train(); text.train()
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sigmas = base.model_sampling.sigmas.float()
    n = latents.shape[0]
    t0 = time.time()
    step = 0
    ema = None
    while time.time() - t0 < seconds:
        frac = (time.time() - t0) / seconds
        for grp in opt.param_groups:  # warm-up then cosine decay, by wall time
            grp["lr"] = lr * min(1.0, (step + 1) / 200) * (0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * 0.95 + 0.05)
        idx = torch.randint(0, n, (batch,), generator=g)
        captions = ["" if rng.random() < drop else augment_caption(rng, records[i]) for i in idx.tolist()]
        x0 = latents[idx]
        t = torch.randint(0, sigmas.shape[0], (batch,), generator=g)
        sigma = sigmas[t]
        eps = torch.randn(x0.shape, generator=g)
        x = x0 + eps * sigma.view(-1, 1, 1, 1)
        # ComfyUI's blocks update activations in place: snapshot saved activations
        with activation_snapshots(params):
            cond, _pooled = clip_l([tokens(c) for c in captions])
            denoised = base.apply_model(x, sigma, c_crossattn=cond)
            eps_pred = (x - denoised) / sigma.view(-1, 1, 1, 1)
            loss = torch.nn.functional.mse_loss(eps_pred, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"unet training diverged at step {step} (loss {loss.item()})")
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % log_every == 0:
            _log(f"unet step {step} loss {ema:.4f} ({time.time() - t0:.0f}/{seconds:.0f}s)")
        step += 1
    unet.eval(); text.eval()
    for p in text.parameters():
        p.requires_grad_(False)
    _log(f"unet+text trained: {step} steps in {time.time() - t0:.0f}s, loss {ema:.4f}")
    return step


def save_demo(path: Path, ae, base, clip_l, meta: dict) -> int:
    import safetensors.torch
    sd = {}
    for prefix, module in (("unet.", base.diffusion_model), ("clip.", clip_l.transformer), ("vae.", ae)):
        for k, v in module.state_dict().items():
            sd[prefix + k] = v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path.stat().st_size


def main(args) -> dict:
    torch.manual_seed(args.seed)
    cr.bootstrap(pytorch_attention=True)
    demo = cr.pack_module("nodes.demo")
    import comfy.sd
    import comfy.supported_models
    t_all = time.time()
    cfg = S.WorldConfig(seed=args.world_seed, rare_classes=tuple(args.rare))
    _log(f"world: rare classes {cfg.rare_classes}, seed {cfg.seed}; making {args.scenes} scenes")
    ds = S.make_dataset(cfg, n=args.scenes)
    images = to_model_images(ds.images)
    t0 = time.time()
    ae = train_vae(images, steps=args.vae_steps, batch=args.vae_batch)
    c = fold_latent_scale(ae, images)
    vae_s = time.time() - t0
    _log(f"vae trained in {vae_s:.0f}s; latent scale folded (x{c:.3f})")
    latents = encode_latents(ae, images)
    _log(f"latents {tuple(latents.shape)}, std {latents.std():.3f}")

    with torch.no_grad():  # ComfyUI's constructors write into fresh parameters
        base = comfy.supported_models.SD15(dict(demo.UNET_CONFIG)).get_model({})
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
    steps = train_unet(base, clip_l, CaptionTokens(clip.tokenizer), latents, ds.records,
                       seconds=args.unet_minutes * 60, batch=args.batch, lr=args.lr)
    unet_s = time.time() - t1
    meta = {"world": asdict(cfg), "vae_params": demo.VAE_PARAMS, "unet_config": demo.UNET_CONFIG,
            "text_config": json.loads(Path(demo.TEXT_CONFIG).read_text()),
            "training": {"scenes": args.scenes, "vae_steps": args.vae_steps, "vae_seconds": round(vae_s),
                         "unet_steps": steps, "unet_seconds": round(unet_s), "seed": args.seed,
                         "total_seconds": round(time.time() - t_all)}}
    out = Path(args.out) / "digits_unet.safetensors"
    size = save_demo(out, ae, base, clip_l, meta)
    _log(f"saved {out} ({size / 1e6:.1f} MB); total {time.time() - t_all:.0f}s")
    return meta["training"] | {"file": str(out), "bytes": size}


def add_arguments(p) -> None:
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world (scenes, writer split)")
    p.add_argument("--rare", type=int, nargs="+", default=[8, 9], help="the rare classes")
    p.add_argument("--scenes", type=int, default=20000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--unet-minutes", type=float, default=15.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "demo"))

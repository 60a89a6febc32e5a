"""``python -m benchmarks world --json PATH``: the digits world, measured.

Generates images from plain class prompts ("a seven") with the bundled demo models, through
ComfyUI's own CLIPTextEncode / KSampler / VAEDecode, and lets the judge (an SVM trained on real
handwriting, no generative model involved) read them. Reports the judge's own accuracy on
held-out writers, per-class generation accuracy against training frequency (with a PNG plot),
and the frequent / rare split: the "rare concepts fail" finding of SeedSelect and the
data-density finding of the factorisation paper, reproduced in this world.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import comfy_runtime as cr
from . import judge as J
from . import scenes as S


def world_config_of(path: Path) -> S.WorldConfig:
    """The WorldConfig a demo model was trained on (from its safetensors metadata)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    raw = json.loads(meta.get("world", "{}"))

    def frozen(v):  # JSON lists back to the (nested) tuples a frozen, hashable WorldConfig holds
        return tuple(frozen(x) for x in v) if isinstance(v, list) else v

    return S.WorldConfig(**{k: frozen(v) for k, v in raw.items() if k in S.WorldConfig.__dataclass_fields__})


def generate(model, clip, vae, prompt: str, n: int, seed: int, steps: int, cfg: float,
             sampler: str = "euler", scheduler: str = "normal") -> np.ndarray:
    """n images (uint8 NxHxWx3) for one prompt, via ComfyUI's stock nodes."""
    import nodes as comfy_nodes
    with torch.inference_mode():
        (pos,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
        (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        (lat,) = comfy_nodes.EmptyLatentImage().generate(64, 64, n)
        (out,) = comfy_nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, pos, neg, lat)
        (img,) = comfy_nodes.VAEDecode().decode(vae, out)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def class_accuracy(images: np.ndarray, cls: int, judge) -> float:
    """Fraction of images whose most prominent digit the judge reads as ``cls``."""
    ok = 0
    for im in images:
        dets = J.find_digits(im, judge=judge)
        if dets:
            main = max(dets, key=lambda d: d.area)
            ok += int(main.cls == cls)
    return ok / len(images)


def plot_curve(path: Path, freqs: dict, accs: dict, rare: tuple, title: str) -> None:
    """Per-class accuracy against training frequency (log x), drawn with PIL."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 560, 360, 60, 20, 40, 50
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    fx = [math.log10(max(freqs[c], 1e-4)) for c in freqs]
    x0, x1 = min(fx) - 0.2, max(fx) + 0.2

    def px(f, a):
        return (L + (math.log10(max(f, 1e-4)) - x0) / (x1 - x0) * (W - L - R), T + (1 - a) * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        y = T + (1 - a) * (H - T - B)
        d.line([L - 4, y, L, y], fill="black")
        d.text((L - 40, y - 6), f"{a:.2f}", fill="black")
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        x = L + (e - x0) / (x1 - x0) * (W - L - R)
        d.line([x, H - B, x, H - B + 4], fill="black")
        d.text((x - 14, H - B + 8), f"1e{e}", fill="black")
    d.text((W // 2 - 120, H - 20), "scenes containing the class in training (log)", fill="black")
    d.text((10, 10), title, fill="black")
    for c in sorted(freqs):
        x, y = px(freqs[c], accs[c])
        col = "red" if c in rare else "blue"
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=col)
        d.text((x + 7, y - 7), str(c), fill=col)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def evaluate_model(key: str, per_class: int, steps: int, cfg_scale: float, seed: int, out_dir: Path,
                   models_dir: str | None = None) -> dict:
    demo = cr.pack_module("nodes.demo")
    path = Path(demo.demo_weights_path(key, models_dir))
    if not path.is_file():
        return {"skipped": f"no trained weights at {path}; run python -m benchmarks train"}
    wcfg = world_config_of(path)
    judge = J.get_judge(wcfg)
    with torch.inference_mode():
        model, clip, vae, _info = demo.build_demo_model(key, models_dir)
    freqs = {c: float(f) for c, f in enumerate(S.class_frequencies(wcfg))}
    accs, t0 = {}, time.time()
    for c in range(10):
        imgs = generate(model, clip, vae, S.class_prompt(c), per_class, seed + c, steps, cfg_scale)
        accs[c] = class_accuracy(imgs, c, judge)
        print(f"  [{key}] class {c} ({S.DIGIT_WORDS[c]}): accuracy {accs[c]:.2f}, "
              f"training frequency {freqs[c]:.3f}", flush=True)
    rare = tuple(wcfg.rare_classes)
    frequent = [c for c in range(10) if c not in rare]
    plot = out_dir / f"world_{key}_accuracy_vs_frequency.png"
    plot_curve(plot, freqs, accs, rare, f"{key}: class-prompt accuracy vs training frequency")
    return {
        "frequent_class_accuracy": round(float(np.mean([accs[c] for c in frequent])), 3),
        "rare_class_accuracy": round(float(np.mean([accs[c] for c in rare])), 3),
        "per_class": {str(c): {"accuracy": round(accs[c], 3), "train_frequency": round(freqs[c], 4)}
                      for c in range(10)},
        "rare_classes": list(rare),
        "images_per_class": per_class, "steps": steps, "cfg": cfg_scale, "sampler": "euler/normal",
        "seconds": round(time.time() - t0, 1), "plot": str(plot),
    }


def run(args) -> dict:
    cr.bootstrap()
    demo = cr.pack_module("nodes.demo")
    out_dir = Path(args.json).resolve().parent if args.json else Path.cwd()
    unet_path = Path(demo.demo_weights_path("digits_unet", args.models_dir))
    cfg = world_config_of(unet_path) if unet_path.is_file() else S.WorldConfig()
    real = J.evaluate_judge(cfg)
    res = {"comfyui": cr.comfy_version(), "models_dir": str(unet_path.parent),
           "judge_accuracy_real": round(real["heldout_real_acc"], 4),
           "judge": real}
    res["unet"] = evaluate_model("digits_unet", args.per_class, args.steps,
                                 args.cfg or demo.DEFAULT_CFG["digits_unet"], args.seed, out_dir, args.models_dir)
    res["dit"] = evaluate_model("digits_dit", args.per_class, args.steps,
                                args.dit_cfg or demo.DEFAULT_CFG["digits_dit"], args.seed, out_dir, args.models_dir)
    return res


def add_arguments(p) -> None:
    p.add_argument("--per-class", type=int, default=40, help="images generated per class prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=0.0, help="CFG scale for the UNet model (0: its default)")
    p.add_argument("--dit-cfg", type=float, default=0.0, help="CFG scale for the DiT model (0: its default)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--models-dir", default=None,
                   help="folder with digits_unet/digits_dit.safetensors (default: the pack's demo/)")
    p.add_argument("--json", help="write the figures to this path (the plot goes beside it)")

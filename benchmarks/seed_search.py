"""``python -m benchmarks seed-search --json PATH``: seed search on the digits world's rare classes.

For each rare class (8 and 9 in the default world; the demo UNet draws them from a plain prompt
"an eight" about 1 time in 10) and each of ``--trials`` starting noises:

- **random**: the starting noise sampled as is (what a random seed gives);
- **seedselect**: ConceptLab Seed Search from that noise (norm prior on), then sampled;
- **seedselect_no_norm**: the same without the norm prior (ablation);
- **best_of_n**: ConceptLab Seed Rank over N fresh seeds, N chosen so that ranking takes the same
  wall time as one search (measured in this run), then the best seed sampled.

References: ``--refs`` real held-out handwriting samples of the class (never seen in training),
rendered with ``scenes.render_subject``. "Sampled" always means ComfyUI's stock sampler (the
KSampler path: ``comfy.sample.sample``, 20 steps, euler, normal, CFG 3) from the found noise or
seed. Success: the judge (an SVM on real handwriting) reads the prompted class in the image's
most prominent digit (``evaluate.class_accuracy``).

Time is reported per trial as a ratio to one plain sampling run of the same batch layout.
Memory: peak RSS above the pre-call baseline (sampled every 2 ms by a thread, in a fresh
process per mode), for one image: search (one iteration is the peak; checkpointed) and Seed
Rank against plain 20-step sampling.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import comfy_runtime as cr
from .world import evaluate as E
from .world import judge as J
from .world import scenes as S

ROOT = Path(__file__).resolve().parent.parent


def add_arguments(p) -> None:
    p.add_argument("--json", help="write the figures to this path")
    p.add_argument("--trials", type=int, default=10, help="starting noises per class")
    p.add_argument("--refs", type=int, default=3, help="reference digits per class")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--search-steps", type=int, default=10)
    p.add_argument("--semantic-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--lr-drop-after", type=int, default=100)
    p.add_argument("--norm-weight", type=float, default=0.1)
    p.add_argument("--semantic-weight", type=float, default=10.0)
    p.add_argument("--appearance-weight", type=float, default=1.0)
    p.add_argument("--appearance-target", default="nearest", choices=("mean", "nearest"))
    p.add_argument("--steps", type=int, default=20, help="steps of the final stock sampling")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--classes", type=int, nargs="*", default=None, help="default: the world's rare classes")
    p.add_argument("--models-dir", default=None)
    p.add_argument("--embedding", choices=("clip_vision", "vae"), default="clip_vision",
                   help="semantic embedding: the digits world's demo CLIP vision model "
                        "(ConceptLab Load Demo CLIP Vision), or the nodes' fallback without CLIP_VISION "
                        "(the VAE encoder's latent)"),
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--memory-probe", default="", help=argparse.SUPPRESS)


def _setup(args):
    cr.bootstrap()
    demo = cr.pack_module("nodes.demo")
    ss = cr.pack_module("nodes.seed_search")
    path = Path(demo.demo_weights_path("digits_unet", args.models_dir))
    wcfg = E.world_config_of(path) if path.is_file() else S.WorldConfig()
    with torch.inference_mode():
        model, clip, vae, _ = demo.build_demo_model("digits_unet", args.models_dir)
    cv = None
    if args.embedding == "clip_vision":
        cv, info = demo.build_demo_clip_vision(args.models_dir)
        if not info["trained"]:
            raise SystemExit("the demo CLIP vision weights are missing (demo/digits_vision.safetensors); "
                             "train them with python -m benchmarks train --model vision, or use --embedding vae")
    return demo, ss, wcfg, model, clip, vae, cv


def _encode(clip, cls, batch):
    import nodes as N
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, S.class_prompt(cls))
        (neg,) = N.CLIPTextEncode().encode(clip, "")
        (lat,) = N.EmptyLatentImage().generate(64, 64, batch)
    return pos, neg, lat


def references(wcfg, cls, n):
    idx = S.heldout_indices(wcfg, cls)[:n]
    ims = np.stack([S.render_subject(wcfg, int(i)).image for i in idx])
    return torch.from_numpy(ims).float() / 255.0, [int(i) for i in idx]


def _sample(model, vae, noise, pos, neg, lat, steps, cfg):
    """ComfyUI's stock sampler from a given noise (KSampler's own call), decoded, uint8 images."""
    import comfy.sample
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, lat["samples"],
                                  disable_pbar=True)
        img = vae.decode(out)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _ksampler(model, vae, seed, pos, neg, lat, steps, cfg):
    import nodes as N
    with torch.inference_mode():
        (out,) = N.KSampler().sample(model, seed, steps, cfg, "euler", "normal", pos, neg, lat)
        img = vae.decode(out["samples"])
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def noise_seed(cls: int, base: int = 1000) -> int:
    """The seed of the starting noises measured for class ``cls`` (ComfyUI's prepare_noise: the
    first k noises of a batch are those of a batch of k, so the demo and the gallery show the
    first of these very noises)."""
    return base + 1000 * cls


def _search_args(args, norm: bool) -> dict:
    return dict(cfg=args.cfg, clip_vision=args.clip_vision, iterations=args.iterations, search_steps=args.search_steps,
                learning_rate=args.lr, lr_drop_after=args.lr_drop_after, norm_regulariser=norm,
                norm_weight=args.norm_weight, semantic_steps=args.semantic_steps,
                semantic_weight=args.semantic_weight, appearance_weight=args.appearance_weight,
                appearance_target=args.appearance_target)


def _rank(ss, model, vae, pos, neg, lat, refs, seed, n, args):
    with torch.inference_mode():
        return ss.rank_seeds(model, vae, pos, neg, lat, refs, seed=seed, candidates=n, cfg=args.cfg,
                             batch_size=32, clip_vision=args.clip_vision,
                             semantic_weight=args.semantic_weight,
                             appearance_weight=args.appearance_weight, appearance_target=args.appearance_target).best_seed


def _reads(images, judge):
    out = []
    for im in images:
        d = J.find_digits(im, judge=judge)
        out.append(int(max(d, key=lambda x: x.area).cls) if d else -1)
    return out


# ---------------------------------------------------------------------------------------------
# memory (fresh process per mode)
# ---------------------------------------------------------------------------------------------
class _PeakRSS:
    def __init__(self, every=0.002):
        import psutil
        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, False

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop = True
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mb(self):
        return (self.peak - self.base) / 2 ** 20


def memory_probe(spec: str, args) -> dict:
    demo, ss, wcfg, model, clip, vae, args.clip_vision = _setup(args)
    cls = int(wcfg.rare_classes[0])
    pos, neg, lat = _encode(clip, cls, 1)
    refs, _ = references(wcfg, cls, args.refs)
    import comfy.sample
    noise = comfy.sample.prepare_noise(lat["samples"], 1)
    _sample(model, vae, noise, pos, neg, lat, 2, args.cfg)          # warm-up: everything loaded
    with _PeakRSS() as m:
        if spec == "plain":
            _sample(model, vae, noise, pos, neg, lat, args.steps, args.cfg)
        elif spec == "search":
            a = _search_args(args, True)
            a["iterations"] = 2
            with torch.inference_mode():
                ss.search_noise(model, vae, pos, neg, lat, refs, seed=1, **a)
        elif spec == "rank":
            _rank(ss, model, vae, pos, neg, lat, refs, 0, 32, args)
    return {"mode": spec, "peak_rss_delta_mb": round(m.delta_mb, 2), "baseline_rss_mb": round(m.base / 2 ** 20, 1)}


def _probe(spec: str, argv_extra: list) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "seed-search", "--memory-probe", spec] + argv_extra
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def run(args) -> dict:
    if args.memory_probe:
        res = memory_probe(args.memory_probe, args)
        print(json.dumps(res))
        return res
    torch.manual_seed(0)
    demo, ss, wcfg, model, clip, vae, args.clip_vision = _setup(args)
    judge = J.get_judge(wcfg)
    classes = list(args.classes or wcfg.rare_classes)
    guard = cr.pack_module("nodes._runtime").ModelGuard.of(model)
    import comfy.sample
    per_class, t_plain, t_search, t_search_nn, t_rank = {}, [], [], [], []
    reads_all = {k: [] for k in ("random", "seedselect", "seedselect_no_norm", "best_of_n")}
    n_best = None
    for cls in classes:
        B = args.trials
        pos, neg, lat = _encode(clip, cls, B)
        refs, ref_idx = references(wcfg, cls, args.refs)
        seed = noise_seed(cls, args.seed)
        z0 = comfy.sample.prepare_noise(lat["samples"], seed)
        t = time.perf_counter()
        imgs = _sample(model, vae, z0, pos, neg, lat, args.steps, args.cfg)
        t_plain.append((time.perf_counter() - t) / B)
        r_random = _reads(imgs, judge)
        row = {"references": ref_idx, "prompt": S.class_prompt(cls)}
        for mode, norm, tl in (("seedselect", True, t_search), ("seedselect_no_norm", False, t_search_nn)):
            t = time.perf_counter()
            with torch.inference_mode():
                out = ss.search_noise(model, vae, pos, neg, lat, refs, seed=seed, **_search_args(args, norm))
            nl, res = out.latent, out.result
            tl.append((time.perf_counter() - t) / B)
            z = nl["samples"]
            r = _reads(_sample(model, vae, z, pos, neg, lat, args.steps, args.cfg), judge)
            reads_all[mode] += [x == cls for x in r]
            row[mode] = {"reads": r, "success": round(float(np.mean([x == cls for x in r])), 3),
                         "iterations_run": res.iterations, "stopped_early": res.stopped_early,
                         "curve": [round(c, 4) for c in res.curve],
                         "noise_norm_over_sqrt_d": [round(float(v), 3) for v in
                                                    z.flatten(1).norm(dim=1) / z[0].numel() ** 0.5]}
            print(f"  [seed-search] class {cls} {mode}: reads {r} ({tl[-1]:.1f}s per trial)", flush=True)
        # best-of-N at the search's wall time per trial (calibrated on this class's ranking speed)
        pos1, neg1, lat1 = _encode(clip, cls, 1)
        if n_best is None:
            t = time.perf_counter()
            _rank(ss, model, vae, pos1, neg1, lat1, refs, 10 ** 6, 32, args)
            per_cand = (time.perf_counter() - t) / 32
            n_best = max(1, int(round(t_search[-1] / per_cand)))
        r_best, tr = [], []
        for k in range(B):
            t = time.perf_counter()
            best = _rank(ss, model, vae, pos1, neg1, lat1, refs, seed + 100000 + k * n_best, n_best, args)
            tr.append(time.perf_counter() - t)
            r_best += _reads(_ksampler(model, vae, best, pos1, neg1, lat1, args.steps, args.cfg), judge)
        t_rank += tr
        row["random"] = {"reads": r_random, "success": round(float(np.mean([x == cls for x in r_random])), 3)}
        row["best_of_n"] = {"reads": r_best, "success": round(float(np.mean([x == cls for x in r_best])), 3),
                            "n": n_best}
        reads_all["random"] += [x == cls for x in r_random]
        reads_all["best_of_n"] += [x == cls for x in r_best]
        print(f"  [seed-search] class {cls} random: {r_random}; best-of-{n_best}: {r_best}", flush=True)
        per_class[str(cls)] = row
    guard.check("seed-search benchmark")
    plain = float(np.mean(t_plain))
    res = {
        "comfyui": cr.comfy_version(), "model": "digits_unet", "classes": classes,
        "trials_per_class": args.trials,
        "rare_success_random": round(float(np.mean(reads_all["random"])), 3),
        "rare_success_best_of_n": round(float(np.mean(reads_all["best_of_n"])), 3),
        "rare_success_seedselect": round(float(np.mean(reads_all["seedselect"])), 3),
        "rare_success_seedselect_no_norm": round(float(np.mean(reads_all["seedselect_no_norm"])), 3),
        "best_of_n_candidates": n_best,
        "time_ratio_seedselect": round(float(np.mean(t_search)) / plain, 2),
        "time_ratio_best_of_n": round(float(np.mean(t_rank)) / plain, 2),
        "seconds_plain_per_image": round(plain, 3),
        "seconds_seedselect_per_trial": round(float(np.mean(t_search)), 2),
        "seconds_best_of_n_per_trial": round(float(np.mean(t_rank)), 2),
        "model_unchanged": True,
        "embedding": args.embedding,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "memory_probe", "clip_vision")},
        "per_class": per_class,
    }
    if not args.no_memory:
        extra = []
        for k in ("iterations", "search_steps", "semantic_steps", "steps", "refs", "lr", "norm_weight",
                  "semantic_weight", "appearance_weight", "appearance_target", "embedding"):
            extra += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        mem = {m: _probe(m, extra) for m in ("plain", "search", "rank")}
        base = max(mem["plain"]["peak_rss_delta_mb"], 1e-3)
        res["memory_ratio_seedselect"] = round(mem["search"]["peak_rss_delta_mb"] / base, 2)
        res["memory_ratio_best_of_n"] = round(mem["rank"]["peak_rss_delta_mb"] / base, 2)
        res["memory"] = mem
        res["memory_method"] = ("peak RSS above the pre-call RSS, polled every 2 ms by a thread, in a fresh "
                                "process per mode after a warm-up sampling run; one image (batch 1); "
                                "search = 2 iterations (checkpointed: the peak does not grow with "
                                "iterations), rank = 32 candidates, plain = one 20-step sampling run")
    return res

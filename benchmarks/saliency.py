"""``python -m benchmarks saliency``: attention saliency measured on digits-world scenes.

For each demo model (digits-unet; digits-dit on ComfyUI 0.3.x), scenes with 2 or 3 digits are
generated from world captions ("a red seven on the left and a blue two on the right") through
ComfyUI's stock KSampler, with the sampler's MODEL coming from ConceptLab Saliency Capture. The
concepts are the caption's digit words. The ground truth is the judge's mask of each generated
digit it finds whose class is one of the caption's words.

Segmentation protocols (the same for every method), see :func:`pipelines`:
- headline (``miou_*``): ConceptLab Saliency Maps with its default widgets, i.e. each latent-grid
  map normalised and upsampled to the image, refined with the decoded image as the guide (a
  fully connected CRF, ``kernels.saliency.dense_crf``), and the mask is ``map >= 0.5``;
- ``*_raw``: no refinement (the earlier default): blur 3x3 on the latent grid, normalise,
  upsample, ``map >= 0.5``;
- ``*_raw_mean_threshold``: the raw map above its own mean (the ConceptAttention paper's
  zero-shot protocol).

Figures: mIoU and pixel accuracy per method, the capture overhead (sampling wall time with
capture / without, median of interleaved repeats, one run; timed with torch pinned to one thread,
``--timing-threads``, and given as a CPU-time ratio too), whether the images are bit-identical
with capture on, and memory at 10 and 40 steps (the recording's own bytes, and the peak RSS of a
fresh process that samples once with capture).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import comfy_runtime as cr

ROOT = Path(__file__).resolve().parent.parent
POSITIONS = ("left", "center", "right")


def scene_prompts(n: int, seed: int, cfg) -> list:
    """n captions of 2 or 3 frequent-class digits, distinct classes, colours and positions."""
    from .world import scenes as S
    rng = np.random.default_rng(seed)
    frequent = [c for c in range(10) if c not in cfg.rare_classes]
    colours = list(cfg.colour_names)
    out = []
    for i in range(n):
        k = 2 + (i % 2)
        classes = rng.choice(frequent, size=k, replace=False)
        cols = rng.choice(colours, size=k, replace=False)
        pos = sorted(rng.choice(POSITIONS, size=k, replace=False), key=POSITIONS.index)
        phrases = [S.digit_phrase(int(c), str(col), str(p)) for c, col, p in zip(classes, cols, pos)]
        out.append((" and ".join(phrases), [S.DIGIT_WORDS[int(c)] for c in classes]))
    return out


def _sample(model, clip, vae, prompt, n, seed, steps, cfg):
    import nodes as comfy_nodes
    (pos,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
    (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
    (lat,) = comfy_nodes.EmptyLatentImage().generate(64, 64, n)
    t0, c0 = time.perf_counter(), time.process_time()
    (out,) = comfy_nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", pos, neg, lat)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    (img,) = comfy_nodes.VAEDecode().decode(vae, out)
    _sample.cpu_seconds = cpu
    return img.detach(), dt


def _capture(sal, model, clip, prompt, words, method="auto", compare=()):
    patched, rec = sal.ConceptLabSaliencyCapture.execute(model, clip, prompt, ", ".join(words),
                                                           method, "auto", 0.0, 1.0)
    rec.compare = tuple(compare)       # e.g. raw cross-attention beside ConceptAttention
    return patched, rec


def pipelines(sal) -> dict:
    """Name suffix -> (blur, refine, threshold mode, threshold) of each scored pipeline. The
    headline ('') is ConceptLab Saliency Maps with its default widgets; '_raw' is the earlier
    default (3x3 blur, no refinement), '_raw_mean_threshold' the same maps above their mean
    (the ConceptAttention paper's zero-shot protocol)."""
    req = sal.ConceptLabSaliencyMaps.INPUT_TYPES()["required"]
    default = (req["blur"][1]["default"], req["refine"][1]["default"],
               req["threshold_mode"][1]["default"], req["threshold"][1]["default"])
    return {"": default, "_raw": (True, "none", "fixed", 0.5),
            "_raw_mean_threshold": (True, "none", "mean", 0.0)}


def _segmentation(K, J, judge, sal, rec, img, names):
    """Per method and pipeline: IoU and pixel accuracy of each judged digit."""
    out = {}
    for i in range(img.shape[0]):
        dets = [d for d in J.find_digits((img[i].numpy() * 255).round().astype(np.uint8), judge)
                if d.word in rec.words]
        if not dets:
            continue
        for name in names:
            raw = rec.result(name)[i:i + 1]
            for suffix, (blur, refine, mode, thr) in pipelines(sal).items():
                _, maps = sal.image_maps(raw, img[i:i + 1, ..., :3].float(), blur, refine)
                masks = K.masks_from_maps(maps, mode, thr)[0]
                r = out.setdefault(name + suffix, {"iou": [], "acc": []})
                for d in dets:
                    truth = torch.from_numpy(d.mask)
                    mask = masks[rec.words.index(d.word)]
                    r["iou"].append(K.iou(mask, truth))
                    r["acc"].append(K.pixel_accuracy(mask, truth))
    return out


def _overhead(sal, model, clip, vae, prompt, words, steps, cfg, repeats, threads=0):
    """Interleaved plain / capture samplings of the same seeds. Returns the median wall-time
    ratio, bit-identity, and per repeat (wall plain, wall capture, CPU plain, CPU capture).

    ``threads`` > 0 pins torch's intra-op threads while timing: on a shared 2-core machine,
    torch's default OpenMP threads wait on each other whenever another process holds a core,
    and single samplings of these tiny models then range from 0.4 s to 30 s."""
    times = {"plain": [], "capture": [], "plain_cpu": [], "capture_cpu": []}
    identical = True
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        _sample(model, clip, vae, prompt, 4, 1, steps, cfg)            # warm-up
        for r in range(repeats):
            img0, t0 = _sample(model, clip, vae, prompt, 4, 100 + r, steps, cfg)
            times["plain_cpu"].append(_sample.cpu_seconds)
            patched, _ = _capture(sal, model, clip, prompt, words)
            img1, t1 = _sample(patched, clip, vae, prompt, 4, 100 + r, steps, cfg)
            times["capture_cpu"].append(_sample.cpu_seconds)
            identical = identical and torch.equal(img0, img1)
            times["plain"].append(t0)
            times["capture"].append(t1)
    finally:
        torch.set_num_threads(before)
    ratio = statistics.median(times["capture"]) / statistics.median(times["plain"])
    return ratio, identical, times


def measure_model(key: str, args) -> dict:
    sal = cr.pack_module("nodes.saliency")
    demo = cr.pack_module("nodes.demo")
    K = cr.pack_module("kernels.saliency")
    from .world import judge as J
    from .world import evaluate as E
    cfg_world = E.world_config_of(Path(demo.demo_weights_path("digits_unet")))
    judge = J.get_judge(cfg_world)
    with torch.inference_mode():
        model, clip, vae, info = demo.build_demo_model(key)
    guard = cr.pack_module("nodes._runtime").ModelGuard.of(model)
    cfg = demo.DEFAULT_CFG[key]
    dit = info["family"] == "sd3"
    names = ("conceptattention", "crossattention") if dit else ("daam",)
    prompts = scene_prompts(args.scenes, args.seed, cfg_world)
    seg: dict = {}
    t0 = time.time()
    with torch.inference_mode():
        for pi, (prompt, words) in enumerate([] if args.overhead_only else prompts):
            # each method by name ('auto' picks cross-attention on the small demo DiT)
            patched, rec = _capture(sal, model, clip, prompt, words, names[0], names[1:])
            img, _ = _sample(patched, clip, vae, prompt, args.images, 1000 + pi, args.steps, cfg)
            for name, r in _segmentation(K, J, judge, sal, rec, img, names).items():
                s = seg.setdefault(name, {"iou": [], "acc": []})
                s["iou"] += r["iou"]
                s["acc"] += r["acc"]
            print(f"[saliency] {key}: scene {pi + 1}/{len(prompts)} '{prompt}' "
                  f"({time.time() - t0:.0f}s)", flush=True)
        ratio, identical, times = _overhead(sal, model, clip, vae, prompts[0][0], prompts[0][1],
                                            args.steps, cfg, args.repeats, args.timing_threads)
    guard.check(f"python -m benchmarks saliency ({key})")
    res = {"family": info["family"],
           "digits_scored": len(next(iter(seg.values()))["iou"]) if seg else 0,
           "capture_overhead_ratio": round(ratio, 4), "image_bit_identical": identical,
           "capture_overhead_ratio_cpu": round(statistics.median(times["capture_cpu"])
                                               / statistics.median(times["plain_cpu"]), 4),
           "timing_threads": args.timing_threads or torch.get_num_threads(),
           "sampling_seconds_plain": [round(t, 4) for t in times["plain"]],
           "sampling_seconds_capture": [round(t, 4) for t in times["capture"]],
           "sampling_cpu_seconds_plain": [round(t, 4) for t in times["plain_cpu"]],
           "sampling_cpu_seconds_capture": [round(t, 4) for t in times["capture_cpu"]]}
    for name, r in seg.items():
        res[f"miou_{name}"] = round(float(np.mean(r["iou"])), 4)
        res[f"pixel_acc_{name}"] = round(float(np.mean(r["acc"])), 4)
    return res


def memory_probe(spec: str) -> dict:
    """In a fresh process: sample once with capture; report the recording bytes and peak RSS."""
    key, steps = spec.split(":")
    cr.bootstrap()
    sal = cr.pack_module("nodes.saliency")
    demo = cr.pack_module("nodes.demo")
    prompt, words = "a red seven on the left and a blue two on the right", ["seven", "two"]
    with torch.inference_mode():
        model, clip, vae, _ = demo.build_demo_model(key)
        patched, rec = _capture(sal, model, clip, prompt, words)
        _sample(patched, clip, vae, prompt, 4, 1, int(steps), demo.DEFAULT_CFG[key])
    return {"recording_bytes": rec.state_bytes(), "steps_recorded": rec.steps,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _probe(key: str, steps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "saliency", "--memory-probe", f"{key}:{steps}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(args) -> dict:
    if args.memory_probe:
        res = memory_probe(args.memory_probe)
        print(json.dumps(res))
        return res
    cr.bootstrap()
    demo = cr.pack_module("nodes.demo")
    sal = cr.pack_module("nodes.saliency")
    keys = ["digits_unet", "digits_dit"]
    res = {"comfyui": cr.comfy_version(), "scenes": args.scenes, "images_per_scene": args.images,
           "steps": args.steps,
           "protocol": {"headline (miou_*, pixel_acc_*)": "ConceptLab Saliency Maps' default "
                        "pipeline: blur %s, refine '%s', threshold %s %s" % pipelines(sal)[""],
                        "*_raw": "no image-guided refinement: 3x3 blur of the latent-grid map, "
                                 "bilinear upsampling, normalised, mask = map >= 0.5",
                        "*_raw_mean_threshold": "the raw map, mask = map > its mean"}}
    for key in keys:
        r = measure_model(key, args)
        if not args.overhead_only:
            mem = {n: _probe(key, n) for n in (10, 40)}
            r["memory"] = {f"{n}_steps": m for n, m in mem.items()}
        res[key] = r
    if "digits_dit" not in res:
        res["digits_dit"] = {"skipped": f"{cr.comfy_version()} has no SD3 MMDiT classes"}
    unet, dit = res["digits_unet"], res["digits_dit"]
    for suffix in ("", "_raw", "_raw_mean_threshold"):
        if f"miou_daam{suffix}" in unet:
            res[f"miou_daam_unet{suffix}"] = unet[f"miou_daam{suffix}"]
            res[f"pixel_acc_daam_unet{suffix}"] = unet[f"pixel_acc_daam{suffix}"]
        if f"miou_conceptattention{suffix}" in dit:
            for name, short in (("conceptattention", "conceptattention"),
                                ("crossattention", "crossattn")):
                res[f"miou_{short}_dit{suffix}"] = dit[f"miou_{name}{suffix}"]
                res[f"pixel_acc_{short}_dit{suffix}"] = dit[f"pixel_acc_{name}{suffix}"]
    ratios = [r["capture_overhead_ratio"] for r in (unet, dit) if "capture_overhead_ratio" in r]
    res["capture_overhead_ratio"] = max(ratios)
    res["capture_overhead_ratio_cpu"] = max(r["capture_overhead_ratio_cpu"] for r in (unet, dit)
                                            if "capture_overhead_ratio_cpu" in r)
    res["image_bit_identical"] = all(r.get("image_bit_identical", True) for r in (unet, dit))
    return res


def add_arguments(p) -> None:
    p.add_argument("--scenes", type=int, default=12, help="scene captions per model")
    p.add_argument("--images", type=int, default=4, help="images per caption")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="timing repeats for the overhead ratio")
    p.add_argument("--timing-threads", type=int, default=1,
                   help="torch intra-op threads while timing the overhead (0: torch's default)")
    p.add_argument("--overhead-only", action="store_true",
                   help="measure only the capture overhead and bit-identity (no segmentation, "
                        "no memory probes), for quick iteration")
    p.add_argument("--memory-probe", default="", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the figures to this path")

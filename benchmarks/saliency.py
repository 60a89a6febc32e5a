"""``python -m benchmarks saliency``: attention saliency measured on digits-world scenes.

For each demo model (digits-unet; digits-dit on ComfyUI 0.3.x), scenes with 2 or 3 digits are
generated from world captions ("a red seven on the left and a blue two on the right") through
ComfyUI's stock KSampler, with the sampler's MODEL coming from ConceptLab Saliency Capture. The
concepts are the caption's digit words. The ground truth is the judge's mask of each generated
digit it finds whose class is one of the caption's words.

Segmentation protocol (the same for every method): each map is normalised to 0..1 at image
resolution (blurred 3x3 on the latent grid first, the nodes' default), and the mask is
``map >= 0.5`` (the nodes' default, ``fixed``). The ConceptAttention paper's protocol (above the
map's mean) is reported beside it as ``*_mean_threshold``.

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
    patched, rec = sal.ConceptLabSaliencyCapture().capture(model, clip, prompt, ", ".join(words),
                                                           method, "auto", 0.0, 1.0)
    rec.compare = tuple(compare)       # e.g. raw cross-attention beside ConceptAttention
    return patched, rec


def _segmentation(K, J, judge, rec, img, names):
    """Per method: IoU and pixel accuracy of each judged digit, under both protocols."""
    out = {}
    h, w = img.shape[1], img.shape[2]
    for i in range(img.shape[0]):
        dets = J.find_digits((img[i].numpy() * 255).round().astype(np.uint8), judge)
        for d in dets:
            if d.word not in rec.words:
                continue
            j = rec.words.index(d.word)
            truth = torch.from_numpy(d.mask)
            for name in names:
                grid = K.blur3x3(rec.result(name)[i:i + 1])
                maps = K.normalise(K.resize(K.normalise(grid), h, w))
                for proto, mode, thr in (("", "fixed", 0.5), ("_mean_threshold", "mean", 0.0)):
                    mask = K.masks_from_maps(maps, mode, thr)[0, j]
                    r = out.setdefault(name + proto, {"iou": [], "acc": []})
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
            patched, rec = _capture(sal, model, clip, prompt, words, compare=names[1:])
            img, _ = _sample(patched, clip, vae, prompt, args.images, 1000 + pi, args.steps, cfg)
            for name, r in _segmentation(K, J, judge, rec, img, names).items():
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
    keys = ["digits_unet"] + (["digits_dit"] if demo.has_mmdit() else [])
    res = {"comfyui": cr.comfy_version(), "scenes": args.scenes, "images_per_scene": args.images,
           "steps": args.steps, "protocol": "map normalised to 0..1, mask = map >= 0.5 "
                                            "(*_mean_threshold: map > its mean)"}
    for key in keys:
        r = measure_model(key, args)
        if not args.overhead_only:
            mem = {n: _probe(key, n) for n in (10, 40)}
            r["memory"] = {f"{n}_steps": m for n, m in mem.items()}
        res[key] = r
    if "digits_dit" not in res:
        res["digits_dit"] = {"skipped": f"{cr.comfy_version()} has no SD3 MMDiT classes"}
    unet, dit = res["digits_unet"], res["digits_dit"]
    if "miou_daam" in unet:
        res["miou_daam_unet"] = unet["miou_daam"]
        res["pixel_acc_daam_unet"] = unet["pixel_acc_daam"]
    if "miou_conceptattention" in dit:
        res["miou_conceptattention_dit"] = dit["miou_conceptattention"]
        res["miou_crossattn_dit"] = dit["miou_crossattention"]
        res["pixel_acc_conceptattention_dit"] = dit["pixel_acc_conceptattention"]
        res["pixel_acc_crossattn_dit"] = dit["pixel_acc_crossattention"]
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

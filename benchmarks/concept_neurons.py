"""``python -m benchmarks concept-neurons``: Cones measured on the digits world (demo UNet).

Protocol (one run, everything seeded):

- Subjects: for each of the classes ``--classes`` (default three and seven), a held-out writer's
  sample. The model first draws ``--images`` pictures from the plain class prompt ("a three");
  the subject is drawn at random (seeded) from the held-out samples of that class whose mean
  similarity to those pictures is below the median, i.e. subjects the model does not already
  draw. Reference images: ``--refs`` renderings of the subject in different colours, positions
  and scales (``scenes.render_subject``).
- Fidelity: mean ``judge.subject_similarity`` of images drawn from the plain class prompt
  (same seeds) without the concept (before), with it (after), and with the fine-tune baseline.
  A generic member of the class scores ~0.5 on average, the subject itself ~1.
- Fine-tune baseline: Custom-Diffusion-style K/V fine-tune (additive deltas on exactly the
  candidate weights, Adam) on the same images, class prompt, prior images and loss, through the
  same ``gradients_through`` machinery; fidelity measured at checkpoints. Its time to reach its
  fidelity = training time up to the first checkpoint at >= 95% of its best fidelity.
- Prompt fidelity: captions with a colour and a position ("a red three on the left"); the
  judge's check of colour and position (and class) with the concept applied, against without.
- Two subjects: the two concepts combined; "a three on the left and a seven on the right"; a
  success is an image where both digits are found at their positions and each one's subject
  similarity is >= ``--two-threshold`` (0.75, well above a generic member's ~0.5). The same
  rate without the concepts is reported beside it.
- Size: ``file_bytes`` of the saved concept; ``projected_sd15_bytes`` = bytes per shut index x
  shut fraction x 19.2 M (SD1.5's cross-attention K/V weights).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import comfy_runtime as cr

ROOT = Path(__file__).resolve().parent.parent
SD15_KV_WEIGHTS = 19_200_000


def add_arguments(p) -> None:
    p.add_argument("--json", help="write the figures to this path")
    p.add_argument("--model", default="digits_unet", choices=("digits_unet", "digits_dit"),
                   help="demo model (digits_dit: SD3 MMDiT, text-stream K/V rows; needs COMFYUI_PATH=ComfyUI 0.3.x)")
    p.add_argument("--classes", default="3,7", help="subject classes (two for the two-subject test)")
    p.add_argument("--images", type=int, default=12, help="images per fidelity measurement")
    p.add_argument("--refs", type=int, default=6, help="reference images per subject")
    p.add_argument("--procedure", default="iterative", choices=("iterative", "accumulated"))
    p.add_argument("--budget", type=float, default=0.004, help="shut budget, fraction of K/V weights")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--prior-weight", type=float, default=0.3)
    p.add_argument("--prior-images", type=int, default=8)
    p.add_argument("--noise-draws", type=int, default=4)
    p.add_argument("--finetune-steps", default="10,20,40,80", help="fine-tune checkpoints (Adam steps)")
    p.add_argument("--finetune-lr", type=float, default=3e-3)
    p.add_argument("--two-threshold", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-demo", action="store_true",
                   help="also write the extracted concepts to demo/concept_neurons/ (shipped demo files)")


class Bench:
    def __init__(self, args):
        cr.bootstrap()
        self.args = args
        self.CN = cr.pack_module("nodes.concept_neurons")
        self.rt = cr.pack_module("nodes._runtime")
        demo = cr.pack_module("nodes.demo")
        from .world import evaluate as E, judge as J, scenes as S
        self.S, self.J = S, J
        self.cfg = E.world_config_of(Path(demo.demo_weights_path("digits_unet")))
        self.judge = J.get_judge(self.cfg)
        with torch.inference_mode():
            self.model, self.clip, self.vae, _ = demo.build_demo_model(args.model)
        self.guard = self.rt.ModelGuard.of(self.model)
        self.rng = np.random.default_rng(args.seed)

    # -- sampling and judging ------------------------------------------------------------------
    def sample(self, model, prompt: str, n: int, seed: int) -> np.ndarray:
        import nodes as comfy_nodes
        with torch.inference_mode():
            (pos,) = comfy_nodes.CLIPTextEncode().encode(self.clip, prompt)
            (neg,) = comfy_nodes.CLIPTextEncode().encode(self.clip, "")
            (lat,) = comfy_nodes.EmptyLatentImage().generate(64, 64, n)
            (out,) = comfy_nodes.KSampler().sample(model, seed, 20, 3.0, "euler", "normal", pos, neg, lat)
            (img,) = comfy_nodes.VAEDecode().decode(self.vae, out)
        return (img.numpy() * 255).round().astype(np.uint8)

    def sim(self, image, subject: int) -> float:
        return self.J.subject_similarity(image, subject, self.cfg, judge=self.judge)

    def fidelity(self, images, subject: int) -> float:
        return float(np.mean([self.sim(im, subject) for im in images]))

    # -- subjects ----------------------------------------------------------------------------------
    def pick_subject(self, cls: int, before: np.ndarray) -> tuple:
        pool = [int(i) for i in self.S.heldout_indices(self.cfg, cls)]
        fids = {i: self.fidelity(before, i) for i in pool}
        med = float(np.median(list(fids.values())))
        low = sorted(i for i in pool if fids[i] < med)
        subject = int(self.rng.choice(low))
        return subject, fids[subject], med

    def references(self, subject: int) -> torch.Tensor:
        cols = list(self.cfg.colour_names)
        lo, hi = self.cfg.scale_range
        imgs = []
        for i in range(self.args.refs):
            sc = self.S.render_subject(self.cfg, subject, colour=cols[i % len(cols)],
                                       position=self.S.POSITIONS[i % 3],
                                       scale=int(self.rng.integers(lo, hi + 1)), rng=self.rng)
            imgs.append(sc.image)
        return torch.from_numpy(np.stack(imgs)).float() / 255.0

    def settings(self):
        a = self.args
        return self.CN.ExtractSettings(procedure=a.procedure, budget_fraction=a.budget, iterations=a.iterations,
                                       prior_weight=a.prior_weight, prior_images=a.prior_images,
                                       noise_draws=a.noise_draws, seed=a.seed)

    # -- the fine-tune baseline --------------------------------------------------------------------
    def finetune(self, refs: torch.Tensor, prompt: str, prior: torch.Tensor, subject: int, seed: int) -> dict:
        CN = self.CN
        s = self.settings()
        layers = CN.model_layers(self.model)
        base = self.model.model
        with torch.inference_mode():
            cond, pooled = CN.encode_text(self.clip, prompt)
            lat = CN.images_to_latents(self.vae, refs, base)
        self.rt.load_for_compute(self.model)
        loss = CN.ConceptLoss(self.model, lat, prior, cond, pooled, s, layers)
        names = sorted(layers)
        with torch.inference_mode(False):
            deltas = {n: torch.zeros(layers[n]["shape"]) for n in names}
            opt_state = {n: (torch.zeros_like(d), torch.zeros_like(d)) for n, d in deltas.items()}
        checkpoints = sorted(int(x) for x in self.args.finetune_steps.split(","))
        lr, b1, b2 = self.args.finetune_lr, 0.9, 0.999
        trace, t_train, step = [], 0.0, 0
        for target in checkpoints:
            t0 = time.perf_counter()
            with torch.inference_mode(False):
                while step < target:
                    step += 1
                    self.rt.load_for_compute(self.model)
                    _, g = loss.gradient(deltas, "add")
                    for n in names:  # Adam, bias-corrected
                        m, v = opt_state[n]
                        m.mul_(b1).add_(g[n], alpha=1 - b1)
                        v.mul_(b2).addcmul_(g[n], g[n], value=1 - b2)
                        mh, vh = m / (1 - b1 ** step), v / (1 - b2 ** step)
                        deltas[n] -= lr * mh / (vh.sqrt() + 1e-8)
            t_train += time.perf_counter() - t0
            tuned = self.rt.clone_model(self.model)
            tuned.add_patches({self.rt.diffusion_key(n): (deltas[n].clone(),) for n in names}, 1.0)
            fid = self.fidelity(self.sample(tuned, prompt, self.args.images, seed), subject)
            trace.append({"steps": step, "train_s": round(t_train, 2), "fidelity": round(fid, 4)})
        best = max(t["fidelity"] for t in trace)
        reach = next(t for t in trace if t["fidelity"] >= 0.95 * best)
        return {"trace": trace, "fidelity": best, "time_to_fidelity_s": reach["train_s"],
                "steps_to_fidelity": reach["steps"]}

    # -- prompt fidelity ----------------------------------------------------------------------------
    def prompt_fidelity(self, model, cls: int, seed: int) -> float:
        cols = list(self.cfg.colour_names)
        ok = []
        for k, pos in enumerate(self.S.POSITIONS):
            colour = cols[(k * 2 + cls) % len(cols)]
            caption = self.S.class_prompt(cls, colour, pos)
            for img in self.sample(model, caption, 3, seed + k):
                r = self.J.check_scene(img, caption, self.judge, self.cfg)
                d = r["digits"][0]
                ok.append(bool(d["found"] and d["colour_ok"]))
        return float(np.mean(ok))

    def two_subjects(self, model, subjects: list, seed: int) -> float:
        S = self.S
        (c1, s1), (c2, s2) = subjects
        caption = f"{S.digit_phrase(c1, None, 'left')} and {S.digit_phrase(c2, None, 'right')}"
        wins = []
        for img in self.sample(model, caption, self.args.images, seed):
            dets = self.J.find_digits(img, self.judge, self.cfg)
            left = [d for d in dets if d.position == "left" and d.cls == c1]
            right = [d for d in dets if d.position == "right" and d.cls == c2]
            good = bool(left and right
                        and max(self.sim(d, s1) for d in left) >= self.args.two_threshold
                        and max(self.sim(d, s2) for d in right) >= self.args.two_threshold)
            wins.append(good)
        return float(np.mean(wins)), caption


def sd15_layer_shapes() -> list:
    """SD1.5's 32 cross-attention K/V weights (16 transformer blocks, context 768): 19.2 M weights."""
    # input blocks 1, 2 (320), 4, 5 (640), 7, 8 (1280); middle (1280); output 3-5 (1280), 6-8 (640), 9-11 (320)
    blocks = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    return [(w, 768) for w in blocks for _ in ("k", "v")]


def sd15_projection(b, fraction: float) -> int:
    """Bytes of an SD1.5 concept at this shut fraction: the same codec run on SD1.5-shaped layers
    with the fraction's count of uniformly random indices per layer (gaps are what the codec sees)."""
    K = cr.pack_module("kernels.concept_neurons")
    g = torch.Generator().manual_seed(0)
    total = 0
    shapes = sd15_layer_shapes()
    assert sum(r * c for r, c in shapes) == 19_169_280  # the 19.2 M
    for r, c in shapes:
        n = r * c
        k = max(1, int(round(n * fraction)))
        idx = torch.sort(torch.randperm(n, generator=g)[:k]).values
        total += int(K.encode_indices(idx).numel())
    return total


def run(args) -> dict:
    b = Bench(args)
    CN, S = b.CN, b.S
    classes = [int(c) for c in args.classes.split(",")]
    seed_eval = 1000 + args.seed
    out = {"comfyui": cr.comfy_version(),
           "model": {"digits_unet": "digits_unet (SD1.x architecture, v-prediction)",
                     "digits_dit": "digits_dit (SD3 MMDiT, flow; text-stream K/V rows)"}[args.model],
           "procedure": args.procedure, "budget_fraction": args.budget, "iterations": args.iterations,
           "prior_weight": args.prior_weight, "images_per_measurement": args.images, "subjects": []}
    concepts, subjects = [], []
    tmp = Path(tempfile.mkdtemp(prefix="conceptlab-cn-bench-"))
    for cls in classes:
        prompt = S.class_prompt(cls)
        before_imgs = b.sample(b.model, prompt, args.images, seed_eval)
        subject, fid_before, med = b.pick_subject(cls, before_imgs)
        refs = b.references(subject)
        # prior images: generated once (stock sampler, no grad), shared by extraction and fine-tune,
        # so neither one's time includes them
        with torch.inference_mode():
            prior = b.model.model.process_latent_in(CN.sample_prior(
                b.model, b.clip, prompt, args.prior_images, (8, 8), 20, 3.0, args.seed).float())
        t0 = time.perf_counter()
        with torch.inference_mode():
            concept = CN.extract(b.model, b.clip, b.vae, refs, prompt, b.settings(), prior_latents=prior)
        t_extract = time.perf_counter() - t0
        b.guard.check("extract")
        with torch.inference_mode():
            patched = CN.apply_concept(b.model, concept, 1.0)
        after_imgs = b.sample(patched, prompt, args.images, seed_eval)
        fid_after = b.fidelity(after_imgs, subject)
        ft = b.finetune(refs, prompt, prior, subject, seed_eval)
        pf_before = b.prompt_fidelity(b.model, cls, seed_eval + 50)
        pf_after = b.prompt_fidelity(patched, cls, seed_eval + 50)
        path = tmp / f"{S.DIGIT_WORDS[cls]}.safetensors"
        nbytes = CN.write_file(concept, str(path))
        index_bytes = sum(int(x.numel()) for x in concept.encoded().values())
        if args.save_demo:
            dest = ROOT / "demo" / "concept_neurons" / f"{args.model}_{S.DIGIT_WORDS[cls]}_subject.safetensors"
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest.unlink()
            CN.write_file(concept, str(dest))
        rec = {"class": S.DIGIT_WORDS[cls], "subject_index": subject, "median_before_over_heldout": round(med, 4),
               "fidelity_before": round(fid_before, 4), "fidelity_after": round(fid_after, 4),
               "finetune": ft, "shut": concept.count, "candidates": concept.candidates,
               "extract_s": round(t_extract, 2), "extract_stats": {k: v for k, v in concept.stats.items() if k != "losses"},
               "loss_trace": concept.stats.get("losses"),
               "prompt_fidelity_before": round(pf_before, 4), "prompt_fidelity_after": round(pf_after, 4),
               "file_bytes": nbytes, "index_bytes": index_bytes}
        out["subjects"].append(rec)
        concepts.append(concept)
        subjects.append((cls, subject))
        print(f"[concept-neurons] {rec['class']} subject {subject}: before {fid_before:.3f} after {fid_after:.3f} "
              f"finetune {ft['fidelity']:.3f} extract {t_extract:.1f}s finetune-to-fidelity {ft['time_to_fidelity_s']:.1f}s",
              flush=True)
    subs = out["subjects"]
    mean = lambda k: float(np.mean([s[k] for s in subs]))  # noqa: E731
    shut_fraction = sum(s["shut"] for s in subs) / sum(s["candidates"] for s in subs)
    bpi = sum(s["index_bytes"] for s in subs) / max(sum(s["shut"] for s in subs), 1)
    out.update({
        "n_subjects": len(subs),
        "subject_fidelity_before": round(mean("fidelity_before"), 4),
        "subject_fidelity_after": round(mean("fidelity_after"), 4),
        "subject_fidelity_finetune_baseline": round(float(np.mean([s["finetune"]["fidelity"] for s in subs])), 4),
        "prompt_fidelity": round(mean("prompt_fidelity_after"), 4),
        "prompt_fidelity_without_concept": round(mean("prompt_fidelity_before"), 4),
        "shut_fraction": round(shut_fraction, 6),
        "file_bytes": int(round(mean("file_bytes"))),
        "bytes_per_index": round(bpi, 3),
        "projected_sd15_bytes_at_measured_bytes_per_index": int(round(bpi * shut_fraction * SD15_KV_WEIGHTS)),
        "projected_sd15_bytes": sd15_projection(b, shut_fraction),
        "extract_time_ratio_vs_finetune": round(
            sum(s["extract_s"] for s in subs) / max(sum(s["finetune"]["time_to_fidelity_s"] for s in subs), 1e-9), 3),
    })
    if len(concepts) >= 2:
        merged, overlap = CN.combine(concepts[:2])
        with torch.inference_mode():
            both = CN.apply_concept(b.model, merged, 1.0)
        rate, caption = b.two_subjects(both, subjects[:2], seed_eval + 7)
        rate0, _ = b.two_subjects(b.model, subjects[:2], seed_eval + 7)
        out.update({"two_subject_success": round(rate, 4), "two_subject_success_without_concepts": round(rate0, 4),
                    "two_subject_caption": caption, "two_subject_threshold": args.two_threshold,
                    "overlap": overlap})
    import comfy.model_management as mm
    mm.load_models_gpu([b.model])
    b.guard.check("benchmark (end)")
    out["incoming_model_bit_identical"] = True
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out

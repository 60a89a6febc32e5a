"""``python -m benchmarks families --json PATH``: every capability's mechanics on every family.

For each family of ``benchmarks/tiny`` (a tiny model built from the ComfyUI's own config and model
classes, seeded weights) it runs the pack's nodes in-process and writes
``{family: {capability: true | false | "unsupported: reason"}}``:

- ``saliency``: KSampler with Saliency Capture (ConceptAttention and raw cross-attention, CFG,
  batch 2) gives latents bit-identical to KSampler without it, and maps were recorded (finite,
  not constant);
- ``seed_search``: Seed Search's objective falls (its best iterate below its first);
- ``concept_neurons``: Extract lowers the concept-implanting loss, and Apply patches only
  candidate weights (text-only K/V), only at the concept's indices; a family with no text-only
  K/V weights reports why it is unsupported (the node refuses it the same way);
- ``model_unchanged``: the incoming MODEL is bit-identical after every node (``ModelGuard``).

A check that raises reports ``false`` and the error under ``errors``. Needs a ComfyUI that has the
families' classes (0.33).
"""
from __future__ import annotations

import time
import traceback

import numpy as np
import torch

from . import comfy_runtime as cr

CAPABILITIES = ("saliency", "seed_search", "concept_neurons", "model_unchanged")


def add_arguments(p) -> None:
    p.add_argument("--json", help="write {family: {capability: result}} to this path")
    p.add_argument("--family", action="append", help="only these families (repeatable)")


class Checks:
    """The capability checks on one tiny model (shared with the family tests)."""

    def __init__(self, tiny):
        import importlib
        self.t = tiny
        pack = cr.bootstrap()
        self.rt = cr.pack_module("nodes._runtime")
        self.nodes = cr.pack_nodes()
        self.sal = importlib.import_module(f"{pack.__name__}.nodes.saliency")
        self.cn = importlib.import_module(f"{pack.__name__}.nodes.concept_neurons")
        self.guard = self.rt.ModelGuard.of(tiny.model)

    # -- helpers ------------------------------------------------------------------------------
    def encode(self, text: str):
        import nodes as N
        with torch.inference_mode():
            (cond,) = N.CLIPTextEncode().encode(self.t.clip, text)
        return cond

    def latent(self, batch: int = 2):
        import nodes as N
        with torch.inference_mode():
            (lat,) = N.EmptyLatentImage().generate(self.t.width, self.t.height, batch)
        channels = self.rt.latent_channels(self.t.model.model)
        # EmptyLatentImage makes 4 channels; ComfyUI's samplers fix that for the model's latent
        # format (fix_empty_latent_channels), Seed Search does the same
        if channels and lat["samples"].shape[1] != channels:
            shape = list(lat["samples"].shape)
            shape[1] = channels
            lat = {"samples": torch.zeros(shape)}
        return lat

    def sample(self, model, steps: int = 3, cfg: float = 2.0, seed: int = 7):
        import nodes as N
        pos, neg = self.encode("a red seven on the left"), self.encode("")
        with torch.inference_mode():
            (out,) = N.KSampler().sample(model, seed, steps, cfg, "euler", "simple", pos, neg, self.latent())
        return out["samples"]

    def images(self, n: int = 3) -> torch.Tensor:
        from .world import scenes as S
        cfg = S.WorldConfig()
        idx = S.heldout_indices(cfg, 8)[:n]
        ims = np.stack([S.render_subject(cfg, int(i)).image for i in idx])
        ims = torch.from_numpy(ims).float() / 255.0
        if (self.t.width, self.t.height) != (64, 64):
            ims = torch.nn.functional.interpolate(ims.movedim(-1, 1), size=(self.t.height, self.t.width),
                                                  mode="bilinear").movedim(1, -1)
        return ims

    # -- the checks -----------------------------------------------------------------------------
    def saliency(self):
        plain = self.sample(self.t.model)
        cap = self.nodes["ConceptLabSaliencyCapture"]
        for method in ("conceptattention", "crossattention"):
            with torch.inference_mode():
                patched, rec = cap.execute(self.t.model, self.t.clip, "a red seven on the left",
                                           "seven, left", method, "all", 0.0, 1.0)
            got = self.sample(patched)
            if not torch.equal(got, plain):
                return False
            maps = rec.result()
            if maps is None or not torch.isfinite(maps).all() or float(maps.std()) == 0.0:
                return False
        return True

    def seed_search(self):
        ss = cr.pack_module("nodes.seed_search")
        pos, neg = self.encode("an eight"), self.encode("")
        with torch.inference_mode():
            out = ss.search_noise(self.t.model, self.t.vae, pos, neg, self.latent(1), self.images(), seed=3, cfg=2.0,
                                  iterations=4, search_steps=2, learning_rate=0.3, lr_drop_after=100,
                                  norm_regulariser=True, norm_weight=0.1, semantic_steps=1, semantic_weight=0.0,
                                  appearance_weight=1.0, appearance_target="mean")
        curve = out.result.curve
        return bool(len(curve) > 1 and min(curve[1:]) < curve[0])

    def concept_neurons(self):
        cn = self.cn
        settings = cn.ExtractSettings(procedure="iterative", budget_fraction=0.05, iterations=3,
                                      prior_images=0, prior_steps=2, noise_draws=2)
        try:
            with torch.inference_mode():
                concept = cn.extract(self.t.model, self.t.clip, self.t.vae, self.images(), "an eight", settings)
        except self.rt.ConceptLabError as e:
            if "no text-only" in str(e) or "does not support" in str(e):
                return f"unsupported: {e.problem}"
            raise
        st = concept.stats
        if not (st.get("loss_start") is not None and st["loss_end"] < st["loss_start"]):
            return False
        apply = self.nodes["ConceptLabConceptNeuronsApply"]()
        with torch.inference_mode():
            (patched,) = apply.apply(self.t.model, concept, 1.0)
        candidates = set(cn.model_layers(self.t.model))
        touched = {k.split("diffusion_model.", 1)[-1] for k in patched.patches}
        return bool(touched) and touched <= candidates and touched <= set(concept.indices)

    def model_unchanged(self):
        return not self.guard.changes()


def run_family(family: str) -> tuple[dict, dict]:
    from . import tiny
    try:
        t = tiny.build(family)
    except tiny.Unavailable as e:
        return {c: f"unsupported: {e}" for c in CAPABILITIES}, {}
    checks = Checks(t)
    out, errors = {}, {}
    for cap in CAPABILITIES:
        t0 = time.time()
        try:
            out[cap] = getattr(checks, cap)()
        except Exception as e:  # noqa: BLE001  (a failed check is a result)
            out[cap] = False
            errors[cap] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        print(f"[families] {family:<12} {cap:<16} {out[cap]!s:<40} {time.time() - t0:5.1f}s", flush=True)
    return out, errors


def run(args) -> dict:
    cr.bootstrap()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from . import tiny
    known = tiny.families()
    chosen = args.family or list(known)
    res = {"comfyui": cr.comfy_version(), "families": {}, "what": {}, "errors": {}}
    for fam in chosen:
        out, errors = run_family(fam)
        res["families"][fam] = out
        res["what"][fam] = known.get(fam, "")
        if errors:
            res["errors"][fam] = errors
    return res

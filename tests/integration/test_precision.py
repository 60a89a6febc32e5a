"""Every node on models loaded in every weight precision: fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2.

The models are state dicts that ComfyUI's own model detection recognises (a narrow SD1.x UNet and
a tiny Flux.1-dev, benchmarks/tiny/loading.py), loaded through ComfyUI's own loading path as
UNETLoader's ``weight_dtype`` does. The
weights are stored in the precision; on a CPU ComfyUI computes with manual-cast ops in fp32.

For each family and precision: Concept Neurons Extract lowers its loss and Apply zeroes exactly
the concept's K/V weights; Saliency Capture leaves the sampled image bit-identical and records
finite, non-empty maps; Seed Search lowers its objective with finite outputs and Seed Rank returns
a seed; the incoming MODEL is bit-identical after each node."""
import importlib

import numpy as np
import pytest
import torch

from conftest import skip_version, subject_images

PRECISIONS = ["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]
FAMILIES = ["sd15", "flux"]
PROMPT = "a red seven on the left and a blue two on the right"


@pytest.fixture(scope="module")
def L(lab):
    return importlib.import_module("benchmarks.tiny.loading")


@pytest.fixture(scope="module")
def sources(lab, L):
    """Per family, built once: (state dict, CLIP, VAE), or the reason this ComfyUI lacks it."""
    tiny = importlib.import_module("benchmarks.tiny")
    out = {}
    with torch.inference_mode():
        _, demo_clip, demo_vae, _ = lab.demo.build_demo_model("digits_unet")
    out["sd15"] = (L.sd15_state_dict(), L.clip_768(), demo_vae)
    try:
        out["flux"] = (L.flux_state_dict(), demo_clip, tiny.vae(16))
    except tiny.Unavailable as e:
        out["flux"] = str(e)
    return out


@pytest.fixture(scope="module")
def loaded(L, sources):
    """(family, precision) -> (MODEL, CLIP, VAE), each loaded once through ComfyUI's loader."""
    cache = {}

    def get(family, precision):
        src = sources[family]
        if isinstance(src, str):
            skip_version(f"{family} needs Flux classes, which this ComfyUI lacks ({src})")
        if (family, precision) not in cache:
            try:
                model = L.load(src[0], precision)
            except ValueError as e:   # 0.3.75's Flux detection fixes 24 heads (3072 wide): no tiny Flux
                if family != "flux" or "num_heads" not in str(e):
                    raise
                skip_version(f"this ComfyUI's Flux detection cannot load a tiny Flux ({e}); 0.33's can")
            assert L.weight_dtypes(model) == {L.PRECISIONS[precision]}
            cache[family, precision] = (model, src[1], src[2])
        return cache[family, precision]
    return get


params = pytest.mark.parametrize("family,precision", [(f, p) for f in FAMILIES for p in PRECISIONS])


def _unload():
    import comfy.model_management as mm
    mm.unload_all_models()


@params
def test_loaded_through_comfyui_detection(lab, L, loaded, family, precision):
    model, _, _ = loaded(family, precision)
    assert lab.runtime.model_family(model) == {"sd15": "sd1", "flux": "flux"}[family]
    assert L.weight_dtypes(model) == {L.PRECISIONS[precision]}


def _rerounds_fp8_patches(lab) -> bool:
    """Whether this ComfyUI moves unpatched entries of a patched fp8 weight (0.3.75 does; 0.33 not)."""
    import re
    m = re.match(r"(\d+)\.(\d+)", str(lab.version))
    return m is not None and (int(m.group(1)), int(m.group(2))) < (0, 33)


@params
def test_concept_neurons_extract_and_apply(lab, cn, loaded, family, precision):
    model, clip, vae = loaded(family, precision)
    guard = lab.runtime.ModelGuard.of(model)
    settings = cn.ExtractSettings(procedure="iterative", budget_fraction=0.002, iterations=2, prior_images=0,
                                  prior_steps=2, noise_draws=1)
    with torch.inference_mode():
        c = cn.extract(model, clip, vae, subject_images(), "a three", settings)
    guard.check(f"Concept Neurons Extract ({precision})")
    assert c.count > 0 and np.isfinite(c.stats["loss_start"]) and np.isfinite(c.stats["loss_end"])
    assert c.stats["loss_end"] < c.stats["loss_start"], c.stats["losses"]

    # Apply at strength 1: exactly the concept's K/V weights become 0, every other weight is unchanged
    import comfy.model_management as mm

    def weights(m):   # as ComfyUI loads a model to sample: under inference mode
        with torch.inference_mode():
            mm.load_models_gpu([m])
        return {n: p.detach().to("cpu", copy=True) for n, p in m.model.diffusion_model.named_parameters()}
    before = weights(model)
    with torch.inference_mode():
        (full,) = cn.ConceptLabConceptNeuronsApply.execute(model, c, 1.0)
    guard.check(f"Concept Neurons Apply ({precision})")
    after = weights(full)
    layers = sorted(n for n in c.layers if c.indices[n].numel())
    changed = sorted(n for n in before if not torch.equal(before[n].view(torch.uint8), after[n].view(torch.uint8)))
    assert changed == layers, changed
    for n in layers:
        assert after[n].dtype == before[n].dtype
        w0, w = before[n].reshape(-1).float(), after[n].reshape(-1).float()
        idx = c.indices[n]
        assert bool((w[idx] == 0).all()) and bool((w0[idx] != 0).any())
        keep = torch.ones_like(w, dtype=torch.bool)
        keep[idx] = False
        if precision.startswith("fp8") and _rerounds_fp8_patches(lab):
            # ComfyUI 0.3.x before 0.33 re-rounds a whole patched fp8 weight stochastically
            # (comfy/float.py): the other weights may move, at most to a neighbouring fp8 value
            e5m2 = precision == "fp8_e5m2"     # (mantissa bits, the smallest subnormal step)
            step = (w0[keep].abs() * 2.0 ** -(2 if e5m2 else 3)).clamp_min(2.0 ** (-16 if e5m2 else -9))
            assert bool(((w[keep] - w0[keep]).abs() <= step).all())
        else:
            assert torch.equal(w[keep], w0[keep])
    _unload()
    guard.check(f"Concept Neurons Apply ({precision}, after loading the clone)")


def _sample(lab, model, clip, family, steps=3, seed=7):
    N = lab.nodes
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, PROMPT)
        (neg,) = N.CLIPTextEncode().encode(clip, "")
        lat = {"samples": torch.zeros(2, 16 if family == "flux" else 4, 8, 8)}
        (out,) = N.KSampler().sample(model, seed, steps, 3.0, "euler", "normal", pos, neg, lat)
    return out["samples"]


@params
def test_saliency_capture_bit_identical(lab, sal, loaded, family, precision):
    model, clip, _ = loaded(family, precision)
    guard = lab.runtime.ModelGuard.of(model)
    plain = _sample(lab, model, clip, family)
    with torch.inference_mode():
        patched, rec = sal.ConceptLabSaliencyCapture.execute(model, clip, PROMPT, "seven, two", "auto", "auto",
                                                               0.0, 1.0)
    img = _sample(lab, patched, clip, family)
    guard.check(f"Saliency Capture ({precision}) + sampling")
    assert torch.isfinite(plain).all() and torch.equal(plain, img)
    maps = rec.result()
    assert rec.steps == 3 and maps.shape[:2] == (2, 2) and maps.numel() > 0
    assert torch.isfinite(maps).all() and float(maps.abs().sum()) > 0


def _refs(n=2):
    from benchmarks.world import scenes as S
    cfg = S.WorldConfig()
    idx = S.heldout_indices(cfg, 8)[:n]
    return torch.from_numpy(np.stack([S.render_subject(cfg, int(i)).image for i in idx])).float() / 255.0


@params
def test_seed_search_and_rank(lab, ss, loaded, family, precision):
    model, clip, vae = loaded(family, precision)
    guard = lab.runtime.ModelGuard.of(model)
    N = lab.nodes
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, "an eight")
        (neg,) = N.CLIPTextEncode().encode(clip, "")
        (lat,) = N.EmptyLatentImage().generate(64, 64, 1)
        noise, noise_latent, plot, res, *_ = ss.search_noise(
            model, vae, pos, neg, lat, _refs(), seed=7, cfg=3.0, iterations=3, search_steps=2, learning_rate=0.1,
            lr_drop_after=10, norm_regulariser=True, norm_weight=1.0, semantic_steps=1, semantic_weight=10.0,
            appearance_weight=1.0)
    guard.check(f"Seed Search ({precision})")
    assert all(np.isfinite(res.curve)) and res.curve[-1] < res.curve[0], res.curve
    assert torch.isfinite(noise_latent["samples"]).all() and torch.isfinite(plot).all()
    with torch.inference_mode():
        best, text, _ = ss.rank_seeds(model, vae, pos, neg, lat, _refs(), seed=100, candidates=2,
                                      cfg=3.0, batch_size=2, semantic_weight=10.0, appearance_weight=1.0)
    guard.check(f"Seed Rank ({precision})")
    assert best in (100, 101) and f"seed {best}" in text
    _unload()

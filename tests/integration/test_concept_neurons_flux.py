"""Concept neurons on a Flux model: ComfyUI's own Flux classes (tiny, seeded random weights, the
guidance embedding and pooled text vector of Flux.1-dev, 16-channel latents, a flow model) with the
demo CLIP's conditioning. Extraction lowers the concept-implanting loss, Apply touches only the K/V
rows of the double-stream blocks' text QKV, the incoming MODEL stays bit-identical, files round-trip,
and concepts / VAEs of another family are refused clearly. Skips, saying why, where the running ComfyUI cannot build the tiny Flux."""
import copy

import pytest
import torch

from conftest import check_apply, check_cross_family, check_save_load, interrupt_at_progress, tiny_flux
from conftest import extract_concept as _extract, extract_settings as _settings, subject_images as _images

TXT_QKV = "txt_attn.qkv.weight"


@pytest.fixture(scope="module")
def parts(lab):
    """(tiny Flux MODEL, demo CLIP, demo 4-channel VAE, a 16-channel VAE)."""
    model = tiny_flux(lab)  # skips on a ComfyUI without Flux
    with torch.inference_mode():
        _, clip, vae4, _ = lab.demo.build_demo_model("digits_unet")
    return model, clip, vae4, _vae16(lab)


def _vae16(lab):
    """A real ComfyUI VAE (the demo VAE's tiny AutoencoderKL) with 16 latent channels, as Flux
    needs; seeded random weights (the extraction only needs a fixed image -> latent map)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = copy.deepcopy(lab.demo.VAE_PARAMS)
    params["embed_dim"] = params["ddconfig"]["z_channels"] = 16
    with torch.inference_mode():  # as the demo VAE is made (nodes/demo.py build_text_and_vae)
        probe = AutoencoderKL(**params)
        lab.demo._seeded_init_(probe, 3)
        return comfy.sd.VAE(sd=probe.state_dict(), config={"params": params})


@pytest.fixture(scope="module")
def concept(cn, parts):
    model, clip, _, vae16 = parts
    return _extract(cn, model, clip, vae16)


def _unload():
    import comfy.model_management as mm
    mm.unload_all_models()


def _loss(cn, lab, model, clip, vae):
    """The concept-implanting loss of ``model`` on the reference images, with the extraction's
    settings and fixed noise draws (the objective the concept fixture minimised)."""
    with torch.inference_mode():
        cond, pooled = cn.encode_text(clip, "a three")
        lat = cn.images_to_latents(vae, _images(), model.model)
    lab.runtime.load_for_compute(model)
    loss = cn.ConceptLoss(model, lat, lat[:0], cond, pooled, _settings(cn), cn.model_layers(model))
    with torch.no_grad():
        return float(loss.loss_on(*loss.batch()))


def test_flux_conds_include_guidance_and_pooled_vector(cn, parts):
    model, clip, _, _ = parts
    with torch.inference_mode():
        cond, pooled = cn.encode_text(clip, "a three")
        kw = cn._model_kwargs(model.model, cond, pooled, 3, (8, 8))
    assert set(kw) >= {"c_crossattn", "y", "guidance"}
    assert kw["y"].shape == (3, 64) and kw["guidance"].shape == (3,) and float(kw["guidance"][0]) == 3.5
    assert cn.latent_channels(model.model) == 16 and cn.guidance_distilled(model.model, cond, pooled, (8, 8))
    with torch.inference_mode():  # the test VAE maps the subject to 16-channel latents that depend on it
        lat = cn.images_to_latents(parts[3], _images(), model.model)
        blank = cn.images_to_latents(parts[3], torch.zeros(3, 64, 64, 3), model.model)
    assert lat.shape == (3, 16, 8, 8) and (lat - blank).abs().max() > 0.1 and lat[0].std() > 0.05


def test_flux_extract_apply_touches_only_text_kv_and_lowers_the_loss(lab, cn, parts, concept):
    model, clip, _, vae16 = parts
    c = concept
    guard = lab.runtime.ModelGuard.of(model)
    params = dict(model.model.diffusion_model.named_parameters())
    layers = sorted(c.layers)
    assert c.family == "flux" and layers == [f"double_blocks.{i}.{TXT_QKV}" for i in range(2)]
    assert not any("single_blocks" in n for n in c.layers)  # fused text+image linear1: not a candidate
    assert c.candidates == 2 * 192 * 64 * 2 // 3 and c.count == round(c.candidates * 0.05)
    for n, idx in c.indices.items():  # K and V rows (the 2nd and 3rd thirds) only
        rows, cols = c.layers[n]["shape"]
        assert bool((idx // cols >= rows // 3).all())
    assert c.stats["loss_end"] < c.stats["loss_start"] and all(p is params[n] for n, p in model.model.diffusion_model.named_parameters())
    guard.check("flux extract")

    full, _ = check_apply(lab, cn, model, c)

    # The shut set lowers the concept-implanting loss, and far more than as many random K/V weights
    # (the random tiny model's text path moves the loss little in absolute terms: 1.0691 -> 1.0620 here).
    rand = copy.deepcopy(c)
    g = torch.Generator().manual_seed(5)
    for n, idx in rand.indices.items():
        rows, cols = rand.layers[n]["shape"]
        kv = torch.arange(rows // 3 * cols, rows * cols)
        rand.indices[n] = torch.sort(kv[torch.randperm(kv.numel(), generator=g)[:idx.numel()]]).values
    with torch.inference_mode():
        random_model = cn.apply_concept(model, rand, 1.0)
    base_loss = _loss(cn, lab, model, clip, vae16)
    shut_loss = _loss(cn, lab, full, clip, vae16)
    random_loss = _loss(cn, lab, random_model, clip, vae16)
    assert shut_loss < base_loss and base_loss - shut_loss > 10 * abs(base_loss - random_loss), \
        (base_loss, shut_loss, random_loss)
    _unload()
    guard.check("flux loss evaluation")


def test_flux_accumulated_procedure(lab, cn, parts):
    model, clip, _, vae16 = parts
    guard = lab.runtime.ModelGuard.of(model)
    c = _extract(cn, model, clip, vae16, procedure="accumulated", iterations=3, prior_images=1, noise_draws=1)
    assert c.family == "flux" and c.count == round(c.candidates * 0.05)
    assert c.stats["prior_images"] == 1  # the prior image was sampled by the Flux model itself (KSampler)
    assert c.stats["loss_end"] < c.stats["loss_start"]
    guard.check("flux accumulated extract")


def test_flux_save_load_combine_info(cn, concept, tmp_path, monkeypatch):
    back, info = check_save_load(cn, concept, tmp_path, monkeypatch, "flux/three")
    assert back.family == "flux" and "(class 'a three', Flux.1)" in info
    merged, overlap = cn.ConceptLabConceptNeuronsCombine.execute(concept, back)
    assert merged.count == concept.count and "Jaccard 1.000" in overlap
    assert "Flux" in cn.ConceptLabConceptNeuronsInfo.execute(merged).result[0]


def test_cross_family_concepts_and_foreign_vae_are_refused(lab, cn, parts, concept):
    model, clip, _, _ = parts
    check_cross_family(lab, cn, model, clip, concept, "Flux.1")


def test_cancel_mid_flux_extraction_leaves_no_patch(lab, cn, parts):
    model, clip, _, vae16 = parts
    guard = lab.runtime.ModelGuard.of(model)
    with interrupt_at_progress(lab, 3):       # after the first gradient evaluation
        _extract(cn, model, clip, vae16, iterations=10, prior_images=0, noise_draws=1)
    assert not model.patches
    guard.check("cancelled flux extract")

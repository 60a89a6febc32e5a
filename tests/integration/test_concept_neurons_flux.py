"""Concept neurons on a Flux model: ComfyUI's own Flux classes (tiny, seeded random weights, the
guidance embedding and pooled text vector of Flux.1-dev, 16-channel latents, a flow model) with the
demo CLIP's conditioning. Extraction lowers the concept-implanting loss, Apply touches only the K/V
rows of the double-stream blocks' text QKV, the incoming MODEL stays bit-identical, files round-trip,
and concepts / VAEs of another family are refused clearly. Skips on ComfyUI without Flux (2024)."""
import copy

import numpy as np
import pytest
import torch

from conftest import interrupt_at_progress, tiny_flux

TXT_QKV = "txt_attn.qkv.weight"


@pytest.fixture(scope="module")
def cn(lab):
    import importlib
    return importlib.import_module(f"{lab.pack.__name__}.nodes.concept_neurons")


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


def _images(n=3):
    """The subject: one held-out handwritten three of the digits world, in n colours (64 x 64)."""
    from benchmarks.world import scenes as S
    cfg = S.WorldConfig()
    subject = int(S.heldout_indices(cfg, 3)[0])
    names = cfg.colour_names
    imgs = [S.render_subject(cfg, subject, colour=names[i % len(names)]).image for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).float() / 255.0


def _settings(cn, **kw):
    base = dict(procedure="iterative", budget_fraction=0.05, iterations=3, prior_images=0, prior_steps=2,
                noise_draws=2)
    base.update(kw)
    return cn.ExtractSettings(**base)


def _extract(cn, model, clip, vae, **kw):
    with torch.inference_mode():
        return cn.extract(model, clip, vae, _images(), "a three", _settings(cn, **kw))


@pytest.fixture(scope="module")
def concept(cn, parts):
    model, clip, _, vae16 = parts
    return _extract(cn, model, clip, vae16)


def _unload():
    import comfy.model_management as mm
    mm.unload_all_models()


def _weights(model):
    """The diffusion-model weights a MODEL computes with (its own patches applied)."""
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    return {n: p.detach().clone() for n, p in model.model.diffusion_model.named_parameters()}


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

    before = _weights(model)
    with torch.inference_mode():
        full = cn.ConceptLabConceptNeuronsApply().apply(model, c, 1.0)[0]
        half = cn.ConceptLabConceptNeuronsApply().apply(model, c, 0.5)[0]
    guard.check("flux apply")
    for patched, factor in ((full, 0.0), (half, 0.5)):
        after = _weights(patched)
        changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
        assert changed == layers, changed
        for n in layers:
            w0, w = before[n].reshape(-1), after[n].reshape(-1)
            idx = c.indices[n]
            assert torch.allclose(w[idx], factor * w0[idx])
            keep = torch.ones_like(w, dtype=torch.bool)
            keep[idx] = False
            assert torch.equal(w[keep], w0[keep])
    _unload()
    guard.check("flux apply (after loading the clones)")

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
    import folder_paths
    entry = folder_paths.folder_names_and_paths[cn.FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, cn.FOLDER, ([str(tmp_path)], entry[1]))
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    name = cn.ConceptLabConceptNeuronsSave().save(concept, "flux/three")["result"][0]
    back, info = cn.ConceptLabConceptNeuronsLoad().load(name)
    assert back.family == "flux" and back.fingerprint == concept.fingerprint and back.layers == concept.layers
    assert all(torch.equal(back.indices[n], concept.indices[n]) for n in concept.indices)
    assert "(class 'a three', Flux.1)" in info and f"shut: {concept.count} of {concept.candidates}" in info
    merged, overlap = cn.ConceptLabConceptNeuronsCombine().combine(concept, back)
    assert merged.count == concept.count and "Jaccard 1.000" in overlap
    assert "Flux" in cn.ConceptLabConceptNeuronsInfo().info(merged)["result"][0]


def test_cross_family_concepts_and_foreign_vae_are_refused(lab, cn, parts, concept):
    model, clip, vae4, _ = parts
    guard = lab.runtime.ModelGuard.of(model)
    with torch.inference_mode():  # the SD3-style demo MMDiT, on the demo's 4-channel latents
        dit, _, _, _ = lab.demo.build_demo_model("digits_dit")
    sd3 = _extract(cn, dit, clip, vae4, iterations=1, prior_images=0, noise_draws=1)
    assert sd3.family == "sd3"
    for c, target, words in ((concept, dit, ("Flux model", "is SD3")), (sd3, model, ("SD3 model", "is Flux"))):
        with pytest.raises(lab.runtime.ConceptLabError) as e:
            cn.ConceptLabConceptNeuronsApply().apply(target, c, 1.0)
        msg = str(e.value)
        assert msg.startswith("[ConceptLab Concept Neurons Apply]") and "Fix:" in msg
        assert all(w in msg for w in words), msg
    with pytest.raises(lab.runtime.ConceptLabError) as e:
        cn.ConceptLabConceptNeuronsExtract().extract(model, clip, vae4, _images(), "a three", "iterative", 0.4,
                                                     1, 0.3, 0, 0)
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Concept Neurons Extract]"), msg
    assert "4-channel latents" in msg and "16-channel latents" in msg and "Fix: Connect the VAE" in msg, msg
    guard.check("refusals")


def test_cancel_mid_flux_extraction_leaves_no_patch(lab, cn, parts):
    model, clip, _, vae16 = parts
    guard = lab.runtime.ModelGuard.of(model)
    with interrupt_at_progress(lab, 3):       # after the first gradient evaluation
        _extract(cn, model, clip, vae16, iterations=10, prior_images=0, noise_draws=1)
    assert not model.patches
    guard.check("cancelled flux extract")

"""Checks shared by the family tests of multimodal DiTs with blocks of their own kind
(test_family_qwen_image.py, test_family_sd35.py): Saliency Capture against plain sampling, the
blocks' real inputs for a step-by-step recomputation, the recomputed maps against the recorded
ones, and Seed Search / Seed Rank through stock samplers. The sampling and capture helpers are
flux_family.py's.

Not a test module (pytest collects test_*.py only); imported like conftest."""
from __future__ import annotations

import pytest
import torch

from flux_family import capture, encode, sample

H, W = 8, 12                     # flux_family.sample's latent (non-square): 4 x 6 image tokens


def check_capture_bit_identical(lab, sal, tiny, layers: list, note: str):
    """Both DiT methods and auto: KSampler's latents (CFG, batch 2) with the capture model equal
    those without, to the bit; the maps are per image and word, a softmax over the words; auto
    picks cross-attention on a model this small and says why (``note``); the incoming MODEL is
    untouched. Returns the plain latents."""
    guard = lab.runtime.ModelGuard.of(tiny.model)
    plain = sample(lab, tiny.model, tiny.clip, 16)
    for method in ("conceptattention", "crossattention", "auto"):
        patched, rec = capture(sal, tiny.model, tiny.clip, method=method)
        assert torch.equal(plain, sample(lab, patched, tiny.clip, 16)), method
        assert rec.method == ("crossattention" if method == "auto" else method)
        assert rec.steps == 3 and rec.skipped_calls == 0 and rec.layers == layers
        maps = rec.result()
        assert maps.shape == (2, 3, H, W) and torch.isfinite(maps).all() and float(maps.std()) > 0
        assert torch.allclose(maps.sum(1), torch.ones(2, H, W), atol=1e-4)
    assert note in rec.method_note, rec.method_note
    guard.check("ConceptLab Saliency Capture + sampling")
    return plain


def recorded_run(lab, sal, tiny, blocks, grab) -> tuple:
    """Capture ConceptAttention on every block and sample one step; ``grab(args, kwargs)`` keeps
    what each block's first call (the first step) was given. Returns (recording, inputs)."""
    inputs, holder = {}, {}

    def keep(i):
        def hook(module, args, kwargs):
            if i not in inputs:
                inputs[i] = {k: v.clone() for k, v in grab(args, kwargs).items()}
        return hook

    handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        holder["patched"], holder["rec"] = capture(sal, tiny.model, tiny.clip, method="conceptattention",
                                                   layers="all")
        sample(lab, holder["patched"], tiny.clip, 16, steps=1)
    finally:
        for h in handles:
            h.remove()
    assert holder["rec"].steps == 1 and set(inputs) == set(range(len(blocks)))
    return holder["rec"], inputs


def prompt_rows(first_txt, txt) -> list:
    """The batch rows whose text stream (``first_txt``, a block's input) is the prompt's ``txt``."""
    return [r for r in range(first_txt.shape[0]) if torch.allclose(first_txt[r], txt[0], atol=1e-6)]


def check_maps_equal(sal, rec, reference: list, mistakes: dict):
    """The recorded maps equal the recomputed per-block ``reference`` maps (mean over blocks) up to
    float rounding, the maps being far from uniform; each of ``mistakes`` (name -> per-block maps
    of a wrong recomputation) is far off, so the comparison tells them apart."""
    def mean_map(maps):
        return sum(sal.K.to_latent_grid(m.float(), H, W) for m in maps) / len(maps)
    got, expected = rec.result(), mean_map(reference)
    spread = float((expected - 1 / 3).abs().max())
    assert spread > 0.01                              # far from uniform: the comparison means something
    err = float((got - expected).abs().max())
    assert err < spread / 100, (err, spread)
    for name, maps in mistakes.items():
        assert float((got - mean_map(maps)).abs().max()) > 10 * err, name


SEARCH = dict(seed=3, cfg=2.0, iterations=3, search_steps=2, lr_drop_after=100, norm_regulariser=True,
              norm_weight=0.1, semantic_steps=1, semantic_weight=1.0, appearance_weight=1.0)


def check_search_and_rank(lab, ss, tiny, vae, latents: list, refs, learning_rate: float, noise_shape: tuple):
    """Seed Search lowers its objective from each of ``latents`` (empty latents of stock nodes) and
    its NOISE (of ``noise_shape``) drives a stock SamplerCustomAdvanced as that noise; Seed Rank's
    best seed, in a one-step stock KSampler, predicts what scores the ranking's best score; the
    MODEL and the VAE are untouched."""
    import comfy.sample
    import comfy_extras.nodes_custom_sampler as CS
    from flux_family import call
    model = tiny.model
    guard, vae_guard = lab.runtime.ModelGuard.of(model), lab.runtime.ModelGuard.of(vae.first_stage_model)
    pos, neg = encode(lab, tiny.clip, "a three"), encode(lab, tiny.clip, "")
    for lat in latents:
        with torch.inference_mode():
            out = ss.search_noise(model, vae, pos, neg, lat, refs, learning_rate=learning_rate, **SEARCH)
        noise, noise_latent, res = out.noise, out.latent, out.result
        assert res.iterations == 3 and min(res.curve[1:]) < res.curve[0], res.curve
        assert noise_latent["samples"].shape == noise_shape
        with torch.inference_mode():
            (guider,) = call(CS.CFGGuider(), model, pos, neg, 2.0)
            (sampler,) = call(CS.KSamplerSelect(), "euler")
            (sigmas,) = call(CS.BasicScheduler(), model, "normal", 3, 1.0)
            out, _ = call(CS.SamplerCustomAdvanced(), noise, guider, sampler, sigmas, lat)
            ref = comfy.sample.sample(model, noise_latent["samples"], 3, 2.0, "euler", "normal", pos, neg,
                                      ss.fix_latent(model, lat)["samples"], disable_pbar=True)
        assert out["samples"].shape == noise_shape and torch.allclose(out["samples"], ref, atol=1e-5)
    lat = latents[0]
    with torch.inference_mode():
        best, _, ranking = ss.rank_seeds(model, vae, pos, neg, lat, refs, seed=10, candidates=3, cfg=2.0,
                                         batch_size=2, semantic_weight=1.0, appearance_weight=1.0)
        (one,) = lab.nodes.KSampler().sample(model, best, 1, 2.0, "euler", "normal", pos, neg, lat)
        objective = ss.Objective(model, vae, None, refs.movedim(-1, 1), 1.0, 1.0)
        x0 = model.model.process_latent_in(one["samples"])
    assert sorted(s for s, _ in ranking) == [10, 11, 12] and best == ranking[0][0]
    with torch.inference_mode(False), torch.no_grad():
        score = float(objective.score(x0.clone())[0])
    assert score == pytest.approx(ranking[0][1], rel=1e-3, abs=1e-4)
    guard.check("ConceptLab Seed Search / Seed Rank")
    vae_guard.check("ConceptLab Seed Search / Seed Rank (VAE)")

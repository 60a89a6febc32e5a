"""Seed search on the trained demo models, through ComfyUI's own nodes and sampling machinery.

Seed Search must lower its objective with gradients that reach the noise through the real demo
UNet / DiT (inference-tensor weights), leave the incoming MODEL bit for bit unchanged, and its
NOISE must drive a stock SamplerCustomAdvanced (0.3.x); Seed Rank's INT must reproduce with a
stock KSampler; bad input must get clear messages."""
import importlib

import numpy as np
import pytest
import torch

from conftest import tiny_unet


def _refs(cls=8, n=3, colour="white"):
    from benchmarks.world import scenes as S
    cfg = S.WorldConfig()
    idx = S.heldout_indices(cfg, cls)[:n]
    ims = np.stack([S.render_subject(cfg, int(i), colour=colour).image for i in idx])
    return torch.from_numpy(ims).float() / 255.0


def _conds(lab, clip, prompt="an eight", batch=2, size=64):
    N = lab.nodes
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, prompt)
        (neg,) = N.CLIPTextEncode().encode(clip, "")
        (lat,) = N.EmptyLatentImage().generate(size, size, batch)
    return pos, neg, lat


SEARCH_ARGS = dict(seed=7, cfg=3.0, iterations=3, search_steps=3, learning_rate=0.1, lr_drop_after=10,
                   norm_regulariser=True, norm_weight=1.0, semantic_steps=2, semantic_weight=10.0,
                   appearance_weight=1.0)


def _search(ss, model, vae, pos, neg, lat, refs, **kw):
    args = dict(SEARCH_ARGS)
    args.update(kw)
    with torch.inference_mode():
        return ss.search_noise(model, vae, pos, neg, lat, refs, **args)


def test_search_lowers_the_objective_through_the_real_unet(lab, ss, demo):
    guard = lab.runtime.ModelGuard.of(demo.model)
    vae_guard = lab.runtime.ModelGuard.of(demo.vae.first_stage_model)
    pos, neg, lat = _conds(lab, demo.clip)
    out = _search(ss, demo.model, demo.vae, pos, neg, lat, _refs())
    noise, noise_latent, plot = out.noise, out.latent, out.loss_curve
    guard.check("ConceptLab Seed Search")
    vae_guard.check("ConceptLab Seed Search (VAE)")
    res = out.result
    # a gradient reached the noise through the UNet and the VAE, and descending it helped
    assert res.iterations == 3 and res.curve[-1] < res.curve[0], res.curve
    assert float(res.best_loss.mean()) <= res.curve[0] + 1e-4
    import comfy.sample
    z0 = comfy.sample.prepare_noise(lat["samples"], 7)
    z = noise_latent["samples"]
    assert z.shape == (2, 4, 8, 8) and not torch.equal(z, z0)
    # the norm prior keeps the noise near the Gaussian shell
    ratio = z.flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1)
    assert bool(((ratio - 1).abs() < 0.2).all()), ratio
    assert noise.seed == 7 and torch.equal(noise.generate_noise(lat), z)
    assert plot.shape == (1, 200, 320, 3) and float(plot.min()) < 0.5 < float(plot.max())


def test_rank_best_seed_reproduces_with_a_stock_ksampler(lab, ss, demo):
    guard = lab.runtime.ModelGuard.of(demo.model)
    pos, neg, lat = _conds(lab, demo.clip, batch=1)
    refs = _refs()
    with torch.inference_mode():
        best, text, ranking = ss.rank_seeds(demo.model, demo.vae, pos, neg, lat, refs, seed=100, candidates=6, cfg=3.0,
                               batch_size=4, semantic_weight=10.0, appearance_weight=1.0)
    guard.check("ConceptLab Seed Rank")
    assert sorted(s for s, _ in ranking) == list(range(100, 106)) and best == ranking[0][0]
    assert [v for _, v in ranking] == sorted(v for _, v in ranking)
    assert f"seed {best}" in text.splitlines()[1]
    # Seed Rank scores the x0 prediction at the first sigma: a stock one-step KSampler with the
    # best seed computes that same prediction, and the objective on it is the reported score.
    with torch.inference_mode():
        (out,) = lab.nodes.KSampler().sample(demo.model, best, 1, 3.0, "euler", "normal", pos, neg, lat)
        objective = ss.Objective(demo.model, demo.vae, None, refs.movedim(-1, 1), 10.0, 1.0)
        x0 = demo.model.model.process_latent_in(out["samples"])
    with torch.inference_mode(False), torch.no_grad():
        score = float(objective.score(x0.clone())[0])
    assert score == pytest.approx(ranking[0][1], rel=1e-3, abs=1e-4)


def test_noise_drives_a_stock_sampler_custom_advanced(lab, ss, demo):
    import comfy.sample
    import comfy_extras.nodes_custom_sampler as CS
    pos, neg, lat = _conds(lab, demo.clip)
    out = _search(ss, demo.model, demo.vae, pos, neg, lat, _refs(), iterations=1)
    noise, noise_latent = out.noise, out.latent

    def call(obj, *a):
        fn = getattr(obj, "execute", None) or getattr(obj, getattr(obj, "FUNCTION"))
        out = fn(*a)
        return tuple(out.result) if hasattr(out, "result") else out
    with torch.inference_mode():
        (guider,) = call(CS.CFGGuider(), demo.model, pos, neg, 3.0)
        (sampler,) = call(CS.KSamplerSelect(), "euler")
        (sigmas,) = call(CS.BasicScheduler(), demo.model, "normal", 8, 1.0)
        out, _ = call(CS.SamplerCustomAdvanced(), noise, guider, sampler, sigmas, lat)
        ref = comfy.sample.sample(demo.model, noise_latent["samples"], 8, 3.0, "euler", "normal", pos, neg,
                                  lat["samples"], disable_pbar=True)
    assert torch.allclose(out["samples"], ref, atol=1e-5)
    _, _, other = _conds(lab, demo.clip, batch=3)
    with pytest.raises(lab.runtime.ConceptLabError, match=r"\[ConceptLab Seed Search \(optimise\)\].*shape.*Fix:"):
        noise.generate_noise(other)


def test_dit_search_and_rank(lab, ss):
    with torch.inference_mode():
        model, clip, vae, _ = lab.demo.build_demo_model("digits_dit")
    guard = lab.runtime.ModelGuard.of(model)
    pos, neg, lat = _conds(lab, clip, batch=1)
    res = _search(ss, model, vae, pos, neg, lat, _refs(), iterations=2, search_steps=2).result
    assert res.curve[-1] < res.curve[0], res.curve
    with torch.inference_mode():
        best = ss.rank_seeds(model, vae, pos, neg, lat, _refs(), seed=0, candidates=3,
                             cfg=3.0, batch_size=3, semantic_weight=10.0, appearance_weight=1.0).best_seed
    guard.check("ConceptLab Seed Search / Rank (DiT)")
    assert best in (0, 1, 2)


@pytest.fixture(scope="module")
def demo_cv(lab):
    demo_nodes = importlib.import_module(f"{lab.pack.__name__}.nodes.demo")
    cv, info = demo_nodes.build_demo_clip_vision()
    assert info["trained"], "demo/digits_vision.safetensors is missing"
    return cv


def _scenes(classes, per_class, offset=0):
    from benchmarks.world import scenes as S
    cfg = S.WorldConfig()
    rng = np.random.default_rng(3)
    ims, labels = [], []
    for c in classes:
        for i in S.heldout_indices(cfg, c)[offset:offset + per_class]:
            colour = cfg.colour_names[int(rng.integers(len(cfg.palette)))]
            pos = ("left", "center", "right")[int(rng.integers(3))]
            ims.append(S.compose_scene(cfg, [S.DigitSpec(int(i), colour, pos)], rng=rng).image)
            labels.append(c)
    return torch.from_numpy(np.stack(ims)).float() / 255.0, torch.tensor(labels)


def test_demo_clip_vision_embeds_digits_by_class(ss, demo_cv):
    """Held-out writers (never trained on): the nearest of ten class means (3 references each)
    is the right class for at least 90% of the images, in any colour and position."""
    refs, ref_labels = _scenes(range(10), 3)
    ims, labels = _scenes(range(10), 6, offset=3)
    with torch.inference_mode():
        e = torch.nn.functional.normalize(ss.clip_vision_embed(demo_cv, ims.movedim(-1, 1)), dim=-1)
        r = torch.nn.functional.normalize(ss.clip_vision_embed(demo_cv, refs.movedim(-1, 1)), dim=-1)
    means = torch.stack([torch.nn.functional.normalize(r[ref_labels == c].mean(0), dim=0) for c in range(10)])
    acc = float(((e @ means.T).argmax(1) == labels).float().mean())
    assert acc >= 0.9, acc


def test_demo_clip_vision_runs_in_comfyui_clip_vision_encode(lab, ss, demo_cv):
    """The stock CLIPVisionEncode node gives the embedding the seed-search nodes compute
    (ComfyUI reads the 64 px input size from the config)."""
    ims, _ = _scenes([8, 3], 2)
    with torch.inference_mode():
        (out,) = lab.nodes.CLIPVisionEncode().encode(demo_cv, ims, "none")
        ours = ss.clip_vision_embed(demo_cv, ims.movedim(-1, 1))
    cos = torch.nn.functional.cosine_similarity(out["image_embeds"].float(), ours, dim=-1)
    assert float(cos.min()) > 0.99, cos


def test_clip_vision_computes_in_the_precision_comfyui_would(lab, ss, demo, demo_cv):
    """ComfyUI stores CLIP vision in fp16 on a CPU too, and its own encode runs it in fp32
    through manual-cast layers; the seed-search nodes do the same where the device is not fast
    at half precision (on this CPU a half matmul takes ~100x the fp32 one), and their estimate
    counts the fp32 weight casts that backward keeps."""
    import comfy.model_management as mm
    seen = []
    layer = next(m for m in demo_cv.model.modules() if isinstance(m, torch.nn.Linear))
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    try:
        with torch.inference_mode():
            ss.clip_vision_embed(demo_cv, torch.rand(1, 3, 64, 64))
    finally:
        h.remove()
    fast = ((demo_cv.dtype == torch.float16 and mm.should_use_fp16(demo_cv.load_device))
            or (demo_cv.dtype == torch.bfloat16 and mm.should_use_bf16(demo_cv.load_device)))
    want = demo_cv.dtype if fast else torch.float32
    assert ss.clip_vision_compute_dtype(demo_cv) == want and seen and set(seen) == {want}
    M = importlib.import_module(f"{lab.pack.__name__}.kernels.memory")
    part = ss.memory_estimate(demo.model, demo.vae, demo_cv, torch.empty(1, 4, 8, 8), 3.0, 2).as_dict()
    cast = sum(p.numel() for p in demo_cv.model.parameters()) * 4 if want != demo_cv.dtype else 0
    # the decode and CLIP vision run after the step (the larger of the two phases counts: here the
    # loss phase, CLIP vision at 224 px against a tiny UNet)
    decode = int(M.VAE_GRAD_FACTOR * ss.decode_bytes(demo.vae, (1, 4, 8, 8)))
    assert part["VAE decode and CLIP vision with gradients (the larger phase)"] == (
        decode + M.transformer_train_bytes(ss.vit_shape(demo_cv), 1, want) + cast)


def test_clip_vision_semantic_loss_is_differentiable(lab, ss, demo, demo_cv):
    cv = demo_cv
    cv_guard = lab.runtime.ModelGuard.of(cv.model)
    pos, neg, lat = _conds(lab, demo.clip, batch=1)
    res = _search(ss, demo.model, demo.vae, pos, neg, lat, _refs(), iterations=2, search_steps=2, appearance_weight=0.0,
                  clip_vision=cv).result
    cv_guard.check("ConceptLab Seed Search (CLIP vision)")
    assert res.curve[-1] < res.curve[0], res.curve
    with torch.inference_mode():
        text = ss.rank_seeds(demo.model, demo.vae, pos, neg, lat, _refs(), seed=0, candidates=2,
                             cfg=3.0, batch_size=2, semantic_weight=1.0, appearance_weight=0.0,
                             clip_vision=cv).text
    assert text.startswith("embedding: clip_vision")


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_search_and_rank_on_sd2_and_sdxl_models(lab, ss, demo, demo_cv, family):
    """Both nodes run on SD2.x- and SDXL-configured UNets (SDXL's conditioning carries a pooled
    vector; ComfyUI builds the ADM input from it), lower the objective, and leave the model unchanged."""
    model = tiny_unet(lab, family)
    assert lab.runtime.model_family(model) == family
    guard = lab.runtime.ModelGuard.of(model)
    pos, neg, lat = _conds(lab, demo.clip, batch=1)
    if family == "sdxl":
        pos = [[c, dict(d, pooled_output=torch.randn(1, 64, generator=torch.Generator().manual_seed(2)))] for c, d in pos]
        neg = [[c, dict(d, pooled_output=torch.zeros(1, 64))] for c, d in neg]
    curve = _search(ss, model, demo.vae, pos, neg, lat, _refs(), iterations=3, search_steps=2,
                    clip_vision=demo_cv).result.curve
    assert curve[-1] < curve[0], curve
    with torch.inference_mode():
        best, text, _ = ss.rank_seeds(model, demo.vae, pos, neg, lat, _refs(), seed=0, candidates=3,
                                                  cfg=3.0, batch_size=3, semantic_weight=10.0,
                                                  appearance_weight=1.0, clip_vision=demo_cv)
    assert best in (0, 1, 2) and text.startswith("embedding: clip_vision")
    guard.check(f"ConceptLab Seed Search / Rank ({family})")


def test_references_of_other_sizes_are_resized(ss):
    small, big = torch.rand(2, 32, 32, 3), torch.rand(1, 96, 80, 4)
    refs = ss.gather_references("n", [("references", small), ("references_2", big), ("references_3", None)], 64, 64)
    assert refs.shape == (3, 3, 64, 64) and float(refs.min()) >= 0 and float(refs.max()) <= 1


def test_clear_errors(lab, ss, demo):
    err = lab.runtime.ConceptLabError
    pos, neg, lat = _conds(lab, demo.clip, batch=1)
    refs = _refs()
    node = r"\[ConceptLab Seed Search \(optimise\)\]"
    with pytest.raises(err, match=node + r" No reference images.*Fix:"):
        ss.gather_references("ConceptLab Seed Search (optimise)", [("references", None)], 64, 64)
    with pytest.raises(err, match=node + r" The 'references' input is dict, not an IMAGE"):
        _search(ss, demo.model, demo.vae, pos, neg, lat, lat)
    with pytest.raises(err, match=node + r" The 'references' input is a tensor of shape \(2, 4, 8, 8\)"):
        _search(ss, demo.model, demo.vae, pos, neg, lat, torch.zeros(2, 4, 8, 8))
    with pytest.raises(err, match=r"at most 10"):
        _search(ss, demo.model, demo.vae, pos, neg, lat, torch.rand(11, 64, 64, 3))
    with pytest.raises(err, match=node + r" The latent has shape \(1, 16, 8, 8\).*4-channel"):
        _search(ss, demo.model, demo.vae, pos, neg, {"samples": torch.ones(1, 16, 8, 8)}, refs)
    with pytest.raises(err, match=r"\[ConceptLab Seed Rank \(best-of-N\)\] The 'model' input is a CLIP"):
        ss.rank_seeds(demo.clip, demo.vae, pos, neg, lat, refs, seed=0, candidates=2, cfg=3.0,
                                     batch_size=2, semantic_weight=1.0, appearance_weight=1.0)
    with pytest.raises(err, match=node + r" The 'vae' input is a CLIP"):
        _search(ss, demo.model, demo.clip, pos, neg, lat, refs)
    with pytest.raises(err, match=r"Both loss weights are 0"):
        _search(ss, demo.model, demo.vae, pos, neg, lat, refs, semantic_weight=0.0, appearance_weight=0.0)


def test_cancel_stops_the_search(lab, ss, demo):
    import comfy.model_management as mm
    pos, neg, lat = _conds(lab, demo.clip, batch=1)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(lab.runtime.interrupt_types()):
            _search(ss, demo.model, demo.vae, pos, neg, lat, _refs(), iterations=50)
    finally:
        mm.interrupt_current_processing(False)


def test_candidate_preview_is_the_vae_decode_or_comfyuis_previewer(lab, ss, demo):
    """The live preview of a candidate: decoded by the model's VAE (64 px on the demo model, in
    the search through the VAE module, outside it through ComfyUI's VAE.decode), or drawn by
    ComfyUI's latent previewer when the user has chosen one (the picture its samplers show)."""
    from comfy.cli_args import LatentPreviewMethod, args
    x0 = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        for in_search in (False, True):
            kind, img, size = ss.candidate_preview(demo.model, demo.vae, x0, in_search=in_search)
            assert kind == "JPEG" and img.size == (64, 64) and size == args.preview_size
        saved = args.preview_method
        args.preview_method = LatentPreviewMethod.Latent2RGB
        try:
            kind, img, _ = ss.candidate_preview(demo.model, demo.vae, x0)
        finally:
            args.preview_method = saved
    assert kind == "JPEG" and img.size == (8, 8)      # Latent2RGB: one pixel per latent pixel

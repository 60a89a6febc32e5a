"""Seed Search and Seed Rank on the Flux-derived families: Flux.1-dev, Flux.2-dev and Chroma (tiny
models of benchmarks/tiny/flux.py: ComfyUI's own classes, seeded weights, the demo CLIP's
conditioning), through ComfyUI's own sampling machinery.

For each family: the stock Empty Latent Image is turned into the model's latent as the stock
samplers turn it (16 channels at 1/8 for Flux.1 and Chroma, 128 at 1/16 for Flux.2); the search
runs on the model's flow-matching schedule, the guidance the conditioning carries reaches the
model (Flux.1 / Flux.2: FluxGuidance's value; Chroma: 0), the objective falls, the NOISE drives a
stock SamplerCustomAdvanced; Seed Rank's best seed reproduces its score with a stock KSampler; the
references are encoded to the VAE's own latents (Flux.2's: batch-normed 2x2 patches); the
incoming MODEL stays bit-identical. Skips (saying what is missing) on a ComfyUI without the
family's classes or options (0.3.75 for some)."""

import numpy as np
import pytest
import torch

import flux_family as FF

FAMILIES = ["flux", "flux2", "chroma"]
#: (latent channels, VAE downscale) of each family's latents
LATENT = {"flux": (16, 8), "flux2": (128, 16), "chroma": (16, 8)}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(lab, request):
    return FF.build(lab, request.param)


def _refs(n=3):
    from benchmarks.world import scenes as S
    cfg = S.WorldConfig()
    idx = S.heldout_indices(cfg, 8)[:n]
    return torch.from_numpy(np.stack([S.render_subject(cfg, int(i)).image for i in idx])).float() / 255.0


def _conds(lab, tiny, guidance=4.0):
    """Positive (with FluxGuidance where the model reads guidance from it), negative, and the stock
    Empty Latent Image (64 x 64, one image)."""
    pos, neg = FF.encode(lab, tiny.clip, "an eight"), FF.encode(lab, tiny.clip, "")
    if tiny.family != "chroma":
        from comfy_extras.nodes_flux import FluxGuidance
        with torch.inference_mode():
            (pos,) = FF.call(FluxGuidance(), pos, guidance)
    with torch.inference_mode():
        (lat,) = lab.nodes.EmptyLatentImage().generate(64, 64, 1)
    return pos, neg, lat


def _guidance_seen(model):
    """A clone of ``model`` that records the guidance values of its model calls."""
    seen = set()

    def wrapper(apply_model, args):
        g = args["c"].get("guidance")
        if g is not None:
            seen.update(float(v) for v in g.flatten())
        return apply_model(args["input"], args["timestep"], **args["c"])
    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m, seen


def test_search_and_rank_through_stock_samplers(lab, ss, tiny):
    """From the stock Empty Latent Image: the objective falls, the NOISE (the model's latent shape)
    drives SamplerCustomAdvanced, Seed Rank's best seed reproduces its score in a stock KSampler,
    the MODEL and VAE are untouched (dit_checks.check_search_and_rank)."""
    from dit_checks import check_search_and_rank
    _, _, lat = _conds(lab, tiny)
    channels, ratio = LATENT[tiny.family]
    check_search_and_rank(lab, ss, tiny, tiny.vae, [lat], _refs(), 0.1, (1, channels, 64 // ratio, 64 // ratio))


def test_guidance_and_schedule_reach_the_model(lab, ss, tiny):
    """The search's model calls carry the guidance the conditioning sets (FluxGuidance on the
    positive, ComfyUI's default 3.5 on the negative; Chroma: 0), on the model's own flow-matching
    schedule (the stock BasicScheduler's sigmas, from 1 to 0)."""
    import comfy_extras.nodes_custom_sampler as CS
    guard = lab.runtime.ModelGuard.of(tiny.model)
    pos, neg, lat = _conds(lab, tiny)
    model, seen = _guidance_seen(tiny.model)
    with torch.inference_mode():
        ss.search_noise(model, tiny.vae, pos, neg, lat, _refs(), seed=7, cfg=2.0, iterations=1, search_steps=2,
                        learning_rate=0.1, lr_drop_after=10, norm_regulariser=True, norm_weight=1.0,
                        semantic_steps=1, semantic_weight=1.0, appearance_weight=1.0)
        (stock,) = FF.call(CS.BasicScheduler(), tiny.model, "normal", 4, 1.0)
    assert seen == ({0.0} if tiny.family == "chroma" else {4.0, 3.5}), seen
    sigmas = ss.schedule(tiny.model, 4)
    assert torch.allclose(sigmas, stock.cpu()) and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    guard.check(f"Seed Search ({tiny.family})")


def test_references_become_the_vaes_own_latents(lab, ss, tiny):
    """The appearance target is what the VAE's encode makes (Flux.2: the posterior mean folded
    into 2x2 patches and batch-normed, 128 channels at 1/16); a latent of another model's channel
    count is refused clearly."""
    refs = _refs()
    with torch.inference_mode():
        own = tiny.vae.encode(refs)
        mean = ss.vae_posterior_mean(tiny.vae, refs.movedim(-1, 1))
    channels, ratio = LATENT[tiny.family]
    assert mean.shape == own.shape == (3, channels, 64 // ratio, 64 // ratio)
    assert torch.allclose(mean, own.float(), atol=1e-5)
    other = 16 if channels == 128 else 128
    pos, neg, _ = _conds(lab, tiny)
    with pytest.raises(lab.runtime.ConceptLabError,
                       match=rf"shape \(1, {other}, 4, 4\), but this model works on {channels}-channel.*Fix:"):
        ss.rank_seeds(tiny.model, tiny.vae, pos, neg, {"samples": torch.ones(1, other, 4, 4)},
                      refs, seed=0, candidates=1, cfg=1.0, batch_size=1, semantic_weight=1.0, appearance_weight=1.0)

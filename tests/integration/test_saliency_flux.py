"""ConceptAttention on Flux double-stream blocks, on a tiny Flux built from ComfyUI's own classes.

There is no trained Flux demo model (ComfyUI 0.3.68's Flux un-patchifies with a fixed patch size,
so the digits world uses SD3's MMDiT), so these tests check the mechanics on seeded random
weights: the image is bit for bit unchanged, the incoming MODEL is untouched, and the recorded
maps equal ConceptAttention recomputed here, step by step, from the blocks' own weights and
their real inputs (head-major q/k/v with the rotary embedding, text tokens first, concepts
through the txt_* weights with a zeroed pooled vector, one-way attention, output-space dot
products, softmax over concepts, mean over blocks and steps)."""
import importlib

import pytest
import torch

import flux_family as FF
from conftest import tiny_flux

PROMPT = "a red seven on the left and a blue two on the right"
WORDS = ["seven", "two", "red"]


@pytest.fixture(scope="module")
def flux(lab):
    return tiny_flux(lab, scale=0.15)


def _sample(lab, model, clip, steps=3, n=2, h=8, w=12):
    N = lab.nodes
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, PROMPT)
        (neg,) = N.CLIPTextEncode().encode(clip, "")
        lat = {"samples": torch.zeros(n, 16, h, w)}      # non-square: 4 x 6 tokens
        (out,) = N.KSampler().sample(model, 7, steps, 3.0, "euler", "normal", pos, neg, lat)
    return out["samples"]


def _capture(sal, model, clip, method="auto", layers="auto"):
    with torch.inference_mode():
        return sal.ConceptLabSaliencyCapture.execute(model, clip, PROMPT, ", ".join(WORDS),
                                                       method, layers, 0.0, 1.0)


def test_flux_capture_leaves_the_image_bit_identical(lab, sal, demo, flux):
    guard = lab.runtime.ModelGuard.of(flux)
    plain = _sample(lab, flux, demo.clip)
    for method in ("conceptattention", "crossattention"):
        patched, rec = _capture(sal, flux, demo.clip, method=method)
        assert torch.equal(plain, _sample(lab, patched, demo.clip)), method
        assert rec.method == method and rec.steps == 3 and rec.skipped_calls == 0
        assert rec.layers == [1]                 # auto: the later half of the 2 double blocks
        maps = rec.result()
        assert maps.shape == (2, 3, 8, 12)
        assert torch.allclose(maps.sum(1), torch.ones(2, 8, 12), atol=1e-4)
    guard.check("ConceptLab Saliency Capture (Flux) + sampling")


def _reference(dm, inputs, rows, embeds, y):
    """ConceptAttention recomputed from the blocks' real inputs with plain torch ops
    (flux_family.reference_maps: Flux.1's blocks make their modulation from ``vec``; the concepts'
    with the pooled vector ``y`` swapped for a zero one)."""
    return FF.reference_maps(dm, inputs, rows, embeds, pooled=y)


def test_flux_conceptattention_matches_a_step_by_step_recomputation(lab, sal, demo, flux):
    dm = flux.model.diffusion_model
    inputs = {}

    def keep(i):
        def hook(module, args, kwargs):
            if i not in inputs:                  # the first call: the first sampling step
                inputs[i] = {k: kwargs[k].clone() for k in ("img", "txt", "vec", "pe")}
        return hook

    handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True)
               for i, b in enumerate(dm.double_blocks)]
    try:
        # by hand: 'auto' picks cross-attention on a Flux this small
        patched, rec = _capture(sal, flux, demo.clip, method="conceptattention", layers="all")
        _sample(lab, patched, demo.clip, steps=1)
    finally:
        for h in handles:
            h.remove()
    assert rec.steps == 1 and set(inputs) == {0, 1}
    with torch.inference_mode():
        (pos,) = lab.nodes.CLIPTextEncode().encode(demo.clip, PROMPT)
        # the positive rows of the CFG batch: those whose text stream is the prompt's
        txt = dm.txt_in(pos[0][0])
        rows = [r for r in range(inputs[0]["txt"].shape[0])
                if torch.allclose(inputs[0]["txt"][r], txt[0], atol=1e-6)]
        assert len(rows) == 2
        y = pos[0][1]["pooled_output"].expand(2, -1)
        ref = _reference(dm, inputs, rows, rec.concept_embeds, y)
    expected = sum(sal.K.to_latent_grid(m.float(), 8, 12) for m in ref) / len(ref)
    got = rec.result()
    spread = float((expected - 1 / 3).abs().max())
    assert spread > 0.01                         # far from uniform, so the comparison means something
    # equal up to float rounding (the attention kernels differ): 1% of the maps' own variation
    assert float((got - expected).abs().max()) < spread / 100, (float((got - expected).abs().max()), spread)


def test_flux_concepts_are_the_words_first_tokens(lab, sal, demo):
    """The demo CLIP has a start token: each concept is the vector after it (T5 has none)."""
    arch = importlib.import_module(sal.__name__.rsplit(".", 1)[0] + ".architectures.flux")
    embeds = sal._concept_embeddings(demo.clip, ["seven"], arch.FluxStream)
    with torch.inference_mode():
        cond = demo.clip.encode_from_tokens(demo.clip.tokenize("seven"))
    assert torch.equal(embeds[0], cond[0, 1].float())

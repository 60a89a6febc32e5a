"""Chroma (ComfyUI's ``supported_models.Chroma`` / ``model_base.Chroma``: ``comfy.ldm.chroma``) on a
tiny model of the real one's design (benchmarks/tiny/flux.py: what ComfyUI's model detection
makes of the weights but for the sizes; Flux.1's double/single blocks without modulation of their
own, every block's modulation sliced from the distilled-guidance approximator's output, T5-only
text, 16-channel latents), seeded weights, the demo CLIP's conditioning.

- Model Info names the family, its size and the candidates;
- Saliency Capture (ConceptAttention and cross-attention) leaves KSampler's latents bit for bit
  unchanged, and its maps equal ConceptAttention recomputed from the blocks' own weights, each
  block's concepts modulated by that block's own slice;
- concept neurons: Extract and Apply touch only the text QKV's K/V rows, the MODEL stays
  bit-identical, concepts of other families are refused.

Seed Search / Seed Rank on Chroma: test_seed_search_flux.py. Skips (saying what is missing) on a
ComfyUI whose Chroma classes take other parameters (0.3.75)."""
import importlib

import pytest
import torch

import flux_family as FF
from conftest import subject_images


@pytest.fixture(scope="module")
def chroma(lab):
    return FF.build(lab, "chroma")


@pytest.fixture(scope="module")
def concept(cn, chroma):
    return FF.extract(cn, chroma)


def test_chroma_is_detected_as_comfyui_detects_it_and_described(lab, chroma):
    tf = importlib.import_module("benchmarks.tiny.flux")
    name, detected = FF.detected_config(lab, chroma)
    assert name == "Chroma"
    # detection assumes 128-wide heads and the real approximator (3072 out, 5 layers of 5120)
    sizes = {"num_heads", "axes_dim", "out_dim", "hidden_dim", "n_layers"}
    assert set(detected) == set(tf.CHROMA_CONFIG)
    assert {k: v for k, v in detected.items() if k not in sizes} == \
        {k: v for k, v in tf.CHROMA_CONFIG.items() if k not in sizes}
    assert lab.runtime.model_family(chroma.model) == "chroma"
    assert lab.runtime.latent_channels(chroma.model.model) == 16
    guard = lab.runtime.ModelGuard.of(chroma.model)
    out = lab.model_info.ConceptLabModelInfo.execute(chroma.model)
    lines = out.ui["text"]
    assert lines[0] == f"Chroma: {sum(p.numel() for p in chroma.model.model.diffusion_model.parameters()):,} parameters (float32)"
    assert lines[1] == f"2 K/V layers, {2 * 192 * 64 * 2 // 3:,} concept-neuron candidates"
    assert "approximator" in lines[2] and "2 double-stream and 1 single-stream blocks, 64 wide" in lines[2]
    assert "double_blocks.N.txt_attn.qkv" in lines[3]
    assert '"family": "chroma"' in out.result[0]
    guard.check("ConceptLab Model Info")


def test_chroma_capture_leaves_the_image_bit_identical(lab, sal, chroma):
    dm = chroma.model.model.diffusion_model
    assert not hasattr(dm.double_blocks[0], "txt_mod") and hasattr(dm, "distilled_guidance_layer")
    assert type(sal.dit_stream(dm, "chroma")).__name__ == "ChromaStream"
    FF.check_capture_bit_identical(lab, sal, chroma, channels=16, tokens_hw=(4, 6))   # patch size 2


def test_chroma_conceptattention_matches_a_step_by_step_recomputation(lab, sal, chroma):
    inputs = FF.check_conceptattention_recomputed(
        lab, sal, FF.rescaled(chroma, 0.2), channels=16,
        mistakes={"block 0's modulation in every block": dict(concept_modulation_of=lambda i: 0)})
    # each block gets its own slice of the approximator's output: the concepts must use it
    mod0, mod1 = inputs[0]["vec"][1][0], inputs[1]["vec"][1][0]
    assert not torch.equal(mod0.shift, mod1.shift) and not torch.equal(mod0.gate, mod1.gate)


def test_auto_on_real_size_chroma(lab, sal):
    """Chroma is 3072 wide with 19 double-stream blocks, like Flux.1-dev: auto uses ConceptAttention."""
    tf = importlib.import_module("benchmarks.tiny.flux")
    FF.build(lab, "chroma")                 # skips where this ComfyUI has no Chroma
    dm = FF.meta_model("Chroma", dict(tf.CHROMA_CONFIG, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56],
                                      depth=19, depth_single_blocks=38, context_in_dim=4096, out_dim=3072,
                                      hidden_dim=5120, n_layers=5))
    assert sal.dit_scale(sal.dit_stream(dm, "chroma")) == (3072, 19)
    method, note = sal.auto_method("chroma", dm)
    assert method == "conceptattention" and "Chroma DiT, 3072 wide, 19 double-stream blocks" in note, note


def test_chroma_conds_latents_and_guidance(cn, chroma):
    """Chroma takes a guidance cond, at 0 (its approximator's input): it is sampled with real CFG,
    so Extract samples its prior images with the prior CFG, not at cfg 1 as Flux.1-dev."""
    base = chroma.model.model
    with torch.inference_mode():
        cond, pooled = cn.encode_text(chroma.clip, "a three")
        kw = cn._model_kwargs(base, cond, pooled, 3, (8, 8))
        lat = cn.images_to_latents(chroma.vae, subject_images(), base)
    assert float(kw["guidance"][0]) == 0.0 and not cn.guidance_distilled(base, cond, pooled, (8, 8))
    assert lat.shape == (3, 16, 8, 8)


def test_chroma_extract_apply_touches_only_text_kv(lab, cn, chroma, concept):
    FF.check_extract_apply(lab, cn, chroma, concept, "chroma", "Chroma")


def test_chroma_accumulated_procedure_with_prior_images(lab, cn, chroma):
    guard = lab.runtime.ModelGuard.of(chroma.model)
    c = FF.extract(cn, chroma, procedure="accumulated", prior_images=1, noise_draws=1)
    assert c.family == "chroma" and c.stats["prior_images"] == 1     # sampled by the Chroma model itself
    assert c.stats["loss_end"] < c.stats["loss_start"]
    guard.check("accumulated extract")


def test_chroma_concepts_are_refused_on_other_families(lab, cn, chroma, concept):
    flux2 = FF.build(lab, "flux2")
    flux2_concept = FF.extract(cn, flux2, iterations=1, noise_draws=1)
    assert sorted(flux2_concept.layers) == sorted(concept.layers)   # same names and shapes
    FF.check_combine_and_refusals(lab, cn, concept, flux2_concept, flux2.model, "Chroma", "Flux.2")

"""Flux.2 (ComfyUI's ``supported_models.Flux2`` / ``model_base.Flux2``: ``comfy.ldm.flux`` with
``image_model="flux2"``) on a tiny model of the real one's design (benchmarks/tiny/flux.py: what
ComfyUI's model detection makes of the weights but for the sizes; global modulation, no per-block
``txt_mod``, text position ids on axis 3, 128-channel latents from a batch-normed 2x2-patch VAE,
no pooled vector), seeded weights, the demo CLIP's conditioning.

- Model Info names the family, its size and the candidates;
- Saliency Capture (ConceptAttention and cross-attention) leaves KSampler's latents bit for bit
  unchanged, and its maps equal ConceptAttention recomputed from the blocks' own weights, the
  concepts modulated by the model's global text modulation and rotated as text position 0;
- concept neurons: Extract and Apply touch only the text QKV's K/V rows, the MODEL stays
  bit-identical, concepts of other families are refused (Flux.1 and Chroma have the same layer
  names and shapes here).

Seed Search / Seed Rank on Flux.2: test_seed_search_flux.py. Skips (saying what is missing) on a
ComfyUI without Flux.2's options (0.3.75)."""
import importlib

import pytest
import torch

import flux_family as FF
from conftest import subject_images


@pytest.fixture(scope="module")
def flux2(lab):
    return FF.build(lab, "flux2")


@pytest.fixture(scope="module")
def concept(cn, flux2):
    return FF.extract(cn, flux2)


def test_flux2_is_detected_as_comfyui_detects_it_and_described(lab, flux2):
    tf = importlib.import_module("benchmarks.tiny.flux")
    name, detected = FF.detected_config(lab, flux2)
    assert name == "Flux2"
    sizes = {"num_heads", "axes_dim"}      # detection assumes 128-wide heads (4 axes of 32)
    assert set(detected) == set(tf.FLUX2_CONFIG)
    assert {k: v for k, v in detected.items() if k not in sizes} == \
        {k: v for k, v in tf.FLUX2_CONFIG.items() if k not in sizes}
    assert lab.runtime.model_family(flux2.model) == "flux2"
    assert lab.runtime.latent_channels(flux2.model.model) == 128
    guard = lab.runtime.ModelGuard.of(flux2.model)
    out = lab.model_info.ConceptLabModelInfo.execute(flux2.model)
    lines = out.ui["text"]
    assert lines[0] == f"Flux.2: {sum(p.numel() for p in flux2.model.model.diffusion_model.parameters()):,} parameters (float32)"
    assert lines[1] == f"2 K/V layers, {2 * 192 * 64 * 2 // 3:,} concept-neuron candidates"
    assert "global modulation" in lines[2] and "2 double-stream and 1 single-stream blocks, 64 wide" in lines[2]
    assert "double_blocks.N.txt_attn.qkv" in lines[3] and "single-stream" in lines[3]
    assert '"family": "flux2"' in out.result[0]
    guard.check("ConceptLab Model Info")


def test_flux2_capture_leaves_the_image_bit_identical(lab, sal, flux2):
    assert not hasattr(flux2.model.model.diffusion_model.double_blocks[0], "txt_mod")   # global modulation
    assert type(sal.dit_stream(flux2.model.model.diffusion_model, "flux2")).__name__ == "Flux2Stream"
    FF.check_capture_bit_identical(lab, sal, flux2, channels=128, tokens_hw=(8, 12))   # patch size 1


def test_flux2_conceptattention_matches_a_step_by_step_recomputation(lab, sal, flux2):
    inputs = FF.check_conceptattention_recomputed(
        lab, sal, FF.rescaled(flux2, 0.2), channels=128,
        mistakes={"concepts rotated as text position 300": dict(concept_position=300)})
    # the block's vec: ((img_mod1, img_mod2), (txt_mod1, txt_mod2)), computed once for all blocks
    vec = inputs[0]["vec"]
    assert len(vec) == 2 and all(len(pair) == 2 for pair in vec)
    assert torch.equal(vec[1][0].shift, inputs[1]["vec"][1][0].shift)
    # txt_ids_dims=[3]: text token i sits at (0, 0, 0, i), ComfyUI pads the prompt on the left to
    # 512 tokens, so a word's own position moves with the prompt; position 0 turns nothing
    pe = inputs[0]["pe"][:1]
    assert pe.shape[2] == 512 + 8 * 12
    probe = torch.randn(1, 2, 1, pe.shape[-3] * 2, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(FF.rope(probe, probe, pe[:, :, 300:301])[0], probe, atol=1e-3)


def test_auto_on_real_size_flux2(lab, sal):
    """Flux.2-dev is 6144 wide but has 8 double-stream blocks (48 single-stream), [klein] 4B 3072
    and 5: below auto's 12 blocks, so auto keeps cross-attention; ConceptAttention by hand."""
    tf = importlib.import_module("benchmarks.tiny.flux")
    FF.build(lab, "flux2")                 # skips where this ComfyUI has no Flux.2
    real = dict(tf.FLUX2_CONFIG, axes_dim=[32, 32, 32, 32])
    for name, size in {"Flux.2-dev": dict(hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48,
                                          context_in_dim=15360),
                       "Flux.2 [klein] 4B": dict(hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                                                 context_in_dim=7680, guidance_embed=False)}.items():
        dm = FF.meta_model("Flux2", dict(real, **size))
        assert sal.dit_scale(sal.dit_stream(dm, "flux2")) == (size["hidden_size"], size["depth"]), name
        method, note = sal.auto_method("flux2", dm)
        assert method == "crossattention", (name, note)
        assert f"Flux.2 DiT, {size['hidden_size']} wide, {size['depth']} double-stream blocks" in note, note


def test_flux2_conds_latents_and_guidance(cn, flux2):
    base = flux2.model.model
    with torch.inference_mode():
        cond, pooled = cn.encode_text(flux2.clip, "a three")
        kw = cn._model_kwargs(base, cond, pooled, 3, (4, 4))
        lat = cn.images_to_latents(flux2.vae, subject_images(), base)
    assert kw["c_crossattn"].shape == (3, 512, 64)               # ComfyUI pads Flux.2 prompts to 512
    assert float(kw["guidance"][0]) == 3.5 and cn.guidance_distilled(base, cond, pooled, (4, 4))
    assert lat.shape == (3, 128, 4, 4)                            # 64 px at 1/16, 32 x 2 x 2 channels


def test_flux2_extract_apply_touches_only_text_kv(lab, cn, flux2, concept):
    FF.check_extract_apply(lab, cn, flux2, concept, "flux2", "Flux.2")


def test_flux2_accumulated_procedure_with_prior_images(lab, cn, flux2):
    guard = lab.runtime.ModelGuard.of(flux2.model)
    c = FF.extract(cn, flux2, procedure="accumulated", prior_images=1, noise_draws=1)
    assert c.family == "flux2" and c.stats["prior_images"] == 1     # sampled by the Flux.2 model itself
    assert c.stats["loss_end"] < c.stats["loss_start"]
    guard.check("accumulated extract")


def test_flux2_concepts_are_refused_on_other_families(lab, cn, flux2, concept):
    chroma, flux1 = FF.build(lab, "chroma"), FF.build(lab, "flux")
    flux1_concept = FF.extract(cn, flux1, iterations=1, noise_draws=1)
    assert sorted(flux1_concept.layers) == sorted(concept.layers)   # same names and shapes
    FF.check_combine_and_refusals(lab, cn, concept, flux1_concept, chroma.model, "Flux.2", "Chroma")
    with pytest.raises(lab.runtime.ConceptLabError, match=r"made for a Flux\.1 model.*is Flux\.2"):
        cn.ConceptLabConceptNeuronsApply.execute(flux2.model, flux1_concept, 1.0)


@pytest.mark.parametrize("family", ["flux2", "flux"])
def test_capture_with_a_reference_image(lab, sal, family):
    """A ReferenceLatent on the positive (Flux.2 editing, Flux.1 Kontext) appends the reference's
    tokens to the image's: the image stays bit-identical, the concepts read the reference tokens
    as the text does, and the maps cover the sampled image only (they once made sampling fail)."""
    tiny = FF.build(lab, family)
    channels = 128 if family == "flux2" else 16
    reference = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = (8, 12) if family == "flux2" else (4, 6)
    if not sal.reference_tokens_told(tiny.model.model.diffusion_model):
        # older ComfyUI does not say how many tokens the reference adds: a clear refusal
        with pytest.raises(lab.runtime.ConceptLabError, match=r"Saliency Capture.*reference image.*Update ComfyUI"):
            FF.check_capture_bit_identical(lab, sal, tiny, channels, grid, reference=reference)
        return
    FF.check_capture_bit_identical(lab, sal, tiny, channels, grid, reference=reference)
    inputs = FF.check_conceptattention_recomputed(lab, sal, FF.rescaled(tiny, 0.2), channels, reference=reference)
    assert inputs[0]["img"].shape[1] == grid[0] * grid[1] + 64 // (1 if family == "flux2" else 4)   # then the reference


def test_flux2_text_input_with_txt_norm(lab, sal, flux2):
    """Flux.2 checkpoints with ``txt_norm`` (detected from its weights) RMS-normalise the text
    before ``txt_in``; the concepts enter the same way, and the maps still equal the recomputation."""
    import dataclasses
    tiny_mod = importlib.import_module("benchmarks.tiny")
    tf = importlib.import_module("benchmarks.tiny.flux")
    model = tiny_mod.model_from_config("Flux2", dict(tf.FLUX2_CONFIG, txt_norm=True), 0.2)
    dm = model.model.diffusion_model
    stream = sal.dit_stream(dm, "flux2")
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(stream.text_in(x), dm.txt_in(dm.txt_norm(x))) and stream.width() == 64
    FF.check_conceptattention_recomputed(lab, sal, dataclasses.replace(flux2, model=model), channels=128)


def test_flux2_concepts_are_the_words_first_tokens_inside_the_chat_template(lab, sal):
    """Flux.2's text encoders read the prompt inside a chat template ([klein]: Qwen3's
    '<|im_start|>user\\n{}<|im_end|>...'): each concept is the vector of its word's first token,
    where the word's tokens part from the empty prompt's, not the template's second token."""
    FF.build(lab, "flux2")                 # skips where this ComfyUI has no Flux.2
    from comfy.text_encoders.flux import KleinTokenizer
    arch = importlib.import_module(sal.__name__.rsplit(".", 1)[0] + ".architectures.flux2")
    tokenizer = KleinTokenizer()

    class Clip:                            # the tokenizer of a real Flux.2 [klein]; each token's id as its vector
        def tokenize(self, text):
            return tokenizer.tokenize_with_weights(text)

        def encode_from_tokens(self, tokens):
            return torch.tensor([[float(t[0]) for t in tokens["qwen3_4b"][0]]]).unsqueeze(-1)

    embeds = sal._concept_embeddings(Clip(), ["seven", "red apple"], arch.Flux2Stream)
    words = tokenizer.qwen3_4b.tokenizer
    assert embeds[:, 0].tolist() == [float(words("seven")["input_ids"][0]), float(words("red")["input_ids"][0])]

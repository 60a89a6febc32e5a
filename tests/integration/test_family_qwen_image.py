"""Qwen-Image: every capability on a tiny Qwen-Image built from ComfyUI's own classes
(``supported_models.QwenImage``, ``comfy.ldm.qwen_image``; benchmarks/tiny/qwen_image.py), seeded
random weights, the demo CLIP's 64-wide conditioning.

What is checked: model detection reads the tiny model as a real checkpoint's geometry; Model Info
names the family and its candidates (the text stream's add_k / add_v projections); the sampled
latents are bit-identical with Saliency Capture (CFG, batch 2; also Qwen-Image-Edit's reference
images) and the maps equal ConceptAttention
recomputed here from the blocks' own weights, with the concepts at the first text position of
Qwen-Image's text RoPE; concepts are the words' first tokens after Qwen-Image's prompt template;
Seed Search / Seed Rank on Qwen-Image's 5-D latents, with an image VAE and with a Wan 2.1 VAE (the
kind real checkpoints ship); concept neurons extracted, applied, combined, saved, refused across
families; the incoming MODEL bit-identical throughout. Skips on a ComfyUI without Qwen-Image."""
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import (check_apply, check_cross_family, check_save_load, extract_concept, extract_settings,
                      skip_version, subject_images)
from dit_checks import (
    H, W, check_capture_bit_identical, check_maps_equal, check_search_and_rank, prompt_rows, recorded_run)
from flux_family import PROMPT, build, capture, detected_config, encode


@pytest.fixture(scope="module")
def qwen(lab):
    """The tiny Qwen-Image (weights std 0.05) with the demo CLIP and a 16-channel image VAE, or a
    skip saying what this ComfyUI lacks."""
    return build(lab, "qwen_image")


@pytest.fixture(scope="module")
def tq(qwen):
    return importlib.import_module("benchmarks.tiny.qwen_image")


def _latents(lab, size=64):
    """Empty latents of the stock nodes: EmptyLatentImage (4 channels) and EmptySD3LatentImage
    (16), both 4-D; the samplers make them (B, 16, 1, h, w) for Qwen-Image."""
    import comfy_extras.nodes_sd3 as SD3N
    from flux_family import call
    with torch.inference_mode():
        return [lab.nodes.EmptyLatentImage().generate(size, size, 1)[0],
                call(SD3N.EmptySD3LatentImage, size, size, 1)[0]]


# ---------------------------------------------------------------------------------------------
# family, detection, Model Info
# ---------------------------------------------------------------------------------------------
def test_tiny_config_is_what_model_detection_reads_from_a_checkpoint(lab, tq, qwen):
    """ComfyUI's model detection, given the tiny model's weights as a checkpoint, picks
    supported_models.QwenImage and reads back the keys the tiny config sets for it."""
    name, config = detected_config(lab, qwen)
    assert name == "QwenImage"
    assert config == {k: tq.QWEN_IMAGE_CONFIG[k] for k in ("image_model", "in_channels", "num_layers")}


def _meta_qwen(**config):
    """A real-size Qwen-Image (60 blocks, 24 heads of 128) on the meta device: no memory."""
    import comfy.supported_models as sm
    mc = sm.QwenImage(dict(image_model="qwen_image", in_channels=64, num_layers=60, **config))
    with torch.device("meta"):
        return mc.get_model({})


def test_model_info_names_qwen_image_and_its_text_kv_candidates(lab, sal, qwen):
    import json
    guard = lab.runtime.ModelGuard.of(qwen.model)
    assert lab.runtime.model_family(qwen.model) == "qwen_image"
    node = lab.nodes.NODE_CLASS_MAPPINGS["ConceptLabModelInfo"]
    with torch.inference_mode():
        out = node.execute(qwen.model)
    info = json.loads(out.result[0])
    assert info["family"] == "qwen_image" and info["family_label"] == "Qwen-Image"
    # the text stream's own K and V projections of the 3 blocks, nothing of the image stream
    assert info["kv_layers"] == 6 and info["kv_weights"] == 6 * 64 * 64
    assert info["architecture"] == "3 double-stream blocks, 64 wide (2 heads), RoPE on text and image tokens"
    assert out.ui["text"][0].startswith("Qwen-Image: ") and "6 K/V layers" in out.ui["text"][1]
    names = [l.name for l in lab.model_info.concept_kv_layers(dict(qwen.model.model.diffusion_model.named_parameters()))]
    assert names == [f"transformer_blocks.{i}.attn.add_{kv}_proj.weight" for i in range(3) for kv in "kv"]
    guard.check("ConceptLab Model Info")
    # the real geometry, and the variants model detection tells apart (on the meta device)
    for config, label in (({}, "Qwen-Image"),
                          ({"default_ref_method": "index_timestep_zero"}, "Qwen-Image-Edit-2511"),
                          ({"use_additional_t_cond": True, "default_ref_method": "negative_index"},
                           "Qwen-Image-Layered")):
        try:
            meta = _meta_qwen(**config)
        except TypeError as e:        # 0.3.75's Qwen-Image has no Edit-2511 / Layered options
            assert config and "unexpected keyword" in str(e), e
            continue
        info = lab.model_info.describe_model(SimpleNamespace(model=meta))
        assert info["family_label"] == label and info["kv_layers"] == 120, info
        assert info["architecture"].startswith("60 double-stream blocks, 3072 wide (24 heads)")
    # auto: ConceptAttention at the real scale
    assert sal.auto_method("qwen_image", _meta_qwen().diffusion_model)[0] == "conceptattention"


# ---------------------------------------------------------------------------------------------
# saliency
# ---------------------------------------------------------------------------------------------
def test_capture_leaves_the_latents_bit_identical(lab, sal, qwen):
    plain = check_capture_bit_identical(lab, sal, qwen, [1, 2], "Qwen-Image DiT, 64 wide, 3 double-stream blocks")
    assert plain.shape == (2, 16, 1, H, W)                  # Qwen-Image's latents are 5-D


@pytest.mark.parametrize("ref_method", ["index", "index_timestep_zero"])
def test_edit_models_with_a_reference_image(lab, sal, tq, qwen, ref_method):
    """Qwen-Image-Edit (ReferenceLatent conditioning: the reference's tokens follow the image's;
    Edit-2511 also runs them at timestep 0, doubling the timestep embedding): the latents stay
    bit-identical and the maps cover the sampled image."""
    import node_helpers
    tiny = importlib.import_module("benchmarks.tiny")
    try:
        model = tiny.model_from_config("QwenImage", dict(tq.QWEN_IMAGE_CONFIG, default_ref_method=ref_method))
    except tiny.Unavailable as e:
        skip_version(f"Qwen-Image-Edit's reference methods are newer than this ComfyUI ({e})")
    guard = lab.runtime.ModelGuard.of(model)
    ref = {"reference_latents": [torch.randn(1, 16, 1, 6, 6, generator=torch.Generator().manual_seed(0))]}
    pos, neg = (node_helpers.conditioning_set_values(encode(lab, qwen.clip, t), ref, append=True)
                for t in (PROMPT, ""))
    lat = {"samples": torch.zeros(2, 16, H, W)}

    def run(m):
        with torch.inference_mode():
            return lab.nodes.KSampler().sample(m, 7, 2, 3.0, "euler", "normal", pos, neg, lat)[0]["samples"]
    plain = run(model)
    for method in ("conceptattention", "crossattention"):
        patched, rec = capture(sal, model, qwen.clip, method=method)
        assert torch.equal(plain, run(patched)), method
        assert rec.steps == 2 and rec.skipped_calls == 0 and rec.result().shape == (2, 3, H, W)
    guard.check("ConceptLab Saliency Capture (Qwen-Image-Edit) + sampling")


def _rope(x, pe):
    """ComfyUI's interleaved RoPE written out: pairs (2k, 2k+1) rotated by pe's 2x2 matrices."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


def _ids(n_txt, h, w):
    """Qwen-Image's position ids (image grid centred on 0, text on the diagonal from txt_start)."""
    hl, wl = (h + 1) // 2, (w + 1) // 2
    img = torch.zeros(hl, wl, 3)
    img[..., 1] = torch.arange(hl).view(-1, 1) - hl // 2
    img[..., 2] = torch.arange(wl).view(1, -1) - wl // 2
    start = max(wl // 2, hl // 2)
    txt = torch.arange(start, start + n_txt).view(-1, 1).repeat(1, 3).float()
    return torch.cat((txt, img.view(-1, 3))).unsqueeze(0), start


def _reference(dm, inputs, rows, embeds, concept_pos):
    """ConceptAttention recomputed from the blocks' real inputs with plain torch ops and the
    blocks' own layers; the concepts sit at rotary position ``concept_pos`` on all three axes."""
    n_txt = inputs[0]["encoder_hidden_states"].shape[1]
    ids, _ = _ids(n_txt, H, W)
    pe = dm.pe_embedder(ids)
    assert torch.equal(pe.to(inputs[0]["image_rotary_emb"]), inputs[0]["image_rotary_emb"][:1])
    n_c = embeds.shape[0]
    pe_c = dm.pe_embedder(torch.full((1, n_c, 3), float(concept_pos)))
    c = dm.txt_in(dm.txt_norm(embeds.unsqueeze(0))).expand(len(rows), -1, -1)
    maps = []
    for i, block in enumerate(dm.transformer_blocks):
        a = inputs[i]
        img, txt, temb = (a[k][rows] for k in ("hidden_states", "encoder_hidden_states", "temb"))
        b, heads = img.shape[0], block.attn.heads

        def mod(x, params):
            shift, scale, gate = params.chunk(3, dim=-1)
            return x * (1 + scale[:, None]) + shift[:, None], gate[:, None]

        def head_major(linear, x):
            return linear(x).view(b, x.shape[1], heads, -1).transpose(1, 2)

        at = block.attn
        im1, _ = block.img_mod(temb).chunk(2, dim=-1)
        tm1, tm2 = block.txt_mod(temb).chunk(2, dim=-1)     # no pooled text: concepts use the same
        xi, _ = mod(F.layer_norm(img, img.shape[-1:], eps=1e-6), im1)
        xt, _ = mod(F.layer_norm(txt, txt.shape[-1:], eps=1e-6), tm1)
        qi, ki, vi = at.norm_q(head_major(at.to_q, xi)), at.norm_k(head_major(at.to_k, xi)), head_major(at.to_v, xi)
        qt, kt, vt = (at.norm_added_q(head_major(at.add_q_proj, xt)), at.norm_added_k(head_major(at.add_k_proj, xt)),
                      head_major(at.add_v_proj, xt))
        q, k = _rope(torch.cat((qt, qi), 2), pe), _rope(torch.cat((kt, ki), 2), pe)
        o = F.scaled_dot_product_attention(q, k, torch.cat((vt, vi), 2))          # B H T d
        o_img = o[:, :, n_txt:].transpose(1, 2).flatten(2)
        xc, g1 = mod(F.layer_norm(c, c.shape[-1:], eps=1e-6), tm1)
        qc = _rope(at.norm_added_q(head_major(at.add_q_proj, xc)), pe_c)
        kc = _rope(at.norm_added_k(head_major(at.add_k_proj, xc)), pe_c)
        vc = head_major(at.add_v_proj, xc)
        oc = F.scaled_dot_product_attention(qc, torch.cat((k[:, :, n_txt:], kc), 2),
                                            torch.cat((vi, vc), 2)).transpose(1, 2).flatten(2)
        maps.append(torch.softmax(o_img @ oc.transpose(1, 2), -1))
        c = c + g1 * at.to_add_out(oc)
        xc2, g2 = mod(F.layer_norm(c, c.shape[-1:], eps=1e-6), tm2)
        c = c + g2 * block.txt_mlp(xc2)
    return maps


def test_conceptattention_matches_a_step_by_step_recomputation(lab, sal, tq, qwen):
    """The recorded maps (one step, every block) are ConceptAttention recomputed from the blocks'
    real inputs: image and text through their own streams, RoPE on both, the concepts through the
    text stream's weights at the first text position, one-way, output-space dot products."""
    tiny = SimpleNamespace(model=tq.qwen_image_model(scale=0.15), clip=qwen.clip)
    dm = tiny.model.model.diffusion_model
    keys = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb")
    rec, inputs = recorded_run(lab, sal, tiny, dm.transformer_blocks, lambda a, kw: {k: kw[k] for k in keys})
    with torch.inference_mode():
        txt = dm.txt_in(dm.txt_norm(encode(lab, qwen.clip, PROMPT)[0][0]))
        rows = prompt_rows(inputs[0]["encoder_hidden_states"], txt)
        assert len(rows) == 2
        _, start = _ids(txt.shape[1], H, W)
        assert start == 3                        # max(6 // 2, 4 // 2) patches
        ref = _reference(dm, inputs, rows, rec.concept_embeds, start)
        centre = _reference(dm, inputs, rows, rec.concept_embeds, 0)
    # the rotary position matters: concepts at position 0 (the centre image patch) map otherwise
    check_maps_equal(sal, rec, ref, {"concepts at position 0": centre})


def test_concepts_are_the_words_first_tokens_after_the_prompt_template(lab, sal, tq):
    """ComfyUI's Qwen-Image tokenizer wraps a word in its chat template, and its text encoder drops
    the template's head (system prompt, 'user' turn header) from the output: the word's first token
    is then the first vector. Checked with ComfyUI's own tokenizer and template-dropping code over
    a stand-in encoder that returns each token's id as its vector."""
    try:
        import comfy.sd1_clip
        from comfy.text_encoders.qwen_image import QwenImageTEModel, QwenImageTokenizer
        tokenizer = QwenImageTokenizer()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"ComfyUI's Qwen-Image tokenizer is not available here: {e}")

    class _Ids(comfy.sd1_clip.SD1ClipModel):
        def encode_token_weights(self, token_weight_pairs):
            ids = [float(t[0]) for t in token_weight_pairs["qwen25_7b"][0]]
            out = torch.tensor(ids).view(1, -1, 1).repeat(1, 1, 2)
            return out, None, {"attention_mask": torch.ones(1, len(ids))}

    class _Encoder(QwenImageTEModel, _Ids):
        def __init__(self):                      # no 7B model: only the template handling
            pass

    enc = _Encoder()
    clip = SimpleNamespace(tokenize=tokenizer.tokenize_with_weights,
                           encode_from_tokens=lambda tokens: enc.encode_token_weights(tokens)[0])
    arch = importlib.import_module(sal.__name__.rsplit(".", 1)[0] + ".architectures.qwen_image")
    words = ["seven", "a dog"]
    embeds = sal._concept_embeddings(clip, words, arch.QwenImageStream)
    for w, e in zip(words, embeds):
        tokens = tokenizer.tokenize_with_weights(w)["qwen25_7b"][0]
        first_word_token = tokenizer.qwen25_7b.tokenizer(w)["input_ids"][0]
        assert int(e[0]) == first_word_token, (w, int(e[0]))
        assert enc.encode_token_weights({"qwen25_7b": [tokens]})[0].shape[1] < len(tokens)   # template dropped


# ---------------------------------------------------------------------------------------------
# seed search
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vae_kind", ["image VAE", "Wan 2.1 VAE"])
def test_seed_search_and_rank_on_5d_latents(lab, ss, tq, qwen, vae_kind):
    """Qwen-Image denoises (B, 16, 1, h, w): Seed Search takes the 4-D empty latents of
    EmptyLatentImage and EmptySD3LatentImage as the samplers do (16 channels, a frame axis), reads
    its objective on the one frame, and its NOISE and Seed Rank's seed reproduce in stock samplers.
    With the Wan 2.1 VAE, references and candidates are one-frame videos."""
    vae = qwen.vae if vae_kind == "image VAE" else tq.wan21_vae()
    check_search_and_rank(lab, ss, qwen, vae, _latents(lab), subject_images(), 0.3, (1, 16, 1, 8, 8))


def test_seed_search_refuses_a_latent_of_the_wrong_shape(lab, ss, qwen):
    from dit_checks import SEARCH
    pos, neg = encode(lab, qwen.clip, "a three"), encode(lab, qwen.clip, "")
    bad = {"samples": torch.randn(1, 16, 2, 8, 8)}              # two frames: a video, not an image
    with pytest.raises(lab.runtime.ConceptLabError) as e:
        ss.search_noise(qwen.model, qwen.vae, pos, neg, bad, subject_images(), learning_rate=0.1, **SEARCH)
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Seed Search (optimise)]") and "(B, 16, 1, H, W)" in msg and "Fix:" in msg


# ---------------------------------------------------------------------------------------------
# concept neurons
# ---------------------------------------------------------------------------------------------
LAYERS = [f"transformer_blocks.{i}.attn.add_{kv}_proj.weight" for i in range(3) for kv in "kv"]


@pytest.fixture(scope="module")
def concept(cn, qwen):
    return extract_concept(cn, qwen.model, qwen.clip, qwen.vae, prior_images=1)


def test_extract_apply_combine_save_touch_only_the_text_kv(lab, cn, qwen, concept, tmp_path, monkeypatch):
    guard = lab.runtime.ModelGuard.of(qwen.model)
    c = concept
    assert c.family == "qwen_image" and sorted(c.layers) == sorted(LAYERS)
    assert all(c.layers[n]["kind"] in ("k", "v") for n in LAYERS)
    assert c.candidates == 6 * 64 * 64 and c.count == round(c.candidates * 0.05)
    assert c.stats["loss_end"] < c.stats["loss_start"] and c.stats["prior_images"] == 1  # sampled by Qwen-Image
    check_apply(lab, cn, qwen.model, c)
    other = extract_concept(cn, qwen.model, qwen.clip, qwen.vae, seed=5)
    merged, overlap = cn.ConceptLabConceptNeuronsCombine.execute(c, other)
    assert merged.family == "qwen_image" and "Jaccard" in overlap
    assert all(torch.equal(merged.indices[n], torch.unique(torch.cat((c.indices[n], other.indices[n]))))
               for n in LAYERS)
    back, info = check_save_load(cn, merged, tmp_path, monkeypatch, "qwen/three")
    assert "Qwen-Image" in info
    guard.check("ConceptLab Concept Neurons (Qwen-Image)")


def test_extract_with_a_wan_vae_encodes_each_reference_alone(lab, cn, tq, qwen):
    """The Wan 2.1 VAE encodes an image batch as one video; Extract gives it one image at a time,
    so each reference is its own one-frame latent."""
    wan = tq.wan21_vae()
    ims = subject_images()
    with torch.inference_mode():
        lat = cn.images_to_latents(wan, ims, qwen.model.model)
        alone = cn.images_to_latents(wan, ims[1:2], qwen.model.model)
        c = cn.extract(qwen.model, qwen.clip, wan, ims, "a three", extract_settings(cn, iterations=2))
    assert lat.shape == (3, 16, 1, 8, 8) and torch.allclose(lat[1:2], alone, atol=1e-5)
    assert (lat[0] - lat[1]).abs().max() > 1e-3
    assert c.family == "qwen_image" and c.stats["loss_end"] < c.stats["loss_start"]


def test_concepts_and_vaes_of_another_family_are_refused(lab, cn, qwen, concept):
    check_cross_family(lab, cn, qwen.model, qwen.clip, concept, "Qwen-Image")

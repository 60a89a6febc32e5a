"""Z-Image on a tiny model from ComfyUI's own classes (``supported_models.ZImage`` /
``model_base.Lumina2`` / ``comfy.ldm.lumina.model.NextDiT``, the config model detection gives a
real Z-Image checkpoint, shrunk: benchmarks/tiny/zimage.py) with the demo CLIP's conditioning,
16-channel latents and a flow schedule of shift 3. Every capability:

- family and Model Info: the family, its size, the candidates (the caption refiner's K/V rows
  only, split as the layer's own attention splits them, also with fewer K/V heads) and why;
- saliency: KSampler latents bit-identical with and without capture (ConceptAttention and
  cross-attention, CFG, batch 2, a non-square latent, caption and image padded to 32 tokens),
  and the maps equal ConceptAttention recomputed step by step from the layers' own weights and
  their real inputs; a ComfyUI whose Lumina model calls no per-layer patches is refused;
- Seed Search and Seed Rank through the flow schedule;
- concept neurons: Extract lowers the loss, Apply shuts only caption-refiner K/V weights at the
  concept's indices, files round-trip, Combine, and concepts of another family are refused.

The incoming MODEL is checked bit for bit after every node. Skips, saying what is missing, on a
ComfyUI without what the Z-Image capture reads (0.3.75)."""
import copy
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import check_apply, check_cross_family, check_save_load, extract_concept as _extract, skip_version

PROMPT = "a red seven on the left and a blue two on the right"
WORDS = ["seven", "two", "red"]
CAPTION_QKV = "context_refiner.{}.attention.qkv.weight"


def _tiny(lab, scale=0.05, **overrides):
    zmod = importlib.import_module("benchmarks.tiny.zimage")
    tiny = importlib.import_module("benchmarks.tiny")
    try:
        return zmod.zimage_model(scale, **overrides)
    except tiny.Unavailable as e:
        pytest.skip(f"ComfyUI {lab.version}: {e}; set COMFYUI_PATH to ComfyUI 0.33")


@pytest.fixture(scope="module")
def zi(lab):
    return _tiny(lab)


@pytest.fixture(scope="module")
def clip(lab):
    with torch.inference_mode():
        _, clip, _, _ = lab.demo.build_demo_model("digits_unet")
    return clip


@pytest.fixture(scope="module")
def vae16(lab, zi):
    return importlib.import_module("benchmarks.tiny").vae(16)


def _pack(lab, name):
    return importlib.import_module(f"{lab.pack.__name__}.nodes.{name}")


sal = pytest.fixture(scope="module")(lambda lab: _pack(lab, "saliency"))
arch = pytest.fixture(scope="module")(lambda lab: _pack(lab, "architectures.zimage"))
cn = pytest.fixture(scope="module")(lambda lab: _pack(lab, "concept_neurons"))
ss = pytest.fixture(scope="module")(lambda lab: _pack(lab, "seed_search"))


def _needs_layer_patches(arch, model):
    if not arch.layer_patches_supported(model.model.diffusion_model):
        skip_version("this ComfyUI's Lumina model (comfy/ldm/lumina/model.py) calls no per-layer "
                    "patches (transformer_options patches['double_block'], block_index), which the "
                    "Z-Image capture reads; ComfyUI 0.33 has them")


# ---------------------------------------------------------------------------------------------
# family, Model Info, candidates
# ---------------------------------------------------------------------------------------------
def test_zimage_family_and_model_info(lab, zi, cn):
    guard = lab.runtime.ModelGuard.of(zi)
    assert lab.runtime.model_family(zi) == "zimage"
    assert lab.runtime.latent_channels(zi.model) == 16
    info = lab.model_info.describe_model(zi)
    assert info["family"] == "zimage" and info["family_label"] == "Z-Image"
    assert info["kv_layers"] == 2 and info["kv_weights"] == 2 * (3 * 256 * 256) * 2 // 3
    assert "2 caption-refiner, 2 noise-refiner and 2 joint layers, 256 wide, 2 heads of 128" in info["architecture"]
    note = info["candidates"]
    assert "context_refiner" in note and "text alone" in note and "one shared weight set" in note
    lines = lab.model_info.ConceptLabModelInfo.execute(zi).ui["text"]
    assert note in lines and any("concept-neuron candidates" in l for l in lines)
    # the candidates: the caption refiner's fused QKV only (no joint, noise-refiner weight)
    assert sorted(cn.model_layers(zi)) == [CAPTION_QKV.format(i) for i in range(2)]
    guard.check("Model Info (Z-Image)")


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_zimage_candidates_are_the_k_and_v_rows_the_layer_splits(lab, cn, kv_heads):
    """Z-Image has as many K/V heads as query heads (thirds); with fewer (grouped-query attention,
    Lumina 2's layout) the K/V rows start after the query rows, not at a third."""
    model = _tiny(lab, n_kv_heads=kv_heads)
    att = model.model.diffusion_model.context_refiner[0].attention
    q_rows = att.n_local_heads * att.head_dim
    kv_rows = 2 * att.n_local_kv_heads * att.head_dim
    layers = cn.model_layers(model)
    for name, layer in layers.items():
        assert layer["shape"] == [q_rows + kv_rows, 256]
        assert layer["kind"] == ("qkv" if kv_heads == 2 else "qkv_gqa")
        mask = cn.K.candidate_mask(tuple(layer["shape"]), layer["kind"])
        assert not mask[:q_rows].any() and mask[q_rows:].all()
        # the layer's own split of its projection: Q, then K, then V
        x = torch.randn(1, 3, 256)
        with torch.inference_mode():
            full = att.qkv(x)
            kv = F.linear(x, att.qkv.weight[mask[:, 0]])
        assert torch.allclose(kv, full[..., q_rows:], atol=1e-6)
    info = lab.model_info.describe_model(model)
    assert info["kv_weights"] == 2 * kv_rows * 256


def test_real_zimage_geometry_splits_in_thirds(K):
    """The real Z-Image (ComfyUI's detection: dim 3840, 30 heads, 30 K/V heads of 128)."""
    shapes = {CAPTION_QKV.format(i): (3 * 3840, 3840) for i in range(2)}
    shapes.update({f"layers.{i}.attention.qkv.weight": (3 * 3840, 3840) for i in range(30)})
    shapes.update({f"noise_refiner.{i}.attention.qkv.weight": (3 * 3840, 3840) for i in range(2)})
    layers = K.layers.concept_kv_layers(shapes)
    assert [(l.name, l.kind) for l in layers] == [(CAPTION_QKV.format(i), "qkv") for i in range(2)]
    assert K.layers.kv_weight_count(layers, shapes) == 2 * 2 * 3840 * 3840


# ---------------------------------------------------------------------------------------------
# saliency
# ---------------------------------------------------------------------------------------------
def _sample(lab, model, clip, steps=3, n=2, h=8, w=12, cfg=3.0):
    N = lab.nodes
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, PROMPT)
        (neg,) = N.CLIPTextEncode().encode(clip, "")
        lat = {"samples": torch.zeros(n, 16, h, w)}      # non-square: 4 x 6 tokens, padded to 32
        (out,) = N.KSampler().sample(model, 7, steps, cfg, "euler", "simple", pos, neg, lat)
    return out["samples"]


def _capture(sal, model, clip, method="auto", layers="auto"):
    with torch.inference_mode():
        return sal.ConceptLabSaliencyCapture.execute(model, clip, PROMPT, ", ".join(WORDS),
                                                       method, layers, 0.0, 1.0)


def test_zimage_capture_leaves_the_image_bit_identical(lab, sal, arch, zi, clip):
    _needs_layer_patches(arch, zi)
    guard = lab.runtime.ModelGuard.of(zi)
    plain = _sample(lab, zi, clip)
    for method in ("conceptattention", "crossattention", "auto"):
        patched, rec = _capture(sal, zi, clip, method=method)
        assert torch.equal(plain, _sample(lab, patched, clip)), method
        assert rec.steps == 3 and rec.skipped_calls == 0 and rec.family == "zimage"
        assert rec.layers == [1]                 # auto: the later half of the 2 joint layers
        maps = rec.result()
        assert maps.shape == (2, 3, 8, 12) and torch.isfinite(maps).all() and float(maps.std()) > 0
        assert torch.allclose(maps.sum(1), torch.ones(2, 8, 12), atol=1e-4)
        if method == "auto":                      # 256 wide, 2 layers: below ConceptAttention's scale
            assert rec.method == "crossattention" and "Z-Image DiT, 256 wide, 2 joint blocks" in rec.method_note
    # a capture of a captured model: both hooks chain (one attention override calls the other),
    # both record, the image is still the same
    first, rec1 = _capture(sal, zi, clip, method="conceptattention")
    second, rec2 = _capture(sal, first, clip, method="crossattention", layers="0")
    assert torch.equal(plain, _sample(lab, second, clip))
    assert rec1.steps == rec2.steps == 3 and rec1.skipped_calls == rec2.skipped_calls == 0
    assert rec1.result().shape == rec2.result().shape == (2, 3, 8, 12)
    # the capture's hooks live on the clone only
    to = zi.model_options.get("transformer_options", {})
    assert "optimized_attention_override" not in to and "double_block" not in to.get("patches", {})
    guard.check("ConceptLab Saliency Capture (Z-Image) + sampling")


def _project(att, h, freqs):
    """q, k, v (B, T, heads, d) of a JointAttention, written out: QKV, RMS q/k norm, rotary, K/V
    heads repeated to the query heads."""
    from comfy.ldm.flux.math import apply_rope
    heads, kv_heads, d = att.n_local_heads, att.n_local_kv_heads, att.head_dim
    q, k, v = att.qkv(h).split([heads * d, kv_heads * d, kv_heads * d], -1)
    b, t = h.shape[:2]
    q, k, v = att.q_norm(q.view(b, t, heads, d)), att.k_norm(k.view(b, t, kv_heads, d)), v.view(b, t, kv_heads, d)
    q, k = apply_rope(q, k, freqs)
    rep = heads // kv_heads
    return q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).flatten(2)


def _reference(dm, inputs, rows, embeds, n_cap, n_img):
    """ConceptAttention recomputed from the joint layers' real inputs with plain torch ops:
    concepts through cap_embedder and the caption refiner (attending to each other), at the
    rotation of the caption's first token; then per joint layer, with the layer's modulation,
    attending to [real image keys; concept keys]; maps = softmax over concepts of the image
    tokens' and the concepts' attention outputs."""
    freqs_c = inputs[0]["freqs"][:, :1]           # the first caption token's rotation
    c = dm.cap_embedder(embeds.unsqueeze(0))
    for r in dm.context_refiner:
        c = c + r.attention_norm2(r.attention.out(_attend(*_project(r.attention, r.attention_norm1(c), freqs_c))))
        c = c + r.ffn_norm2(r.feed_forward(r.ffn_norm1(c)))
    c = c.expand(len(rows), -1, -1)
    img = slice(n_cap, n_cap + n_img)
    maps = []
    for i, layer in enumerate(dm.layers):
        x, freqs, vec = inputs[i]["x"][rows], inputs[i]["freqs"], inputs[i]["vec"][rows]
        sm, gm, sf, gf = layer.adaLN_modulation(vec).chunk(4, 1)
        q, k, v = _project(layer.attention, layer.attention_norm1(x) * (1 + sm.unsqueeze(1)), freqs)
        o = _attend(q, k, v)                      # every token attends to every token (no mask)
        qc, kc, vc = _project(layer.attention, layer.attention_norm1(c) * (1 + sm.unsqueeze(1)), freqs_c)
        oc = _attend(qc, torch.cat((k[:, img], kc), 1), torch.cat((v[:, img], vc), 1))
        maps.append(torch.softmax(o[:, img] @ oc.transpose(1, 2), -1))
        c = c + gm.unsqueeze(1).tanh() * layer.attention_norm2(layer.attention.out(oc))
        c = c + gf.unsqueeze(1).tanh() * layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(c) * (1 + sf.unsqueeze(1))))
    return maps


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_zimage_conceptattention_matches_a_step_by_step_recomputation(lab, sal, arch, clip, kv_heads):
    model = _tiny(lab, 0.15, n_kv_heads=kv_heads)
    _needs_layer_patches(arch, model)
    guard = lab.runtime.ModelGuard.of(model)
    dm = model.model.diffusion_model
    inputs, caption = {}, {}

    def keep(i):
        def hook(module, args, kwargs):
            if i not in inputs:                  # the first call: the first sampling step
                inputs[i] = {"x": args[0].clone(), "freqs": args[2].clone(), "vec": args[3].clone()}
        return hook

    def keep_caption(module, args, kwargs):     # the model's own caption comes first
        caption.setdefault("x", args[0].clone())

    handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(dm.layers)]
    handles.append(dm.context_refiner[0].register_forward_pre_hook(keep_caption, with_kwargs=True))
    try:
        # by hand: 'auto' picks cross-attention on a model this small
        patched, rec = _capture(sal, model, clip, method="conceptattention", layers="all")
        _sample(lab, patched, clip, steps=1)
    finally:
        for h in handles:
            h.remove()
    assert rec.steps == 1 and rec.skipped_calls == 0 and set(inputs) == {0, 1}
    n_cap, n_img = caption["x"].shape[1], 4 * 6
    assert n_cap == 96 and inputs[0]["x"].shape[1] == n_cap + 32   # 77 -> 96 and 24 -> 32 tokens
    with torch.inference_mode():
        (pos,) = lab.nodes.CLIPTextEncode().encode(clip, PROMPT)
        # the positive rows of the CFG batch: those whose caption is the prompt's
        cap = dm.cap_embedder(pos[0][0])
        rows = [r for r in range(caption["x"].shape[0])
                if torch.allclose(caption["x"][r, :cap.shape[1]], cap[0], atol=1e-6)]
        assert len(rows) == 2
        ref = _reference(dm, inputs, rows, rec.concept_embeds, n_cap, n_img)
    expected = sum(sal.K.to_latent_grid(m.float(), 8, 12) for m in ref) / len(ref)
    got = rec.result()
    spread = float((expected - 1 / 3).abs().max())
    assert spread > 0.01                         # far from uniform, so the comparison means something
    # equal up to float rounding (the attention kernels differ): 1% of the maps' own variation
    assert float((got - expected).abs().max()) < spread / 100, (float((got - expected).abs().max()), spread)
    guard.check("ConceptLab Saliency Capture (Z-Image) recomputation")


def test_zimage_concepts_are_the_words_tokens_after_the_prompt_template(lab, sal, arch):
    """Z-Image's own tokenizer wraps the prompt in Qwen3's chat template; a concept's vector is
    read at the word's first token, after the template's head (3 tokens)."""
    try:
        from comfy.text_encoders.z_image import ZImageTokenizer
    except ImportError as e:
        pytest.skip(f"ComfyUI {lab.version} has no Z-Image tokenizer (comfy.text_encoders.z_image: {e})")

    tokenizer = ZImageTokenizer()

    class Clip:                                   # the tokenizer of a real Z-Image CLIP, a fake encoder
        def tokenize(self, text):
            return tokenizer.tokenize_with_weights(text)

        def encode_from_tokens(self, tokens):
            ids = torch.tensor([[float(t[0]) for t in tokens["qwen3_4b"][0]]])
            return ids.unsqueeze(-1).expand(-1, -1, 4)

    embeds = sal._concept_embeddings(Clip(), ["seven"], arch.ZImageStream)
    ids = [t[0] for t in tokenizer.tokenize_with_weights("seven")["qwen3_4b"][0]]
    empty = [t[0] for t in tokenizer.tokenize_with_weights("")["qwen3_4b"][0]]
    assert ids[:3] == empty[:3] and ids[3] != empty[3]          # "<|im_start|>user\n" + the word
    assert float(embeds[0, 0]) == ids[3]


def test_zimage_capture_refused_without_layer_patches(lab, sal, arch, zi, clip, monkeypatch):
    """ComfyUI 0.3.75's NextDiT calls no per-layer patches: a clear error, nothing patched."""
    guard = lab.runtime.ModelGuard.of(zi)
    monkeypatch.setattr(arch, "layer_patches_supported", lambda dm: False)
    with pytest.raises(lab.runtime.ConceptLabError) as e:
        _capture(sal, zi, clip, method="crossattention")
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Saliency Capture]") and "per-layer patches" in msg and "Fix: Update ComfyUI" in msg
    guard.check("refused capture")


# ---------------------------------------------------------------------------------------------
# seed search
# ---------------------------------------------------------------------------------------------
def _refs(n=3):
    from benchmarks.world import scenes as S
    cfg = S.WorldConfig()
    idx = S.heldout_indices(cfg, 8)[:n]
    return torch.from_numpy(np.stack([S.render_subject(cfg, int(i)).image for i in idx])).float() / 255.0


def _conds(lab, clip, prompt="an eight", batch=1):
    N = lab.nodes
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, prompt)
        (neg,) = N.CLIPTextEncode().encode(clip, "")
        (lat,) = N.EmptyLatentImage().generate(64, 64, batch)   # 4 channels: fixed to 16 as samplers do
    return pos, neg, lat


def test_zimage_seed_search_through_the_flow_schedule(lab, ss, zi, clip, vae16):
    guard = lab.runtime.ModelGuard.of(zi)
    ms = zi.get_model_object("model_sampling")
    # Z-Image's flow schedule, shift 3: sigma(t) = 3t / (1 + 2t) at evenly spaced t, from pure
    # noise (sigma 1); the search and the stock samplers use the same one
    sigmas = ss.schedule(zi, 4)
    t = sigmas[:-1] / (3 - 2 * sigmas[:-1])
    assert float(ms.shift) == 3.0 and float(sigmas[0]) == pytest.approx(1.0) and float(sigmas[-1]) == 0.0
    assert torch.allclose(t.diff(), t.diff()[:1].expand(3), atol=1e-5) and float(t.diff()[0]) < -0.3
    pos, neg, lat = _conds(lab, clip)
    with torch.inference_mode():
        noise, noise_latent, plot, res, *_ = ss.search_noise(
            zi, vae16, pos, neg, lat, _refs(), seed=3, cfg=2.0, iterations=4, search_steps=2,
            learning_rate=0.3, lr_drop_after=100, norm_regulariser=True, norm_weight=0.1,
            semantic_steps=1, semantic_weight=0.0, appearance_weight=1.0)
    guard.check("ConceptLab Seed Search (Z-Image)")
    assert res.iterations == 4 and min(res.curve[1:]) < res.curve[0], res.curve
    import comfy.sample
    z = noise_latent["samples"]
    z0 = comfy.sample.prepare_noise(torch.zeros(1, 16, 8, 8), 3)
    assert z.shape == (1, 16, 8, 8) and not torch.equal(z, z0)
    assert torch.equal(noise.generate_noise({"samples": torch.zeros(1, 16, 8, 8)}), z)


def test_zimage_seed_rank_best_seed_reproduces_with_a_stock_ksampler(lab, ss, zi, clip, vae16):
    guard = lab.runtime.ModelGuard.of(zi)
    pos, neg, lat = _conds(lab, clip)
    refs = _refs()
    with torch.inference_mode():
        best, text, ranking = ss.rank_seeds(zi, vae16, pos, neg, lat, refs, seed=100, candidates=4, cfg=2.0,
                                            batch_size=4, semantic_weight=0.0, appearance_weight=1.0)
    guard.check("ConceptLab Seed Rank (Z-Image)")
    assert sorted(s for s, _ in ranking) == list(range(100, 104)) and best == ranking[0][0]
    # the score is the objective on the x0 prediction at the first sigma, which a one-step stock
    # KSampler with the best seed computes (flow: x0 = x - sigma * v, sigma = 1)
    with torch.inference_mode():
        (out,) = lab.nodes.KSampler().sample(zi, best, 1, 2.0, "euler", "normal", pos, neg, lat)
        objective = ss.Objective(zi, vae16, None, refs.movedim(-1, 1), 0.0, 1.0)
        x0 = zi.model.process_latent_in(out["samples"])
    with torch.inference_mode(False), torch.no_grad():
        score = float(objective.score(x0.clone())[0])
    assert score == pytest.approx(ranking[0][1], rel=1e-3, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# concept neurons
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def concept(cn, zi, clip, vae16):
    return _extract(cn, zi, clip, vae16, prior_images=1)


def test_zimage_extract_apply_touch_only_caption_refiner_kv(lab, cn, zi, concept):
    c = concept
    guard = lab.runtime.ModelGuard.of(zi)
    layers = sorted(c.layers)
    assert c.family == "zimage" and layers == [CAPTION_QKV.format(i) for i in range(2)]
    assert c.stats["prior_images"] == 1           # sampled by the Z-Image model itself (KSampler)
    assert c.candidates == 2 * 768 * 256 * 2 // 3 and c.count == round(c.candidates * 0.05)
    for n, idx in c.indices.items():              # K and V rows (the 2nd and 3rd thirds) only
        rows, cols = c.layers[n]["shape"]
        assert bool((idx // cols >= rows // 3).all())
    assert c.stats["loss_end"] < c.stats["loss_start"]
    guard.check("Z-Image extract")
    check_apply(lab, cn, zi, c)                 # only those weights, at the indices; MODEL unchanged


def test_zimage_gqa_extraction_shuts_only_k_and_v_rows(lab, cn, clip, vae16):
    model = _tiny(lab, n_kv_heads=1)
    guard = lab.runtime.ModelGuard.of(model)
    c = _extract(cn, model, clip, vae16, iterations=2, noise_draws=1)
    for n, idx in c.indices.items():
        assert c.layers[n] == {"shape": [512, 256], "kind": "qkv_gqa"}
        assert bool((idx // 256 >= 256).all())    # the 2 query heads' 256 rows are never shut
    assert c.candidates == 2 * 256 * 256
    guard.check("Z-Image (grouped K/V heads) extract")


def test_zimage_save_load_combine_info(cn, concept, tmp_path, monkeypatch):
    back, info = check_save_load(cn, concept, tmp_path, monkeypatch, "zimage/three")
    assert back.family == "zimage" and "(class 'a three', Z-Image)" in info
    other = copy.deepcopy(concept)
    other.indices = {n: idx[: idx.numel() // 2] for n, idx in other.indices.items()}
    merged, overlap = cn.ConceptLabConceptNeuronsCombine.execute(concept, other)
    assert merged.count == concept.count and "Jaccard 0.5" in overlap
    assert "Z-Image" in cn.ConceptLabConceptNeuronsInfo.execute(merged).result[0]


def test_zimage_cross_family_concepts_are_refused(lab, cn, zi, clip, concept):
    check_cross_family(lab, cn, zi, clip, concept, "Z-Image")

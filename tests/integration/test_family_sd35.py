"""SD3.5: every capability on tiny SD3.5 models built from ComfyUI's own classes
(``supported_models.SD3``, ``comfy.ldm.modules.diffusionmodules.mmdit``; benchmarks/tiny/sd3.py):
an SD3.5-Medium-like MMDiT-X (image self-attention in blocks 0-1, RMS q/k norm) and an
SD3.5-Large-like MMDiT (RMS q/k norm), seeded random weights, the demo CLIP's conditioning.

What is checked: model detection reads the tiny models as real checkpoints' geometry; Model Info
says SD3.5 (family id "sd3") and names the candidates (the context blocks' QKV K/V rows); the
sampled latents are bit-identical with Saliency Capture (CFG, batch 2) and the maps equal
ConceptAttention recomputed here from the blocks' own weights, with the context block's own q/k
norm on the concepts and the joint attention's image tensors (not the MMDiT-X image
self-attention's); Seed Search and Seed Rank; concept neurons extracted, applied, combined,
refused on another SD3 model; the incoming MODEL bit-identical throughout. Skips on a ComfyUI
without SD3's classes."""
import importlib
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import check_apply, extract_concept, subject_images
from dit_checks import (
    check_capture_bit_identical, check_maps_equal, check_search_and_rank, prompt_rows, recorded_run)
from flux_family import PROMPT, build, call, detected_config, encode


@pytest.fixture(scope="module")
def medium(lab):
    """The tiny SD3.5 Medium (MMDiT-X), or a skip saying what this ComfyUI lacks."""
    return build(lab, "sd3.5")


@pytest.fixture(scope="module")
def large(lab):
    return build(lab, "sd3.5-large")


@pytest.fixture(scope="module")
def ts(medium):
    return importlib.import_module("benchmarks.tiny.sd3")


# ---------------------------------------------------------------------------------------------
# detection, Model Info
# ---------------------------------------------------------------------------------------------
def test_tiny_configs_are_what_model_detection_reads_from_a_checkpoint(lab, ts, medium, large):
    for tiny, config in ((medium, ts.SD35_MEDIUM_CONFIG), (large, ts.SD35_LARGE_CONFIG)):
        name, detected = detected_config(lab, tiny)
        detected["x_block_self_attn_layers"] = sorted(detected["x_block_self_attn_layers"])
        assert name == "SD3" and detected == config


def _meta_sd3(depth, pos_embed, x_layers=(), qk_norm=None):
    """A real-size MMDiT (ComfyUI's SD3 config, what model detection makes) on the meta device."""
    import comfy.supported_models as sm
    config = dict(in_channels=16, patch_size=2, out_channels=16, depth=depth, input_size=None,
                  adm_in_channels=2048, num_patches=pos_embed ** 2, pos_embed_max_size=pos_embed,
                  pos_embed_scaling_factor=None, x_block_self_attn_layers=list(x_layers),
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 64 * depth}})
    if qk_norm:
        config["qk_norm"] = qk_norm
    with torch.device("meta"):
        return sm.SD3(config).get_model({})


def test_model_info_says_sd35_and_names_the_context_kv_candidates(lab, ts, medium, large):
    guard = lab.runtime.ModelGuard.of(medium.model)
    node = lab.nodes.NODE_CLASS_MAPPINGS["ConceptLabModelInfo"]
    with torch.inference_mode():
        out = node.execute(medium.model)
    info = json.loads(out.result[0])
    assert info["family"] == "sd3" and info["family_label"] == "SD3.5"
    assert info["architecture"] == ("MMDiT-X (image self-attention in joint blocks 0-1), 3 joint blocks, "
                                    "192 wide, RMS q/k norm")
    # the K and V rows of the three context blocks' QKV: no x_block weight, no attn2
    assert info["kv_layers"] == 3 and info["kv_weights"] == 3 * 2 * 192 * 192
    names = [l.name for l in lab.model_info.concept_kv_layers(
        dict(medium.model.model.diffusion_model.named_parameters()))]
    assert names == [f"joint_blocks.{i}.context_block.attn.qkv.weight" for i in range(3)]
    assert out.ui["text"][0].startswith("SD3.5: ") and out.ui["text"][2] == info["architecture"]
    guard.check("ConceptLab Model Info (SD3.5)")
    info = lab.model_info.describe_model(large.model)
    assert info["family_label"] == "SD3.5" and info["architecture"] == "MMDiT, 3 joint blocks, 192 wide, RMS q/k norm"
    # real geometries (on the meta device), as model detection configures them
    real = {"SD3.5 Medium": _meta_sd3(24, 384, range(13), "rms"), "SD3.5 Large": _meta_sd3(38, 192, (), "rms"),
            "SD3 Medium": _meta_sd3(24, 192)}
    for label, base in real.items():
        info = lab.model_info.describe_model(SimpleNamespace(model=base))
        assert info["family"] == "sd3" and info["family_label"] == label, info
    assert "MMDiT-X (image self-attention in joint blocks 0-12), 24 joint blocks, 1536 wide" in \
        lab.model_info.describe_model(SimpleNamespace(model=real["SD3.5 Medium"]))["architecture"]
    # the demo DiT (SD3's MMDiT without q/k norms) stays "SD3"
    with torch.inference_mode():
        dit, _, _, _ = lab.demo.build_demo_model("digits_dit")
    assert lab.model_info.describe_model(dit)["family_label"] == "SD3"


# ---------------------------------------------------------------------------------------------
# saliency
# ---------------------------------------------------------------------------------------------
def test_capture_leaves_the_latents_bit_identical(lab, sal, medium, large):
    for tiny in (medium, large):
        check_capture_bit_identical(lab, sal, tiny, [1, 2], "SD3/SD3.5 DiT, 192 wide, 3 joint blocks")


def _mod(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _qkv(attn, x, qk_norm=True):
    """An MMDiT attention's q, k, v (B, T, heads, d) with its own q/k norm."""
    q, k, v = attn.qkv(x).view(x.shape[0], x.shape[1], 3, attn.num_heads, -1).unbind(2)
    return (attn.ln_q(q), attn.ln_k(k), v) if qk_norm else (q, k, v)


def _sdpa(q, k, v):
    """(B, T, heads, d) attention, output (B, T, heads * d)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).flatten(2)


def _reference(dm, inputs, rows, embeds, y, image_side="joint", concept_qk_norm=True):
    """ConceptAttention recomputed from the joint blocks' real inputs with plain torch ops and the
    blocks' own layers. ``image_side="self"`` takes the image's tensors from the MMDiT-X image
    self-attention instead, ``concept_qk_norm=False`` leaves out the q/k norm on the concepts: the
    two mistakes the capture must not make."""
    c = dm.context_embedder(embeds.unsqueeze(0).to(y.dtype)).expand(len(rows), -1, -1)
    maps = []
    for i, block in enumerate(dm.joint_blocks):
        ctx, x, vec = (inputs[i][k][rows] for k in ("context", "x", "c"))
        vec_c = vec - dm.y_embedder(y) + dm.y_embedder(torch.zeros_like(y))
        cb, xb = block.context_block, block.x_block
        n_txt = ctx.shape[1]
        xm = xb.adaLN_modulation(vec).chunk(9 if xb.x_block_self_attn else 6, dim=1)
        x_norm = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        qi, ki, vi = _qkv(xb.attn, _mod(x_norm, xm[0], xm[1]))
        cm = cb.adaLN_modulation(vec).chunk(2 if cb.pre_only else 6, dim=1)
        qt, kt, vt = _qkv(cb.attn, _mod(F.layer_norm(ctx, ctx.shape[-1:], eps=1e-6), cm[0], cm[1]))
        o = _sdpa(torch.cat((qt, qi), 1), torch.cat((kt, ki), 1), torch.cat((vt, vi), 1))
        o_img = o[:, n_txt:]
        if image_side == "self" and xb.x_block_self_attn:
            qi, ki, vi = _qkv(xb.attn2, _mod(x_norm, xm[6], xm[7]))
            o_img = _sdpa(qi, ki, vi)
        ccm = cb.adaLN_modulation(vec_c).chunk(2 if cb.pre_only else 6, dim=1)
        qc, kc, vc = _qkv(cb.attn, _mod(F.layer_norm(c, c.shape[-1:], eps=1e-6), ccm[0], ccm[1]), concept_qk_norm)
        oc = _sdpa(qc, torch.cat((ki, kc), 1), torch.cat((vi, vc), 1))
        maps.append(torch.softmax(o_img @ oc.transpose(1, 2), -1))
        if not cb.pre_only:
            c = c + ccm[2][:, None] * cb.attn.proj(oc)
            c = c + ccm[5][:, None] * cb.mlp(_mod(F.layer_norm(c, c.shape[-1:], eps=1e-6), ccm[3], ccm[4]))
    return maps


def test_conceptattention_matches_a_step_by_step_recomputation(lab, sal, ts, medium):
    """On the MMDiT-X model: the maps are ConceptAttention of the joint attention, with the
    context block's RMS q/k norm on the concepts; either mistake would change them."""
    tiny = SimpleNamespace(model=ts.sd3_model(ts.SD35_MEDIUM_CONFIG, scale=0.15), clip=medium.clip)
    dm = tiny.model.model.diffusion_model
    assert [b.x_block.x_block_self_attn for b in dm.joint_blocks] == [True, True, False]
    rec, inputs = recorded_run(lab, sal, tiny, dm.joint_blocks,
                               lambda a, kw: {"context": a[0], "x": a[1], "c": kw["c"]})
    with torch.inference_mode():
        pos = encode(lab, medium.clip, PROMPT)
        rows = prompt_rows(inputs[0]["context"], dm.context_embedder(pos[0][0]))
        assert len(rows) == 2
        y = pos[0][1]["pooled_output"].expand(2, -1)
        ref = _reference(dm, inputs, rows, rec.concept_embeds, y)
        wrong_call = _reference(dm, inputs, rows, rec.concept_embeds, y, image_side="self")
        no_norm = _reference(dm, inputs, rows, rec.concept_embeds, y, concept_qk_norm=False)
    check_maps_equal(sal, rec, ref, {"image self-attention": wrong_call, "no q/k norm": no_norm})


# ---------------------------------------------------------------------------------------------
# seed search
# ---------------------------------------------------------------------------------------------
def test_seed_search_and_rank(lab, ss, medium):
    """16-channel latents of EmptySD3LatentImage and of EmptyLatentImage (the samplers widen it),
    SD3's flow schedule (shift 3)."""
    import comfy_extras.nodes_sd3 as SD3N
    with torch.inference_mode():
        latents = [call(SD3N.EmptySD3LatentImage, 64, 64, 1)[0], lab.nodes.EmptyLatentImage().generate(64, 64, 1)[0]]
    check_search_and_rank(lab, ss, medium, medium.vae, latents, subject_images(), 0.1, (1, 16, 8, 8))


# ---------------------------------------------------------------------------------------------
# concept neurons
# ---------------------------------------------------------------------------------------------
def test_concept_neurons_extract_apply_combine_refuse(lab, cn, medium, large):
    guard = lab.runtime.ModelGuard.of(medium.model)
    c = extract_concept(cn, medium.model, medium.clip, medium.vae, prior_images=1)
    layers = [f"joint_blocks.{i}.context_block.attn.qkv.weight" for i in range(3)]
    assert c.family == "sd3" and sorted(c.layers) == layers
    assert c.candidates == 3 * 2 * 192 * 192 and c.count == round(c.candidates * 0.05)
    assert c.stats["loss_end"] < c.stats["loss_start"]
    for n, idx in c.indices.items():             # K and V rows (the 2nd and 3rd thirds) only
        rows, cols = c.layers[n]["shape"]
        assert bool((idx // cols >= rows // 3).all())
    check_apply(lab, cn, medium.model, c)
    other = extract_concept(cn, medium.model, medium.clip, medium.vae, seed=4)
    merged, overlap = cn.ConceptLabConceptNeuronsCombine.execute(c, other)
    assert "Jaccard" in overlap and merged.count >= max(c.count, other.count)
    check_apply(lab, cn, medium.model, merged)
    # the same family, other weights: the SD3.5 Large-like model (same shapes) and the demo DiT
    with torch.inference_mode():
        dit = lab.demo.build_demo_model("digits_dit")[0]
    for target, why in ((large.model, "fingerprint mismatch"), (dit, "does not exist with that shape")):
        with pytest.raises(lab.runtime.ConceptLabError) as e:
            cn.ConceptLabConceptNeuronsApply.execute(target, c, 1.0)
        msg = str(e.value)
        assert msg.startswith("[ConceptLab Concept Neurons Apply]") and "Fix:" in msg and why in msg, msg
    guard.check("ConceptLab Concept Neurons (SD3.5)")

"""Checks shared by the tests of the Flux-derived families (test_family_flux2.py,
test_family_chroma.py, test_seed_search_flux.py): the tiny models of benchmarks/tiny/flux.py
(ComfyUI's own classes, seeded weights, the demo CLIP's conditioning), sampling with the stock
KSampler, Saliency Capture, and ConceptAttention recomputed from the blocks' own weights.

Not a test module (pytest collects test_*.py only); imported like conftest."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

PROMPT = "a red seven on the left and a blue two on the right"
WORDS = ["seven", "two", "red"]


def build(lab, family: str):
    """The family's tiny model (benchmarks/tiny), or a skip that says what this ComfyUI lacks."""
    tiny = importlib.import_module("benchmarks.tiny")
    try:
        return tiny.build(family)
    except tiny.Unavailable as e:
        from conftest import skip_version
        skip_version(f"it cannot build a {family} model: {e}. Set COMFYUI_PATH to a ComfyUI that has "
                     "it (0.33).", lab.version)


def rescaled(tiny, scale: float):
    """The same tiny model with weights of std ``scale``: the saliency recomputation needs maps far
    from uniform, which the default small weights do not give."""
    import dataclasses
    tf = importlib.import_module("benchmarks.tiny.flux")
    make = {"flux": tf.flux1_model, "flux2": tf.flux2_model, "chroma": tf.chroma_model}[tiny.family]
    return dataclasses.replace(tiny, model=make(scale))


def module(lab, sub: str):
    return importlib.import_module(f"{lab.pack.__name__}.{sub}")


def call(node, *args):
    """Run a stock node of either API (classic FUNCTION, or comfy_api's execute)."""
    fn = getattr(node, "execute", None) or getattr(node, getattr(node, "FUNCTION"))
    out = fn(*args)
    return tuple(out.result) if hasattr(out, "result") else out


def encode(lab, clip, text: str):
    with torch.inference_mode():
        (cond,) = lab.nodes.CLIPTextEncode().encode(clip, text)
    return cond


def sample(lab, model, clip, channels: int, steps=3, n=2, h=8, w=12, cfg=3.0, reference=None):
    """Stock KSampler latents (CFG, batch ``n``, a non-square latent of ``h`` x ``w``); with
    ``reference`` (a latent), the positive carries it as ComfyUI's ReferenceLatent node sets it."""
    pos, neg = encode(lab, clip, PROMPT), encode(lab, clip, "")
    with torch.inference_mode():
        if reference is not None:
            from comfy_extras.nodes_edit_model import ReferenceLatent
            (pos,) = call(ReferenceLatent(), pos, {"samples": reference})
        lat = {"samples": torch.zeros(n, channels, h, w)}
        (out,) = lab.nodes.KSampler().sample(model, 7, steps, cfg, "euler", "normal", pos, neg, lat)
    return out["samples"]


def capture(sal, model, clip, method="auto", layers="auto"):
    with torch.inference_mode():
        return sal.ConceptLabSaliencyCapture.execute(model, clip, PROMPT, ", ".join(WORDS),
                                                       method, layers, 0.0, 1.0)


def check_capture_bit_identical(lab, sal, tiny, channels: int, tokens_hw: tuple, reference=None):
    """Both DiT methods: KSampler's latents with the capture model equal those without, to the bit;
    the maps are per image and word, a softmax over the words, on the sampled image's grid (also
    with a ``reference`` latent on the positive); the incoming MODEL is untouched."""
    guard = lab.runtime.ModelGuard.of(tiny.model)
    plain = sample(lab, tiny.model, tiny.clip, channels, reference=reference)
    for method in ("conceptattention", "crossattention"):
        patched, rec = capture(sal, tiny.model, tiny.clip, method=method)
        assert torch.equal(plain, sample(lab, patched, tiny.clip, channels, reference=reference)), method
        assert rec.method == method and rec.steps == 3 and rec.skipped_calls == 0
        assert rec.layers == [1]                      # auto: the later half of the 2 double blocks
        maps = rec.result()
        assert maps.shape == (2, 3, 8, 12) and torch.isfinite(maps).all()
        assert torch.allclose(maps.sum(1), torch.ones(2, 8, 12), atol=1e-4)
        assert float(maps.std()) > 0
        assert rec._grids and set(rec._grids.values()) == {tokens_hw}
    guard.check("ConceptLab Saliency Capture + sampling")
    patched, rec = capture(sal, tiny.model, tiny.clip)
    assert rec.method == "crossattention"             # auto on a model this small
    assert "64 wide, 2 double-stream blocks" in rec.method_note, rec.method_note


def block_inputs(dm, run):
    """The first call's keyword inputs (img, txt, vec, pe) of every double-stream block while
    ``run()`` samples."""
    inputs = {}

    def keep(i):
        def hook(module, args, kwargs):
            if i not in inputs:                       # the first call: the first sampling step
                inputs[i] = {k: kwargs[k] for k in ("img", "txt", "vec", "pe")}
                inputs[i] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs[i].items()}
        return hook

    handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(dm.double_blocks)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return inputs


def positive_rows(dm, inputs, pos) -> list:
    """The batch rows of the first call whose text stream is the positive prompt's (the model may
    pad the prompt on the left: Flux.2 pads to 512 tokens)."""
    cond = pos[0][0]
    if getattr(dm, "txt_norm", None) is not None:
        cond = dm.txt_norm(cond)
    txt = dm.txt_in(cond)[0]
    first = inputs[0]["txt"]
    return [r for r in range(first.shape[0]) if torch.allclose(first[r, -txt.shape[0]:], txt, atol=1e-6)]


def _rows(x, rows):
    if torch.is_tensor(x):
        return x[rows]
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(i, rows) for i in x)
    return type(x)(*(getattr(x, f)[rows] for f in ("shift", "scale", "gate")))   # ModulationOut


def rope(q, k, pe):
    import comfy.ldm.flux.math as fm
    plain = getattr(fm, "_apply_rope", None)          # plain torch (0.33); else ComfyUI's own
    return (plain or fm.apply_rope)(q, k, pe)


def reference_maps(dm, inputs, rows, embeds, pooled=None, n_img=None, concept_position=0,
                   concept_modulation_of=None):
    """ConceptAttention recomputed with plain torch ops from the double-stream blocks' real inputs:
    head-major q/k/v with the rotary embedding, text tokens first; the concepts through the text
    stream (``txt_norm1``, ``txt_attn.qkv`` + q/k norm, ``txt_attn.proj``, ``txt_norm2``,
    ``txt_mlp``), rotated as text position 0 (``pe[:, :, :1]``); one-way attention (concepts read
    the image, reference images included, and themselves); output-space dot products over the
    first ``n_img`` image tokens (the sampled image; all by default), softmax over concepts.

    Modulation: Flux.1's blocks make theirs from the global vector ``vec`` (``img_mod``,
    ``txt_mod``), the concepts' with the ``pooled`` text's share swapped for a zero vector's
    (``vector_in``); Flux.2's and Chroma's blocks are handed theirs,
    ``vec = ((img_mod1, img_mod2), (txt_mod1, txt_mod2))``, and the concepts use the text pair.

    ``concept_position`` (another text position's rotation) and ``concept_modulation_of`` (block
    index -> the block whose text modulation the concepts take) make deliberately wrong
    recomputations, to show the comparison tells them apart."""
    dtype = inputs[0]["txt"].dtype
    raw = embeds.unsqueeze(0).to(dtype)
    if getattr(dm, "txt_norm", None) is not None:      # Flux.2's option: RMS norm before txt_in
        raw = dm.txt_norm(raw)
    c = dm.txt_in(raw).expand(len(rows), -1, -1)
    maps = []
    for i, block in enumerate(dm.double_blocks):
        img, txt, vec, pe = (inputs[i][k] for k in ("img", "txt", "vec", "pe"))
        img, txt, pe = img[rows], txt[rows], (pe[rows] if pe.shape[0] > 1 else pe)
        if torch.is_tensor(vec):                      # Flux.1
            vec = vec[rows]
            (im1, _), (tm1, _) = block.img_mod(vec), block.txt_mod(vec)
            if pooled is not None:
                vec = vec - dm.vector_in(pooled) + dm.vector_in(torch.zeros_like(pooled))
            cm1, cm2 = block.txt_mod(vec)
        else:
            (im1, _), (tm1, _) = _rows(vec, rows)
            own = inputs[concept_modulation_of(i) if concept_modulation_of else i]["vec"]
            cm1, cm2 = _rows(own, rows)[1]

        def qkv(mod, norm, attn, x):
            x = torch.addcmul(mod.shift, norm(x), 1 + mod.scale)
            q, k, v = attn.qkv(x).view(x.shape[0], x.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.norm(q, k, v)
            return q, k, v

        qi, ki, vi = qkv(im1, block.img_norm1, block.img_attn, img)
        qt, kt, vt = qkv(tm1, block.txt_norm1, block.txt_attn, txt)
        q, k = rope(torch.cat((qt, qi), 2), torch.cat((kt, ki), 2), pe)
        v = torch.cat((vt, vi), 2)
        o = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        n_txt = txt.shape[1]
        o_img = o[:, :, n_txt:n_txt + (n_img or img.shape[1])].transpose(1, 2).flatten(2)
        qc, kc, vc = qkv(cm1, block.txt_norm1, block.txt_attn, c)
        qc, kc = rope(qc, kc, pe[:, :, concept_position:concept_position + 1])   # text position 0's
        kk, vv = torch.cat((k[:, :, n_txt:], kc), 2), torch.cat((vi, vc), 2)
        oc = F.scaled_dot_product_attention(qc, kk, vv).transpose(1, 2).flatten(2)
        maps.append(torch.softmax(o_img @ oc.transpose(1, 2), -1))
        c = c + cm1.gate * block.txt_attn.proj(oc)
        c = c + cm2.gate * block.txt_mlp(torch.addcmul(cm2.shift, block.txt_norm2(c), 1 + cm2.scale))
    return maps


def check_conceptattention_recomputed(lab, sal, tiny, channels: int, reference=None, mistakes=None) -> dict:
    """The recorded ConceptAttention maps equal :func:`reference_maps` (mean over the blocks, one
    sampling step), up to float rounding, and are far from each of ``mistakes`` (name ->
    :func:`reference_maps` keywords of a wrong recomputation); text position 0's rotation is the
    identity. With ``reference`` (a latent) the positive carries a reference image, whose tokens
    the concepts read and the maps leave out. Returns the blocks' inputs."""
    from dit_checks import check_maps_equal
    dm = tiny.model.model.diffusion_model
    holder = {}

    def run():
        holder["patched"], holder["rec"] = capture(sal, tiny.model, tiny.clip, method="conceptattention",
                                                   layers="all")
        sample(lab, holder["patched"], tiny.clip, channels, steps=1, reference=reference)

    inputs = block_inputs(dm, run)
    rec = holder["rec"]
    assert rec.steps == 1 and set(inputs) == {0, 1}
    with torch.inference_mode():
        (pos,) = lab.nodes.CLIPTextEncode().encode(tiny.clip, PROMPT)
        rows = positive_rows(dm, inputs, pos)
        assert len(rows) == 2
        pooled = pos[0][1]["pooled_output"].expand(2, -1) if getattr(dm, "vector_in", None) is not None else None
        pe0 = inputs[0]["pe"][:1, :, :1]
        probe = torch.randn(1, 2, 3, pe0.shape[-3] * 2, generator=torch.Generator().manual_seed(0))
        assert all(torch.allclose(a, probe, atol=1e-6) for a in rope(probe, probe, pe0))
        p = dm.patch_size
        n_img = (8 // p) * (12 // p)
        ref = reference_maps(dm, inputs, rows, rec.concept_embeds, pooled, n_img)
        wrong = {name: reference_maps(dm, inputs, rows, rec.concept_embeds, pooled, n_img, **kw)
                 for name, kw in (mistakes or {}).items()}
    check_maps_equal(sal, rec, ref, wrong)
    return inputs


def meta_model(config_class: str, config: dict):
    """A real-size diffusion model from ComfyUI's own config class on the meta device (shapes
    only, no memory): enough to read its width and depth."""
    import comfy.supported_models as sm
    mc = getattr(sm, config_class)(dict(config))
    with torch.device("meta"):
        return mc.get_model({}).diffusion_model


def detected_config(lab, tiny) -> tuple:
    """(config class name, unet_config) that ComfyUI's model detection reads off the tiny model's
    weights, as it would off a checkpoint's."""
    import comfy.model_detection as md
    sd = tiny.model.model.diffusion_model.state_dict()
    mc = md.model_config_from_unet(sd, "")
    return type(mc).__name__, dict(mc.unet_config)


# ----------------------------------------------------------------------------------------------
# concept neurons
# ----------------------------------------------------------------------------------------------
TXT_QKV = "txt_attn.qkv.weight"


def extract(cn, tiny, **kw):
    """conftest's concept ("a three", small settings) extracted from a tiny model."""
    from conftest import extract_concept
    return extract_concept(cn, tiny.model, tiny.clip, tiny.vae, **kw)


def check_extract_apply(lab, cn, tiny, concept, family: str, label: str):
    """The concept holds only the double-stream blocks' text QKV K/V rows (never the single-stream
    blocks' fused linear1) and lowers the loss; the info names the family; Apply (strength 1 and
    0.5) changes exactly those weights at the concept's indices and the incoming MODEL stays
    bit-identical, also after its clones were loaded (conftest.check_apply)."""
    from conftest import check_apply
    c = concept
    assert c.family == family and sorted(c.layers) == [f"double_blocks.{i}.{TXT_QKV}" for i in range(2)]
    assert c.candidates == 2 * 192 * 64 * 2 // 3 and c.count == round(c.candidates * 0.05)
    for n, idx in c.indices.items():                  # K and V rows (the 2nd and 3rd thirds) only
        rows, cols = c.layers[n]["shape"]
        assert bool((idx // cols >= rows // 3).all())
    assert c.stats["loss_end"] < c.stats["loss_start"], c.stats
    assert f"{label})" in cn.info_text(c)
    check_apply(lab, cn, tiny.model, c)


def check_combine_and_refusals(lab, cn, concept, other_concept, other_model, label: str, other_label: str):
    """Combine unites a family's concepts; a concept of another family is refused on Apply, even
    where the layer names and shapes agree, and Combine refuses to mix families."""
    merged, overlap = cn.ConceptLabConceptNeuronsCombine.execute(concept, concept)
    assert merged.count == concept.count and merged.family == concept.family and "Jaccard 1.000" in overlap
    guard = lab.runtime.ModelGuard.of(other_model)
    with pytest.raises(lab.runtime.ConceptLabError) as e:
        cn.ConceptLabConceptNeuronsApply.execute(other_model, concept, 1.0)
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Concept Neurons Apply]") and "Fix:" in msg
    assert f"made for a {label} model" in msg and f"is {other_label}" in msg, msg
    with pytest.raises(lab.runtime.ConceptLabError, match="different models"):
        cn.ConceptLabConceptNeuronsCombine.execute(concept, other_concept)
    guard.check("refused apply")

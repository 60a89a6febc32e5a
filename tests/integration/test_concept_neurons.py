"""Concept neurons on real ComfyUI and the real demo UNet: extraction (gradients reach the K/V
weights, budget respected, model untouched, cancel leaves nothing behind), apply (the clone's
weights are shut / scaled, the original stays bit-identical), the file format and its refusals."""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import interrupt_at_progress, tiny_unet


@pytest.fixture(scope="module")
def unet(lab):
    with torch.inference_mode():
        model, clip, vae, _ = lab.demo.build_demo_model("digits_unet")
    return model, clip, vae


@pytest.fixture
def folder(cn, tmp_path, monkeypatch):
    """Concept files go to a temporary models/concept_neurons for the test."""
    import folder_paths
    d = tmp_path / "concept_neurons"
    d.mkdir()
    entry = folder_paths.folder_names_and_paths[cn.FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, cn.FOLDER, ([str(d)], entry[1]))
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    return d


def _images(n=3):
    g = torch.Generator().manual_seed(0)
    imgs = torch.zeros(n, 64, 64, 3)
    for i in range(n):  # a thick stroke, slightly moved: a stand-in subject
        x = 20 + 4 * i
        imgs[i, 16:48, x:x + 6, :] = torch.rand(3, generator=g) * 0.5 + 0.5
    return imgs


def _settings(cn, **kw):
    base = dict(procedure="iterative", budget_fraction=0.004, iterations=2, prior_images=2, prior_steps=3,
                noise_draws=1)
    base.update(kw)
    return cn.ExtractSettings(**base)


def _extract(cn, unet, **kw):
    model, clip, vae = unet
    with torch.inference_mode():
        return cn.extract(model, clip, vae, _images(), "a three", _settings(cn, **kw))


@pytest.fixture(scope="module")
def concept(cn, unet):
    return _extract(cn, unet)


def _copy(c):
    import copy
    return copy.deepcopy(c)


def _unload():
    import comfy.model_management as mm
    mm.unload_all_models()


@pytest.mark.parametrize("procedure", ["iterative", "accumulated"])
def test_extraction_respects_budget_and_leaves_model_untouched(lab, cn, unet, procedure):
    model = unet[0]
    guard = lab.runtime.ModelGuard.of(model)
    params = dict(model.model.diffusion_model.named_parameters())
    c = _extract(cn, unet, procedure=procedure)
    assert c.candidates == 45056 and c.count == round(45056 * 0.004)
    assert set(c.indices) == {n for n in c.layers} and all(k.endswith(("to_k.weight", "to_v.weight")) for k in c.layers)
    assert all(".attn2." in k for k in c.layers)  # cross-attention only by default
    assert c.stats["evaluations"] >= 1 and np.isfinite(c.stats["loss_start"])
    assert all(p is params[n] for n, p in model.model.diffusion_model.named_parameters())
    guard.check("extract")


def test_self_attention_option_adds_attn1(cn, unet):
    c = _extract(cn, unet, include_self_attention=True, iterations=1, prior_images=0)
    assert any(".attn1." in k for k in c.layers) and c.candidates > 45056


def test_scores_are_taylor_scores_of_the_real_weights(lab, cn, unet):
    """The gradient w.r.t. the multipliers equals theta * dL/dtheta computed the plain way."""
    model, clip, vae = unet
    layers = cn.model_layers(model)
    with torch.inference_mode():
        cond, pooled = cn.encode_text(clip, "a three")
        lat = cn.images_to_latents(vae, _images(), model.model)
    s = _settings(cn)
    lab.runtime.load_for_compute(model)
    loss = cn.ConceptLoss(model, lat, lat[:0], cond, pooled, s, layers)
    ones = {n: torch.ones(l["shape"]) for n, l in layers.items()}
    l1, g1 = loss(ones)
    name = sorted(layers)[0]
    with torch.inference_mode():
        with lab.runtime.gradients_through(model, trainable=[name]) as view:
            x0, sigma, noise = loss.batch()
            out = loss.loss_on(x0, sigma, noise)
            out.backward()
            plain = (view.trainable[name].detach() * view.trainable[name].grad).cpu()
    assert l1 == pytest.approx(float(out.detach()), rel=1e-5)
    assert torch.allclose(g1[name], plain, rtol=1e-4, atol=1e-9) and plain.abs().sum() > 0


def test_apply_shuts_weights_in_the_clone_only(lab, cn, unet, concept):
    import comfy.model_management as mm
    model = unet[0]
    c = concept
    guard = lab.runtime.ModelGuard.of(model)
    name = next(n for n, i in c.indices.items() if i.numel())
    w0 = model.model.diffusion_model.get_parameter(name).detach().clone()
    with torch.inference_mode():
        full = cn.ConceptLabConceptNeuronsApply.execute(model, c, 1.0)[0]
        half = cn.ConceptLabConceptNeuronsApply.execute(model, c, 0.5)[0]
    guard.check("apply")
    idx = c.indices[name]
    for patched, expect in ((full, 0.0), (half, 0.5)):
        mm.load_models_gpu([patched])
        w = model.model.diffusion_model.get_parameter(name).detach().reshape(-1)
        assert torch.allclose(w[idx], expect * w0.reshape(-1)[idx])
        keep = torch.ones_like(w, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(w[keep], w0.reshape(-1)[keep])
    mm.load_models_gpu([model])
    _unload()
    guard.check("apply (after sampling the clones)")


def test_cancel_mid_extraction_leaves_no_patch(lab, cn, unet):
    model = unet[0]
    guard = lab.runtime.ModelGuard.of(model)
    params = dict(model.model.diffusion_model.named_parameters())
    with interrupt_at_progress(lab, 3):       # after the first gradient evaluation
        _extract(cn, unet, iterations=10, prior_images=0)
    assert all(p is params[n] for n, p in model.model.diffusion_model.named_parameters())
    guard.check("cancelled extract")


def test_save_load_round_trip_never_overwrites(lab, cn, concept, folder):
    c = concept
    save = cn.ConceptLabConceptNeuronsSave
    r1 = save.execute(c, "subj/three").result[0]
    r2 = save.execute(c, "subj/three").result[0]
    assert r1 != r2 and r1.endswith("_00001_.safetensors") and r2.endswith("_00002_.safetensors")
    assert r1 in cn.concept_files()
    back, info = cn.ConceptLabConceptNeuronsLoad.execute(r1)
    assert all(torch.equal(back.indices[n], c.indices[n]) for n in c.indices)
    assert back.fingerprint == c.fingerprint and back.family == "sd1" and back.class_word == "a three"
    assert "shut: 180 of 45056" in info
    size = os.path.getsize(folder / r1)
    assert size < 8192  # metadata (layer list, settings, statistics) is most of it


def _refused(cn, name, *words):
    with pytest.raises(Exception) as e:
        cn.ConceptLabConceptNeuronsLoad.execute(name)
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Concept Neurons Load]") and "Fix:" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_load_refuses_corrupt_truncated_hostile_and_traversal(cn, concept, folder, tmp_path):
    import safetensors.torch
    c = concept
    good = folder / cn.ConceptLabConceptNeuronsSave.execute(c, "c").result[0]
    data = good.read_bytes()
    (folder / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    _refused(cn, "trunc.safetensors", "truncated or corrupt")
    (folder / "junk.safetensors").write_bytes(b"\x00" * 64)
    _refused(cn, "junk.safetensors")
    # hostile: valid safetensors, indices beyond the declared layer
    with __import__("safetensors").safe_open(str(good), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    import json
    layers = json.loads(meta["layers"])
    i = next(j for j, l in enumerate(layers) if l["count"])
    layers[i]["shape"] = [1, 1]
    safetensors.torch.save_file(tensors, str(folder / "range.safetensors"), {**meta, "layers": json.dumps(layers)})
    _refused(cn, "range.safetensors", "corrupt")
    layers = json.loads(meta["layers"])
    layers[i]["count"] = 10**12
    safetensors.torch.save_file(tensors, str(folder / "huge.safetensors"), {**meta, "layers": json.dumps(layers)})
    _refused(cn, "huge.safetensors", "impossible")
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(folder / "other.safetensors"), {"format": "lora"})
    _refused(cn, "other.safetensors", "not a Concept Lab")
    shutil.copy(good, tmp_path / "outside.safetensors")
    for escaping in ("../outside.safetensors", "sub/../../outside.safetensors",
                     "..\\outside.safetensors", str(tmp_path / "outside.safetensors"),
                     "\\\\server\\share\\c.safetensors", "C:outside.safetensors",
                     "C:\\outside.safetensors"):
        _refused(cn, escaping, "not a file name inside")
    assert not any(".." in n or os.path.isabs(n) for n in cn.concept_files())


def test_links_inside_the_concept_folder_are_followed(cn, concept, folder, tmp_path):
    """models/ on another disk: a symlinked sub-folder or file inside the concept folder is
    listed and loads (as ComfyUI's folder_paths lists and opens files through links); a link
    that leads nowhere is not listed and is refused with a clear message; Save never writes
    through a linked sub-folder or a name that escapes (test_save_containment.py)."""
    save = cn.ConceptLabConceptNeuronsSave
    disk = tmp_path / "other_disk"
    (disk / "mine").mkdir(parents=True)
    good = folder / save.execute(concept, "c").result[0]
    shutil.copy(good, disk / "mine" / "three.safetensors")
    shutil.copy(good, disk / "single.safetensors")
    os.symlink(disk / "mine", folder / "linked", target_is_directory=True)
    os.symlink(disk / "single.safetensors", folder / "single_link.safetensors")
    os.symlink(disk / "gone.safetensors", folder / "dangling.safetensors")
    os.symlink(disk / "gone_dir", folder / "dangling_dir", target_is_directory=True)
    listed = cn.concept_files()
    assert {"linked/three.safetensors", "single_link.safetensors"} <= set(listed), listed
    assert not any(n.startswith("dangling") for n in listed), listed
    for name in listed:                                   # everything listed loads
        back, info = cn.ConceptLabConceptNeuronsLoad.execute(name)
        assert all(torch.equal(back.indices[n], concept.indices[n]) for n in concept.indices)
        assert cn.ConceptLabConceptNeuronsLoad.fingerprint_inputs(name) != name   # mtime:size, not a failure
    _refused(cn, "dangling.safetensors", "is a link to", "does not exist")
    _refused(cn, "dangling_dir/x.safetensors", "was not found")
    # Save: never through the linked sub-folder (it leads out of the folder), nor a name that escapes
    before = {p for p in tmp_path.rglob("*")}
    for prefix in ("linked/again", "../escaped", "linked/../../escaped", "/tmp/escaped", "C:escaped", ".",
                   "./", "..\\escaped", "sub\\..\\..\\escaped"):
        with pytest.raises(Exception) as e:
            save.execute(concept, prefix)
        msg = str(e.value)
        assert msg.startswith("[ConceptLab Concept Neurons Save]"), msg
        assert ("through a link" if prefix == "linked/again" else "not allowed") in msg, msg
        assert "Fix:" in msg, msg
    assert {p for p in tmp_path.rglob("*")} == before


def test_extra_model_paths_entry_keeps_the_default_folder_and_the_filter(cn, monkeypatch, tmp_path):
    """ComfyUI reads extra_model_paths.yaml before loading custom nodes; a 'concept_neurons:'
    entry there creates the folder entry first, with no file-type filter."""
    import folder_paths
    mine = tmp_path / "my_concepts"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a concept")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, cn.FOLDER, ([str(mine)], set()))
    if hasattr(folder_paths, "filename_list_cache"):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    cn.register_folder()
    paths, exts = folder_paths.folder_names_and_paths[cn.FOLDER]
    assert paths == [str(mine), os.path.join(folder_paths.models_dir, cn.FOLDER), cn.DEMO_FOLDER]
    assert set(exts) == {".safetensors"}
    assert cn.save_dir() == str(mine)                     # the user's folder stays where Save writes
    files = cn.concept_files()
    assert "notes.txt" not in files and "digits_unet_three_subject.safetensors" in files


def test_apply_refuses_a_concept_from_another_model(lab, cn, unet, concept, tmp_path):
    c = _copy(concept)
    with torch.inference_mode():
        other, _, _, info = lab.demo.build_demo_model("digits_unet", directory=str(tmp_path))  # untrained weights
    assert not info["trained"]
    guard = lab.runtime.ModelGuard.of(other)
    with pytest.raises(lab.runtime.ConceptLabError) as e:
        cn.ConceptLabConceptNeuronsApply.execute(other, c, 1.0)
    assert "fingerprint mismatch" in str(e.value) and "Fix:" in str(e.value)
    guard.check("refused apply")
    c.layers[next(iter(c.layers))]["shape"] = [3, 3]
    with pytest.raises(lab.runtime.ConceptLabError, match="does not exist with that shape"):
        cn.ConceptLabConceptNeuronsApply.execute(unet[0], c, 1.0)


def test_combine_and_info(cn, concept):
    a = concept
    b = _copy(concept)
    for n in b.indices:  # a second subject: half the same neurons, half others
        idx = b.indices[n]
        b.indices[n] = torch.unique(torch.cat([idx[: len(idx) // 2], (idx[len(idx) // 2:] + 1) % 2048]))
    b.names = ["seven"]
    merged, overlap = cn.ConceptLabConceptNeuronsCombine.execute(a, b)
    assert merged.count == len(set(_flat(a)) | set(_flat(b)))
    assert "Jaccard" in overlap and "a three & seven" in overlap
    text = cn.ConceptLabConceptNeuronsInfo.execute(merged).result[0]
    assert "shut:" in text and "a three" in text


def _flat(c):
    return [(n, int(i)) for n, idx in c.indices.items() for i in idx]


def test_dit_text_stream_kv_rows(lab, cn):
    with torch.inference_mode():
        model, clip, vae, _ = lab.demo.build_demo_model("digits_dit")
    guard = lab.runtime.ModelGuard.of(model)
    c = _extract(cn, (model, clip, vae))
    assert c.family == "sd3" and all("context_block.attn.qkv" in n for n in c.layers)
    for n, idx in c.indices.items():
        rows = c.layers[n]["shape"][0]
        cols = c.layers[n]["shape"][1]
        assert bool((idx // cols >= rows // 3).all())  # K and V rows only
    guard.check("dit extract")
    with torch.inference_mode():
        patched = cn.apply_concept(model, c, 1.0)
    assert patched is not model
    with pytest.raises(lab.runtime.ConceptLabError, match="SD3"):
        with torch.inference_mode():
            m1 = lab.demo.build_demo_model("digits_unet")[0]
        cn.apply_concept(m1, c, 1.0)
    guard.check("dit apply")


def test_sd2_config_model_extract_and_apply(lab, cn, unet):
    """A tiny SD2.x-configured UNet (ComfyUI's SD20 config class, linear transformer projections,
    v-prediction; random weights) goes through extract and apply; the family is recorded."""
    model = tiny_unet(lab, "sd2")
    guard = lab.runtime.ModelGuard.of(model)
    c = _extract(cn, (model, unet[1], unet[2]), iterations=1, prior_images=1)
    assert c.family == "sd2" and c.count == 180
    with torch.inference_mode():
        cn.apply_concept(model, c, 1.0)
    guard.check("sd2 extract/apply")


def _extract_error(cn, unet, images) -> str:
    with pytest.raises(Exception) as e:
        with torch.inference_mode():
            cn.extract(*unet, images, "a three", _settings(cn))
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Concept Neurons Extract]") and "Fix:" in msg, msg
    return msg


def test_reference_images_are_checked_before_anything_runs(lab, cn, unet):
    """The count (1 to 10), the kind (an IMAGE batch) and the size (at least one latent pixel of
    the VAE; at most what the model's position embedding covers) of Extract's references."""
    model = unet[0]
    guard = lab.runtime.ModelGuard.of(model)
    for hw in ((1, 1), (7, 64), (64, 7), (0, 64)):
        msg = _extract_error(cn, unet, torch.rand(3, *hw, 3))
        assert f"are {hw[1]}x{hw[0]} pixels; the VAE needs at least 8x8" in msg, msg
        assert "Kernel size" not in msg
    assert "No reference images were given" in _extract_error(cn, unet, torch.rand(0, 64, 64, 3))
    msg = _extract_error(cn, unet, torch.rand(11, 64, 64, 3))
    assert "11 reference images were given; at most 10 are used" in msg and "Pass 10 or fewer" in msg
    assert "not an IMAGE" in _extract_error(cn, unet, torch.rand(3, 4, 8, 8))       # a LATENT's shape
    assert "not an IMAGE" in _extract_error(cn, unet, {"samples": torch.rand(3, 4, 8, 8)})
    guard.check("refused extractions")
    # accepted: 1 reference (with a note), grey (1-channel) and RGBA images; the tooltip agrees
    with torch.inference_mode():
        c1 = cn.extract(*unet, _images(1), "a three", _settings(cn, prior_images=0))
        grey = cn.extract(*unet, _images(3)[..., :1], "a three", _settings(cn, prior_images=0))
        rgba = cn.extract(*unet, torch.cat([_images(3), torch.ones(3, 64, 64, 1)], -1), "a three",
                          _settings(cn, prior_images=0))
    assert "note: 1 reference image(s)" in cn.info_text(c1)
    assert "note:" not in cn.info_text(grey) and grey.stats["images"] == rgba.stats["images"] == 3
    tip = cn.ConceptLabConceptNeuronsExtract.INPUT_TYPES()["required"]["images"][1]["tooltip"]
    assert tip.startswith("1 to 10 images of the subject") and "3 to 10 different views" in tip
    guard.check("extractions")


def test_reference_images_larger_than_an_sd3_position_embedding_are_refused(lab, cn, unet):
    """SD3's MMDiT has a learned position embedding of pos_embed_max_size patches a side
    (192 x patch 2 x VAE 8 = 3072 px for SD3-medium); Flux and the UNets have no such limit.
    The check reads it off a real-size SD3-medium built on the meta device (no memory)."""
    import comfy.supported_models as sm
    config = dict(in_channels=16, patch_size=2, out_channels=16, depth=24, input_size=None,
                  adm_in_channels=2048, num_patches=36864, pos_embed_max_size=192,
                  pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 1536}})
    with torch.device("meta"):
        sd3 = sm.SD3(config).get_model({})
    assert cn.max_latent_side(sd3) == 384 and cn.max_latent_side(unet[0].model) is None
    vae = unet[2]
    fits = torch.zeros(1, 1, 1, 3).expand(2, 3072, 8, 3)             # shapes only
    assert cn.check_references(fits, vae, sd3).shape == (2, 3072, 8, 3)
    with pytest.raises(Exception) as e:
        cn.check_references(torch.zeros(1, 1, 1, 3).expand(2, 3080, 8, 3), vae, sd3)
    msg = str(e.value)
    assert "are 8x3080 pixels; this model's position embedding covers at most 3072x3072" in msg, msg
    assert "Fix: Scale the images down" in msg

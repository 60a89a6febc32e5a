"""GPU memory as ComfyUI manages it (issue 15), on tiny models through ComfyUI's real classes.

- the long nodes hand ComfyUI's real ``load_models_gpu`` their estimate (kernels/memory.py);
- torch running out of memory inside them becomes a clear ConceptLabError naming the settings to
  lower, with the incoming MODEL unchanged and nothing left patched;
- a partially loaded model (ComfyUI's lowvram layers, forced through ModelPatcher's own
  partial unload/load) gives Extract the same gradient and Seed Search the same result.
What only a GPU shows (real peaks, offloading other models) is listed in docs/memory.md."""
import importlib

import pytest
import torch

from conftest import extract_settings, subject_images, tiny_flux


@pytest.fixture(scope="module")
def M(lab):
    return importlib.import_module(f"{lab.pack.__name__}.kernels.memory")


@pytest.fixture(scope="module")
def demo_cv(lab):
    cv, _ = lab.demo.build_demo_clip_vision()
    return cv


@pytest.fixture
def recorded(monkeypatch):
    """Every call of ComfyUI's real load_models_gpu (recorded, then called through)."""
    import comfy.model_management as mm
    real, calls = mm.load_models_gpu, []

    def wrapper(models, *a, **kw):
        calls.append((list(models), a, dict(kw)))
        return real(models, *a, **kw)
    monkeypatch.setattr(mm, "load_models_gpu", wrapper)
    return calls


def _search_inputs(lab, clip, size=64, batch=1):
    import numpy as np
    from benchmarks.world import scenes as S
    N = lab.nodes
    cfg = S.WorldConfig()
    ims = np.stack([S.render_subject(cfg, int(i), colour="white").image for i in S.heldout_indices(cfg, 8)[:2]])
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, "an eight")
        (neg,) = N.CLIPTextEncode().encode(clip, "")
        (lat,) = N.EmptyLatentImage().generate(size, size, batch)
    return pos, neg, lat, torch.from_numpy(ims).float() / 255.0


ARGS = dict(seed=3, cfg=3.0, iterations=2, search_steps=2, learning_rate=0.1, lr_drop_after=10,
            norm_regulariser=True, norm_weight=1.0, semantic_steps=1, semantic_weight=10.0, appearance_weight=1.0)


def _search(ss, model, vae, pos, neg, lat, refs, **kw):
    with torch.inference_mode():
        return ss.search_noise(model, vae, pos, neg, lat, refs, **dict(ARGS, **kw))


def _estimate_calls(calls, model):
    return [kw.get("memory_required", a[0] if a else 0) for ms, a, kw in calls if model in ms]


def test_seed_search_passes_its_estimate_to_load_models_gpu(lab, ss, M, demo, demo_cv, recorded):
    pos, neg, lat, refs = _search_inputs(lab, demo.clip)
    _search(ss, demo.model, demo.vae, pos, neg, lat, refs, clip_vision=demo_cv)
    # plenty of memory here: the automatic plan is "full", and its estimate is what ComfyUI is told
    want = ss.memory_estimate(demo.model, demo.vae, demo_cv, lat["samples"], ARGS["cfg"], ARGS["search_steps"])
    first = [c for c in recorded if demo.model in c[0]][0]
    # one call for the model, the VAE and the CLIP vision model, with the estimate
    assert demo.vae.patcher in first[0] and demo_cv.patcher in first[0]
    # (plus the allocator's margin: fragmentation and kernel workspace, as on a GPU)
    assert first[2]["memory_required"] == want.with_allocator_margin().total > want.total > 0
    assert want.with_allocator_margin().total - want.total == int(M.ALLOCATOR_FRAGMENTATION * want.total
                                                                  + M.ALLOCATOR_WORKSPACE)
    parts = want.as_dict()
    # the step and the loss run one after the other: the larger of the two counts, with the latents
    assert set(parts) == {"checkpointed step latents", "VAE decode and CLIP vision with gradients (the larger phase)"}
    decode = int(M.VAE_GRAD_FACTOR * demo.vae.memory_used_decode(tuple(lat["samples"].shape), demo.vae.vae_dtype)) \
        * lat["samples"].shape[0]
    assert parts["VAE decode and CLIP vision with gradients (the larger phase)"] > decode
    # it grows with the resolution and the batch, as it should
    base = want.total
    big = ss.memory_estimate(demo.model, demo.vae, demo_cv, torch.empty(1, 4, 16, 16), 3.0, 2).total
    batch = ss.memory_estimate(demo.model, demo.vae, demo_cv, torch.empty(2, 4, 8, 8), 3.0, 2).total
    assert big > 3.5 * base and batch > 1.9 * base
    # without CLIP vision there is no decode in the loss, and no vision term: the step is the phase
    plain = ss.memory_estimate(demo.model, demo.vae, None, lat["samples"], 3.0, 2)
    assert set(plain.as_dict()) == {"diffusion step with autograd (the larger phase)", "checkpointed step latents"}


def test_seed_rank_passes_its_chunk_estimate(lab, ss, demo, recorded):
    pos, neg, lat, refs = _search_inputs(lab, demo.clip, batch=1)
    with torch.inference_mode():
        ss.rank_seeds(demo.model, demo.vae, pos, neg, lat, refs, seed=0, candidates=3, cfg=3.0,
                      batch_size=2, semantic_weight=1.0, appearance_weight=1.0)
    want = ss.memory_estimate(demo.model, demo.vae, None, torch.empty(2, 4, 8, 8), 3.0, None).total
    assert _estimate_calls(recorded, demo.model)[0] == want > 0


def test_extract_passes_its_estimate(lab, cn, M, demo, recorded, monkeypatch):
    images = subject_images(3)
    planned = []
    real_plan = cn.memory_plan

    def recording(*a, **k):
        planned.append(real_plan(*a, **k))
        return planned[-1]
    monkeypatch.setattr(cn, "memory_plan", recording)
    with torch.inference_mode():
        cn.ConceptLabConceptNeuronsExtract.execute(demo.model, demo.clip, demo.vae, images, "a three", "iterative",
                                                     5.0, 1, 0.3, 0, 0, noise_draws=2)
    need = [v for v in _estimate_calls(recorded, demo.model) if v]
    (plan,) = planned
    assert plan.setting == "full" and not plan.forced          # plenty of memory here
    assert need == [plan.estimate.total]
    layers = cn.model_layers(demo.model)
    kv = sum(int(torch.tensor(l["shape"]).prod()) for l in layers.values())
    lat = (3, 4, 8, 8)
    factor = lab.runtime.train_usage_factor(demo.model)
    load = lab.runtime.unet_activation_load(demo.model.model.diffusion_model)
    assert load and factor == pytest.approx(M.unet_train_usage(*load))
    want = M.extract_estimate(lat, lab.runtime.compute_dtype(demo.model.model), factor, 2, kv, torch.float32)
    more = M.extract_estimate((6, 4, 8, 8), torch.float32, 1.0, 2, kv, torch.float32).total
    draws = M.extract_estimate(lat, torch.float32, 1.0, 4, kv, torch.float32).total
    assert more > want.total and draws > want.total
    # Extract reads the weight tensors themselves: on a ComfyUI that has the flag, it asks in the
    # same (single) call for patches to be written into layers a partial load would leave unpatched
    import inspect
    import comfy.model_management as mm
    ours = [kw for ms, a, kw in recorded if demo.model in ms and kw.get("memory_required")]
    if "force_patch_weights" in inspect.signature(mm.load_models_gpu).parameters:
        assert [kw.get("force_patch_weights") for kw in ours] == [True]


def test_training_estimates_follow_the_unet_activation_load(lab, M):
    """What autograd keeps grows with a UNet's blocks (width x tokens), which ComfyUI's
    inference ``memory_usage_factor`` does not follow (SDXL: 0.8 against SD1.5's 1.0, while one
    SDXL forward saves 1.72x SD1.5's for backward at the same latent). Full-size SD1.5, SD2.1 and
    SDXL, built on the meta device through ComfyUI's own classes: the training factor is 1 for
    SD1.x/2.x and 1.72 for SDXL; a DiT keeps ComfyUI's factor (counted per block on top)."""
    import comfy.model_base as mb
    import comfy.supported_models as sm
    scale = importlib.import_module("benchmarks.scale")
    got = {}
    for name, cls, cfg in (("sd15", sm.SD15, scale.SD15), ("sd21", sm.SD20, scale.SD21), ("sdxl", sm.SDXL, scale.SDXL)):
        mc = cls(dict(cfg, dtype=torch.float32))
        mc.set_inference_dtype(torch.float32, None)
        # SD2.x's get_model reads a state dict to tell v-prediction; the UNet is the same either way
        base = mc.get_model({}, device="meta") if name == "sdxl" else mb.BaseModel(mc, device="meta")
        assert next(base.diffusion_model.parameters()).device.type == "meta"
        got[name] = lab.runtime.unet_activation_load(base.diffusion_model)
    assert got == {"sd15": M.SD15_ACTIVATION_LOAD, "sd21": M.SD15_ACTIVATION_LOAD, "sdxl": (20.0, 9.25)}
    assert M.unet_train_usage(*got["sd15"]) == 1.0
    xl = M.unet_train_usage(*got["sdxl"])
    assert xl == pytest.approx(5275.3 / 3075.0, rel=0.01)      # the saved-tensor counts (kernels/memory.py)
    big = M.seed_search_estimate((1, 4, 64, 64), "float32", xl, 5.0, 2).as_dict()
    sd = M.seed_search_estimate((1, 4, 64, 64), "float32", 1.0, 5.0, 2).as_dict()
    assert big["diffusion step with autograd"] == pytest.approx(xl * sd["diffusion step with autograd"], rel=1e-6)


def test_a_dit_keeps_comfyuis_usage_factor_for_training(lab):
    flux = tiny_flux(lab)
    assert lab.runtime.train_usage_factor(flux) == flux.model.memory_usage_factor
    assert lab.runtime.dit_blocks(flux) > 0


# ------------------------------------------------------------------------------------------
# out of memory
# ------------------------------------------------------------------------------------------
def _oom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")


def _param_state(module):
    return {n: (id(p), type(p), p.requires_grad, p.grad is None) for n, p in module.named_parameters()}


def _no_instance_forwards(module):
    return [n for n, m in module.named_modules() if "forward" in vars(m)]


def test_seed_search_out_of_memory_is_a_clear_error(lab, ss, demo, demo_cv, monkeypatch):
    import torch.utils.checkpoint
    guard = lab.runtime.ModelGuard.of(demo.model)
    vae_guard = lab.runtime.ModelGuard.of(demo.vae.first_stage_model)
    params = _param_state(demo.model.model.diffusion_model)
    pos, neg, lat, refs = _search_inputs(lab, demo.clip)
    # the decoder's block checkpointing runs only inside the differentiable search
    autograd = importlib.import_module(f"{lab.pack.__name__}.kernels.autograd")
    monkeypatch.setattr(autograd._CheckpointedCall, "apply", _oom)
    with pytest.raises(lab.runtime.ConceptLabError) as e:
        _search(ss, demo.model, demo.vae, pos, neg, lat, refs, clip_vision=demo_cv)
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Seed Search (optimise)] Ran out of memory (OutOfMemoryError)."), msg
    for word in ("resolution", "batch size", "search_steps", "CLIP vision", "bf16 or fp16", "MiB) above the model", "Fix:"):
        assert word in msg, (word, msg)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    monkeypatch.undo()
    guard.check("Seed Search (out of memory)")
    vae_guard.check("Seed Search VAE (out of memory)")
    assert _no_instance_forwards(demo.vae.first_stage_model) == []
    assert _param_state(demo.model.model.diffusion_model) == params   # the original objects, as they were
    # and the node works afterwards
    _search(ss, demo.model, demo.vae, pos, neg, lat, refs, iterations=1)


def test_extract_out_of_memory_is_a_clear_error(lab, cn, demo, monkeypatch):
    guard = lab.runtime.ModelGuard.of(demo.model)
    dm = demo.model.model.diffusion_model
    params = _param_state(dm)
    monkeypatch.setattr(torch.Tensor, "backward", _oom)   # inside the gradient, weights substituted
    with pytest.raises(lab.runtime.ConceptLabError) as e, torch.inference_mode():
        cn.ConceptLabConceptNeuronsExtract.execute(demo.model, demo.clip, demo.vae, subject_images(3), "a three",
                                                     "iterative", 5.0, 1, 0.3, 0, 0, noise_draws=2)
    monkeypatch.undo()
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Concept Neurons Extract] Ran out of memory"), msg
    for word in ("reference images", "resolution", "noise_draws", "prior_images", "bf16 or fp16", "Fix:"):
        assert word in msg, (word, msg)
    guard.check("Extract (out of memory)")
    assert _param_state(dm) == params   # the original parameter objects, as they were


def test_other_errors_pass_through(lab, cn, demo, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("not a memory problem")
    monkeypatch.setattr(torch.Tensor, "backward", boom)
    with pytest.raises(RuntimeError, match="not a memory problem"), torch.inference_mode():
        cn.ConceptLabConceptNeuronsExtract.execute(demo.model, demo.clip, demo.vae, subject_images(3), "a three",
                                                     "iterative", 5.0, 1, 0.3, 0, 0, noise_draws=1)
    assert lab.runtime.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not lab.runtime.is_out_of_memory(ValueError("out of memory"))


# ------------------------------------------------------------------------------------------
# partially loaded models (ComfyUI's lowvram layers)
# ------------------------------------------------------------------------------------------
def _force_partial(lab, model, keep_fraction=0.3):
    """ComfyUI's own partial unload (what free_memory does under memory pressure): most layers
    go to the offload device and are cast at each forward (comfy_cast_weights), their weight
    patches applied then (LowVramPatch)."""
    lab.runtime.load_for_compute(model)
    size = model.model_size()
    model.partially_unload(model.offload_device, int(size * (1 - keep_fraction)))
    casts = [n for n, m in model.model.diffusion_model.named_modules() if getattr(m, "comfy_cast_weights", False)]
    assert model.model.model_lowvram and casts, "ComfyUI did not load the model partially"
    return casts


def _kv_patch(cn, model):
    """A clone with a weight patch (like a LoRA) on one K/V layer."""
    layers = cn.model_layers(model)
    name = sorted(layers)[0]
    clone = model.clone()
    g = torch.Generator().manual_seed(4)
    diff = torch.randn(layers[name]["shape"], generator=g) * 0.05
    clone.add_patches({"diffusion_model." + name: (diff,)}, 1.0)
    return clone, name


def _gradient(lab, cn, model, load=True):
    with torch.inference_mode():
        cond, pooled = cn.encode_text(model.conceptlab_clip, "a three")
        lat = cn.images_to_latents(model.conceptlab_vae, subject_images(3), model.model)
    layers = cn.model_layers(model)
    if load:
        lab.runtime.load_for_compute(model, patched_weights=True)
    loss = cn.ConceptLoss(model, lat, lat[:0], cond, pooled, extract_settings(cn), layers)
    return loss({n: torch.ones(l["shape"]) for n, l in layers.items()})


def test_partially_loaded_model_gives_extract_the_same_gradient(lab, cn, demo):
    import comfy.model_management as mm
    guard = lab.runtime.ModelGuard.of(demo.model)
    clone, patched = _kv_patch(cn, demo.model)
    clone.conceptlab_clip, clone.conceptlab_vae = demo.clip, demo.vae
    loss_full, g_full = _gradient(lab, cn, clone)
    assert not lab.runtime.lowvram_patched(clone)

    _force_partial(lab, clone)
    assert lab.runtime.lowvram_patched(clone)          # the K/V patch is applied at forward time now
    loss_lv, g_lv = _gradient(lab, cn, clone, load=False)
    assert loss_lv == pytest.approx(loss_full, rel=1e-5)   # the forward is the same model ...
    # ... and the scores too: the scored K/V layers read the weight with the layer's patch applied
    # (before, the aliases read the unpatched tensor there and the scores of that layer were wrong)
    for n in g_full:
        assert torch.allclose(g_lv[n], g_full[n], rtol=1e-4, atol=1e-7), n
    assert patched in g_full

    # what load_for_compute(patched_weights=True) asks ComfyUI for on a partially loaded model
    # (a CPU device is always loaded fully by load_models_gpu, so the call is made here directly)
    clone.partially_load(clone.load_device, 1, force_patch_weights=True)
    assert clone.model.model_lowvram and not lab.runtime.lowvram_patched(clone)
    loss_fp, g_fp = _gradient(lab, cn, clone, load=False)
    assert loss_fp == pytest.approx(loss_full, rel=1e-5)
    for n in g_full:
        assert torch.allclose(g_fp[n], g_full[n], rtol=1e-4, atol=1e-7), n
    mm.unload_all_models()
    guard.check("partial load")


def test_partially_loaded_model_gives_seed_search_the_same_result(lab, ss, demo, demo_cv, monkeypatch):
    import comfy.model_management as mm
    guard = lab.runtime.ModelGuard.of(demo.model)
    pos, neg, lat, refs = _search_inputs(lab, demo.clip)
    mm.unload_all_models()
    full = _search(ss, demo.model, demo.vae, pos, neg, lat, refs, clip_vision=demo_cv)
    # the search runs in ComfyUI's sampler, which loads the model itself (fully, on a CPU device);
    # the partial load is made after that, when the differentiable search starts, with ComfyUI's
    # own partial unload (what free_memory does under memory pressure)
    real = ss.differentiable
    seen = {}

    def partially(model, *a, **k):
        seen["casts"] = _force_partial(lab, model)
        return real(model, *a, **k)
    monkeypatch.setattr(ss, "differentiable", partially)
    part = _search(ss, demo.model, demo.vae, pos, neg, lat, refs, clip_vision=demo_cv)
    monkeypatch.undo()
    assert seen["casts"]
    a, b = full.result, part.result
    assert torch.allclose(a.best_z, b.best_z, atol=1e-5), (a.best_z - b.best_z).abs().max()
    assert a.curve == pytest.approx(b.curve, rel=1e-5)
    mm.unload_all_models()
    guard.check("Seed Search (partial load)")


def test_dit_blocks_are_counted_for_the_estimates(lab, demo):
    import flux_family as FF
    tiny = FF.build(lab, "flux")
    dm = tiny.model.model.diffusion_model
    assert lab.runtime.dit_blocks(tiny.model) == len(dm.double_blocks) + len(dm.single_blocks) > 0
    assert lab.runtime.dit_blocks(demo.model) == 0

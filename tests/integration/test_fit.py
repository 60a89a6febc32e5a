"""Fitting the gradient nodes on smaller GPUs (issue 23): every memory setting gives the plain
gradients, on tiny models of every family built through ComfyUI's own classes.

- Extract: checkpointing inside the diffusion model, weight casts made again at backward, K/V
  scores reduced inside backward (accumulators on the device or the host), the batch in chunks,
  and a model ComfyUI loaded only partially (weights streamed): the multiplier gradients equal
  the plain ones to 1e-5 relative (fp32).
- Seed Search: the gradient with respect to the noise through checkpointing and made-again
  casts, and through a partial load, equals the plain one.
- The levers lower what is alive at the peak (counted with the pack's own allocation counter on
  real tensors), and the automatic choice follows the memory ComfyUI reports.
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

import flux_family as FF
from conftest import skip_version, subject_images

FAMILIES = ("sd1", "flux", "flux2", "chroma", "sd3.5", "qwen_image", "zimage")


@pytest.fixture(scope="module")
def MEM(lab):
    return importlib.import_module(f"{lab.pack.__name__}.nodes._memory")


@pytest.fixture(scope="module")
def KM(lab):
    return importlib.import_module(f"{lab.pack.__name__}.kernels.memory")


def _model(lab, family):
    """(MODEL, CLIP, VAE, pixel size) of a tiny model of ``family`` (the demo UNet for SD1.x)."""
    if family == "sd1":
        with torch.inference_mode():
            model, clip, vae, _ = lab.demo.build_demo_model()
        return model, clip, vae, 64
    t = FF.build(lab, family)
    return t.model, t.clip, t.vae, t.width


def _loss(lab, cn, family, px=None, **settings):
    model, clip, vae, size = _model(lab, family)
    return _loss_for(lab, cn, model, clip, vae, px or size, **settings)


def _loss_for(lab, cn, model, clip, vae, px=64, **settings):
    """(MODEL, its K/V layers, plan -> ConceptLoss) on two subject images, two noise draws."""
    images = torch.nn.functional.interpolate(subject_images(2).movedim(-1, 1), size=(px, px)).movedim(1, -1)
    with torch.inference_mode():
        cond, pooled = cn.encode_text(clip, "a three")
        lat = cn.images_to_latents(vae, images, model.model)
    layers = cn.model_layers(model)
    s = cn.ExtractSettings(**dict(dict(noise_draws=2, prior_images=0), **settings))
    lab.runtime.load_for_compute(model, patched_weights=True)
    return model, layers, lambda plan: cn.ConceptLoss(model, lat, lat[:0], cond, pooled, s, layers, plan)


def _multipliers(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(l["shape"], generator=g) > 0.2).float() for n, l in layers.items()}


def _plan(MEM, KM, setting, chunk=0):
    return MEM.Plan(setting, MEM.Levers.of(setting), KM.Estimate(()), chunk=chunk)


def _rel(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_gradients_are_the_plain_ones_in_every_memory_setting(lab, cn, MEM, KM, family):
    model, layers, loss = _loss(lab, cn, family)
    guard = lab.runtime.ModelGuard.of(model)
    mult = _multipliers(layers)
    ref_loss, ref = loss(None)(mult)                 # no plan: everything kept, the whole batch at once
    assert any(g.abs().sum() > 0 for g in ref.values())
    for setting in MEM.SETTINGS:
        for chunk in (0, 1):
            got_loss, got = loss(_plan(MEM, KM, setting, chunk))(mult)
            assert got_loss == pytest.approx(ref_loss, rel=1e-5), (setting, chunk)
            assert _rel(got, ref) <= 1e-5, (setting, chunk, _rel(got, ref))
    guard.check(f"Extract gradients ({family})")


def test_extract_scores_equal_the_plain_autograd_ones(lab, cn, MEM, KM):
    """The scored layers' dL/dm against autograd through plain fp32 copies of the K/V weights
    (the way the pack took them before: ``theta * m`` substituted for each weight)."""
    model, layers, loss = _loss(lab, cn, "flux")
    mult = _multipliers(layers, 1)
    l = loss(_plan(MEM, KM, MEM.CHECKPOINT, 1))
    _, got = l(mult)
    names = sorted(layers)
    with torch.inference_mode(False), lab.runtime.gradients_through(model, trainable=names) as view:
        ms = {n: mult[n].clone().requires_grad_(True) for n in names}
        dm = model.model.diffusion_model
        saved = []
        for n in names:
            owner = dm.get_submodule(n.rpartition(".")[0])
            saved.append((owner, owner._parameters["weight"]))
            owner._parameters["weight"] = view.trainable[n] * ms[n]
        try:
            x0, sigma, noise = l.batch()
            l.loss_on(x0, sigma, noise).backward()
        finally:
            for owner, w in saved:
                owner._parameters["weight"] = w
        plain = {n: ms[n].grad.detach() for n in names}
    kcn = importlib.import_module(f"{lab.pack.__name__}.kernels.concept_neurons")
    for n in names:          # the candidates only: a fused QKV's Q rows are not searched
        cand = kcn.candidate_mask(tuple(layers[n]["shape"]), layers[n]["kind"])
        if cand is not None:
            plain[n] = plain[n] * cand
            assert not got[n][~cand].any()
    assert _rel(got, plain) <= 1e-5


def test_extract_gradients_are_right_on_a_partially_loaded_model(lab, cn, MEM, KM):
    """Weights streamed from the offload device (ComfyUI's partial loading), one K/V layer
    carrying a patch applied at forward time: the scored layers read the weight the model computes
    with, so the gradients equal the fully loaded ones, streamed or not."""
    import comfy.model_management as mm
    model, clip, vae, px = _model(lab, "sd1")
    guard = lab.runtime.ModelGuard.of(model)
    name = sorted(cn.model_layers(model))[0]
    clone = model.clone()
    diff = torch.randn(cn.model_layers(model)[name]["shape"], generator=torch.Generator().manual_seed(4)) * 0.05
    clone.add_patches({"diffusion_model." + name: (diff,)}, 1.0)
    _, layers, loss = _loss_for(lab, cn, clone, clip, vae, px)
    mult = _multipliers(layers, 2)
    _, full = loss(None)(mult)
    lab.runtime.load_for_compute(clone)
    clone.partially_unload(clone.offload_device, int(clone.model_size() * 0.7))
    assert clone.model.model_lowvram and lab.runtime.lowvram_patched(clone)
    for setting in (MEM.FULL, MEM.OFFLOAD):
        _, got = loss(_plan(MEM, KM, setting, 1))(mult)
        assert _rel(got, full) <= 1e-5, setting
    mm.unload_all_models()
    guard.check("Extract on a partially loaded clone")


def _noise_gradient(lab, ss, MEM, family, levers, dtype=None):
    """d(objective)/d(noise) of one short sampled trajectory, through ``ss.differentiable``."""
    kseed = importlib.import_module(f"{lab.pack.__name__}.kernels.seed_search")
    model, clip, vae, px = _model(lab, family)
    N = lab.nodes
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, "an eight")
        (neg,) = N.CLIPTextEncode().encode(clip, "")
    refs = torch.nn.functional.interpolate(subject_images(2).movedim(-1, 1), size=(px, px)).movedim(1, -1)
    lab.runtime.load_for_compute(model, getattr(vae, "patcher", None) or model)
    objective = ss.Objective(model, vae, None, refs.movedim(-1, 1), 1.0, 1.0)
    channels = lab.runtime.latent_channels(model.model)
    ratio = lab.runtime.vae_ratio(vae)
    shape = (1, channels, 1, px // ratio, px // ratio) if lab.runtime.frame_latents(model.model) \
        else (1, channels, px // ratio, px // ratio)
    lat = torch.zeros(shape)
    z0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    sigmas = ss.schedule(model, 2)
    step_loss = objective.step_loss_fn(2, 2)

    def body(denoise, to_x, sig):
        with ss.differentiable(model, vae, None, levers):
            loss, _, g = kseed.sample_and_grad(z0, to_x, denoise, sig.float(), step_loss)
        return loss, g
    return ss.run_inside_sampler(model, pos, neg, lat, 3.0, sigmas, z0, 1, body)


@pytest.mark.parametrize("family", ("sd1", "flux", "sd3.5", "qwen_image"))
def test_seed_search_gradients_are_the_plain_ones_with_checkpointing(lab, ss, MEM, family):
    loss0, g0 = _noise_gradient(lab, ss, MEM, family, MEM.Levers())
    assert g0.abs().sum() > 0
    for levers in (MEM.Levers.of(MEM.RECAST), MEM.Levers.of(MEM.CHECKPOINT)):
        loss, g = _noise_gradient(lab, ss, MEM, family, levers)
        assert torch.allclose(loss, loss0, rtol=1e-5)
        assert float((g - g0).abs().max() / g0.abs().max()) <= 1e-5, levers


def _peak_of(run) -> int:
    """What ``run`` added to the process heap at its worst (glibc's count of bytes in use, read
    after every torch operation: ``benchmarks/fakemem.HeapPeak``)."""
    fakemem = importlib.import_module("benchmarks.fakemem")
    heap = fakemem.HeapPeak()
    with heap:
        run()
    return heap.added


def test_checkpointing_and_chunks_lower_the_peak(lab, cn, MEM, KM):
    """At 256 px on the tiny Flux (a 32 x 32 latent, 256 image tokens), one gradient evaluation:
    checkpointing inside the model, then one latent per forward, each hold less at the peak."""
    _, layers, loss = _loss(lab, cn, "flux", px=256, noise_draws=4)
    mult = _multipliers(layers)
    runs = (("full", None), ("checkpoint", _plan(MEM, KM, MEM.CHECKPOINT)),
            ("checkpoint, chunks of 1", _plan(MEM, KM, MEM.CHECKPOINT, 1)))
    loss(None)(mult)                        # warm: the first call allocates caches once
    peaks = {name: _peak_of(lambda plan=plan: loss(plan)(mult)) for name, plan in runs}
    assert peaks["checkpoint"] < 0.8 * peaks["full"], peaks
    assert peaks["checkpoint, chunks of 1"] < 0.8 * peaks["checkpoint"], peaks


def test_weight_casts_are_made_again_at_backward(lab, cn, MEM, KM, demo):
    """A model stored in fp16 computes in fp32 on a CPU (ComfyUI's manual cast): "recompute
    casts" makes each cast again at backward, and the gradients are the same to the bit."""
    import comfy.model_management as mm
    import comfy.ops
    loading = importlib.import_module("benchmarks.tiny.loading")
    model = loading.load(loading.sd15_state_dict(), "fp16")
    assert model.model.manual_cast_dtype == torch.float32
    _, layers, loss = _loss_for(lab, cn, model, loading.clip_768(), demo.vae)
    made = []
    real = comfy.ops.cast_bias_weight

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)
    mult = _multipliers(layers)
    _, full = loss(_plan(MEM, KM, MEM.FULL))(mult)
    comfy.ops.cast_bias_weight = counting
    try:
        _, again = loss(_plan(MEM, KM, MEM.RECAST))(mult)
    finally:
        comfy.ops.cast_bias_weight = real
    assert all(torch.equal(again[n], full[n]) for n in full)
    assert made
    mm.unload_all_models()


def test_auto_takes_the_fastest_setting_that_fits(lab, cn, MEM, demo, monkeypatch):
    """What ComfyUI reports available decides: plenty gives "full" with the whole batch; less
    gives smaller chunks, then checkpointing, then streaming; a forced setting is kept; a wrong
    one is refused clearly."""
    with torch.inference_mode():
        subject = cn.images_to_latents(demo.vae, subject_images(3), demo.model.model)
    layers = cn.model_layers(demo.model)
    s = cn.ExtractSettings(prior_images=8, noise_draws=4)
    weights = MEM.weight_bytes(demo.model)

    def plan_with(available, requested="auto"):
        monkeypatch.setattr(MEM, "available_bytes", lambda device: int(available))
        return cn.memory_plan(demo.model, subject, 8, s, layers, requested)
    roomy = plan_with(1 << 40)
    assert roomy.setting == MEM.FULL and roomy.chunk == 0 and not roomy.forced
    batch = (3 + 8) * 4
    full_need = roomy.estimate.total
    tighter = plan_with(weights + full_need // 4)
    assert tighter.setting == MEM.FULL and 0 < tighter.chunk < batch
    # what the plan asks for: the estimate and the allocator's margin
    one = cn.memory_estimate(demo.model, subject, 8, s, layers, MEM.FULL, 1).with_allocator_margin().total
    ck = cn.memory_estimate(demo.model, subject, 8, s, layers, MEM.CHECKPOINT, 1).with_allocator_margin().total
    assert ck < one
    squeezed = plan_with(weights + (ck + one) // 2)
    assert squeezed.setting == MEM.CHECKPOINT and 1 <= squeezed.chunk < batch
    streamed = plan_with(MEM.stream_floor(demo.model) + ck)
    assert streamed.setting == MEM.OFFLOAD
    forced = plan_with(1 << 40, MEM.CHECKPOINT)
    assert forced.setting == MEM.CHECKPOINT and forced.forced and forced.chunk == 0
    assert forced.describe().startswith("memory: checkpoint (forced); estimated ")
    with pytest.raises(lab.runtime.ConceptLabError, match=r"Unknown memory setting 'tiny'.*Fix: Use one of: auto"):
        plan_with(1 << 40, "tiny")


@pytest.mark.parametrize("family", ["sd1", "flux", "qwen_image"])
def test_the_estimates_read_the_models_blocks(lab, cn, ss, MEM, KM, family):
    """Extract's and Seed Search's estimates take a DiT's activations per block (its blocks'
    inputs, DIT_FULL_FACTOR, DIT_UNIT_BLOCKS) and a UNet's from ComfyUI's inference figure (a
    DiT's estimate once fell back on the UNet formula: its block count reached the wrong
    argument)."""
    model, clip, vae, px = _model(lab, family)
    lat = torch.zeros(2, lab.runtime.latent_channels(model.model), px // 8, px // 8)
    if lab.runtime.frame_latents(model.model):     # Qwen-Image: (B, C, 1, H, W)
        lat = lat.unsqueeze(2)
    layers = cn.model_layers(model)
    s = cn.ExtractSettings(noise_draws=1, prior_images=0)
    dtype = lab.runtime.compute_dtype(model.model)
    unit = MEM.unit_input_bytes(model, lat.shape, dtype)
    blocks = cn.dit_blocks(model)
    assert bool(blocks) == (family != "sd1") and unit > 0
    full = cn.memory_estimate(model, lat, 0, s, layers, "full").as_dict()["diffusion forward with autograd"]
    ckpt = cn.memory_estimate(model, lat, 0, s, layers, "checkpoint").as_dict()["diffusion forward, checkpointed"]
    assert ckpt == KM.checkpointed_forward_bytes(lat.shape, dtype, 1.0, blocks, unit)
    if blocks:
        assert full == int(KM.DIT_FULL_FACTOR * unit)
        assert ckpt == int(unit * (1 + KM.DIT_UNIT_BLOCKS / blocks))
    else:
        assert full == KM.train_forward_bytes(lat.shape, dtype, lab.runtime.train_usage_factor(model))
    seed = ss.memory_estimate(model, vae, None, lat, 1.0, 1, False, "checkpoint").as_dict()
    step = next(v for k, v in seed.items() if k.startswith("diffusion step"))
    assert step == KM.checkpointed_forward_bytes(lat.shape, dtype, 1.0, blocks,
                                                 MEM.unit_input_bytes(model, lat.shape, dtype))


@pytest.mark.parametrize("kind", ["SD VAE", "Wan 2.1 VAE"])
def test_the_vae_decoder_is_checkpointed_block_by_block(lab, ss, demo, kind):
    """Seed Search decodes with gradients through a decoder checkpointed block by block: its
    blocks are found (SD's and the Wan 2.1 VAE's of Qwen-Image, one frame) and the gradient
    through it equals the plain one to 1e-5 (fp32)."""
    if kind == "SD VAE":
        vae, lat = demo.vae, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    else:
        tq = pytest.importorskip("benchmarks.tiny.qwen_image")
        try:
            vae = tq.wan21_vae()
        except Exception as e:  # noqa: BLE001
            skip_version(f"it cannot build the Wan 2.1 VAE: {e}")
        lat = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    fsm = ss._vae_module(vae)
    target = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    KA = importlib.import_module(f"{lab.pack.__name__}.kernels.autograd")

    def grad(checkpoint: bool):
        with torch.inference_mode(False), KA.differentiable_weights(fsm, snapshot_saved=False), \
                contextlib.ExitStack() as stack:
            n = stack.enter_context(ss.checkpointed_blocks(fsm.decoder)) if checkpoint else None
            stack.enter_context(KA.activation_snapshots(list(fsm.parameters()) + list(fsm.buffers())))
            z = lat.clone().requires_grad_(True)
            out = ss.vae_decode(vae, z)
            ((out - target[:, :, :out.shape[-2], :out.shape[-1]]) ** 2).mean().backward()
            return z.grad, n

    plain, _ = grad(False)
    ckpt, blocks = grad(True)
    assert blocks, "no decoder block was checkpointed"
    assert float((ckpt - plain).abs().max() / plain.abs().max()) < 1e-5


def test_the_allocator_margin_is_the_one_the_counts_add(lab, K):
    """The margin the nodes ask ComfyUI for beyond their estimate is the one the fit section adds
    to its fake-tensor counts (benchmarks/fakemem.py), so that what they plan is what is counted."""
    fakemem = importlib.import_module("benchmarks.fakemem")
    assert K.memory.ALLOCATOR_FRAGMENTATION == fakemem.FRAGMENTATION
    assert K.memory.ALLOCATOR_WORKSPACE == fakemem.WORKSPACE_BYTES

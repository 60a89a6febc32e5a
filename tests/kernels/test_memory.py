"""kernels/memory.py: the estimates handed to ComfyUI's load_models_gpu (pure arithmetic)."""
import pytest


def test_inference_formula_is_comfyuis(K):
    M = K.memory
    # ComfyUI 0.3.x BaseModel.memory_required (SDPA): area * dtype bytes * 0.01 * factor MiB
    assert M.inference_forward_bytes((2, 4, 64, 64), "float16", 1.0) == int(2 * 64 * 64 * 2 * 0.01 * 2 ** 20)
    assert M.inference_forward_bytes((1, 16, 1, 8, 8), "bf16", 3.1) == int(64 * 2 * 0.01 * 3.1 * 2 ** 20)
    assert M.train_forward_bytes((2, 4, 64, 64), "float32") == int(
        M.TRAIN_FORWARD_FACTOR * M.inference_forward_bytes((2, 4, 64, 64), "float32"))


def test_dtype_bytes(K):
    import torch
    M = K.memory
    assert [M.dtype_bytes(d) for d in (torch.float32, torch.bfloat16, torch.float16, "fp8")] == [4, 2, 2, 1]
    with pytest.raises(ValueError):
        M.dtype_bytes("int7")


def test_cfg_doubles_the_model_batch(K):
    M = K.memory
    assert M.call_batch(3, 5.0) == 6 and M.call_batch(3, 1.0) == 3
    a = M.seed_search_estimate((1, 4, 32, 32), "float32", 1.0, cfg=1.0, search_steps=4)
    b = M.seed_search_estimate((1, 4, 32, 32), "float32", 1.0, cfg=3.0, search_steps=4)
    assert b.as_dict()["diffusion step with autograd"] == pytest.approx(2 * a.as_dict()["diffusion step with autograd"], abs=16)


def test_seed_search_grows_with_resolution_batch_and_vision(K):
    M = K.memory
    vit = M.VitShape(224, 14, 32, 1280, 5120)
    def est(b, s, dec=0, v=None, steps=6):
        return M.seed_search_estimate((b, 4, s, s), "float16", 1.0, 5.0, steps, dec, v, "float16").total
    assert est(1, 96) > 2 * est(1, 64) > 0            # area: (96/64)^2 = 2.25
    assert est(2, 64) == pytest.approx(2 * est(1, 64), rel=1e-3)
    assert est(1, 64, dec=10 ** 9) == est(1, 64) + int(M.VAE_GRAD_FACTOR * 10 ** 9)
    assert est(1, 64, v=vit) > est(1, 64)
    assert est(1, 64, steps=12) > est(1, 64, steps=6)  # only the kept step latents: small
    assert est(1, 64, steps=12) - est(1, 64, steps=6) == 6 * 4 * 64 * 64 * 4
    # the CLIP vision term is per image and per layer
    assert M.transformer_train_bytes(vit, 2, "float16") == 2 * M.transformer_train_bytes(vit, 1, "float16")
    half = M.VitShape(224, 14, 16, 1280, 5120)
    assert M.transformer_train_bytes(half, 1, "float16") < M.transformer_train_bytes(vit, 1, "float16")


def test_seed_rank_is_an_inference_estimate(K):
    M = K.memory
    r = M.seed_rank_estimate((16, 4, 64, 64), "float16", 1.0, 5.0)
    assert r.total == M.inference_forward_bytes((32, 4, 64, 64), "float16")
    s = M.seed_search_estimate((16, 4, 64, 64), "float16", 1.0, 5.0, 1)
    assert s.total > r.total


def test_extract_grows_with_images_draws_and_kv(K):
    M = K.memory
    e = lambda n, draws, kv=10 ** 6, dt="float32": M.extract_estimate((n, 4, 64, 64), "float32", 1.0, draws, kv, dt).total
    assert e(6, 4) > e(3, 4) > e(3, 1)
    assert e(3, 4) - e(3, 2) == pytest.approx(M.train_forward_bytes((6, 4, 64, 64), "float32"), abs=16)
    # one fp32 score accumulator per candidate K/V weight, whatever the weights' precision (the
    # scored layers make each weight when the layer runs: no lifted copy is kept) ...
    assert e(3, 1, kv=2 * 10 ** 6) - e(3, 1) == 10 ** 6 * 4
    assert e(3, 1, dt="float16") == e(3, 1)
    # ... plus three fp32 copies of the largest layer while it runs; none on the device when the
    # accumulators wait on the host
    g = M.KVGeometry(10 ** 6, 10 ** 5)
    assert M.extract_estimate((3, 4, 64, 64), "float32", 1.0, 1, g).total - e(3, 1) == 12 * 10 ** 5
    assert (M.extract_estimate((3, 4, 64, 64), "float32", 1.0, 1, g).total
            - M.extract_estimate((3, 4, 64, 64), "float32", 1.0, 1, g, host_accumulators=True).total) == 4 * 10 ** 6
    est = M.extract_estimate((3, 4, 64, 64), "float32", 1.0, 2, 100)
    assert est.total == sum(est.as_dict().values()) and "MiB" in est.describe()


def _measured_probes(node, trail=()):
    """(where, probe) for every probe of the committed scale figures that recorded its estimate."""
    if isinstance(node, dict):
        if "estimate_args" in node:
            yield "/".join(trail), node
        for k, v in node.items():
            yield from _measured_probes(v, trail + (k,))


def test_estimates_cover_the_peaks_measured_at_real_scale(K):
    """The estimates handed to ComfyUI, re-evaluated with today's factors on the arguments the
    nodes computed in ``python -m benchmarks scale`` (full-size SD1.5, SD2.1, SDXL, a Flux slice;
    docs/figures/scale.json), are at or above the measured peak above the loaded weights, and
    not more than twice it."""
    import json
    from pathlib import Path
    M = K.memory
    figures = json.loads((Path(__file__).resolve().parents[2] / "docs" / "figures" / "scale.json").read_text())
    assert not figures.get("quick"), "the committed figures must come from a full-size run"
    checked = []
    for where, probe in _measured_probes(figures):
        call = probe["estimate_args"]
        def revive(v):      # the kernels' dataclasses, recorded as {class name: fields}
            if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("VitShape", "KVGeometry"):
                name, fields = next(iter(v.items()))
                return getattr(M, name)(**fields)
            return v
        kwargs = {k: revive(v) for k, v in call["kwargs"].items()}
        if call["kernel"] == "seed_search_estimate":
            kwargs.setdefault("phases", True)     # as the node calls it today: the larger phase counts
        est = getattr(M, call["kernel"])(*[revive(a) for a in call["args"]], **kwargs).total
        measured = (probe["peak_above_loaded_gb"] * 2 ** 30 if "peak_above_loaded_gb" in probe
                    else probe["peak_above_loaded_mb"] * 2 ** 20)
        checked.append((where, round(est / measured, 2)))
        assert measured <= est <= 2 * measured, (where, est / 2 ** 30, measured / 2 ** 30)
    assert len(checked) >= 4, checked


def test_a_dit_keeps_activations_per_block(K):
    M = K.memory
    two = M.extract_estimate((1, 16, 64, 64), "float32", 3.1, 1, 0, dit_blocks=2).total
    full = M.extract_estimate((1, 16, 64, 64), "float32", 3.1, 1, 0, dit_blocks=57).total
    assert full == pytest.approx(57 / 2 * two, rel=1e-6)
    unet = M.extract_estimate((1, 4, 64, 64), "float32", 1.0, 1, 0).total
    assert unet == M.train_forward_bytes((1, 4, 64, 64), "float32")
    step = M.seed_search_estimate((1, 16, 64, 64), "bf16", 3.1, 1.0, 2, dit_blocks=57).as_dict()
    assert step["diffusion step with autograd"] == M.train_forward_bytes((1, 16, 64, 64), "bf16", 3.1, 57)

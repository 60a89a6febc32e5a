"""Shared fixtures. Tiers: tests/kernels (pure torch), tests/integration (ComfyUI in-process),
tests/e2e (a real ComfyUI server over HTTP, and its front end in Chromium).

Tests run with ``--import-mode=importlib`` (see pyproject.toml) so the pack root never lands on
sys.path, where our ``nodes/`` package would shadow ComfyUI's ``nodes`` module. The pack is
loaded through ComfyUI's own ``load_custom_node``, as ComfyUI does.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


#: The reason prefix of the one kind of skip allowed on every tier: a test that does not apply to
#: the running ComfyUI version (it says which version and why). With CONCEPTLAB_NO_SKIPS=1 (every
#: tier of .ci/run) any other skip fails the run.
NOT_FOR_VERSION = "does not apply to ComfyUI "


def skip_version(reason: str, version: str | None = None):
    """Skip a test that does not apply to the running ComfyUI version, saying why (allowed on
    every tier)."""
    version = version or cr.comfy_version()
    pytest.skip(f"{NOT_FOR_VERSION}{version}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CONCEPTLAB_NO_SKIPS") == "1" and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if not reason.removeprefix("Skipped: ").startswith(NOT_FOR_VERSION):
            rep.outcome = "failed"
            rep.longrepr = (f"skipped on a tier that allows no skips (CONCEPTLAB_NO_SKIPS=1) but for "
                            f"tests that do not apply to the running ComfyUI version: {reason}")


def _load_by_path(name: str, path: Path, package_dir: Path | None = None):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# The dev-tools package (benchmarks/: harness, digits world), imported under its own name
# without putting the pack root on sys.path. No ComfyUI import happens until bootstrap().
_load_by_path("benchmarks", ROOT / "benchmarks" / "__init__.py", ROOT / "benchmarks")
cr = importlib.import_module("benchmarks.comfy_runtime")
sys.modules.setdefault("conceptlab_comfy_runtime", cr)  # short alias for test modules


def kernels():
    """The pack's kernels package, imported alone (no ComfyUI) as ``conceptlab_kernels``."""
    _load_by_path("conceptlab_kernels", ROOT / "kernels" / "__init__.py", ROOT / "kernels")
    names = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_"))
    return SimpleNamespace(**{m: importlib.import_module(f"conceptlab_kernels.{m}") for m in names})


@pytest.fixture(scope="session")
def K():
    """Kernels namespace: one attribute per module of kernels/ (K.autograd, K.saliency, ...)."""
    return kernels()


@pytest.fixture(scope="session")
def lab():
    """ComfyUI imported in-process (CPU) with the pack loaded through load_custom_node."""
    try:
        pack = cr.bootstrap()
    except cr.ComfyNotFound as e:
        pytest.skip(str(e))
    import nodes as comfy_nodes
    return SimpleNamespace(
        pack=pack, nodes=comfy_nodes, version=cr.comfy_version(),
        runtime=cr.pack_module("nodes._runtime"), demo=cr.pack_module("nodes.demo"),
        model_info=cr.pack_module("nodes.model_info"))


@pytest.fixture
def demo(lab):
    """A fresh demo (MODEL, CLIP, VAE), built under inference_mode as ComfyUI's loaders run."""
    import torch
    with torch.inference_mode():
        model, clip, vae, info = lab.demo.build_demo_model()
    return SimpleNamespace(model=model, clip=clip, vae=vae, info=info)


@pytest.fixture(scope="session")
def server():
    """A real ComfyUI server on 127.0.0.1 with the pack in custom_nodes (temporary base dir)."""
    try:
        cr.comfy_root()
    except cr.ComfyNotFound as e:
        pytest.skip(str(e))
    srv = cr.ComfyServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def object_info(server):
    """The server's /object_info (every node's inputs), fetched once."""
    return server.get("/object_info")


def tiny_unet(lab, family: str):
    """A tiny SD2.x (linear projections, v-prediction) or SDXL (ADM from a pooled text vector and
    size embeddings) UNet from ComfyUI's own config classes, seeded random weights, as a
    ModelPatcher (the demo UNet's widths: its K/V layers have the demo's shapes)."""
    import torch
    import comfy.model_base as mb
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    cfg = dict(lab.demo.UNET_CONFIG, use_linear_in_transformer=True)
    if family == "sd2":
        mc = comfy.supported_models.SD20(cfg)
    else:
        cfg.update(adm_in_channels=64 + 6 * 256, num_classes="sequential")  # pooled text (64) + 6 size embeddings
        mc = comfy.supported_models.SDXL(cfg)
    mc.unet_config.update(num_head_channels=16, num_heads=-1)  # the configs' defaults assume 64-wide heads
    with torch.inference_mode():
        base = mb.BaseModel(mc, model_type=mb.ModelType.V_PREDICTION) if family == "sd2" else mc.get_model({})
        g = torch.Generator().manual_seed(1)
        for q in base.diffusion_model.parameters():
            q.copy_(torch.randn(q.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_flux(lab, scale: float = 0.05):
    """A tiny Flux.1-dev-style model (guidance embedding, pooled text vector) from ComfyUI's own
    config and model classes, seeded random weights (std ``scale``), as a ModelPatcher
    (benchmarks/tiny/flux.py). It takes the demo CLIP's conditioning and 16-channel latents.
    Needs ComfyUI 0.3.x."""
    tiny_flux_mod = importlib.import_module("benchmarks.tiny.flux")
    tiny = importlib.import_module("benchmarks.tiny")
    try:
        return tiny_flux_mod.flux1_model(scale)
    except tiny.Unavailable:
        pytest.skip(f"{lab.version} has no Flux classes; set COMFYUI_PATH to a ComfyUI 0.3.x checkout")


def subject_images(n: int = 3):
    """A concept's subject: one held-out handwritten three of the digits world, in n colours
    (n, 64, 64, 3)."""
    import numpy as np
    import torch
    from benchmarks.world import scenes as S
    cfg = S.WorldConfig()
    subject = int(S.heldout_indices(cfg, 3)[0])
    names = cfg.colour_names
    imgs = [S.render_subject(cfg, subject, colour=names[i % len(names)]).image for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).float() / 255.0


def extract_settings(cn, **kw):
    """Concept-neuron extraction settings small enough for tiny models (5 % budget, 3 rounds)."""
    base = dict(procedure="iterative", budget_fraction=0.05, iterations=3, prior_images=0, prior_steps=2,
                noise_draws=2)
    base.update(kw)
    return cn.ExtractSettings(**base)


def extract_concept(cn, model, clip, vae, **kw):
    """The subject's concept ("a three") extracted from ``model`` with :func:`extract_settings`."""
    import torch
    with torch.inference_mode():
        return cn.extract(model, clip, vae, subject_images(), "a three", extract_settings(cn, **kw))


def check_apply(lab, cn, model, concept) -> tuple:
    """Concept Neurons Apply at strength 1 and 0.5: exactly the concept's layers change, only at
    its indices (to 0 and to half), every other weight stays bit-identical, and the incoming MODEL
    is untouched, also after the clones were loaded. Returns the two clones."""
    import torch
    import comfy.model_management as mm

    def weights(m):   # the diffusion-model weights a MODEL computes with (its own patches applied)
        mm.load_models_gpu([m])
        return {n: p.detach().clone() for n, p in m.model.diffusion_model.named_parameters()}
    guard = lab.runtime.ModelGuard.of(model)
    layers = sorted(n for n in concept.layers if concept.indices[n].numel())   # those it shuts weights of
    before = weights(model)
    with torch.inference_mode():
        full = cn.ConceptLabConceptNeuronsApply.execute(model, concept, 1.0)[0]
        half = cn.ConceptLabConceptNeuronsApply.execute(model, concept, 0.5)[0]
    guard.check("apply")
    for patched, factor in ((full, 0.0), (half, 0.5)):
        after = weights(patched)
        changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
        assert changed == layers, changed
        for n in layers:
            w0, w = before[n].reshape(-1), after[n].reshape(-1)
            idx = concept.indices[n]
            assert torch.allclose(w[idx], factor * w0[idx])
            keep = torch.ones_like(w, dtype=torch.bool)
            keep[idx] = False
            assert torch.equal(w[keep], w0[keep])
    mm.unload_all_models()
    guard.check("apply (after loading the clones)")
    return full, half


def check_cross_family(lab, cn, model, clip, concept, label: str) -> None:
    """On a 16-channel model of family ``label`` (e.g. "Z-Image"): its concept is refused on the
    SD3-style demo DiT and an SD3 concept on it (Apply), Combine refuses to mix them, and Extract
    refuses a 4-channel VAE; ``model`` stays bit-identical."""
    import torch
    guard = lab.runtime.ModelGuard.of(model)
    with torch.inference_mode():  # the SD3-style demo MMDiT, on the demo's 4-channel latents
        dit, _, vae4, _ = lab.demo.build_demo_model("digits_dit")
    sd3 = extract_concept(cn, dit, clip, vae4, iterations=1, noise_draws=1)
    assert sd3.family == "sd3"
    for c, target, words in ((concept, dit, (f"made for a {label} model", "MODEL is SD3")),
                             (sd3, model, ("made for a SD3", f"MODEL is {label}"))):
        with pytest.raises(lab.runtime.ConceptLabError) as e:
            cn.ConceptLabConceptNeuronsApply.execute(target, c, 1.0)
        msg = str(e.value)
        assert msg.startswith("[ConceptLab Concept Neurons Apply]") and "Fix:" in msg
        assert all(w in msg for w in words), msg
    with pytest.raises(lab.runtime.ConceptLabError, match="different models"):
        cn.ConceptLabConceptNeuronsCombine.execute(concept, sd3)
    with pytest.raises(lab.runtime.ConceptLabError) as e:
        cn.ConceptLabConceptNeuronsExtract.execute(model, clip, vae4, subject_images(), "a three", "iterative",
                                                     0.4, 1, 0.3, 0, 0)
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Concept Neurons Extract]"), msg
    assert "4-channel latents" in msg and "16-channel latents" in msg and "Fix: Connect the VAE" in msg, msg
    guard.check("refusals")


def check_save_load(cn, concept, folder, monkeypatch, prefix: str) -> tuple:
    """Concept Neurons Save into ``folder`` (as models/concept_neurons), then Load: the same
    family, fingerprint, layers and indices. Returns Load's (concept, info)."""
    import torch
    import folder_paths
    entry = folder_paths.folder_names_and_paths[cn.FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, cn.FOLDER, ([str(folder)], entry[1]))
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    name = cn.ConceptLabConceptNeuronsSave.execute(concept, prefix).result[0]
    back, info = cn.ConceptLabConceptNeuronsLoad.execute(name)
    assert back.family == concept.family and back.fingerprint == concept.fingerprint
    assert back.layers == concept.layers
    assert all(torch.equal(back.indices[n], concept.indices[n]) for n in concept.indices)
    assert f"shut: {concept.count} of {concept.candidates}" in info
    return back, info


@contextlib.contextmanager
def unthrottled_progress():
    """ComfyUI's progress hook called on every update for the duration of the block.

    ComfyUI 0.3.5x and later throttle ``ProgressBar`` (an update reaches the hook only when 100 ms
    and 1 % have passed since the last one; the first and the final update always do). A test
    that acts from the hook at a given value would then depend on timing: on a fast run the hook
    never sees that value. With both thresholds at 0 every update reaches the hook, as on a slow
    run; ComfyUI's own code path is otherwise unchanged."""
    import comfy.utils
    saved = {n: getattr(comfy.utils, n) for n in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT")
             if hasattr(comfy.utils, n)}
    for n in saved:
        setattr(comfy.utils, n, 0)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(comfy.utils, n, v)


@contextlib.contextmanager
def interrupt_at_progress(lab, value: int):
    """Press ComfyUI's cancel once a progress bar reaches ``value``; expect the interruption, and
    expect it before the bar moves on (the node checks for cancel at every step and every model
    call). Deterministic: the hook sees every update (:func:`unthrottled_progress`)."""
    import comfy.model_management as mm
    import comfy.utils
    old = getattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    seen = []

    def hook(current, total, preview, *a, **k):
        seen.append(current)
        if current >= value:
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with unthrottled_progress(), pytest.raises(lab.runtime.interrupt_types()):
            yield seen
        assert seen and seen[-1] == value, f"cancel pressed at {value}, but the bar went on: {seen}"
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old)


# the pack's node modules, one fixture each
@pytest.fixture(scope="session")
def cn(lab):
    return cr.pack_module("nodes.concept_neurons")


@pytest.fixture(scope="session")
def ss(lab):
    return cr.pack_module("nodes.seed_search")


@pytest.fixture(scope="session")
def sal(lab):
    return cr.pack_module("nodes.saliency")

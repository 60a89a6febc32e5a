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


#: The reason prefix of a skip that is allowed on the current tier: a test about an old ComfyUI.
#: With CONCEPTLAB_NO_SKIPS=1 (.ci/run's current-ComfyUI tier) every other skip fails the run.
OLD_ONLY = "only for old ComfyUI: "


def skip_old_only(reason: str):
    """Skip a test that is about an old ComfyUI (allowed on every tier)."""
    pytest.skip(OLD_ONLY + reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CONCEPTLAB_NO_SKIPS") == "1" and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if not reason.removeprefix("Skipped: ").startswith(OLD_ONLY):
            rep.outcome = "failed"
            rep.longrepr = (f"skipped on a tier that allows no skips (CONCEPTLAB_NO_SKIPS=1) but for "
                            f"tests about an old ComfyUI: {reason}")


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
        pack=pack, nodes=comfy_nodes, version=cr.comfy_version(), modern=cr.is_modern(),
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


def needs_modern(lab, what: str):
    if not lab.modern:
        pytest.skip(f"{what} needs a ComfyUI with comfy_api (0.3.x); this is {lab.version}. "
                    "Set COMFYUI_PATH to a newer ComfyUI checkout to run it.")


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


@contextlib.contextmanager
def interrupt_at_progress(lab, value: int):
    """Press ComfyUI's cancel once a progress bar reaches ``value``; expect the interruption."""
    import comfy.model_management as mm
    import comfy.utils
    old = getattr(comfy.utils, "PROGRESS_BAR_HOOK", None)

    def hook(current, total, preview, *a, **k):
        if current >= value:
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(lab.runtime.interrupt_types()):
            yield
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old)

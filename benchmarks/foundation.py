"""``python -m benchmarks foundation``: what gradients through a ComfyUI model cost.

For the demo model and a mid-size SD1.x-architecture UNet (both built through ComfyUI's own
classes under ``torch.inference_mode()``, as ComfyUI's loaders do), one forward + backward with
gradients on the cross-attention K/V weights and on the input noise, two ways:

- ``alias``: Concept Lab's way (``nodes/_runtime.gradients_through``): zero-copy aliases;
- ``clone``: the usual workaround, a full copy of every weight as normal tensors.

Both use the same activation snapshots (ComfyUI updates activations in place, so either way
needs them). Reported: bytes of weights copied, bytes of activation snapshots per forward, and
the wall-time ratio alias / clone (best of 5, measured in one run).
"""
from __future__ import annotations

import time

import torch

from . import comfy_runtime as cr

MID_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 128,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 4],
    "transformer_depth": [1, 1, 1], "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": 768,
    "use_linear_in_transformer": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
    "use_checkpoint": False, "use_spatial_transformer": True, "legacy": False,
    "num_heads": 8, "num_head_channels": -1,
}


def _mid_model():
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    demo = cr.pack_module("nodes.demo")
    with torch.inference_mode():
        base = comfy.supported_models.SD15(dict(MID_UNET)).get_model({})
        demo._seeded_init_(base.diffusion_model, 7)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _demo_model():
    demo = cr.pack_module("nodes.demo")
    with torch.inference_mode():
        return demo.build_demo_model()[0]


def measure(model, latent: int, ctx_dim: int, repeats: int = 5) -> dict:
    rt = cr.pack_module("nodes._runtime")
    layers = cr.pack_module("kernels.layers")
    fp = cr.pack_module("kernels.fingerprint")
    dm = model.model.diffusion_model
    kv = [l.name for l in layers.concept_kv_layers(n for n, _ in dm.named_parameters())]
    param_bytes = sum(p.numel() * p.element_size() for p in dm.parameters())
    before = fp.state_digest(model.model.state_dict())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, latent, latent, generator=g)
    cond = torch.randn(1, 77, ctx_dim, generator=g)
    sigma = torch.tensor([3.0])
    rt.load_for_compute(model)

    def step_alias():
        with rt.gradients_through(model, trainable=kv) as view:
            x = x0.clone().requires_grad_(True)
            model.model.apply_model(x, sigma, c_crossattn=cond).pow(2).mean().backward()
        return view

    def step_clone():
        # the usual workaround: copy every weight into normal tensors, then differentiate, with
        # the same activation snapshots (ComfyUI's in-place residuals need them either way)
        kag = cr.pack_module("kernels.autograd")
        with torch.inference_mode(False), torch.enable_grad():
            params = {n: p.detach().clone() for n, p in dm.named_parameters()}
            buffers = {n: b.detach().clone() for n, b in dm.named_buffers()}
            copied = sum(t.numel() * t.element_size() for t in (*params.values(), *buffers.values()))
            with torch.nn.utils.stateless._reparametrize_module(dm, {**params, **buffers}):
                with kag.differentiable_weights(dm, trainable=kv):  # aliases of the copies
                    x = x0.clone().requires_grad_(True)
                    model.model.apply_model(x, sigma, c_crossattn=cond).pow(2).mean().backward()
        return copied

    with torch.inference_mode():  # as inside a ComfyUI node
        step_alias()  # warm-up
        step_clone()
        t_alias, t_clone = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            view = step_alias()
            t_alias.append(time.perf_counter() - t)
            t = time.perf_counter()
            copied = step_clone()
            t_clone.append(time.perf_counter() - t)
    unchanged = fp.state_digest(model.model.state_dict()) == before
    return {
        "parameters": sum(p.numel() for p in dm.parameters()),
        "param_bytes": param_bytes,
        "alias_weight_bytes_copied": view.copied_bytes,
        "clone_weight_bytes_copied": copied,
        "activation_snapshot_bytes": view.snapshot_bytes,
        "time_ratio_alias_vs_clone": round(min(t_alias) / min(t_clone), 3),
        "weights_bit_identical_after": unchanged,
    }


def run(args) -> dict:
    cr.bootstrap()
    res = {"comfyui": cr.comfy_version(),
           "demo_unet": measure(_demo_model(), 8, 64),
           "mid_unet": measure(_mid_model(), 32, 768)}
    return res

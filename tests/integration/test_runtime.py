"""Shared machinery on a real ComfyUI: tiny SD1.x-architecture model built through ComfyUI's own
classes (comfy.supported_models.SD15, ModelPatcher, SDClipModel, AutoencoderKL), sampled with
ComfyUI's own nodes and samplers. No mocks of ComfyUI."""
import pytest
import torch

from conftest import unthrottled_progress


def _apply(model, x, sigma, cond):
    """One real ComfyUI model call (BaseModel.apply_model), the call every sampler makes."""
    return model.model.apply_model(x, sigma, c_crossattn=cond)


def _cond(lab, clip, text="a red seven"):
    with torch.inference_mode():
        (c,) = lab.nodes.CLIPTextEncode().encode(clip, text)
    return c[0][0]


def _sample(lab, d, seed=3, steps=3, model=None):
    with torch.inference_mode():
        (pos,) = lab.nodes.CLIPTextEncode().encode(d.clip, "a blue two on the right")
        (neg,) = lab.nodes.CLIPTextEncode().encode(d.clip, "")
        (lat,) = lab.nodes.EmptyLatentImage().generate(64, 64, 1)
        (out,) = lab.nodes.KSampler().sample(model or d.model, seed, steps, 4.0, "euler", "normal", pos, neg, lat)
    return out["samples"]


def test_pack_registers_v3_nodes_with_prefix_tooltips_and_descriptions(lab):
    """The pack is a V3 extension (comfy_entrypoint, as 0.33's comfy_extras): ComfyUI registered
    every node of its list under the schema's id and display name. It exports no
    NODE_CLASS_MAPPINGS (ComfyUI would take the V1 path and never call the entry point)."""
    import asyncio
    from comfy_api.v0_0_2 import ComfyExtension, io
    assert not hasattr(lab.pack, "NODE_CLASS_MAPPINGS") and lab.pack.WEB_DIRECTORY == "./web"
    extension = asyncio.run(lab.pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    classes = asyncio.run(extension.get_node_list())
    assert len(classes) == 15
    for cls in classes:
        assert issubclass(cls, io.ComfyNode)
        schema = cls.GET_SCHEMA()
        node_id = schema.node_id
        assert node_id.startswith("ConceptLab") and schema.display_name.startswith("ConceptLab"), node_id
        assert lab.nodes.NODE_CLASS_MAPPINGS[node_id] is cls
        assert lab.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == schema.display_name
        assert schema.description and schema.category.startswith("ConceptLab"), node_id
        spec_all = cls.INPUT_TYPES()
        for section in ("required", "optional"):      # "hidden" inputs (UNIQUE_ID, ...) have no widget
            for name, spec in spec_all.get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(o.tooltip for o in schema.outputs), f"{node_id}: an output has no tooltip"


def test_demo_model_is_a_real_comfy_model(lab, demo):
    import comfy.model_base
    import comfy.model_patcher
    assert isinstance(demo.model, comfy.model_patcher.ModelPatcher)
    assert isinstance(demo.model.model, comfy.model_base.BaseModel)
    assert comfy_family(lab, demo.model) == "sd1"
    p = next(demo.model.model.diffusion_model.parameters())
    assert p.is_inference(), "built under inference_mode like ComfyUI's loaders: weights are inference tensors"


def comfy_family(lab, model):
    return lab.runtime.model_family(model)


def test_stock_sampling_runs_and_leaves_model_untouched(lab, demo):
    guard = lab.runtime.ModelGuard.of(demo.model)
    a = _sample(lab, demo, seed=5)
    b = _sample(lab, demo, seed=5)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b), "sampling must be deterministic for a fixed seed"
    guard.check("KSampler")


def test_backward_through_comfy_model_fails_without_the_helper(lab, demo):
    """The measured problem: ComfyUI's weights are inference tensors."""
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    cond = _cond(lab, demo.clip).clone()
    lab.runtime.load_for_compute(demo.model)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        _apply(demo.model, x, torch.tensor([5.0]), cond).pow(2).mean().backward()


def test_gradients_through_a_comfy_model_zero_copy(lab, demo, K):
    rt = lab.runtime
    dm = demo.model.model.diffusion_model
    kv = [l.name for l in K.layers.concept_kv_layers(n for n, _ in dm.named_parameters())]
    assert len(kv) == 14
    guard = rt.ModelGuard.of(demo.model)
    ptrs = {n: p.data_ptr() for n, p in dm.named_parameters()}
    originals = dict(dm.named_parameters())
    cond = _cond(lab, demo.clip).clone()
    rt.load_for_compute(demo.model)
    with torch.inference_mode():  # as inside a node
        with rt.gradients_through(demo.model, trainable=kv) as view:
            assert {n: p.data_ptr() for n, p in dm.named_parameters()} == ptrs  # zero copy
            x = torch.randn(1, 4, 8, 8, requires_grad=True)
            loss = _apply(demo.model, x, torch.tensor([5.0]), cond).pow(2).mean()
            loss.backward()
            grads = {n: p.grad for n, p in view.trainable.items()}
            xg = x.grad
    assert view.copied_bytes == 0
    assert set(grads) == set(kv) and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert xg is not None and xg.abs().sum() > 0  # seed search differentiates w.r.t. the noise
    assert all(p is originals[n] for n, p in dm.named_parameters())
    guard.check("gradients_through")


def test_guard_catches_in_place_changes_and_leaked_patches(lab, demo):
    rt = lab.runtime
    guard = rt.ModelGuard.of(demo.model)
    guard.check()
    w = demo.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight
    with torch.inference_mode():
        w.view(-1)[0] = -w.view(-1)[0] + 1.0
    with pytest.raises(AssertionError, match="modified the incoming MODEL"):
        guard.check("vandal")
    guard = rt.ModelGuard.of(demo.model)
    demo.model.add_patches({"diffusion_model.out.2.bias": (torch.zeros(4),)}, 1.0)
    with pytest.raises(AssertionError, match="patcher state"):
        guard.check("leaky node")


def test_clone_patches_change_the_clone_only(lab, demo):
    rt = lab.runtime
    guard = rt.ModelGuard.of(demo.model)
    before = _sample(lab, demo)
    patched = rt.clone_model(demo.model)
    dm = demo.model.model.diffusion_model
    patches = {rt.diffusion_key(n): (torch.zeros_like(p),) for n, p in dm.named_parameters()
               if n.endswith("attn2.to_v.weight")}
    patched.add_patches(patches, 1.0, 0.0)  # replace: zero every cross-attention V
    changed = _sample(lab, demo, model=patched)
    after = _sample(lab, demo)
    assert not torch.equal(before, changed), "the patch must take effect on the clone"
    assert torch.equal(before, after), "the original must sample exactly as before"
    guard.check("clone + add_patches")


def test_family_detection_and_clear_errors(lab, demo):
    rt = lab.runtime
    assert rt.require_family("ConceptLab Test", demo.model, rt.UNET_FAMILIES) == "sd1"
    with pytest.raises(rt.ConceptLabError) as e:
        rt.require_family("ConceptLab Test", demo.model, rt.DIT_FAMILIES, "ConceptAttention")
    msg = str(e.value)
    assert msg.startswith("[ConceptLab Test]") and "SD1.x" in msg and "Fix:" in msg and "Flux" in msg
    with pytest.raises(rt.ConceptLabError, match="not a diffusion MODEL"):
        rt.require_family("ConceptLab Test", demo.clip, rt.UNET_FAMILIES)


def test_progress_reports_and_cancel_interrupts(lab):
    """The bar reaches ComfyUI's progress hook at every step and Cancel interrupts at the next step.

    ComfyUI 0.3.5x and later throttle the hook (an update is sent at most every 100 ms, but the
    first and the final one always are). Under ComfyUI's own throttle the test asserts what every
    run delivers (the first update, the bar's position, the final update); with the throttle off
    (``unthrottled_progress``) it asserts every update, in order."""
    import comfy.model_management as mm
    import comfy.utils
    rt = lab.runtime
    seen = []
    old_hook = getattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, *a, **k: seen.append((value, total)))
    try:
        bar = rt.Progress(3)
        bar.step()
        assert seen == [(1, 3)]
        bar.step()
        assert bar.done == 2 and bar._bar.current == 2
        assert seen[-1] in ((1, 3), (2, 3))      # (2, 3) unless throttled
        bar.step()
        assert seen[-1] == (3, 3)                # the final update is always sent
        bar.step()                               # past the end: stays at the total
        assert bar.done == 3 and seen[-1] == (3, 3)
        seen.clear()
        with unthrottled_progress():
            bar = rt.Progress(4)
            for _ in range(5):
                bar.step()
        assert seen == [(1, 4), (2, 4), (3, 4), (4, 4), (4, 4)]
        mm.interrupt_current_processing(True)
        with pytest.raises(rt.interrupt_types()):
            rt.Progress(3).step()
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old_hook)


def test_model_info_node(lab, demo):
    guard = lab.runtime.ModelGuard.of(demo.model)
    node = lab.nodes.NODE_CLASS_MAPPINGS["ConceptLabModelInfo"]
    with torch.inference_mode():
        out = node.execute(model=demo.model)
    import json
    info = json.loads(out.result[0])
    assert info["family"] == "sd1" and info["kv_layers"] == 14 and info["kv_weights"] == 45056
    assert "concept-neuron candidates" in out.ui["text"][1]
    guard.check("ConceptLab Model Info")


def test_gradients_through_switches_on_comfyuis_training_paths(lab, demo):
    """Inside gradients_through, ComfyUI's in_training switch is on (0.3.7x and later: model code
    then avoids custom ops with no backward, e.g. comfy_kitchen's RoPE on 0.33), and it is
    restored afterwards, also when the block raises."""
    import comfy.model_management as mm
    rt = lab.runtime
    if not hasattr(mm, "in_training"):          # ComfyUI before 0.3.7x: no switch, none added
        with rt.gradients_through(demo.model):
            assert not hasattr(mm, "in_training")
        return
    assert mm.in_training is False
    with rt.gradients_through(demo.model):
        assert mm.in_training is True
    assert mm.in_training is False
    with pytest.raises(RuntimeError, match="boom"):
        with rt.gradients_through(demo.model):
            raise RuntimeError("boom")
    assert mm.in_training is False

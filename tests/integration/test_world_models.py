"""The trained digits-world demo models, run through ComfyUI's own nodes and read by the judge.

Fails if the shipped weights stop loading into ComfyUI's classes, or stop drawing the digits
their prompts ask for. (The benchmark, python -m benchmarks world, measures the real figures on
40 images per class; these tests use few images and a loose bar, far above chance = 0.1.)"""
from pathlib import Path

import pytest
import torch

from conftest import cr


def _world(lab, key):
    from benchmarks.world import evaluate as E, judge as J
    path = Path(lab.demo.demo_weights_path(key))
    if not path.is_file():
        pytest.fail(f"the trained demo model is missing: {path} (python -m benchmarks train)")
    cfg = E.world_config_of(Path(lab.demo.demo_weights_path("digits_unet")))
    return E, J.get_judge(cfg), cfg


def _draws_prompted_classes(lab, key, cfg_scale, bar):
    E, judge, cfg = _world(lab, key)
    with torch.inference_mode():
        model, clip, vae, info = lab.demo.build_demo_model(key)
    assert info["trained"] is True
    assert lab.runtime.model_family(model) == info["family"]
    guard = lab.runtime.ModelGuard.of(model)
    frequent = [c for c in range(10) if c not in cfg.rare_classes][:4]
    accs = []
    for c in frequent:
        imgs = E.generate(model, clip, vae, E.S.class_prompt(c), 6, seed=7 + c, steps=16, cfg=cfg_scale)
        assert imgs.shape == (6, 64, 64, 3)
        accs.append(E.class_accuracy(imgs, c, judge))
    assert sum(accs) / len(accs) >= bar, accs
    guard.check(f"sampling the {key} demo model")


def test_unet_demo_model_draws_the_prompted_class(lab):
    # measured: 0.95 on the frequent classes (python -m benchmarks world)
    _draws_prompted_classes(lab, "digits_unet", lab.demo.DEFAULT_CFG["digits_unet"], 0.5)


def test_dit_demo_model_draws_the_prompted_class(lab):
    # measured: 0.83 on the frequent classes (python -m benchmarks world)
    _draws_prompted_classes(lab, "digits_dit", lab.demo.DEFAULT_CFG["digits_dit"], 0.5)


def test_demo_images_node_serves_the_bundled_handwriting(lab):
    """ConceptLab Load Demo Images: each set is a batch of 64x64 RGB pictures in [0, 1] (what
    LoadImage gives), the subject sets are the writers the shipped concepts were made from, and
    the judge reads every picture as its class; an unknown set is refused clearly."""
    import numpy as np
    from benchmarks.world import judge as J
    node = lab.nodes.NODE_CLASS_MAPPINGS["ConceptLabLoadDemoImages"]
    want = {"eight-references": (8, 3), "three-subject": (3, 6), "seven-subject": (7, 6)}
    assert set(cr.combo_options(node.INPUT_TYPES()["required"]["image_set"])) == set(want)
    for name, (cls, count) in want.items():
        out = node.execute(name)
        images, info = out.result
        assert images.shape == (count, 64, 64, 3) and images.dtype == torch.float32
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.max()) > 0.5
        reads = [max(J.find_digits((im.numpy() * 255).astype(np.uint8)), key=lambda d: d.area).cls
                 for im in images]
        assert reads == [cls] * count, (name, reads)
    with pytest.raises(lab.runtime.ConceptLabError, match="Unknown picture set"):
        node.execute("nine-references")

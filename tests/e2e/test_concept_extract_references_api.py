"""End to end: ConceptLab Concept Neurons Extract's reference images, through a real ComfyUI
server's /prompt. Images too small for the VAE and more than 10 references are refused with a
message that names the node, the problem and the fix (a 1x1 reference used to end in a raw torch
error, "Kernel size can't be greater than actual input size"); 1 to 10 references run, and with
fewer than 3 the info output says that Cones wants a few views of the subject."""
import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path

pytestmark = pytest.mark.e2e
NODE = "[ConceptLab Concept Neurons Extract]"


def _graph(width: int, height: int, batch: int) -> dict:
    return {
        "1": {"class_type": "ConceptLabLoadDemoModel", "inputs": {"demo_model": "digits-unet"}},
        "2": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": batch, "color": 0xC03020}},
        "3": {"class_type": "ConceptLabConceptNeuronsExtract",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
                         "class_prompt": "a three", "procedure": "iterative", "budget_percent": 0.4,
                         "iterations": 1, "prior_weight": 0.3, "prior_images": 0,
                         "seed": width * 1000 + height * 10 + batch}},
        "4": {"class_type": "ConceptLabConceptNeuronsInfo", "inputs": {"concept": ["3", 0]}},
    }


def test_the_tooltip_states_the_accepted_count_and_size(object_info):
    tip = object_info["ConceptLabConceptNeuronsExtract"]["input"]["required"]["images"][1]["tooltip"]
    assert "1 to 10 images" in tip and "3 to 10" in tip and "at least 8x8 pixels" in tip, tip


@pytest.mark.parametrize("width, height, batch, words", [
    (1, 1, 3, ["are 1x1 pixels", "the VAE needs at least 8x8"]),
    (64, 7, 3, ["are 64x7 pixels", "the VAE needs at least 8x8"]),
    (64, 64, 17, ["17 reference images were given; at most 10 are used"]),
])
def test_references_that_cannot_work_are_refused_with_the_fix(server, width, height, batch, words):
    entry = server.run_prompt(_graph(width, height, batch), timeout=120)
    err = cr.history_error(entry)
    assert err is not None and NODE in err, err
    assert "Kernel size" not in err, err
    for w in words + ["Fix:"]:
        assert w in err, err
    assert ("Upscale Image" in err) if batch <= 10 else ("Pass 10 or fewer" in err), err


@pytest.mark.parametrize("batch", [1, 3])
def test_one_to_ten_references_run(server, batch):
    entry = server.run_prompt(_graph(64, 64, batch), timeout=300)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    info = entry["outputs"]["4"]["text"][0]
    assert "shut:" in info, info
    note = "note: 1 reference image(s). Cones learns the subject from a few views"
    assert (note in info) == (batch < 3), info

"""ConceptLab Mask From Concept's ``threshold_mode``: an ``io.DynamicCombo`` where ComfyUI has it.

On ComfyUI 0.33 the combo carries ``threshold`` under the modes that use it (fixed, argmax): the
front end shows the widget ``threshold_mode.threshold`` only while one of those is chosen, and the
server hands ``execute`` ``{"threshold_mode": mode, "threshold": value}``. On 0.3.75, which has
no DynamicCombo, the node keeps the two flat inputs ``threshold_mode`` and ``threshold``.

Workflows and /prompt calls saved before send the flat names; on 0.33 they still run
(``accept_all_inputs``, nodes/_schema.py) and give the same mask as the nested name. Checked on a
real server (tests/conftest.py), with the saved V1 saliency workflow made small; the mask comes
back through MaskToImage, PreviewImage and /view.
"""
import copy
import io
import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path
from conftest import skip_version

pytestmark = pytest.mark.e2e
NODE = "ConceptLabMaskFromConcept"
SAVED = Path(__file__).resolve().parents[1] / "fixtures" / "workflows_v1" / "api" / \
    "saliency_dit_conceptattention_inpaint.json"
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
NO_DYNAMIC_COMBO = ("this ComfyUI's comfy_api has no io.DynamicCombo, so Mask From Concept keeps "
                    "'threshold_mode' and 'threshold' as two flat inputs (checked by "
                    "test_flat_threshold_inputs_without_dynamic_combo) and no front end sends "
                    "'threshold_mode.threshold'")


def _mode_spec(object_info: dict):
    return object_info[NODE]["input"]["required"]["threshold_mode"]


def _has_dynamic_combo(object_info: dict) -> bool:
    return _mode_spec(object_info)[0] == DYNAMIC_COMBO


def test_threshold_mode_is_a_dynamic_combo_with_threshold_under_fixed_and_argmax(object_info):
    if not _has_dynamic_combo(object_info):
        skip_version(NO_DYNAMIC_COMBO)
    info = object_info[NODE]
    spec = _mode_spec(object_info)
    options = {o["key"]: o["inputs"] for o in spec[1]["options"]}
    # the front end makes the first option the default: 'fixed', the default of before
    assert list(options) == ["fixed", "mean", "otsu", "argmax"], list(options)
    carried = {k: sorted(n for s in ("required", "optional") for n in (v.get(s) or {}))
               for k, v in options.items()}
    assert carried == {"fixed": ["threshold"], "mean": [], "otsu": [], "argmax": ["threshold"]}, carried
    for mode in ("fixed", "argmax"):
        threshold = options[mode]["optional"]["threshold"]      # optional: old flat prompts validate
        assert threshold[0] == "FLOAT"
        assert {k: threshold[1][k] for k in ("default", "min", "max", "step")} == \
            {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}
        assert threshold[1]["tooltip"].startswith("Used by 'fixed' and 'argmax'.")
    assert spec[1]["tooltip"].startswith("How maps become masks.")
    flat = {n for s in ("required", "optional") for n in info["input"].get(s, {})}
    assert "threshold" not in flat, sorted(flat)
    assert info["input_order"]["required"] == ["saliency", "concept", "threshold_mode", "grow", "refine"]
    # unchanged: the node's id, name and description
    assert info["display_name"] == "ConceptLab Mask From Concept"
    assert info["description"].startswith("One word's saliency as a MASK")
    # Saliency Maps keeps its two flat inputs (its viewer reads both)
    maps = object_info["ConceptLabSaliencyMaps"]["input"]["required"]
    assert maps["threshold_mode"][0] != DYNAMIC_COMBO and "threshold" in maps


def test_flat_threshold_inputs_without_dynamic_combo(object_info):
    if _has_dynamic_combo(object_info):
        skip_version("this ComfyUI has io.DynamicCombo: Mask From Concept's 'threshold' is carried by "
                     "the 'fixed' and 'argmax' options of 'threshold_mode' (the test above)")
    info = object_info[NODE]
    req = info["input"]["required"]
    assert cr.combo_options(req["threshold_mode"]) == ["mean", "otsu", "fixed", "argmax"]
    assert req["threshold_mode"][1]["default"] == "fixed"
    assert req["threshold"][0] == "FLOAT" and req["threshold"][1]["default"] == 0.5
    assert info["input_order"]["required"] == ["saliency", "concept", "threshold_mode", "threshold", "grow", "refine"]


# ------------------------------------------------------------------------------------------------
# /prompt: the old flat names and the nested one
# ------------------------------------------------------------------------------------------------
def _prompt(**mask_inputs) -> dict:
    """The saved V1 saliency workflow, small, up to Mask From Concept's mask (MaskToImage,
    PreviewImage), with Mask From Concept's threshold inputs replaced by ``mask_inputs``."""
    saved = json.loads(SAVED.read_text())
    prompt = {k: copy.deepcopy(saved[k]) for k in ("1", "2", "3", "4", "5", "6", "7", "8", "9")}
    prompt["6"]["inputs"]["steps"] = 3
    inputs = prompt["9"]["inputs"]
    inputs.pop("threshold_mode"), inputs.pop("threshold")
    inputs.update(mask_inputs)
    prompt["19"] = {"class_type": "MaskToImage", "inputs": {"mask": ["9", 0]}}
    prompt["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["19", 0]}}
    return prompt


def _mask(server, **mask_inputs) -> np.ndarray:
    entry = server.run_prompt(_prompt(**mask_inputs), timeout=600)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    ref = entry["outputs"]["20"]["images"][0]
    with urllib.request.urlopen(server.url + "/view?" + urllib.parse.urlencode(ref)) as r:
        with Image.open(io.BytesIO(r.read())) as pic:
            return np.asarray(pic.convert("L"))


def test_saved_flat_prompt_runs(server):
    """Every version: the saved form, threshold_mode 'fixed' and threshold 0.5 side by side."""
    mask = _mask(server, threshold_mode="fixed", threshold=0.5)
    assert 0 < (mask > 127).sum() < mask.size, "the mask is empty or full"


@pytest.mark.parametrize("mode, threshold", [("fixed", 0.5), ("fixed", 0.3), ("argmax", 0.4)])
def test_nested_and_flat_threshold_give_the_same_mask(server, object_info, mode, threshold):
    if not _has_dynamic_combo(object_info):
        skip_version(NO_DYNAMIC_COMBO)
    nested = _mask(server, **{"threshold_mode": mode, "threshold_mode.threshold": threshold})
    flat = _mask(server, threshold_mode=mode, threshold=threshold)
    assert np.array_equal(nested, flat)
    if (mode, threshold) != ("fixed", 0.5):      # the value is read, not the default
        assert not np.array_equal(nested, _mask(server, threshold_mode="fixed", threshold=0.5))


def test_modes_without_threshold_run_in_either_form(server, object_info):
    if not _has_dynamic_combo(object_info):
        skip_version(NO_DYNAMIC_COMBO)
    for mode in ("mean", "otsu"):
        # as the front end sends it (no threshold), and as a saved workflow does (a threshold it ignores)
        assert np.array_equal(_mask(server, threshold_mode=mode), _mask(server, threshold_mode=mode, threshold=0.9))


def test_a_threshold_out_of_range_is_refused(server, object_info):
    """0.33 validates the nested value; the flat one of an old prompt is checked by the node."""
    dynamic = _has_dynamic_combo(object_info)
    forms = [{"threshold": 1.5}] + ([{"threshold_mode.threshold": 1.5}] if dynamic else [])
    for form in forms:
        declared = "threshold" not in form or not dynamic     # a declared input: ComfyUI validates it
        try:
            entry = server.run_prompt(_prompt(threshold_mode="fixed", **form), timeout=600)
        except cr.PromptRejected as e:         # refused by ComfyUI's validation
            assert "threshold" in e.body, e.body
            continue
        err = cr.history_error(entry)
        if err is None:   # ComfyUI dropped the mask's branch for its validation error and ran the rest
            assert "20" not in entry["outputs"] and declared, (form, sorted(entry["outputs"]))
            continue
        assert "threshold is 1.5" in err, (form, err)

"""End to end: the saliency maps' image-guided refinement through a real ComfyUI server's graph
execution (/prompt). One graph holds two Saliency Maps nodes on the same recording and images,
one refined (crf) and one raw, and a Mask From Concept that re-refines with the guided filter;
the maps come back through /history and /view."""
import io
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path

pytestmark = pytest.mark.e2e
PROMPT = "a red seven on the left and a blue two on the right"


def _graph() -> dict:
    maps = {"threshold_mode": "fixed", "threshold": 0.5, "blur": False,
            "recording": ["4", 1], "images": ["7", 0]}
    return {
        "1": {"class_type": "ConceptLabLoadDemoModel",
              "inputs": {"demo_model": "digits-unet"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "ConceptLabSaliencyCapture",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT,
                         "concepts": "seven, two", "method": "auto", "layers": "auto",
                         "start_percent": 0.0, "end_percent": 1.0}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["4", 0], "seed": 1234, "steps": 10, "cfg": 3.0,
                         "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                         "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "ConceptLabSaliencyMaps", "inputs": dict(maps, refine="crf")},
        "9": {"class_type": "ConceptLabSaliencyMaps", "inputs": dict(maps, refine="none")},
        "10": {"class_type": "ConceptLabMaskFromConcept",
               "inputs": {"saliency": ["8", 0], "concept": "seven", "threshold_mode": "fixed",
                          "threshold": 0.5, "grow": 0, "refine": "guided"}},
        "11": {"class_type": "MaskToImage", "inputs": {"mask": ["10", 0]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }


def _fetch(server, f) -> np.ndarray:
    with urllib.request.urlopen(server.url + "/view?" + urllib.parse.urlencode(f)) as r:
        with Image.open(io.BytesIO(r.read())) as pic:
            return np.asarray(pic.convert("L"), dtype=np.float32) / 255.0


def test_refined_and_raw_maps_through_the_prompt_api(server):
    info = server.get("/object_info/ConceptLabSaliencyMaps")["ConceptLabSaliencyMaps"]
    refine = info["input"]["required"]["refine"]
    assert cr.combo_options(refine) == ["crf", "guided", "none"] and refine[1]["default"] == "crf"
    assert refine[1]["tooltip"]
    entry = server.run_prompt(_graph(), timeout=300)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    refined = entry["outputs"]["8"]["concept_lab_saliency"][0]
    raw = entry["outputs"]["9"]["concept_lab_saliency"][0]
    assert refined["words"] == raw["words"] == ["seven", "two"]
    sharper = []
    for i in range(2):
        for j in range(2):
            r, q = _fetch(server, raw["maps"][i][j]), _fetch(server, refined["maps"][i][j])
            assert r.shape == q.shape == (64, 64) and not np.array_equal(r, q)
            # the refinement decides: most refined pixels are near 0 or 1, unlike the raw map
            sharper.append(np.mean((q < 0.1) | (q > 0.9)) > np.mean((r < 0.1) | (r > 0.9)))
    assert sum(sharper) >= 3, sharper
    # Mask From Concept re-refined with the guided filter: a binary mask per image, not empty,
    # not the whole image
    shown = [o["images"] for k, o in entry["outputs"].items() if k == "12"][0]
    assert len(shown) == 2
    for f in shown:
        m = _fetch(server, f)
        assert set(np.unique(m)) <= {0.0, 1.0} and 0.0 < m.mean() < 0.5

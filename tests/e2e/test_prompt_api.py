"""End to end: a real ComfyUI server (127.0.0.1, temporary base directory, the pack in its
custom_nodes) runs the pack's example workflows posted to /prompt; results come back through
/history and the output folder."""
import json
from pathlib import Path

import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_server_lists_the_pack_nodes(server, object_info):
    ours = {k: v for k, v in object_info.items() if k.startswith("ConceptLab")}
    assert {"ConceptLabLoadDemoModel", "ConceptLabModelInfo"} <= set(ours)
    for node_id, info in ours.items():
        assert info["display_name"].startswith("ConceptLab"), node_id
        assert info["description"], node_id
        assert info["category"].startswith("ConceptLab"), node_id
    bad = [l for l in server.log().splitlines()
           if "ConceptLab" in l and ("Cannot import" in l or "IMPORT FAILED" in l)]
    assert not bad, bad


def test_example_workflows_are_valid_json_using_known_nodes(object_info):
    """Every example converts to an API prompt; every node it uses is registered."""
    files = sorted((ROOT / "example_workflows").glob("*.json"))
    assert files
    for f in files:
        wf = json.loads(f.read_text())
        missing = sorted({n["type"] for n in wf["nodes"]} - set(object_info) - set(cr._SKIP_TYPES))
        assert not missing, (f.name, missing)
        prompt = cr.ui_to_api(wf, object_info)
        assert prompt, f.name
        for node_id, node in prompt.items():     # widget values land on the right inputs
            for name, spec in cr._ordered_inputs(object_info[node["class_type"]]):
                value = node["inputs"].get(name)
                if spec and spec[0] in ("INT", "FLOAT") and not isinstance(value, list):
                    assert isinstance(value, (int, float)), (f.name, node_id, name, value)


def _example_prompt(name: str, dit: bool, object_info: dict) -> dict:
    """An example workflow as an API prompt."""
    return cr.example_prompt(name, object_info)


@pytest.mark.parametrize("name, dit", [("demo_model_txt2img.json", False), ("demo_dit_txt2img.json", True)])
def test_demo_workflow_runs_through_prompt_api(server, object_info, name, dit):
    prompt = _example_prompt(name, dit, object_info)
    assert prompt["5"]["inputs"]["seed"] == 1234 and prompt["5"]["inputs"]["steps"] == 20
    entry = server.run_prompt(prompt, timeout=300)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 4
    out_dir = server.base / "output"
    for im in images:
        path = out_dir / im.get("subfolder", "") / im["filename"]
        assert path.is_file() and path.stat().st_size > 0
        from PIL import Image
        with Image.open(path) as pic:
            assert pic.size == (64, 64)
    text = entry["outputs"]["8"]["text"]
    assert any("concept-neuron candidates" in t for t in text)
    # the judge (an SVM on real handwriting) reads what the trained model drew
    import numpy as np
    from benchmarks.world import judge as J
    caption = prompt["2"]["inputs"]["text"]
    reads = [J.check_scene(np.asarray(Image.open(out_dir / im.get("subfolder", "") / im["filename"])
                                      .convert("RGB")), caption) for im in images]
    assert all(c["n_found"] >= 1 for c in reads), reads
    class_ok = sum(bool(d.get("class_ok")) for c in reads for d in c["digits"])
    # digits-unet: at least half of the 2 x 4 requested digits are drawn as the prompted class;
    # digits-dit: a quarter (its two-digit scenes are weaker than its one-digit figure, 0.83).
    # Chance is 0.1. Colour-to-digit binding in two-digit prompts is weak in these tiny models
    # (see README), so it is not asserted.
    assert class_ok >= (len(images) // 2 if dit else len(images)), reads


def test_bad_input_is_rejected_with_a_clear_message(server):
    prompt = {"1": {"class_type": "ConceptLabLoadDemoModel", "inputs": {"demo_model": "no-such-model"}},
              "2": {"class_type": "ConceptLabModelInfo", "inputs": {"model": ["1", 0]}}}
    with pytest.raises(cr.PromptRejected) as e:
        server.run_prompt(prompt)
    assert e.value.code == 400 and "no-such-model" in e.value.body


@pytest.mark.parametrize("name, dit", [("saliency_unet_heatmaps.json", False),
                                       ("saliency_dit_conceptattention_inpaint.json", True)])
def test_saliency_workflow_runs_through_prompt_api(server, object_info, name, dit):
    prompt = _example_prompt(name, dit, object_info)
    maps_id = next(k for k, v in prompt.items() if v["class_type"] == "ConceptLabSaliencyMaps")
    entry = server.run_prompt(prompt, timeout=300)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    payload = entry["outputs"][maps_id]["concept_lab_saliency"][0]
    assert payload["words"] == ["seven", "two"]
    # auto: DAAM on the UNet; raw cross-attention on a DiT as small as the demo's (ConceptAttention
    # is kept for SD3- and Flux-size DiTs), and the viewer's payload says which ran and why
    assert payload["method"] == ("crossattention" if dit else "daam")
    assert payload["method_note"].startswith("auto: "), payload
    import io
    import urllib.parse
    import urllib.request
    from PIL import Image
    for per_image, base in zip(payload["maps"], payload["images"]):
        assert len(per_image) == 2
        for f in [base] + per_image:   # served by ComfyUI's /view, as the viewer fetches them
            with urllib.request.urlopen(server.url + "/view?" + urllib.parse.urlencode(f)) as r:
                with Image.open(io.BytesIO(r.read())) as pic:
                    assert pic.size == (64, 64)
    saved = [o["images"] for o in entry["outputs"].values() if "images" in o]
    assert saved and all(len(s) >= 1 for s in saved)


def test_example_workflows_carry_node_pack_ids():
    """Every node of every example names its pack as the front end writes it when saving
    (properties.cnr_id / ver). Without it, front ends 1.3x look each node type up in the Comfy
    Registry when the workflow is opened (one request per type; offline, a console error each)."""
    import re
    version = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for f in sorted((ROOT / "example_workflows").glob("*.json")):
        for node in json.loads(f.read_text())["nodes"]:
            if node["type"] in cr._SKIP_TYPES:
                continue
            props = node.get("properties", {})
            want = ("conceptlab", version) if node["type"].startswith("ConceptLab") else ("comfy-core",)
            assert (props.get("cnr_id"), props.get("ver"))[:len(want)] == want, (f.name, node["type"], props)


def test_flux_example_is_accepted_but_for_its_model_files(server, object_info):
    """The Flux example cannot run here (it names flux1-dev, clip_l, t5xxl and ae files; no Flux
    weights ship, and ComfyUI builds T5-XXL at full size whatever file it loads). The server's
    own validation accepts every node, link and widget value of it except those file names; the
    tiny-Flux integration tests run the Concept Lab nodes' mechanics."""
    prompt = cr.example_prompt("saliency_flux_conceptattention.json", object_info)
    with pytest.raises(cr.PromptRejected) as e:
        server.run_prompt(prompt)
    body = json.loads(e.value.body)
    bad = {(node_id, err.get("extra_info", {}).get("input_name"), err["type"])
           for node_id, info in body["node_errors"].items() for err in info["errors"]}
    loaders = {k: v["class_type"] for k, v in prompt.items() if v["class_type"] in
               ("UNETLoader", "DualCLIPLoader", "VAELoader")}
    assert bad == {(loaders_id, name, "value_not_in_list") for loaders_id, name in
                   [(k, n) for k, t in loaders.items() for n in
                    {"UNETLoader": ["unet_name"], "DualCLIPLoader": ["clip_name1", "clip_name2"],
                     "VAELoader": ["vae_name"]}[t]]}, body

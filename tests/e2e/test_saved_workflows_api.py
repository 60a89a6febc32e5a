"""End to end: workflows saved with the V1 nodes still load and run on the V3 nodes.

``tests/fixtures/workflows_v1/`` holds the example workflows as they were before the nodes moved to
ComfyUI's V3 schema: the UI format the front end saved, and the /prompt API format it queued. On a
real server of the running ComfyUI (0.3.75 or 0.33):

- the UI files convert, as the front end converts them, to exactly the API prompts saved then (no
  node id, input name or value changed);
- every API prompt runs (made small: fewer steps, iterations and candidates), except the Flux one,
  whose model files are not here: the server refuses it for the missing files only;
- inputs that grow on 0.33 (``io.Autogrow``: Seed Search / Seed Rank ``references_2``,
  ``references_3``, Combine ``concept_3``, ``concept_4``) still take a saved workflow's inputs of
  those names, in the UI and the API format, and the node reads them (counted, not just accepted);
- on 0.33, a prompt the current front end makes (``more_references.references_2``) runs too;
- Mask From Concept's ``threshold``, carried by ``threshold_mode``'s fixed and argmax options on 0.33
  (``io.DynamicCombo``): the UI files convert to ``threshold_mode.threshold`` there, as the front end
  sends it, and the saved API prompts with the flat ``threshold`` run (tests/integration/
  test_dynamic_combo.py: both give the same mask).
"""
import copy
import json
from pathlib import Path

import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path
from conftest import skip_version

pytestmark = pytest.mark.e2e
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "workflows_v1"
NAMES = sorted(p.name for p in FIXTURES.glob("*.json"))
NEEDS_MODEL_FILES = {"saliency_flux_conceptattention.json"}       # the user's own Flux.1-dev files
#: Values that keep a run short; the inputs' names are the saved ones.
SMALL = {"steps": 3, "iterations": 2, "prior_images": 1, "noise_draws": 1, "candidates": 3, "batch_size": 1,
         "search_steps": 2}


def _ui(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def _api(name: str) -> dict:
    return json.loads((FIXTURES / "api" / name).read_text())


def _small(prompt: dict) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for k, v in SMALL.items():
            if k in node["inputs"] and not isinstance(node["inputs"][k], list):
                node["inputs"][k] = v
    return prompt


def _run(server, prompt: dict) -> dict:
    entry = server.run_prompt(prompt, timeout=600)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    return entry


def _ids(prompt: dict, class_type: str) -> list:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def _ranking(server, prompt: dict, rank: str) -> str:
    """Run ``prompt`` with Seed Rank's ranking text shown by ComfyUI's Preview Any; the text."""
    prompt = dict(prompt, preview={"class_type": "PreviewAny", "inputs": {"source": [rank, 1]}})
    return _run(server, prompt)["outputs"]["preview"]["text"][0]


def _as_the_front_end_sends(prompt: dict, object_info: dict) -> dict:
    """``prompt`` (a saved API prompt) as this ComfyUI's front end queues the same UI workflow: on
    0.33 the inputs that a DynamicCombo's chosen option carries are named ``<combo>.<name>``
    (Mask From Concept's ``threshold`` is ``threshold_mode.threshold`` under fixed and argmax)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        spec = object_info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for combo, s in spec.get(section, {}).items():
                if s[0] != "COMFY_DYNAMICCOMBO_V3" or combo not in node["inputs"]:
                    continue
                for option in s[1]["options"]:
                    if option["key"] == node["inputs"][combo]:
                        for n in (n for d in option["inputs"].values() for n in d):
                            if n in node["inputs"]:
                                node["inputs"][f"{combo}.{n}"] = node["inputs"].pop(n)
    return prompt


@pytest.mark.parametrize("name", NAMES)
def test_saved_ui_workflow_converts_to_the_saved_prompt(object_info, name):
    assert cr.ui_to_api(_ui(name), object_info) == _as_the_front_end_sends(_api(name), object_info)


#: Mask From Concept saved flat in every threshold mode, later widgets off their defaults
#: (tests/e2e/test_dynamic_combo_front_end.py opens it in the front end)
FLAT_THRESHOLD = FIXTURES.parent / "workflows_flat_threshold" / "mask_from_concept_flat_threshold.json"


def test_mask_from_concept_saved_flat_converts_with_every_value_in_place(object_info):
    """A workflow saved with the flat 'threshold_mode' and 'threshold': on 0.33 the modes without a
    threshold ('mean', 'otsu') drop the saved threshold and keep grow and refine in place (as the
    pack's front-end extension reads them, web/js/dynamic_combo_migration.js), 'fixed' and 'argmax'
    send it as 'threshold_mode.threshold'; on 0.3.75 every value flat, as saved."""
    wf = json.loads(FLAT_THRESHOLD.read_text())
    prompt = cr.ui_to_api(wf, object_info)
    dynamic = object_info["ConceptLabMaskFromConcept"]["input"]["required"]["threshold_mode"][0] == \
        "COMFY_DYNAMICCOMBO_V3"
    for node in (n for n in wf["nodes"] if n["type"] == "ConceptLabMaskFromConcept"):
        concept, mode, threshold, grow, refine = node["widgets_values"]
        expected = {"concept": concept, "threshold_mode": mode, "grow": grow, "refine": refine}
        if not dynamic:
            expected["threshold"] = threshold
        elif mode in ("fixed", "argmax"):
            expected["threshold_mode.threshold"] = threshold
        sent = {k: v for k, v in prompt[str(node["id"])]["inputs"].items() if k != "saliency"}
        assert sent == expected, (node["id"], sent)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in NEEDS_MODEL_FILES])
def test_saved_prompt_runs(server, name):
    prompt = _small(_api(name))
    entry = _run(server, prompt)
    outputs = [k for k, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage")
               or v["class_type"] in ("ConceptLabConceptNeuronsSave", "ConceptLabConceptNeuronsInfo",
                                      "ConceptLabModelInfo", "ConceptLabSaliencyMaps")]
    assert outputs and all(k in entry["outputs"] for k in outputs), (sorted(entry["outputs"]), outputs)


def test_saved_flux_prompt_is_refused_only_for_the_missing_model_files(server):
    with pytest.raises(cr.PromptRejected) as e:
        server.run_prompt(_api("saliency_flux_conceptattention.json"), timeout=60)
    body = json.loads(e.value.body)
    prompt = _api("saliency_flux_conceptattention.json")
    refused = {prompt[k]["class_type"] for k in body.get("node_errors", {})}
    assert refused and refused <= {"UNETLoader", "DualCLIPLoader", "VAELoader"}, body


# ------------------------------------------------------------------------------------------------
# numbered inputs (Autogrow on 0.33) in workflows saved before
# ------------------------------------------------------------------------------------------------
def _with_references(name: str, extra: dict) -> tuple:
    """The saved Seed Rank / Seed Search workflow with more reference inputs of the V1 names
    (``{"references_2": image set, ...}``), each fed by its own Load Demo Images node: as a saved
    UI workflow and as a saved API prompt."""
    ui, api = _ui(name), _api(name)
    node_type = "ConceptLabSeedRank" if "rank" in name else "ConceptLabSeedSearch"
    (target,) = [n for n in ui["nodes"] if n["type"] == node_type]
    loader = next(n for n in ui["nodes"] if n["type"] == "ConceptLabLoadDemoImages")
    next_id = max(n["id"] for n in ui["nodes"]) + 1
    next_link = max(l[0] for l in ui["links"]) + 1
    for slot, image_set in extra.items():
        node = dict(copy.deepcopy(loader), id=next_id, widgets_values=[image_set])
        node["outputs"] = [dict(o, links=[next_link] if i == 0 else []) for i, o in enumerate(node["outputs"])]
        ui["nodes"].append(node)
        ui["links"].append([next_link, next_id, 0, target["id"], 99, "IMAGE"])
        target["inputs"] = [i for i in target["inputs"] if i["name"] != slot]
        target["inputs"].append({"name": slot, "type": "IMAGE", "link": next_link})
        api[str(next_id)] = {"class_type": "ConceptLabLoadDemoImages", "inputs": {"image_set": image_set}}
        api[str(target["id"])]["inputs"][slot] = [str(next_id), 0]
        next_id, next_link = next_id + 1, next_link + 1
    return ui, api, str(target["id"])


@pytest.mark.parametrize("form", ["ui", "api"])
def test_saved_seed_rank_with_numbered_references(server, object_info, form):
    ui, api, rank = _with_references("seed_rank_then_ksampler.json",
                                      {"references_2": "eight-references", "references_3": "eight-references"})
    prompt = _small(cr.ui_to_api(ui, object_info) if form == "ui" else api)
    assert prompt[rank]["inputs"]["references_2"] and prompt[rank]["inputs"]["references_3"]
    assert "9 reference images" in _ranking(server, prompt, rank)      # 3 eights in each of the three inputs


@pytest.mark.parametrize("form", ["ui", "api"])
def test_saved_seed_search_with_numbered_references_reads_them(server, object_info, form):
    """Seed Search takes at most 10 reference images: 3 + 3 + 6 through references,
    references_2 and references_3 are refused by count, which only happens if all three arrive."""
    ui, api, search = _with_references("seed_select_then_custom_advanced.json",
                                        {"references_2": "eight-references", "references_3": "three-subject"})
    prompt = _small(cr.ui_to_api(ui, object_info) if form == "ui" else api)
    entry = server.run_prompt(prompt, timeout=300)
    err = cr.history_error(entry)
    assert err and "12 reference images were given; at most 10" in err, err


def _with_concepts(form: str, object_info: dict) -> tuple:
    """The saved two-subjects workflow with Combine's concept_3 and concept_4 connected too (the
    same two concepts again)."""
    name = "concept_two_subjects.json"
    if form == "api":
        prompt = _api(name)
        (combine,) = _ids(prompt, "ConceptLabConceptNeuronsCombine")
        loads = _ids(prompt, "ConceptLabConceptNeuronsLoad")
        prompt[combine]["inputs"].update(concept_3=[loads[0], 0], concept_4=[loads[1], 0])
        return prompt, combine
    ui = _ui(name)
    (node,) = [n for n in ui["nodes"] if n["type"] == "ConceptLabConceptNeuronsCombine"]
    loads = [n for n in ui["nodes"] if n["type"] == "ConceptLabConceptNeuronsLoad"]
    link = max(l[0] for l in ui["links"]) + 1
    for slot, src in (("concept_3", loads[0]), ("concept_4", loads[1])):
        ui["links"].append([link, src["id"], 0, node["id"], 99, "CONCEPT_NEURONS"])
        node["inputs"] = [i for i in node["inputs"] if i["name"] != slot]
        node["inputs"].append({"name": slot, "type": "CONCEPT_NEURONS", "link": link})
        link += 1
    return cr.ui_to_api(ui, object_info), str(node["id"])


@pytest.mark.parametrize("form", ["ui", "api"])
def test_saved_combine_with_four_concepts(server, object_info, form):
    prompt, combine = _with_concepts(form, object_info)
    prompt = _small(prompt)
    assert prompt[combine]["inputs"]["concept_3"] and prompt[combine]["inputs"]["concept_4"]
    entry = _run(server, prompt)
    (info,) = _ids(prompt, "ConceptLabConceptNeuronsInfo")
    text = entry["outputs"][info]["text"][0]
    assert text.startswith("concept: a three, a seven, a three, a seven "), text


def test_prompt_of_the_current_front_end_with_autogrow_inputs(server, object_info):
    """On 0.33 the front end names a grown socket '<group>.<name>'."""
    if "more_references" not in object_info["ConceptLabSeedRank"]["input"].get("optional", {}):
        skip_version("this ComfyUI has no io.Autogrow, so the front end makes no '<group>.<name>' inputs; "
                     "references_2, references_3 are fixed inputs here (the tests above)")
    _, api, rank = _with_references("seed_rank_then_ksampler.json", {"references_2": "eight-references"})
    api[rank]["inputs"]["more_references.references_2"] = api[rank]["inputs"].pop("references_2")
    assert "6 reference images" in _ranking(server, _small(api), rank)

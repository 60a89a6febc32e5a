"""End to end: the concept-neuron example workflows through a real ComfyUI server's /prompt.
Extract -> Save writes a new file (never overwriting), Load -> Apply -> KSampler draws with the
shipped demo concept, two concepts combine, and bad files are refused with a clear message."""

import pytest

import conceptlab_comfy_runtime as cr

pytestmark = pytest.mark.e2e


def _node(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def test_concept_nodes_are_listed_with_the_demo_files(object_info):
    ids = {"ConceptLabConceptNeuronsExtract", "ConceptLabConceptNeuronsSave", "ConceptLabConceptNeuronsLoad",
           "ConceptLabConceptNeuronsApply", "ConceptLabConceptNeuronsCombine", "ConceptLabConceptNeuronsInfo"}
    assert ids <= set(object_info)
    for i in ids:
        for kind, section in object_info[i]["input"].items():
            for name, spec in (section.items() if kind != "hidden" else ()):
                assert len(spec) > 1 and spec[1].get("tooltip"), (i, name)
    files = cr.combo_options(object_info["ConceptLabConceptNeuronsLoad"]["input"]["required"]["concept_file"])
    assert "digits_unet_three_subject.safetensors" in files and "digits_unet_seven_subject.safetensors" in files


def test_extract_then_save_twice_writes_two_files(server, object_info):
    prompt = cr.example_prompt("concept_extract_then_save.json", object_info)
    ex = _node(prompt, "ConceptLabConceptNeuronsExtract")
    prompt[ex]["inputs"].update(iterations=2, prior_images=1)  # keep the test short
    names = []
    for _ in range(2):
        prompt[ex]["inputs"]["seed"] += 1  # a new extraction each time (no cache hit)
        entry = server.run_prompt(prompt, timeout=400)
        assert cr.history_error(entry) is None, cr.history_error(entry)
        save = _node(prompt, "ConceptLabConceptNeuronsSave")
        names.append(entry["outputs"][save]["text"][0].split(" ")[0])
    assert names[0] != names[1]
    folder = server.base / "models" / "concept_neurons"
    for n in names:
        assert (folder / n).is_file() and (folder / n).stat().st_size < 8192


@pytest.mark.parametrize("name", ["concept_load_apply_sample.json", "concept_two_subjects.json"])
def test_load_apply_sample_workflows(server, object_info, name):
    prompt = cr.example_prompt(name, object_info)
    entry = server.run_prompt(prompt, timeout=300)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    save = _node(prompt, "SaveImage")
    assert len(entry["outputs"][save]["images"]) == 4
    if name == "concept_two_subjects.json":
        info = entry["outputs"][_node(prompt, "ConceptLabConceptNeuronsInfo")]["text"][0]
        assert "shut:" in info


def test_path_traversal_is_refused(server, object_info):
    prompt = cr.example_prompt("concept_load_apply_sample.json", object_info)
    ld = _node(prompt, "ConceptLabConceptNeuronsLoad")
    prompt[ld]["inputs"]["concept_file"] = "../../demo/digits_unet.safetensors"
    with pytest.raises(cr.PromptRejected):  # not in the combo list: ComfyUI's validation refuses it
        server.run_prompt(prompt, timeout=60)

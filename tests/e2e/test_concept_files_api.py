"""End to end: concept files reached through links, through a real ComfyUI server's /prompt.

Many users keep models/ (or a part of it) on another disk through a symlink. A concept file in a
symlinked sub-folder of models/concept_neurons, or a symlinked file there, must be listed in
ConceptLab Concept Neurons Load's menu and load when the workflow runs, as ComfyUI's own loaders
follow such links; a link that leads nowhere must not be listed; Save never writes through a
linked sub-folder that leads out of the folder (as ComfyUI 0.33's own saves), nor through a name
that escapes it."""
import os
import shutil
from pathlib import Path

import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DEMO_CONCEPT = ROOT / "demo" / "concept_neurons" / "digits_unet_three_subject.safetensors"
LOAD = "ConceptLabConceptNeuronsLoad"


@pytest.fixture
def linked(server, tmp_path):
    """models/concept_neurons of the server with a linked sub-folder, a linked file and a
    dangling link, all pointing into another folder ("another disk"); removed afterwards."""
    folder = server.base / "models" / "concept_neurons"
    folder.mkdir(parents=True, exist_ok=True)
    disk = tmp_path / "other_disk"
    (disk / "mine").mkdir(parents=True)
    shutil.copy(DEMO_CONCEPT, disk / "mine" / "three_linked.safetensors")
    shutil.copy(DEMO_CONCEPT, disk / "single.safetensors")
    links = {"e2e_linked_sub": (disk / "mine", True),
             "e2e_linked_file.safetensors": (disk / "single.safetensors", False),
             "e2e_dangling.safetensors": (disk / "gone.safetensors", False)}
    for name, (target, is_dir) in links.items():
        os.symlink(target, folder / name, target_is_directory=is_dir)
    try:
        yield disk
    finally:
        for name in links:
            os.unlink(folder / name)


def _menu(server) -> list:
    return cr.combo_options(server.get(f"/object_info/{LOAD}")[LOAD]["input"]["required"]["concept_file"])


def _load_info(name: str) -> dict:
    return {"1": {"class_type": LOAD, "inputs": {"concept_file": name}},
            "2": {"class_type": "ConceptLabConceptNeuronsInfo", "inputs": {"concept": ["1", 0]}}}


def test_linked_concept_files_are_listed_and_load(server, linked):
    menu = _menu(server)
    want = ["e2e_linked_file.safetensors", "e2e_linked_sub/three_linked.safetensors"]
    assert set(want) <= set(menu), menu
    assert "e2e_dangling.safetensors" not in menu, menu          # never list what Load refuses
    for name in want:
        entry = server.run_prompt(_load_info(name), timeout=120)
        assert cr.history_error(entry) is None, cr.history_error(entry)
        assert "shut:" in entry["outputs"]["2"]["text"][0]


def test_a_dangling_link_is_refused_before_running(server, linked):
    with pytest.raises(cr.PromptRejected) as e:               # not in the menu
        server.run_prompt(_load_info("e2e_dangling.safetensors"), timeout=60)
    assert e.value.code == 400 and "e2e_dangling.safetensors" in e.value.body


def test_save_refuses_a_linked_folder_leading_outside_and_an_escaping_name(server, linked):
    def save(prefix: str) -> dict:
        prompt = _load_info("digits_unet_three_subject.safetensors")
        prompt["3"] = {"class_type": "ConceptLabConceptNeuronsSave",
                       "inputs": {"concept": ["1", 0], "filename_prefix": prefix}}
        return server.run_prompt(prompt, timeout=120)

    entry = save("e2e_linked_sub/saved")   # the linked sub-folder leads to the "other disk"
    err = cr.history_error(entry)
    assert err and "[ConceptLab Concept Neurons Save]" in err and "through a link" in err, err
    assert "Fix:" in err and os.path.realpath(linked / "mine") in err, err
    assert sorted(p.name for p in (linked / "mine").iterdir()) == ["three_linked.safetensors"]
    base = server.base
    for prefix in ("../escaped", "e2e_linked_sub/../../escaped", str(base / "escaped"), "."):
        entry = save(prefix)
        err = cr.history_error(entry)
        assert err and "[ConceptLab Concept Neurons Save]" in err and "not allowed" in err, (prefix, err)
        assert "Fix:" in err, err
    # where those names would have written: next to the concept folder, above it, the absolute
    # path, and (for '.') "models/concept_neurons_00001_.safetensors"
    written = [p for d in (base, base / "models", base / "comfyui", linked, linked.parent)
               for pattern in ("escaped*", "concept_neurons_*") for p in d.glob(pattern)]
    assert not written, written


def test_a_concept_folder_from_extra_model_paths_yaml(tmp_path):
    """extra_model_paths.yaml naming a 'concept_neurons' folder (on another disk): ComfyUI reads it
    before it loads custom nodes, so the folder entry exists before the pack registers its own.
    Load lists and opens that folder's concept files, models/concept_neurons and the demo concepts
    stay listed, other files are not offered, and Save writes to the yaml's folder (first)."""
    disk = tmp_path / "other_disk"
    (disk / "concepts").mkdir(parents=True)
    shutil.copy(DEMO_CONCEPT, disk / "concepts" / "from_yaml.safetensors")
    (disk / "concepts" / "notes.txt").write_text("not a concept file")
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"my_disk:\n    base_path: {disk}\n    concept_neurons: concepts\n")
    base = tmp_path / "comfy"
    (base / "models" / "concept_neurons").mkdir(parents=True)
    shutil.copy(DEMO_CONCEPT, base / "models" / "concept_neurons" / "in_models.safetensors")
    with cr.ComfyServer(base=base, extra_args=("--extra-model-paths-config", str(yaml))) as srv:
        menu = _menu(srv)
        assert {"from_yaml.safetensors", "in_models.safetensors",
                "digits_unet_three_subject.safetensors"} <= set(menu), menu
        assert "notes.txt" not in menu, menu
        prompt = _load_info("from_yaml.safetensors")
        prompt["3"] = {"class_type": "ConceptLabConceptNeuronsSave",
                       "inputs": {"concept": ["1", 0], "filename_prefix": "saved"}}
        entry = srv.run_prompt(prompt, timeout=120)
        assert cr.history_error(entry) is None, cr.history_error(entry)
        assert (disk / "concepts" / "saved_00001_.safetensors").is_file()
        entry = srv.run_prompt(_load_info("in_models.safetensors"), timeout=120)
        assert cr.history_error(entry) is None, cr.history_error(entry)

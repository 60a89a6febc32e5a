"""Concept Neurons Save stays inside models/concept_neurons, as ComfyUI 0.33's own saves do.

ComfyUI 0.33 checks every save path with ``folder_paths.is_within_directory``, which resolves both
paths with ``realpath`` "so that a symlink placed inside `directory` that points elsewhere cannot
escape". The pack does the same check itself (``nodes/concept_neurons.py: next_save_path``), so it
holds on 0.3.75 too, which has no such function. Loading through the user's links is unchanged
(test_concept_neurons.py: test_links_inside_the_concept_folder_are_followed).

Runs on the demo concept file (no extraction), in ComfyUI's process.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONCEPT = ROOT / "demo" / "concept_neurons" / "digits_unet_three_subject.safetensors"


@pytest.fixture
def concept(cn):
    return cn.read_file(str(DEMO_CONCEPT), cn.LOAD)


def _use_folder(cn, monkeypatch, folder: Path) -> None:
    import folder_paths
    entry = folder_paths.folder_names_and_paths[cn.FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, cn.FOLDER, ([str(folder)], entry[1]))
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


def _save(cn, concept, prefix: str) -> str:
    """Concept Neurons Save as ComfyUI runs it (classic schema: an instance's FUNCTION; V3: the
    class's execute): the saved file's name inside the folder."""
    node = cn.ConceptLabConceptNeuronsSave
    if hasattr(node, "define_schema"):
        out = node.execute(concept=concept, filename_prefix=prefix)
        return out.result[0]
    return getattr(node(), node.FUNCTION)(concept, prefix)["result"][0]


def _files(*dirs: Path) -> set:
    return {p for d in dirs for p in d.rglob("*")}


def test_save_refuses_a_linked_sub_folder_that_leads_outside(lab, cn, concept, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "concept_neurons"
    (folder / "real").mkdir(parents=True)
    disk = tmp_path / "other_disk"
    (disk / "mine").mkdir(parents=True)
    _use_folder(cn, monkeypatch, folder)
    os.symlink(disk / "mine", folder / "linked", target_is_directory=True)
    os.symlink(disk / "mine", folder / "real" / "deeper", target_is_directory=True)
    os.symlink(disk / "not_yet", folder / "dangling", target_is_directory=True)
    before = _files(folder, disk)
    for prefix, lands in (("linked/three", disk / "mine"), ("real/deeper/three", disk / "mine"),
                          ("linked/sub/three", disk / "mine" / "sub"),
                          ("dangling/three", disk / "not_yet")):
        with pytest.raises(lab.runtime.ConceptLabError) as e:
            _save(cn, concept, prefix)
        msg = str(e.value)
        assert msg.startswith("[ConceptLab Concept Neurons Save]"), msg
        assert f"'{prefix}' leads out of {folder}" in msg and "through a link" in msg, msg
        assert os.path.realpath(lands) in msg, msg                 # where it would have written
        assert "Fix: Use a prefix without that linked sub-folder" in msg, msg
    # nothing written, and no folder made on the other disk (not even the dangling link's target)
    assert _files(folder, disk) == before
    assert not (disk / "not_yet").exists() and not (disk / "mine" / "sub").exists()
    # a real sub-folder still works, and so does a link that stays inside the folder
    os.symlink(folder / "real", folder / "alias", target_is_directory=True)
    assert _save(cn, concept, "real/three") == os.path.join("real", "three_00001_.safetensors")
    assert _save(cn, concept, "alias/three") == os.path.join("alias", "three_00002_.safetensors")
    assert sorted(p.name for p in (folder / "real").glob("*.safetensors")) == [
        "three_00001_.safetensors", "three_00002_.safetensors"]
    assert not list(disk.rglob("*.safetensors"))


def test_save_follows_a_concept_folder_that_is_itself_a_link(cn, concept, tmp_path, monkeypatch):
    """models/concept_neurons linked to another disk as a whole: that is the save folder, and the
    file lands there (as ComfyUI 0.33 resolves its own output folder before comparing)."""
    disk = tmp_path / "other_disk" / "concepts"
    disk.mkdir(parents=True)
    (tmp_path / "models").mkdir()
    folder = tmp_path / "models" / "concept_neurons"
    os.symlink(disk, folder, target_is_directory=True)
    _use_folder(cn, monkeypatch, folder)
    assert _save(cn, concept, "mine/three") == os.path.join("mine", "three_00001_.safetensors")
    assert (disk / "mine" / "three_00001_.safetensors").is_file()
    back = cn.read_file(str(folder / "mine" / "three_00001_.safetensors"), cn.LOAD)
    assert back.fingerprint == concept.fingerprint

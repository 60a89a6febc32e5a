"""End to end: the seed-search example workflows posted to a real ComfyUI server's /prompt.

The workflows take their references from ConceptLab Load Demo Images (three held-out writers'
eights, never seen in training), so they run as soon as a user opens them."""

import numpy as np
import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path

pytestmark = pytest.mark.e2e


def _ids(prompt, cls):
    return [k for k, v in prompt.items() if v["class_type"] == cls]


def _read(server, entry, node_id):
    from PIL import Image
    out = []
    for im in entry["outputs"][node_id]["images"]:
        with Image.open(server.base / "output" / im.get("subfolder", "") / im["filename"]) as pic:
            out.append(np.asarray(pic.convert("RGB")))
    return out


def test_seed_rank_workflow_feeds_a_stock_ksampler(server, object_info):
    prompt = cr.example_prompt("seed_rank_then_ksampler.json", object_info)
    (rank,) = _ids(prompt, "ConceptLabSeedRank")
    (refs,) = _ids(prompt, "ConceptLabLoadDemoImages")
    assert prompt[rank]["inputs"]["references"] == [refs, 0]
    (ks,) = _ids(prompt, "KSampler")
    assert prompt[ks]["inputs"]["seed"] == [rank, 0] and prompt[ks]["inputs"]["steps"] == 20
    prompt[rank]["inputs"]["candidates"] = 8
    entry = server.run_prompt(prompt, timeout=300)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    (save,) = _ids(prompt, "SaveImage")
    imgs = _read(server, entry, save)
    assert len(imgs) == 1 and imgs[0].shape == (64, 64, 3)
    # (that the INT reproduces with a stock KSampler is checked in tests/integration)
    from benchmarks.world import judge as J
    assert J.find_digits(imgs[0]), "no digit drawn"


def test_seed_search_workflow_through_sampler_custom_advanced(server, object_info):
    prompt = cr.example_prompt("seed_select_then_custom_advanced.json", object_info)
    (search,) = _ids(prompt, "ConceptLabSeedSearch")
    assert prompt[search]["inputs"]["iterations"] == 40
    prompt[search]["inputs"]["iterations"] = 2          # keep the test fast
    entry = server.run_prompt(prompt, timeout=300)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    saves = _ids(prompt, "SaveImage")
    shapes = sorted(_read(server, entry, s)[0].shape for s in saves)
    assert len(_read(server, entry, saves[0])) + len(_read(server, entry, saves[1])) == 3  # 2 samples + curve
    assert shapes == [(64, 64, 3), (200, 320, 3)]


def test_bad_references_are_reported_by_the_node(server, object_info):
    prompt = cr.example_prompt("seed_rank_then_ksampler.json", object_info)
    (rank,) = _ids(prompt, "ConceptLabSeedRank")
    prompt[rank]["inputs"]["references"] = ["4", 0]     # the LATENT, not an IMAGE
    for k in ("references_2", "references_3"):
        prompt[rank]["inputs"].pop(k, None)
    try:
        entry = server.run_prompt(prompt, timeout=120)
    except cr.PromptRejected as e:                      # 0.3.x validates link types up front
        assert "references" in e.body
        return
    err = cr.history_error(entry)
    assert err and "[ConceptLab Seed Rank (best-of-N)] The 'references' input is dict, not an IMAGE" in err

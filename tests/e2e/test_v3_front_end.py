"""End to end: the V3 nodes in the real front end (headless Chromium, a real server).

- **Search aliases.** A user who types a paper's or a method's name finds the node: "DAAM" the
  saliency nodes, "Cones" Concept Neurons Extract, "SeedSelect" Seed Search, "heatmap" Saliency
  Maps, in the node library's search and in the node search box (whose first match Enter adds).
  None of these words is in a node's name: only the aliases the server sends
  (``search_aliases``, ComfyUI 0.33) can find them. ComfyUI 0.3.75's server sends none, so the
  test does not apply there.
- **Saved workflows with the V1 input names.** A workflow saved before the nodes moved to V3,
  with Seed Rank's ``references_2`` and ``references_3`` connected, opened in the page: the
  front end keeps the connections (on 0.33 the node's growing inputs are named
  ``more_references.*`` now, and the front end keeps the saved sockets beside them), queues them
  under their saved names, and the workflow runs. The pack adds no console error.
"""
import copy
import importlib
import json
from pathlib import Path

import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path
from conftest import skip_version

pytestmark = pytest.mark.e2e
br = importlib.import_module("benchmarks.browser")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "workflows_v1"

front_end = pytest.fixture(scope="module")(br.shared_front_end)

#: word typed -> the display names that must be found (and, for the search box, what Enter adds)
ALIASES = {
    "DAAM": {"ConceptLabSaliencyCapture": "ConceptLab Saliency Capture",
             "ConceptLabSaliencyMaps": "ConceptLab Saliency Maps",
             "ConceptLabMaskFromConcept": "ConceptLab Mask From Concept"},
    "Cones": {"ConceptLabConceptNeuronsExtract": "ConceptLab Concept Neurons Extract"},
    "SeedSelect": {"ConceptLabSeedSearch": "ConceptLab Seed Search (optimise)"},
    "heatmap": {"ConceptLabSaliencyMaps": "ConceptLab Saliency Maps"},
}


def _aliases_served(front_end) -> None:
    info = front_end.server.get("/object_info/ConceptLabSeedSearch")["ConceptLabSeedSearch"]
    if not info.get("search_aliases"):
        skip_version("its server sends no search aliases for custom nodes (no search_aliases in "
                     "/object_info; ComfyUI 0.33's server does)")


@pytest.mark.parametrize("word", sorted(ALIASES))
def test_node_library_search_finds_the_node_by_its_alias(front_end, word):
    _aliases_served(front_end)
    page, watch = front_end.open()
    try:
        text = br.search_node_library(page, word)
    finally:
        page.context.close()
    missing = [name for name in ALIASES[word].values() if name not in text]
    assert not missing, f"searching {word!r} in the node library did not list {missing}"


ADDED_JS = "() => window.app.graph._nodes.map((n) => n.comfyClass || n.type)"


@pytest.mark.parametrize("word", ["DAAM", "SeedSelect", "heatmap"])
def test_search_box_adds_the_node_found_by_its_alias(front_end, word):
    _aliases_served(front_end)
    page, watch = front_end.open()
    try:
        added = br.add_from_search_box(page, word)
        types = page.evaluate(ADDED_JS)
    finally:
        page.context.close()
    assert added == 1 and types[-1] in ALIASES[word], (word, types)


def _rank_with_numbered_references() -> dict:
    """The saved Seed Rank workflow (V1) with references_2 and references_3 connected, each to
    its own Load Demo Images node, as a user of the V1 nodes saved it; small enough to run."""
    wf = json.loads((FIXTURES / "seed_rank_then_ksampler.json").read_text())
    (rank,) = [n for n in wf["nodes"] if n["type"] == "ConceptLabSeedRank"]
    loader = next(n for n in wf["nodes"] if n["type"] == "ConceptLabLoadDemoImages")
    node_id, link_id = max(n["id"] for n in wf["nodes"]) + 1, max(l[0] for l in wf["links"]) + 1
    for slot in ("references_2", "references_3"):
        node = dict(copy.deepcopy(loader), id=node_id, pos=[loader["pos"][0], loader["pos"][1] + 150 * (node_id % 3)])
        node["outputs"] = [dict(o, links=[link_id] if i == 0 else []) for i, o in enumerate(node["outputs"])]
        wf["nodes"].append(node)
        wf["links"].append([link_id, node_id, 0, rank["id"], len(rank["inputs"]), "IMAGE"])
        rank["inputs"].append({"name": slot, "type": "IMAGE", "link": link_id})
        node_id, link_id = node_id + 1, link_id + 1
    rank["widgets_values"][rank["widgets_values"].index(32)] = 4       # candidates
    for n in wf["nodes"]:
        if n["type"] == "KSampler":
            n["widgets_values"][2] = 2                                 # steps
    wf["last_node_id"], wf["last_link_id"] = node_id - 1, link_id - 1
    return wf, str(rank["id"])


def test_saved_workflow_with_numbered_references_opens_queues_and_runs(front_end):
    wf, rank = _rank_with_numbered_references()
    page, watch = front_end.open()
    try:
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
        page.wait_for_timeout(500)
        queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        sent = queued[rank]["inputs"]
        assert isinstance(sent.get("references_2"), list) and isinstance(sent.get("references_3"), list), sent
        entry = br.queue_and_wait(page, front_end.server, timeout=300)
        page.wait_for_timeout(500)      # late console errors
        added = watch.added_by_pack(front_end.baseline())
    finally:
        page.context.close()
    assert entry is not None, "the queued workflow did not finish"
    assert cr.history_error(entry) is None, cr.history_error(entry)
    assert not added, "console errors the pack added:\n" + "\n".join(added)

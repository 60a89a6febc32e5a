"""The pack's subgraph blueprints (subgraphs/*.json, written by benchmarks/blueprints.py) in the real
front end: listed, added as a user adds them, and run on the demo models.

ComfyUI serves a pack's ``subgraphs/*.json`` at ``/global_subgraphs`` (0.3.75 and 0.33:
``app/subgraph_manager.py``); front ends 1.32.9, 1.48.7 and 1.58.1 list each one as a node under
*Subgraph Blueprints*.

- ``test_blueprints_are_current``: the files are what the generator writes.
- ``test_blueprints_are_listed_and_each_runs``: one server and headless Chromium. The server lists
  the three files for the pack; the node library's search finds each by name; each is added to an
  empty graph from the node search box (type its name, Enter), which must give a subgraph node with
  the blueprint's inputs, widgets and outputs. Load Demo Model (and, for Seed Search, Load Demo
  CLIP Vision and the demo's eight references) feed them, a preview takes each output, and the
  graph is queued from the page. The run must succeed with every blueprint's inner nodes in the
  prompt the front end built, an image from each, and a word mask that is neither empty nor full.
  The pack may add no console error.
"""
from __future__ import annotations

import importlib
import io
import json
import sys
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.e2e

cr = sys.modules["conceptlab_comfy_runtime"]          # benchmarks.comfy_runtime (tests/conftest.py)
br = importlib.import_module("benchmarks.browser")
bl = importlib.import_module("benchmarks.blueprints")

PACK = "ConceptLab"
RUN_TIMEOUT_S = 600
EMPTY = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [], "config": {},
         "extra": {}, "version": 0.4}
# what each blueprint must have run (class types in the prompt the front end built)
INNER = {"Word Mask from Prompt (Concept Lab)": {"ConceptLabSaliencyCapture", "ConceptLabSaliencyMaps",
                                                  "ConceptLabMaskFromConcept", "KSampler"},
         "Rare Concept by Seed Search (Concept Lab)": {"ConceptLabSeedSearch", "SamplerCustomAdvanced"},
         "Stored Concept, Applied and Sampled (Concept Lab)": {"ConceptLabConceptNeuronsLoad",
                                                                "ConceptLabConceptNeuronsApply", "KSampler"}}

# Feed every blueprint on the canvas from the demo loaders and put a preview on each output:
# {blueprint title: {output name: preview node id}} and what each subgraph node shows.
WIRE_JS = """
(titles) => {
  const app = window.app, LG = window.LiteGraph, g = app.graph;
  const add = (type, pos) => { const n = LG.createNode(type); n.pos = pos; g.add(n); return n; };
  const demo = add('ConceptLabLoadDemoModel', [-700, 0]);
  const vision = add('ConceptLabLoadDemoCLIPVision', [-700, 260]);
  const refs = add('ConceptLabLoadDemoImages', [-700, 420]);
  refs.widgets.find((w) => w.name === 'image_set').value = 'eight-references';
  const sources = {model: [demo, 0], clip: [demo, 1], vae: [demo, 2], clip_vision: [vision, 0], references: [refs, 0]};
  const previews = {}, shown = {};
  let y = 0;
  for (const bp of g._nodes.filter((n) => titles.includes(n.title))) {
    bp.pos = [0, y];
    shown[bp.title] = {isSubgraph: !!bp.subgraph, inputs: bp.inputs.map((i) => i.name),
                       widgets: (bp.widgets || []).map((w) => w.name), outputs: bp.outputs.map((o) => o.name)};
    bp.inputs.forEach((input, i) => { const s = sources[input.name]; if (s) s[0].connect(s[1], bp, i); });
    const iterations = (bp.widgets || []).find((w) => w.name === 'iterations');
    if (iterations) iterations.value = 4;     // a short search: this test is about the blueprint
    previews[bp.title] = {};
    bp.outputs.forEach((output, i) => {
      let from = bp, slot = i;
      if (output.type === 'MASK') { const m = add('MaskToImage', [500, y]); bp.connect(i, m, 0); from = m; slot = 0; }
      const p = add('PreviewImage', [800, y + 120 * i]);
      from.connect(slot, p, 0);
      previews[bp.title][output.name] = String(p.id);
    });
    y += 500;
  }
  app.graph.setDirtyCanvas(true, true);
  return {previews, shown};
}
"""


def test_blueprints_are_current():
    stale = bl.stale()
    assert not stale, "run 'bash scripts/lab.sh bench blueprints':\n" + "\n".join(stale)


@pytest.fixture(scope="module")
def front_end():
    # One torch thread in the server: on a busy 2-core machine OpenMP threads wait on each other.
    yield from br.shared_front_end(env={"OMP_NUM_THREADS": "1"})


def _new_history(server, before: set, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = server.get("/history")
        new = {k: v for k, v in hist.items() if k not in before}
        for entry in new.values():
            status = entry.get("status", {})
            if status.get("completed") or status.get("status_str") == "error":
                return entry
        time.sleep(1)
    raise TimeoutError(f"the queued blueprints did not finish within {timeout} s:\n{server.log()[-3000:]}")


def _picture(server, ref: dict):
    from PIL import Image
    q = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                "type": ref.get("type", "temp")})
    with urllib.request.urlopen(f"{server.url}/view?{q}", timeout=30) as r:
        return Image.open(io.BytesIO(r.read())).convert("L")


def test_blueprints_are_listed_and_each_runs(front_end, tmp_path):
    version, front = cr.comfy_version(), br.front_end_version()
    server = front_end.server
    names = sorted(bp.name for bp in bl.blueprints())
    served = sorted(v["name"] for v in server.get("/global_subgraphs").values()
                    if v.get("info", {}).get("node_pack") == f"custom_nodes.{PACK}")
    assert served == names, served
    baseline = front_end.baseline(False)
    page, watch = front_end.open(vue=False)
    try:
        listed = {name: br.search_node_library(page, name.removesuffix(" (Concept Lab)")) for name in names}
        page.evaluate("async () => { await window.app.extensionManager.command.execute("
                      "'Workspace.ToggleSidebarTab.node-library'); }")      # closed again
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", EMPTY)
        added = {name: br.add_from_search_box(page, name.removesuffix(" (Concept Lab)"), at=(500 + 250 * i, 300))
                 for i, name in enumerate(names)}
        wired = page.evaluate(WIRE_JS, names)
        before = set(server.get("/history"))
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        started = time.time()
        entry = _new_history(server, before, RUN_TIMEOUT_S)
        print(f"the three blueprints ran in {time.time() - started:.1f} s")
        shot = tmp_path / "blueprints.png"
        page.screenshot(path=str(shot))
        page.wait_for_timeout(500)
    finally:
        page.context.close()

    where = f"ComfyUI {version}, front end {front}; screenshot {shot}"
    missing = [n for n, text in listed.items() if n not in text or "subgraph blueprints" not in text.lower()]
    assert not missing, f"the node library's search does not list {missing} as subgraph blueprints ({where})"
    assert added == {n: 1 for n in names}, f"nodes the search box added: {added} ({where})"
    assert sorted(wired["shown"]) == names, f"the search box added {sorted(wired['shown'])} ({where})"
    for bp in bl.blueprints():
        shown = wired["shown"][bp.name]
        assert shown["isSubgraph"], (bp.name, shown, where)
        assert shown["inputs"] == [i[0] for i in bp.inputs], (bp.name, shown, where)
        assert shown["widgets"] == [i[0] for i in bp.inputs if i[4] is not None], (bp.name, shown, where)
        assert shown["outputs"] == [o[0] for o in bp.outputs], (bp.name, shown, where)
    assert cr.history_error(entry) is None, f"{cr.history_error(entry)}\n{where}\n{server.log()[-3000:]}"
    prompt = entry["prompt"][2]
    ran = {v["class_type"] for v in prompt.values()}
    searches = [v["inputs"] for v in prompt.values() if v["class_type"] == "ConceptLabSeedSearch"]
    assert [s["iterations"] for s in searches] == [4], (searches, where)   # the blueprint's widget reached it
    for name, inner in INNER.items():
        assert inner <= ran, (name, sorted(inner - ran), where)
    outputs = entry["outputs"]
    for name, previews in wired["previews"].items():
        for output, node_id in previews.items():
            images = outputs.get(node_id, {}).get("images", [])
            assert images, f"{name}: no picture from its output {output!r} ({where}): {json.dumps(outputs)[:2000]}"
            picture = _picture(server, images[0])
            if output != "loss_curve":   # a plot; the rest are the demo's 64 x 64 pictures
                assert picture.size == (64, 64), (name, output, picture.size)
            if output == "mask":   # where the model put the word: some of the image, not all of it
                share = sum(1 for v in picture.tobytes() if v > 127) / (64 * 64)
                assert 0.005 < share < 0.6, (name, share, where)
    added = watch.added_by_pack(baseline)
    assert not added, (f"console errors the pack added ({where}):\n" + "\n".join(added)
                       + f"\nthe front end's own (baseline): {sorted(baseline)}")

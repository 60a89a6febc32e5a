"""End to end: the saliency viewer (web/saliency_viewer.js) in the real front end, in both renderers.

A real server (ComfyUI with its PyPI front end) serves the page to headless Chromium; one server
and one browser serve the module, and the test runs once per renderer: the classic canvas and
Nodes 2.0 (``Comfy.VueNodes.Enabled``, where the viewer's DOM widget is mounted inside the Vue
node). The test loads example_workflows/saliency_unet_heatmaps.json into the page, queues it from
the page (the demo UNet, 2 images, 8 steps, words "seven" and "two"), and then drives the viewer
that appears on the "ConceptLab Saliency Maps" node with real clicks: switching words, images and
the threshold must each change the picture (compared as canvas pixels), and after a page reload
the viewer must come back from the saved workflow with the same choices and the same picture. No
console or page errors allowed (against a baseline of the same front end and renderer without the
pack). Set ``CONCEPTLAB_VIEWER_SCREENSHOT=/tmp/viewer`` to keep a screenshot per renderer.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys

import pytest

from conftest import skip_version

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKFLOW = ROOT / "example_workflows" / "saliency_unet_heatmaps.json"
VIEWER_EXTENSION = "ConceptLab.SaliencyViewer"
MAPS_NODE_TYPE = "ConceptLabSaliencyMaps"
RUN_TIMEOUT_MS = 120_000

pytestmark = pytest.mark.e2e


cr = sys.modules["conceptlab_comfy_runtime"]          # benchmarks.comfy_runtime (tests/conftest.py)
br = importlib.import_module("benchmarks.browser")              # loaded by tests/conftest.py

# Bring the Maps node into view at scale 1 (so the viewer's controls can be clicked), and return
# its id.
SHOW_NODE_JS = """
(type) => {
  const app = window.app;
  const node = app.graph._nodes.find((n) => (n.comfyClass || n.type) === type);
  if (!node) return null;
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset[0] = 380 - node.pos[0];
  app.canvas.ds.offset[1] = 60 - node.pos[1];
  app.canvas.setDirty(true, true);
  return node.id;
}
"""

# What the viewer shows: its state, controls and a fingerprint of the canvas pixels.
VIEWER_STATE_JS = """
(id) => {
  const node = window.app.graph.getNodeById(id);
  const viewer = node && node.conceptLabSaliency;
  if (!viewer) return null;
  const root = viewer.root;
  const canvas = root.querySelector('canvas[data-role="view"]');
  const pressed = Array.from(root.querySelectorAll('button[data-word][aria-pressed="true"]'));
  const select = root.querySelector('select[data-role="image"]');
  return {
    state: root.dataset.state,
    drawn: viewer.drawn,
    connected: root.isConnected,
    visible: root.getBoundingClientRect().width > 0 && root.getBoundingClientRect().height > 0,
    words: Array.from(root.querySelectorAll('button[data-word]')).map((b) => b.dataset.word),
    pressed: pressed.map((b) => b.dataset.word),
    images: select ? select.options.length : 0,
    image: select ? select.value : null,
    threshold: root.querySelector('input[data-role="threshold"]').value,
    status: root.querySelector('[data-role="status"]').textContent,
    size: [canvas.width, canvas.height],
    pixels: canvas.toDataURL("image/png"),
    property: node.properties && node.properties.conceptlab_saliency
      ? JSON.parse(JSON.stringify(node.properties.conceptlab_saliency)) : null,
  };
}
"""

SAVED_NODE_JS = """
async (id) => {
  const app = window.app;
  // Front end 1.48 keeps live node ids as strings but serialises them as numbers.
  const saved = app.graph.serialize().nodes.find((n) => String(n.id) === String(id));
  const prompt = await app.graphToPrompt();
  return {widgets_values: saved.widgets_values, properties: saved.properties,
          prompt_inputs: Object.keys(prompt.output[String(id)].inputs)};
}
"""


def _wait_ready(page, node_id, drawn_after: int, timeout_ms: int = 30_000):
    page.wait_for_function(
        """([id, n]) => { const v = window.app.graph.getNodeById(id)?.conceptLabSaliency;
                         return v && v.drawn > n && v.root.dataset.state === "ready"; }""",
        arg=[node_id, drawn_after], timeout=timeout_ms)
    return page.evaluate(VIEWER_STATE_JS, node_id)


def _wait_app(page):
    page.wait_for_function(
        """(name) => window.app && window.app.graph && window.ConceptLab && window.ConceptLab.extensionLoaded
                     && Array.from(window.app.extensions || []).some((e) => e && e.name === name)""",
        arg=VIEWER_EXTENSION, timeout=br.LOAD_TIMEOUT_MS)


def _quick(workflow: dict, steps: int = 8, seed: int = 1234) -> dict:
    """The example workflow with fewer sampling steps: this test is about the viewer."""
    for node in workflow["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][0] = seed
            node["widgets_values"][2] = steps
    return workflow


@pytest.fixture(scope="module")
def front_end():
    # One torch thread in the server: on a busy 2-core machine OpenMP threads wait on each other
    # and sampling even this tiny model can take many times longer.
    yield from br.shared_front_end(env={"OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("vue", [False, True], ids=br.RENDERER_IDS)
def test_saliency_viewer_runs_switches_and_survives_reload(front_end, vue):
    version, front = cr.comfy_version(), br.front_end_version()
    baseline = front_end.baseline(vue)
    page, watch = front_end.open(vue=vue, viewport=(1280, 820))
    try:
        if vue and br.nodes_2_0_missing(page):
            skip_version(br.nodes_2_0_missing(page))
        _wait_app(page)
        other = _drive_the_viewer(page, watch, front_end.server, vue)

        # Reload: the workflow (with the node's saved viewer state) comes back from the front
        # end's workflow persistence, and the viewer repaints the same picture.
        page.wait_for_timeout(1000)   # the front end persists the open workflow shortly after a change
        page.reload(wait_until="load", timeout=br.LOAD_TIMEOUT_MS)
        _wait_app(page)
        node_id = other["id"]
        page.wait_for_function("(id) => !!window.app.graph.getNodeById(id)", arg=node_id, timeout=30_000)
        page.evaluate(SHOW_NODE_JS, MAPS_NODE_TYPE)
        restored = _wait_ready(page, node_id, 0)
        assert br.renderer(page)["vueNodesMode"] is vue
        assert restored["connected"] and restored["visible"], restored["status"]
        assert restored["pressed"] == ["two"] and restored["image"] == "1", restored
        assert float(restored["threshold"]) == pytest.approx(0.8), restored
        assert restored["pixels"] == other["pixels"], "the reloaded viewer shows another picture"
        page.wait_for_timeout(500)   # let late console errors surface
    finally:
        page.context.close()

    added = watch.added_by_pack(baseline)
    assert not added, (f"console errors the pack added on ComfyUI {version}, front end {front}, "
                       f"{br.RENDERER_IDS[vue]} renderer:\n" + "\n".join(added)
                       + f"\nthe front end's own (baseline): {sorted(baseline)}")
    assert not watch.pack_warnings, "console warnings about the pack:\n" + "\n".join(watch.pack_warnings)


def _drive_the_viewer(page, watch, srv, vue: bool) -> dict:
    """Load the workflow, queue it from the page, drive the viewer; the last state it showed."""
    workflow = _quick(json.loads(WORKFLOW.read_text()), seed=1234 + vue)   # a fresh run per renderer
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    assert br.renderer(page)["vueNodesMode"] is vue
    node_id = page.evaluate(SHOW_NODE_JS, MAPS_NODE_TYPE)
    assert node_id is not None, "the workflow has no ConceptLab Saliency Maps node"
    if vue:   # the Vue node holds the viewer (mounted once the node is rendered)
        page.wait_for_function(
            """(id) => { const v = window.app.graph.getNodeById(id)?.conceptLabSaliency;
                         const el = document.querySelector(`[data-node-id="${id}"]`);
                         return !!(v && el && el.contains(v.root)); }""", arg=node_id, timeout=30_000)
    before = page.evaluate(VIEWER_STATE_JS, node_id)
    assert before is not None and before["state"] == "empty", before
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    try:
        first = _wait_ready(page, node_id, 0, RUN_TIMEOUT_MS)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the viewer never showed a picture ({e})\nconsole errors: {watch.errors}\n"
                    f"page errors: {watch.page_errors}\nserver log:\n{srv.log()[-4000:]}")
    assert first["connected"] and first["visible"], first["status"]
    assert first["words"] == ["seven", "two"], first
    assert first["pressed"] == ["seven"] and first["images"] == 2, first
    assert first["size"] == [64, 64], first            # the demo image size
    assert float(first["threshold"]) == pytest.approx(0.5), first

    # Switching the word changes the picture (a real click on the word's button).
    viewer = page.locator('[data-conceptlab="saliency-viewer"]')
    viewer.locator('button[data-word="two"]').click()
    two = _wait_ready(page, node_id, first["drawn"])
    assert two["pressed"] == ["two"], two
    assert two["pixels"] != first["pixels"], "switching the word did not change the picture"

    # The threshold slider changes the picture.
    slider = viewer.locator('input[data-role="threshold"]')
    slider.fill("0.8")
    high = _wait_ready(page, node_id, two["drawn"])
    assert float(high["threshold"]) == pytest.approx(0.8), high
    assert high["pixels"] != two["pixels"], "the threshold slider did not change the picture"

    # The second image of the batch.
    viewer.locator('select[data-role="image"]').select_option("1")
    other = _wait_ready(page, node_id, high["drawn"])
    assert other["image"] == "1" and other["pixels"] != high["pixels"], other
    prop = other["property"]
    assert (prop["word"], prop["image"]) == ("two", 1), prop
    assert prop["threshold"] == pytest.approx(0.8), prop

    # The viewer is not a node input: nothing in the prompt, nothing in widgets_values.
    saved = page.evaluate(SAVED_NODE_JS, node_id)
    assert sorted(saved["prompt_inputs"]) == ["blur", "images", "recording", "refine",
                                              "threshold", "threshold_mode"], saved
    assert [v for v in saved["widgets_values"] if v is not None] == ["fixed", 0.5, False, "crf"], saved
    props = saved["properties"]["conceptlab_saliency"]
    assert len(json.dumps(props)) < 4000, "the saved viewer state should stay small"

    shots = os.environ.get("CONCEPTLAB_VIEWER_SCREENSHOT")
    if shots:
        pathlib.Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(pathlib.Path(shots) / f"viewer-{br.RENDERER_IDS[vue]}.png"))
    return dict(other, id=node_id)

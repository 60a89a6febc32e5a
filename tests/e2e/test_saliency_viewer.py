"""End to end: the saliency viewer (web/saliency_viewer.js) on a real ComfyUI 0.3.x front end.

A real server (ComfyUI 0.3.x with its PyPI front end) serves the page to headless Chromium. The
test loads example_workflows/saliency_unet_heatmaps.json into the page, queues it from the page
(the demo UNet, 2 images, 8 steps, words "seven" and "two"), and then drives the viewer that
appears on the "ConceptLab Saliency Maps" node: switching words, images and the threshold must
each change the picture (compared as canvas pixels), and after a page reload the viewer must
come back from the workflow with the same choices and the same picture. No console or page
errors allowed.

The 2024 built-in front end is not driven (it only has to load the extension without errors,
which test_frontend.py checks). Set ``CONCEPTLAB_VIEWER_SCREENSHOT=/tmp/viewer.png`` to keep a
screenshot of the viewer.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys

import pytest

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


def _quick(workflow: dict, steps: int = 8) -> dict:
    """The example workflow with fewer sampling steps: this test is about the viewer."""
    for node in workflow["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = steps
    return workflow


def test_saliency_viewer_runs_switches_and_survives_reload(tmp_path, monkeypatch):
    why = br.available()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    try:
        cr.comfy_root()
    except cr.ComfyNotFound as e:
        pytest.skip(str(e))
    version, front_end = cr.comfy_version(), br.front_end_version()
    if not cr.is_modern():
        pytest.skip(f"the saliency viewer test drives the PyPI front end "
                    f"(comfyui-frontend-package); this is ComfyUI {version} with the 2024 built-in "
                    "front end, where the viewer only has to load without errors (test_frontend.py "
                    "checks that).")
    baseline = br.front_end_baseline()
    workflow = _quick(json.loads(WORKFLOW.read_text()))
    # One torch thread in the server: on a busy 2-core machine OpenMP threads wait on each other
    # and sampling even this tiny model can take many times longer.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    base = tmp_path / "comfy"
    br.seed_user(base)
    with cr.ComfyServer(base=base) as srv, sync_playwright() as pw:
        browser = br.launch(pw)
        try:
            page = br.new_page(browser, viewport=(1280, 820))
            watch = br.ConsoleWatch().attach(page)
            page.goto(srv.url + "/", wait_until="load", timeout=br.LOAD_TIMEOUT_MS)
            _wait_app(page)

            # Load the example workflow into the page and queue it from the page.
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
            node_id = page.evaluate(SHOW_NODE_JS, MAPS_NODE_TYPE)
            assert node_id is not None, "the workflow has no ConceptLab Saliency Maps node"
            before = page.evaluate(VIEWER_STATE_JS, node_id)
            assert before is not None and before["state"] == "empty", before
            page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
            try:
                first = _wait_ready(page, node_id, 0, RUN_TIMEOUT_MS)
            except Exception as e:
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
            assert [v for v in saved["widgets_values"] if v is not None] == [
                "fixed", 0.5, False, "crf"], saved
            props = saved["properties"]["conceptlab_saliency"]
            assert len(json.dumps(props)) < 4000, "the saved viewer state should stay small"

            shot = os.environ.get("CONCEPTLAB_VIEWER_SCREENSHOT")
            if shot:
                pathlib.Path(shot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=shot)

            # Reload: the workflow (with the node's saved viewer state) comes back from the
            # front end's workflow persistence, and the viewer repaints the same picture.
            page.wait_for_timeout(1200)   # the 2024 front end saves the open graph once a second
            page.reload(wait_until="load", timeout=br.LOAD_TIMEOUT_MS)
            _wait_app(page)
            page.wait_for_function("(id) => !!window.app.graph.getNodeById(id)", arg=node_id,
                                   timeout=30_000)
            page.evaluate(SHOW_NODE_JS, MAPS_NODE_TYPE)
            restored = _wait_ready(page, node_id, 0)
            assert restored["pressed"] == ["two"] and restored["image"] == "1", restored
            assert float(restored["threshold"]) == pytest.approx(0.8), restored
            assert restored["pixels"] == other["pixels"], "the reloaded viewer shows another picture"
            page.wait_for_timeout(500)   # let late console errors surface
        finally:
            browser.close()

    added = watch.added_by_pack(baseline)
    assert not added, (f"console errors the pack added on ComfyUI {version}, front end {front_end}:\n"
                       + "\n".join(added) + f"\nthe front end's own (baseline): {sorted(baseline)}")
    assert not watch.pack_warnings, "console warnings about the pack:\n" + "\n".join(watch.pack_warnings)

"""End to end: a real ComfyUI server serves the real front end, which loads web/concept_lab.js.

Runs against whichever ComfyUI benchmarks/comfy_runtime.py finds (``COMFYUI_PATH``; scripts/lab.sh
sets it), with the PyPI front end it pins (``CONCEPTLAB_FRONTEND=X.Y.Z`` serves another one), in
both of the front end's renderers: the classic canvas and Nodes 2.0 (``Comfy.VueNodes.Enabled``,
nodes drawn as Vue components). One server and one headless Chromium (Debian's, driven by Python
playwright) serve the module; each renderer gets its own page.

What is checked: the extension loads once and registers its setting; a new Concept Lab node gets
the pack colour and is marked once as the pack's (the front end's own source badge, or our "Concept
Lab" tag while that badge is off), following the setting off and on. In Nodes 2.0 this is read
from the rendered Vue node itself (its colours and badges), since nothing there is drawn on the
canvas.

Console errors: the same page is first loaded from the same ComfyUI without the pack, in the same
renderer (``benchmarks/browser.py: front_end_baseline``). Only errors the pack adds fail the test;
an error that names the pack always does. What the front ends log by themselves, measured this way:
- 1.32.9 (ComfyUI 0.3.75): "TypeError: Cannot read properties of undefined (reading 'id')" from
  the settings store's onChange, when useRenderModeSetting sets a setting not yet registered;
- 1.48.7 (ComfyUI 0.33.0): "ComfyApp graph accessed before initialization", a Vue computed that
  reads app.rootGraph before the graph exists;
- all of them: 404s for optional per-user files (user.css, workflows, subgraphs).

Set ``CONCEPTLAB_E2E_SCREENSHOT=/some/dir`` to keep a screenshot of the loaded page per renderer.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys
import urllib.error
import urllib.request

import pytest

from conftest import skip_version

EXTENSION_NAME = "ConceptLab.Core"
SETTING_ID = "ConceptLab.ShowBadge"
SOURCE_BADGE_SETTING = "Comfy.NodeBadge.NodeSourceBadgeMode"
JS_PATH = "/extensions/ConceptLab/concept_lab.js"
TITLE_RGB, BODY_RGB = "rgb(61, 47, 102)", "rgb(36, 28, 61)"     # the pack colours, #3d2f66 / #241c3d

pytestmark = pytest.mark.e2e

cr = sys.modules["conceptlab_comfy_runtime"]          # benchmarks.comfy_runtime (tests/conftest.py)
br = importlib.import_module("benchmarks.browser")              # loaded by tests/conftest.py


# Evaluated in the page once it has loaded: what the test asserts on.
PAGE_STATE_JS = """
([extName, settingId]) => {
  const app = window.app;
  const store = app.extensionManager.setting;
  const registered = settingId in store.settings;
  return {
    conceptLab: window.ConceptLab ? {...window.ConceptLab} : null,
    extensionNames: Array.from(app.extensions || []).map((e) => e && e.name),
    settingRegistered: registered,
    settingName: registered ? store.settings[settingId].name : null,
    settingValue: store.get(settingId),
  };
}
"""

# Add one Concept Lab node to the graph and report how it is marked: with our setting on, off and
# on again; then with the front end's node-source badge turned off (NodeSourceBadgeMode "None"),
# with our setting on and off. Each look reads the node (its colours and badge list) and, in
# Nodes 2.0, the rendered Vue node: whether it shows the pack colours, our tag and the source badge.
ADD_NODE_JS = """
async ([type, settingId, sourceSetting, titleRgb, bodyRgb]) => {
  const app = window.app;
  const store = app.extensionManager.setting;
  const vue = !!window.LiteGraph.vueNodesMode;
  const settle = () => new Promise((r) => setTimeout(r, vue ? 400 : 0));   // Vue renders asynchronously
  const set = async (id, v) => { await store.set(id, v); await settle(); };
  const node = window.LiteGraph.createNode(type);
  app.graph.add(node);
  node.pos = [120, 160];  // left in the graph, so the screenshot shows how it is marked
  await settle();
  const rendered = () => {
    const el = document.querySelector(`[data-node-id="${node.id}"]`);
    if (!el) return null;
    const colours = new Set([el, ...el.querySelectorAll('*')].map((e) => getComputedStyle(e).backgroundColor));
    const lines = el.innerText.split('\\n').map((t) => t.trim());
    return {title: colours.has(titleRgb), body: colours.has(bodyRgb), tag: lines.includes('Concept Lab'),
            source: lines.includes('ConceptLab')};
  };
  const look = () => ({
    color: node.color || null, bgcolor: node.bgcolor || null,
    badges: node.badges.map((b) => (typeof b === "function" ? b() : b)).map((b) => b && b.text).filter((t) => t),
    rendered: vue ? rendered() : null,
  });
  const sourceMode = store.get(sourceSetting);
  const on = look();
  await set(settingId, false);
  const off = look();
  await set(settingId, true);
  const again = look();
  await set(sourceSetting, "None");
  const sourceNone = look();
  await set(settingId, false);
  const sourceNoneOff = look();
  await set(settingId, true);
  await set(sourceSetting, sourceMode);
  app.graph.setDirtyCanvas(true, true);
  return {comfyClass: node.comfyClass || node.type, vue, on, off, again, sourceMode, sourceNone, sourceNoneOff};
}
"""


def _pack_badges(look: dict) -> list[str]:
    return [t for t in look["badges"] if "conceptlab" in t.replace(" ", "").lower()]


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def front_end(server):
    """The session's ComfyUI server (tests/conftest.py) and this module's Chromium."""
    yield from br.shared_front_end(server)


def test_the_server_serves_the_extension(front_end):
    # The pack is linked as custom_nodes/ConceptLab and WEB_DIRECTORY is ./web.
    url = front_end.url
    status, body = _get(url + JS_PATH)
    assert status == 200, f"GET {JS_PATH} -> {status}\n{front_end.server.log()[-3000:]}"
    assert b"ConceptLab.Core" in body
    listed = json.loads(_get(url + "/extensions")[1])
    assert JS_PATH in listed, f"{JS_PATH} not in /extensions: {listed}"
    assert not [p for p in listed if p.startswith("/extensions/ConceptLab/docs/")], (
        "help pages must not be loaded as scripts", listed)


@pytest.mark.parametrize("vue", [False, True], ids=br.RENDERER_IDS)
def test_frontend_loads_extension_and_marks_nodes_without_console_errors(front_end, vue, tmp_path):
    version, front = cr.comfy_version(), br.front_end_version()
    baseline = front_end.baseline(vue)
    node_types = sorted(k for k in front_end.server.get("/object_info") if k.startswith("ConceptLab"))
    assert node_types, "the server lists no ConceptLab node types"

    page, watch = front_end.open(vue=vue)
    try:
        if vue and br.nodes_2_0_missing(page):
            skip_version(br.nodes_2_0_missing(page))
        try:
            page.wait_for_function(
                """(name) => window.ConceptLab && window.ConceptLab.extensionLoaded
                             && Array.from(window.app.extensions || []).some((e) => e && e.name === name)""",
                arg=EXTENSION_NAME, timeout=br.LOAD_TIMEOUT_MS)
        except Exception as e:  # noqa: BLE001
            shot = tmp_path / "frontend-timeout.png"
            page.screenshot(path=str(shot))
            pytest.fail(f"front end did not finish loading ({e}); screenshot {shot}\n"
                        f"console errors: {watch.errors}\npage errors: {watch.page_errors}\n"
                        f"server log:\n{front_end.server.log()[-3000:]}")
        page.wait_for_timeout(3000)  # let late errors (settings saves, websocket) surface
        rendering = br.renderer(page)
        state = page.evaluate(PAGE_STATE_JS, [EXTENSION_NAME, SETTING_ID])
        marked = page.evaluate(ADD_NODE_JS, [node_types[0], SETTING_ID, SOURCE_BADGE_SETTING, TITLE_RGB, BODY_RGB])
        page.wait_for_timeout(500)
        shots = os.environ.get("CONCEPTLAB_E2E_SCREENSHOT")
        shot = pathlib.Path(shots) / f"frontend-{br.RENDERER_IDS[vue]}.png" if shots else tmp_path / "frontend.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
    finally:
        page.context.close()

    added = watch.added_by_pack(baseline)
    context = (f"ComfyUI {version}, front end {front}, {br.RENDERER_IDS[vue]} renderer {rendering}; page state "
               f"{state}; node {marked}; front end's own errors (baseline) {sorted(baseline)}; its failed "
               f"requests to other hosts {watch.external()}; screenshot {shot}")
    assert rendering["vueNodesMode"] is vue and marked["vue"] is vue, context
    assert state["conceptLab"] == {"version": "0.1.0", "extensionLoaded": True}, context
    assert state["extensionNames"].count(EXTENSION_NAME) == 1, context
    assert state["settingRegistered"], context
    assert state["settingName"] == "Concept Lab: mark Concept Lab nodes", context
    assert state["settingValue"] is True, context
    # The setting is on by default, so a new Concept Lab node gets the pack colour; turning it
    # off removes the colour, turning it on restores it.
    on, off, again = marked["on"], marked["off"], marked["again"]
    assert on["color"] and on["bgcolor"], context
    assert off["color"] is None and off["bgcolor"] is None, context
    assert again == on, context
    # Marked once: the front end draws its own node-source badge on custom nodes ("ConceptLab",
    # the folder name; 1.3x-1.4x keep it in node.badges, 1.5x draw it apart), so our tag stays
    # away while that badge shows, and takes its place when the user turns it off (and our
    # setting is on).
    assert marked["sourceMode"] != "None", context
    assert len(_pack_badges(on)) <= 1 and _pack_badges(again) == _pack_badges(on), context
    assert "Concept Lab" not in on["badges"] and "Concept Lab" not in off["badges"], context
    assert _pack_badges(marked["sourceNone"]) == ["Concept Lab"], context
    assert _pack_badges(marked["sourceNoneOff"]) == [], context
    if vue:
        # What the Vue node shows: the colours follow the setting off and on again; the source
        # badge or our tag (an extension badge), never both and never neither.
        look = {k: marked[k]["rendered"] for k in ("on", "off", "again", "sourceNone", "sourceNoneOff")}
        assert all(look.values()), f"a Vue node was not rendered: {look}\n{context}"
        assert look["on"]["title"] and look["on"]["body"], context
        assert not look["off"]["title"] and not look["off"]["body"], context
        assert look["again"] == look["on"], f"the colours did not come back in the Vue node\n{context}"
        for k in ("on", "off", "again"):
            assert look[k]["source"] and not look[k]["tag"], (k, context)
        assert look["sourceNone"]["tag"] and not look["sourceNone"]["source"], context
        assert not look["sourceNoneOff"]["tag"] and not look["sourceNoneOff"]["title"], context
    assert not added, "console errors the pack added:\n" + "\n".join(added) + f"\n{context}"
    assert not watch.pack_warnings, ("console warnings about the pack:\n" + "\n".join(watch.pack_warnings)
                                     + f"\n{context}")

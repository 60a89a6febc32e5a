"""End to end: a real ComfyUI server serves the real front end, which loads web/concept_lab.js.

Runs against whichever ComfyUI benchmarks/comfy_runtime.py finds (``COMFYUI_PATH``; scripts/lab.sh
sets it): the 2024 snapshot's built-in front end, or the PyPI front end a 0.3.x / 0.33 ComfyUI
pins (``CONCEPTLAB_FRONTEND=X.Y.Z`` serves another one). Headless Chromium is driven by Python
playwright, using the system browser at /usr/bin/chromium.

Console errors: the same page is first loaded from the same ComfyUI without the pack
(``benchmarks/browser.py: front_end_baseline``). Only errors the pack adds fail the test; an error
that names the pack always does. What the front ends log by themselves, measured this way:
- 1.32.9 (ComfyUI 0.3.75): "TypeError: Cannot read properties of undefined (reading 'id')" from
  the settings store's onChange, when useRenderModeSetting sets a setting not yet registered;
- 1.48.7 (ComfyUI 0.33.0): "ComfyApp graph accessed before initialization", a Vue computed that
  reads app.rootGraph before the graph exists;
- all PyPI front ends: 404s for optional per-user files (user.css, workflows, subgraphs).

Set ``CONCEPTLAB_E2E_SCREENSHOT=/some/file.png`` to keep a screenshot of the loaded page.
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

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXTENSION_NAME = "ConceptLab.Core"
SETTING_ID = "ConceptLab.ShowBadge"
SOURCE_BADGE_SETTING = "Comfy.NodeBadge.NodeSourceBadgeMode"
JS_PATH = "/extensions/ConceptLab/concept_lab.js"

pytestmark = pytest.mark.e2e

cr = sys.modules["conceptlab_comfy_runtime"]          # benchmarks.comfy_runtime (tests/conftest.py)
br = importlib.import_module("benchmarks.browser")              # loaded by tests/conftest.py
LOAD_TIMEOUT_MS = br.LOAD_TIMEOUT_MS


# Evaluated in the page once it has loaded: what the test asserts on. Written for both front ends:
# the 2024 one keeps extensions in app.extensions (an array) and settings in
# app.ui.settings.settingsLookup; the 2025 one has app.extensions (a getter on its extension store)
# and app.extensionManager.setting (the settings store).
PAGE_STATE_JS = """
([extName, settingId]) => {
  const app = window.app;
  const exts = Array.from((app && app.extensions) || []);
  const store = app && app.extensionManager && app.extensionManager.setting;
  let registered = false, value = null, name = null;
  if (store && store.settings) {
    registered = settingId in store.settings;
    name = registered ? store.settings[settingId].name : null;
    value = store.get(settingId);
  } else {
    const lookup = (app && app.ui && app.ui.settings && app.ui.settings.settingsLookup) || {};
    registered = settingId in lookup;
    name = registered ? lookup[settingId].name : null;
    value = app.ui.settings.getSettingValue(settingId);
  }
  return {
    hasApp: !!app,
    newFrontEnd: !!(app && app.extensionManager),
    conceptLab: window.ConceptLab ? {...window.ConceptLab} : null,
    extensionNames: exts.map((e) => e && e.name),
    settingRegistered: registered,
    settingName: name,
    settingValue: value,
  };
}
"""

# Add one Concept Lab node to the graph and report how it is marked: with our setting on, off and
# on again; then, on front ends that draw their own node-source badge, with that badge turned off
# (Comfy.NodeBadge.NodeSourceBadgeMode = "None"), with our setting on and off.
ADD_NODE_JS = """
async ([type, settingId, sourceSetting]) => {
  const app = window.app;
  const store = app.extensionManager && app.extensionManager.setting;
  const setSetting = (id, v) => store ? store.set(id, v) : app.ui.settings.setSettingValueAsync(id, v);
  const node = window.LiteGraph.createNode(type);
  app.graph.add(node);
  node.pos = [120, 160];  // left in the graph, so the screenshot shows how it is marked
  const look = () => ({
    color: node.color || null, bgcolor: node.bgcolor || null,
    badges: Array.isArray(node.badges)
      ? node.badges.map((b) => (typeof b === "function" ? b() : b)).map((b) => b && b.text).filter((t) => t)
      : null,
  });
  const on = look();
  await setSetting(settingId, false);
  const off = look();
  await setSetting(settingId, true);
  const again = look();
  const sourceBadges = !!(store && store.settings && sourceSetting in store.settings);
  let sourceNone = null, sourceNoneOff = null, sourceMode = null;
  if (sourceBadges) {
    sourceMode = store.get(sourceSetting);
    await setSetting(sourceSetting, "None");
    sourceNone = look();
    await setSetting(settingId, false);
    sourceNoneOff = look();
    await setSetting(settingId, true);
    await setSetting(sourceSetting, sourceMode);
  }
  app.graph.setDirtyCanvas(true, true);
  return {comfyClass: node.comfyClass || node.type, on, off, again, sourceBadges, sourceMode,
          sourceNone, sourceNoneOff};
}
"""


def _pack_badges(look: dict) -> list[str]:
    return [t for t in look["badges"] if "conceptlab" in t.replace(" ", "").lower()]


def _skip_unless_browser():
    why = br.available()
    if why:
        pytest.skip(why)


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_frontend_loads_extension_without_console_errors(tmp_path):
    _skip_unless_browser()
    from playwright.sync_api import sync_playwright

    try:
        cr.comfy_root()
    except cr.ComfyNotFound as e:
        pytest.skip(str(e))
    version, front_end = cr.comfy_version(), br.front_end_version()
    baseline = br.front_end_baseline()

    base = tmp_path / "comfy"
    br.seed_user(base)
    with cr.ComfyServer(base=base) as srv:
        # The pack is linked as custom_nodes/ConceptLab and WEB_DIRECTORY is ./web.
        status, body = _get(srv.url + JS_PATH)
        assert status == 200, f"GET {JS_PATH} -> {status}\n{srv.log()[-3000:]}"
        assert b"ConceptLab.Core" in body
        listed = json.loads(_get(srv.url + "/extensions")[1])
        assert JS_PATH in listed, f"{JS_PATH} not in /extensions: {listed}"
        node_types = sorted(k for k in json.loads(_get(srv.url + "/object_info")[1]) if k.startswith("ConceptLab"))
        assert node_types, "the server lists no ConceptLab node types"

        with sync_playwright() as pw:
            browser = br.launch(pw)
            try:
                page = br.new_page(browser)
                watch = br.ConsoleWatch().attach(page)
                resp = page.goto(srv.url + "/", wait_until="load", timeout=LOAD_TIMEOUT_MS)
                assert resp is not None and resp.ok, f"GET / -> {resp and resp.status}"
                # window.app is assigned once app.setup() has finished (every front end), i.e.
                # after every extension's init/setup hooks ran.
                try:
                    page.wait_for_function(
                        """(name) => window.app && window.ConceptLab && window.ConceptLab.extensionLoaded
                                     && Array.from(window.app.extensions || []).some((e) => e && e.name === name)""",
                        arg=EXTENSION_NAME, timeout=LOAD_TIMEOUT_MS)
                except Exception as e:
                    shot = tmp_path / "frontend-timeout.png"
                    page.screenshot(path=str(shot))
                    pytest.fail(f"front end did not finish loading ({e}); screenshot {shot}\n"
                                f"console errors: {watch.errors}\npage errors: {watch.page_errors}\n"
                                f"server log:\n{srv.log()[-3000:]}")
                page.wait_for_timeout(3000)  # let late errors (settings saves, websocket) surface

                state = page.evaluate(PAGE_STATE_JS, [EXTENSION_NAME, SETTING_ID])
                marked = page.evaluate(ADD_NODE_JS, [node_types[0], SETTING_ID, SOURCE_BADGE_SETTING])
                page.wait_for_timeout(500)

                shot = pathlib.Path(os.environ.get("CONCEPTLAB_E2E_SCREENSHOT") or tmp_path / "frontend.png")
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot))
            finally:
                browser.close()

    added = watch.added_by_pack(baseline)
    context = (f"ComfyUI {version}, front end {front_end}; page state {state}; node {marked}; "
               f"front end's own errors (baseline) {sorted(baseline)}; its failed requests to other hosts "
               f"{watch.external()}; screenshot {shot}")
    assert state["hasApp"], context
    assert state["conceptLab"] == {"version": "0.1.0", "extensionLoaded": True}, context
    assert EXTENSION_NAME in state["extensionNames"], context
    assert state["extensionNames"].count(EXTENSION_NAME) == 1, context
    assert state["settingRegistered"], context
    assert state["settingName"] == "Concept Lab: mark Concept Lab nodes", context
    assert state["settingValue"] in (True, None), context  # None: 2024 front end, never saved
    # The setting is on by default, so a new Concept Lab node gets the pack colour; turning it
    # off removes the colour, turning it on restores it.
    on, off, again = marked["on"], marked["off"], marked["again"]
    assert on["color"] and on["bgcolor"], context
    assert off["color"] is None and off["bgcolor"] is None, context
    assert again == on, context
    # Marked once. Front ends from mid-2024 on draw their own node-source badge on custom nodes
    # ("ConceptLab", the folder name; 1.3x-1.4x keep it in node.badges, 1.5x draw it apart), so
    # ours stays away while that badge shows, and takes its place when the user turns it off
    # (and our setting is on). The 2024 front end has no badge list: the extension draws the
    # tag itself in onDrawForeground, which the screenshot shows.
    if on["badges"] is not None:
        assert len(_pack_badges(on)) <= 1 and _pack_badges(again) == _pack_badges(on), context
        if marked["sourceBadges"] and marked["sourceMode"] != "None":
            assert "Concept Lab" not in on["badges"], context
        else:
            assert _pack_badges(on) == ["Concept Lab"] and _pack_badges(off) == [], context
        if marked["sourceBadges"]:
            assert _pack_badges(marked["sourceNone"]) == ["Concept Lab"], context
            assert _pack_badges(marked["sourceNoneOff"]) == [], context
    assert not added, "console errors the pack added:\n" + "\n".join(added) + f"\n{context}"
    assert not watch.pack_warnings, ("console warnings about the pack:\n" + "\n".join(watch.pack_warnings)
                                     + f"\n{context}")

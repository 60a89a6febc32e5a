"""End to end: the pack's example workflows in the front end's template browser, with thumbnails.

ComfyUI serves a custom-node pack's ``example_workflows/`` as templates (``GET /workflow_templates``
lists them by pack folder; ``/api/workflow_templates/<folder>/<file>`` serves the folder). The
front end's template browser shows a custom-node template with the thumbnail
``/api/workflow_templates/<folder>/<name>.jpg`` (front ends 1.48.7 and 1.58.1 give custom-node
templates ``mediaSubtype: 'jpg'``), so every ``example_workflows/<name>.json`` needs
``example_workflows/<name>.jpg`` beside it (rendered from a real run by
``python -m benchmarks gallery --only thumbnails``).

- ``test_every_example_workflow_has_a_thumbnail``: the files: one JPEG per workflow, none without
  one, 256-320 px wide, small.
- ``test_template_browser_shows_the_thumbnails``: a real server and its front end in headless
  Chromium, in both renderers (the classic canvas and Nodes 2.0, ``Comfy.VueNodes.Enabled``); one
  server and one browser serve the module. The browser is opened as a user opens it (the front
  end's ``Comfy.BrowseTemplates`` command, what the Workflow menu's *Browse Templates* runs), the
  pack's category (*ConceptLab*, under Extensions) is picked, and for every template its card must
  be listed with its thumbnail loaded: the card's <img> has finished loading with
  ``naturalWidth > 0`` and the thumbnail file's size; the page fetched
  ``/api/workflow_templates/ConceptLab/<name>.jpg`` (200) for each (the front ends show it through
  a ``blob:`` URL of what they fetched), and no thumbnail request failed. Then one template is
  opened from its card, as a user does: its nodes are in the graph (and, in Nodes 2.0, drawn as Vue
  nodes, the pack's marked as such). The pack may add no console error.
"""
from __future__ import annotations

import importlib
import json
import pathlib
import sys
import urllib.request

import pytest

from conftest import skip_version

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_workflows"
PACK = "ConceptLab"

pytestmark = pytest.mark.e2e

cr = sys.modules["conceptlab_comfy_runtime"]          # benchmarks.comfy_runtime (tests/conftest.py)
br = importlib.import_module("benchmarks.browser")

NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))


def test_every_example_workflow_has_a_thumbnail():
    from PIL import Image
    assert NAMES, "example_workflows/ holds no workflow"
    missing = [n for n in NAMES if not (EXAMPLES / f"{n}.jpg").is_file()]
    assert not missing, (f"no thumbnail for {missing}: run "
                         "'bash scripts/lab.sh bench gallery --only thumbnails'")
    strays = sorted(p.name for p in EXAMPLES.glob("*.jpg") if p.stem not in NAMES)
    assert not strays, f"thumbnails without a workflow: {strays}"
    for n in NAMES:
        path = EXAMPLES / f"{n}.jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG", (path, im.format)
            assert 256 <= im.width <= 320 and 128 <= im.height <= 320, (path, im.size)
        assert path.stat().st_size < 60_000, (path, path.stat().st_size)


# One template card of the open category: its thumbnail's state.
CARD_JS = """
(name) => {
  const card = document.querySelector(`[role="dialog"] [data-testid="template-workflow-${name}"]`);
  const img = card && card.querySelector('img');
  return {listed: !!card, src: img ? img.getAttribute('src') : null, complete: img ? img.complete : false,
          width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0};
}
"""
CARD_LOADED_JS = "(name) => { const s = (" + CARD_JS.strip() + ")(name); return s.complete && s.width > 0; }"
LISTED_JS = """
() => Array.from(document.querySelectorAll('[role="dialog"] [data-testid^="template-workflow-"]'))
  .map((c) => c.dataset.testid.replace('template-workflow-', ''))
"""


OPENED = "saliency_unet_heatmaps"     # the template opened from its card

# The graph the front end opened: its node types, and which of them Nodes 2.0 drew.
OPENED_JS = """
async () => {
  await new Promise((r) => setTimeout(r, window.LiteGraph.vueNodesMode ? 800 : 0));
  const nodes = window.app.graph._nodes;
  return {types: nodes.map((n) => n.comfyClass || n.type).sort(),
          drawn: nodes.filter((n) => document.querySelector(`[data-node-id="${n.id}"]`)).length};
}
"""


@pytest.fixture(scope="module")
def front_end(server):
    """The session's ComfyUI server (tests/conftest.py) and this module's Chromium."""
    yield from br.shared_front_end(server)


@pytest.mark.parametrize("vue", [False, True], ids=br.RENDERER_IDS)
def test_template_browser_shows_the_thumbnails(front_end, vue, tmp_path):
    version, front = cr.comfy_version(), br.front_end_version()
    baseline = front_end.baseline(vue)
    with urllib.request.urlopen(front_end.url + "/workflow_templates", timeout=30) as r:
        served = json.loads(r.read())
    assert sorted(served.get(PACK, [])) == NAMES, served
    answers = []
    page, watch = front_end.open(vue=vue)
    try:
        if vue and br.nodes_2_0_missing(page):
            skip_version(br.nodes_2_0_missing(page))
        # thumbnails are only requested once the template browser opens
        page.on("response", lambda r: answers.append((r.status, r.url))
                if f"/workflow_templates/{PACK}/" in r.url else None)
        # as a user does: Workflow menu -> Browse Templates runs this command
        page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
        dialog = page.get_by_role("dialog")
        category = dialog.get_by_text(PACK, exact=True).first
        category.wait_for(state="visible", timeout=30_000)
        category.click()
        page.wait_for_function(
            "(n) => document.querySelectorAll('[role=\"dialog\"] [data-testid^=\"template-workflow-\"]').length >= n",
            arg=len(NAMES), timeout=30_000)
        listed = page.evaluate(LISTED_JS)
        # each card in view in turn (thumbnails load lazily, and some front ends unload the ones
        # scrolled away), its thumbnail given time to load, then read
        cards = {}
        for name in NAMES:
            card = page.locator(f'[role="dialog"] [data-testid="template-workflow-{name}"]')
            if not card.count():
                continue
            card.scroll_into_view_if_needed()
            try:
                page.wait_for_function(CARD_LOADED_JS, arg=name, timeout=15_000)
            except Exception:  # noqa: BLE001  (reported below)
                pass
            cards[name] = page.evaluate(CARD_JS, name)
        shot = tmp_path / "templates.png"
        page.screenshot(path=str(shot))
        # open one template from its card, as a user does
        page.locator(f'[role="dialog"] [data-testid="template-workflow-{OPENED}"]').click()
        page.wait_for_function("(n) => window.app.graph._nodes.length >= n",
                               arg=len(json.loads((EXAMPLES / f"{OPENED}.json").read_text())["nodes"]),
                               timeout=30_000)
        opened = page.evaluate(OPENED_JS)
        rendering = br.renderer(page)
        page.wait_for_timeout(500)
    finally:
        page.context.close()

    want_types = sorted(n["type"] for n in json.loads((EXAMPLES / f"{OPENED}.json").read_text())["nodes"])
    assert rendering["vueNodesMode"] is vue, rendering
    assert opened["types"] == want_types, (opened, want_types)
    assert opened["drawn"] == (len(want_types) if vue else 0), opened
    where = f"ComfyUI {version}, front end {front}, {br.RENDERER_IDS[vue]} renderer; screenshot {shot}"
    assert sorted(listed) == NAMES, f"the {PACK} category lists {sorted(listed)}, not {NAMES} ({where})"
    from PIL import Image
    wrong = []
    fetched = {url.split("?")[0] for status, url in answers if status == 200}
    for name in NAMES:
        c = cards.get(name) or {"src": None, "complete": False, "width": 0, "height": 0}
        want = f"/workflow_templates/{PACK}/{name}.jpg"
        size = None
        if (EXAMPLES / f"{name}.jpg").is_file():
            with Image.open(EXAMPLES / f"{name}.jpg") as im:
                size = list(im.size)
        if not any(u.endswith(want) for u in fetched):
            wrong.append(f"{name}: the page never loaded ...{want} (200)")
        # the front end shows the fetched file directly or through a blob: URL of it
        if not c["src"] or not (c["src"].endswith(want) or c["src"].startswith("blob:")):
            wrong.append(f"{name}: thumbnail src {c['src']!r}, want ...{want}")
        elif not (c["complete"] and c["width"] > 0):
            wrong.append(f"{name}: thumbnail not loaded (complete {c['complete']}, naturalWidth {c['width']})")
        elif size and [c["width"], c["height"]] != size:
            wrong.append(f"{name}: the card shows a {c['width']}x{c['height']} image, the thumbnail is {size}")
    failed = [f"{status} {url}" for status, url in answers if status >= 400]
    assert not failed, f"thumbnail requests failed ({where}):\n" + "\n".join(failed)
    assert not wrong, f"{where}:\n" + "\n".join(wrong)

    added = watch.added_by_pack(baseline)
    assert not added, (f"console errors the pack added ({where}):\n" + "\n".join(added)
                       + f"\nthe front end's own (baseline): {sorted(baseline)}")

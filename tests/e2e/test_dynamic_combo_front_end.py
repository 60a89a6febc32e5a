"""End to end: Mask From Concept's ``threshold_mode`` DynamicCombo (ComfyUI 0.33) in the real front
end (headless Chromium, a real server), classic canvas and Nodes 2.0.

On 0.33 ``threshold`` is the widget ``threshold_mode.threshold``, carried by the options 'fixed'
and 'argmax' only. Workflows saved before kept both flat widgets, so a node in 'mean' or 'otsu'
saved ``[concept, "mean", threshold, grow, refine]``; the front end restores ``widgets_values`` by
position and, without the pack's web/js/dynamic_combo_migration.js, put the threshold into
``grow`` and grow's value into ``refine`` (measured on front ends 1.48.7 and 1.58.1, both
renderers: mean ``grow 0.5, refine 7`` for a saved ``grow 7, refine 'guided'``).

- **A workflow saved with the flat node** (tests/fixtures/workflows_flat_threshold/: 'mean',
  'otsu', 'fixed' with threshold 0.3 and 'argmax' with 0.7, every later widget off its default;
  plus a node saved before 'refine' existed) loads with every widget's value in its place, and the
  page queues exactly those values. On ComfyUI 0.3.75 (no DynamicCombo) the flat widgets load
  unchanged: the pack's migration leaves them alone.
- **Queued from the page, it runs**, and the server receives those values (``/history``).
- **Saved on 0.33, reloaded**: a workflow the page saves with the DynamicCombo (modes changed on
  the page, so the threshold widget comes and goes) opens again in a fresh page with the same
  values.
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
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "workflows_flat_threshold" / \
    "mask_from_concept_flat_threshold.json"
NODE = "ConceptLabMaskFromConcept"
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
THRESHOLD_USED_BY = ("fixed", "argmax")
#: a Mask From Concept saved before 'refine' existed (added to the fixture's graph by the test)
PRE_REFINE_ID, PRE_REFINE_VALUES = 24, ["seven", "otsu", 0.45, 6]
NO_DYNAMIC_COMBO = ("its Mask From Concept has no io.DynamicCombo (threshold_mode and threshold are "
                    "two flat widgets, so there is no nested widget to save and reload)")

front_end = pytest.fixture(scope="module")(br.shared_front_end)

READ_JS = """(ids) => Object.fromEntries(ids.map((id) => {
  const n = window.app.graph.getNodeById(id);
  return [String(id), (n.widgets || []).filter((w) => w.serialize !== false).map((w) => [w.name, w.value])];
}))"""


def _has_dynamic_combo(server) -> bool:
    info = server.get(f"/object_info/{NODE}")[NODE]
    return info["input"]["required"]["threshold_mode"][0] == DYNAMIC_COMBO


def _workflow() -> tuple[dict, dict]:
    """The fixture, plus a Mask From Concept saved before 'refine' existed, and ``{node id: the
    values it was saved with}`` of its Mask From Concept nodes."""
    wf = json.loads(FIXTURE.read_text())
    masks = [n for n in wf["nodes"] if n["type"] == NODE]
    old = copy.deepcopy(masks[0])
    link = max(l[0] for l in wf["links"]) + 1
    old.update(id=PRE_REFINE_ID, pos=[1550, 960], widgets_values=list(PRE_REFINE_VALUES), title="Mask (saved before refine)",
               inputs=[{"name": "saliency", "type": "SALIENCY", "link": link}],
               outputs=[{"name": "mask", "type": "MASK", "links": None, "slot_index": 0}])
    wf["nodes"].append(old)
    wf["links"].append([link, 8, 0, PRE_REFINE_ID, 0, "SALIENCY"])
    next(n for n in wf["nodes"] if n["id"] == 8)["outputs"][0]["links"].append(link)
    wf["last_node_id"], wf["last_link_id"] = max(wf["last_node_id"], PRE_REFINE_ID), link
    return wf, {str(n["id"]): list(n["widgets_values"]) for n in masks + [old]}


def _expected(saved: list, dynamic: bool) -> list:
    """The widgets ``[[name, value], ...]`` a flat saved ``[concept, mode, threshold, grow(,
    refine)]`` must give: on 0.33 the threshold under the modes that use it, nested."""
    concept, mode, threshold, grow, *refine = saved
    out = [["concept", concept], ["threshold_mode", mode]]
    if not dynamic:
        out.append(["threshold", threshold])
    elif mode in THRESHOLD_USED_BY:
        out.append(["threshold_mode.threshold", threshold])
    return out + [["grow", grow], ["refine", refine[0] if refine else "as saliency maps"]]


def _open(front_end, vue: bool):
    page, watch = front_end.open(vue=vue)
    if vue and br.nodes_2_0_missing(page):
        reason = br.nodes_2_0_missing(page)
        page.context.close()
        skip_version(reason)
    return page, watch


def _load(page, wf: dict, ids) -> dict:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(500)
    return page.evaluate(READ_JS, [int(i) for i in ids])


@pytest.mark.parametrize("vue", [False, True], ids=br.RENDERER_IDS)
def test_workflow_saved_with_the_flat_node_loads_with_every_value_in_place(front_end, vue):
    dynamic = _has_dynamic_combo(front_end.server)
    wf, saved = _workflow()
    page, watch = _open(front_end, vue)
    try:
        shown = _load(page, wf, saved)
        queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        page.wait_for_timeout(500)      # late console errors
        added = watch.added_by_pack(front_end.baseline(vue))
    finally:
        page.context.close()
    where = f"ComfyUI {cr.comfy_version()}, front end {br.front_end_version()}, {br.RENDERER_IDS[vue]}"
    expected = {i: _expected(v, dynamic) for i, v in saved.items()}
    assert shown == expected, f"widgets after load ({where}):\n{shown}\nexpected:\n{expected}"
    for i, widgets in expected.items():
        sent = {k: v for k, v in queued[i]["inputs"].items() if k != "saliency"}
        assert sent == dict(widgets), (i, sent, where)
    assert not added, "console errors the pack added:\n" + "\n".join(added)


def test_workflow_saved_with_the_flat_node_queued_from_the_page_runs(front_end):
    wf, saved = _workflow()
    page, watch = _open(front_end, False)
    try:
        shown = _load(page, wf, saved)
        entry = br.queue_and_wait(page, front_end.server, timeout=300)
    finally:
        page.context.close()
    assert entry is not None, "the queued workflow did not finish"
    assert cr.history_error(entry) is None, cr.history_error(entry)
    posted = entry["prompt"][2]
    for i, widgets in shown.items():
        sent = {k: v for k, v in posted[i]["inputs"].items() if k != "saliency"}
        assert sent == dict(widgets), (i, sent)
    masks = [n["id"] for n in json.loads(FIXTURE.read_text())["nodes"] if n["type"] == "PreviewImage"]
    assert all(str(m) in entry["outputs"] for m in masks), sorted(entry["outputs"])


# a user changes modes on the page (the nested threshold widget comes and goes), then saves
CHANGE_JS = """() => {
  const set = (id, name, value) => {
    const w = window.app.graph.getNodeById(id).widgets.find((w) => w.name === name);
    w.value = value; w.callback?.(value);
  };
  set(9, 'threshold_mode', 'argmax'); set(9, 'threshold_mode.threshold', 0.65); set(9, 'grow', 13);
  set(22, 'threshold_mode', 'otsu'); set(22, 'refine', 'none');
  set(21, 'threshold_mode', 'fixed'); set(21, 'threshold_mode.threshold', 0.25);
}"""


@pytest.mark.parametrize("vue", [False, True], ids=br.RENDERER_IDS)
def test_workflow_saved_with_the_dynamic_combo_reloads_intact(front_end, vue):
    if not _has_dynamic_combo(front_end.server):
        skip_version(NO_DYNAMIC_COMBO)
    wf, saved = _workflow()
    page, watch = _open(front_end, vue)
    try:
        _load(page, wf, saved)
        page.evaluate(CHANGE_JS)
        page.wait_for_timeout(300)
        before = page.evaluate(READ_JS, [int(i) for i in saved])
        workflow = page.evaluate("async () => (await window.app.graphToPrompt()).workflow")
    finally:
        page.context.close()
    page, watch = _open(front_end, vue)         # a fresh page opens the saved workflow
    try:
        after = _load(page, json.loads(json.dumps(workflow)), saved)
        queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    finally:
        page.context.close()
    where = f"ComfyUI {cr.comfy_version()}, front end {br.front_end_version()}, {br.RENDERER_IDS[vue]}"
    assert before["9"][1:3] == [["threshold_mode", "argmax"], ["threshold_mode.threshold", 0.65]], (before, where)
    assert before["22"][1:] == [["threshold_mode", "otsu"], ["grow", 9], ["refine", "none"]], (before, where)
    assert after == before, f"saved:\n{before}\nreloaded ({where}):\n{after}"
    for i, widgets in before.items():
        sent = {k: v for k, v in queued[i]["inputs"].items() if k != "saliency"}
        assert sent == dict(widgets), (i, sent, where)

"""End to end: ConceptLab Load Demo Model's menu values through a real ComfyUI server.

API scripts type the values, so they are short and stable ('digits-unet', 'digits-dit'); what
each model is, is in the tooltip. Workflows saved by earlier releases hold the long values
('digits-unet (SD1.x architecture)', 'digits-dit (SD3 MMDiT architecture, ComfyUI 0.3.x)'):
posted to /prompt (API format, or UI format as the front end converts it) they must still pass
ComfyUI's validation and run, on every supported ComfyUI (the node's validate_inputs takes the
input, so ComfyUI leaves the check to it). In the front end, an old workflow keeps its value and
runs when queued from the page (browser test)."""
import importlib
import json
import time
from pathlib import Path

import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
NODE = "ConceptLabLoadDemoModel"
SHORT = {"digits-unet": "SD1.x", "digits-dit": "SD3"}           # value -> the family Model Info reads
LEGACY = {"digits-unet (SD1.x architecture)": "SD1.x",
          "digits-dit (SD3 MMDiT architecture, ComfyUI 0.3.x)": "SD3"}


def _info_prompt(value: str) -> dict:
    return {"1": {"class_type": NODE, "inputs": {"demo_model": value}},
            "2": {"class_type": "ConceptLabModelInfo", "inputs": {"model": ["1", 0]}}}


def _family(server, prompt: dict) -> str:
    entry = server.run_prompt(prompt, timeout=300)
    assert cr.history_error(entry) is None, cr.history_error(entry)
    info_id = next(k for k, v in prompt.items() if v["class_type"] == "ConceptLabModelInfo")
    return entry["outputs"][info_id]["text"][0].split(":")[0]     # "SD1.x: 1,104,644 parameters"


def test_menu_values_are_short_and_described_in_the_tooltip(object_info):
    spec = object_info[NODE]["input"]["required"]["demo_model"]
    values, opts = cr.combo_options(spec), spec[1]
    assert values == list(SHORT) and opts["default"] == "digits-unet"
    for words in (("digits-unet", "SD1.x"), ("digits-dit", "SD3 MMDiT", "0.3.x")):
        assert all(w in opts["tooltip"] for w in words), opts["tooltip"]


@pytest.mark.parametrize("value", list(SHORT))
def test_api_scripts_type_the_short_value(server, value):
    assert _family(server, _info_prompt(value)) == SHORT[value]


@pytest.mark.parametrize("value", list(LEGACY))
def test_old_api_workflows_with_the_long_value_still_run(server, value):
    assert _family(server, _info_prompt(value)) == LEGACY[value]


@pytest.mark.parametrize("name, legacy", [("demo_model_txt2img.json", "digits-unet (SD1.x architecture)"),
                                          ("demo_dit_txt2img.json",
                                           "digits-dit (SD3 MMDiT architecture, ComfyUI 0.3.x)")])
def test_old_ui_workflows_with_the_long_value_still_run(server, object_info, name, legacy):
    """A workflow saved by an earlier release (UI format, the long value in widgets_values),
    converted and queued as the front end does."""
    wf = json.loads((ROOT / "example_workflows" / name).read_text())
    (node,) = [n for n in wf["nodes"] if n["type"] == NODE]
    assert node["widgets_values"] == [legacy.split(" ")[0]]     # the shipped file: the short value
    node["widgets_values"] = [legacy]
    prompt = cr.ui_to_api(wf, object_info)
    prompt["4"]["inputs"]["batch_size"] = 1                      # one image is enough here
    prompt["5"]["inputs"]["steps"] = 4
    assert prompt[str(node["id"])]["inputs"]["demo_model"] == legacy
    assert _family(server, prompt) == LEGACY[legacy]


def test_an_unknown_value_is_still_refused_with_the_choices(server):
    with pytest.raises(cr.PromptRejected) as e:
        server.run_prompt(_info_prompt("digits-vae"))
    body = json.loads(e.value.body)
    errors = body["node_errors"]["1"]["errors"]
    assert e.value.code == 400 and len(errors) == 1, body
    assert "Unknown demo model 'digits-vae'" in errors[0]["details"], errors
    assert "digits-unet, digits-dit" in errors[0]["details"], errors


# ------------------------------------------------------------------------------------------------
# the front end: an old workflow opened in the page keeps its value and runs when queued
# ------------------------------------------------------------------------------------------------
WIDGET_JS = """
(type) => {
  const node = window.app.graph._nodes.find((n) => (n.comfyClass || n.type) === type);
  const w = node && node.widgets && node.widgets.find((w) => w.name === "demo_model");
  return w ? {value: w.value, options: Array.from((w.options && w.options.values) || [])} : null;
}
"""


def test_the_front_end_opens_and_queues_an_old_workflow(tmp_path, monkeypatch):
    br = importlib.import_module("benchmarks.browser")
    why = br.available()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright
    legacy = "digits-unet (SD1.x architecture)"
    wf = json.loads((ROOT / "example_workflows" / "demo_model_txt2img.json").read_text())
    for node in wf["nodes"]:
        if node["type"] == NODE:
            node["widgets_values"] = [legacy]
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][2] = 1
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tmp_path / "comfy"
    br.seed_user(base)
    with cr.ComfyServer(base=base) as srv, sync_playwright() as pw:
        browser = br.launch(pw)
        try:
            page = br.new_page(browser)
            page.goto(srv.url + "/", wait_until="load", timeout=br.LOAD_TIMEOUT_MS)
            page.wait_for_function(br.APP_READY_JS, timeout=br.LOAD_TIMEOUT_MS)
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
            widget = page.evaluate(WIDGET_JS, NODE)
            assert widget is not None, "no demo_model widget on the loaded node"
            assert widget["options"] == list(SHORT), widget
            # the value the workflow was saved with is what the page queues
            queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
            (loader,) = [k for k, v in queued.items() if v["class_type"] == NODE]
            sent = queued[loader]["inputs"]["demo_model"]
            assert sent in (legacy, "digits-unet"), (widget, sent)
            print(f"front end: the widget shows {widget['value']!r}, the page queues {sent!r}")
            page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
            deadline = time.time() + 120
            while time.time() < deadline:
                history = srv.get("/history")
                if history and all(e.get("status", {}).get("completed")
                                   or e.get("status", {}).get("status_str") == "error"
                                   for e in history.values()):
                    break
                time.sleep(0.5)
        finally:
            browser.close()
    (entry,) = history.values()
    assert cr.history_error(entry) is None, (cr.history_error(entry), widget, sent)
    assert entry["prompt"][2][loader]["inputs"]["demo_model"] == sent

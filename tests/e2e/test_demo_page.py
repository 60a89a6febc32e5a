"""End to end: the README's main command, `bash scripts/lab.sh demo` (``python -m benchmarks demo``),
runs every capability through a real ComfyUI server and writes one self-contained page; the page
is opened in headless Chromium: it loads, every picture shows, nothing is logged as an error.

The page is a static file of the pack's own, not ComfyUI's front end, so the front end's renderer
setting (Nodes 2.0, ``Comfy.VueNodes.Enabled``) does not reach it: it runs once."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
br = importlib.import_module("benchmarks.browser")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_output")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "demo", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_covers_every_capability(demo_run):
    out, stdout = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sections"]) == {"txt2img", "saliency", "seed-search", "concept-neurons"}
    figs = {k: v["figures"] for k, v in summary["sections"].items()}
    assert "masks mostly on their word's digit" in figs["saliency"]
    assert "starting noises drawing an eight, as they are" in figs["seed-search"]
    assert any(k.startswith("subject similarity, concept applied") for k in figs["concept-neurons"])
    wfs = " ".join(w for s in summary["sections"].values() for w in s["workflows"])
    for name in ("demo_model_txt2img", "saliency_unet_heatmaps", "concept_extract_then_save",
                 "concept_load_apply_sample", "concept_two_subjects", "demo_dit_txt2img", "saliency_dit_",
                 "seed_select_then_custom_advanced"):
        assert name in wfs, name
    assert str(out / "index.html") in stdout       # the page's path is printed


def test_demo_page_shows_every_picture_without_errors(demo_run):
    why = br.available()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright
    out, _ = demo_run
    page_html = (out / "index.html").read_text()
    assert "http://" not in page_html.replace("http://127.0.0.1", "")   # self-contained
    with sync_playwright() as pw:
        browser = br.launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            watch = br.ConsoleWatch().attach(page)
            page.goto((out / "index.html").as_uri(), wait_until="load")
            state = page.evaluate("""() => ({
                images: document.images.length,
                shown: Array.from(document.images).filter((i) => i.complete && i.naturalWidth > 0).length,
                sections: Array.from(document.querySelectorAll('section')).map((s) => s.id),
                captions: document.querySelectorAll('figcaption').length })""")
        finally:
            browser.close()
    assert state["sections"] == ["txt2img", "saliency", "seed-search", "concept-neurons"], state
    assert state["images"] >= 40 and state["shown"] == state["images"], state
    assert state["captions"] == state["images"], state
    assert not watch.errors and not watch.page_errors, (watch.errors, watch.page_errors)

"""Catalogue jobs, the parts that need no server (pure Python, no ComfyUI, no Ray): the ledger's
state machine, atomic files and hashes, the saliency check, the job file and the graph filling.
The job itself, on real servers and a real Ray, is tests/e2e/test_catalogue.py."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from catalogue_helpers import catalogue

L = catalogue("ledger")
F = catalogue("files")
C = catalogue("checks")
CFG = catalogue("config")
W = catalogue("workflow")


@pytest.fixture
def ledger(tmp_path):
    led = L.Ledger(tmp_path / "ledger.sqlite")
    led.begin_run(os.getpid())
    yield led
    led.close()


def test_a_subject_finishes_once_and_only_from_its_own_prompt(ledger):
    ledger.sync([("a", "fp-a", []), ("b", "fp-b", ["[ConceptLab Catalogue] bad photos"])])
    assert ledger.counts() == {"pending": 1, "running": 0, "done": 0, "failed": 1, "stale": 0}
    assert ledger.subject("b")["error"] == "[ConceptLab Catalogue] bad photos"
    assert ledger.claim("a", "http://s1", "p1", "c1") == 1
    with pytest.raises(RuntimeError):          # a running subject cannot be claimed twice
        ledger.claim("a", "http://s2", "p2", "c2")
    ledger.requeue("a", "server lost", "http://s1")
    assert ledger.claim("a", "http://s2", "p2", "c2") == 2
    assert not ledger.finish("a", "p1", {"late": True})     # the lost attempt's result comes too late
    assert ledger.finish("a", "p2", {"outputs": []})
    assert not ledger.finish("a", "p2", {"outputs": []})    # never twice
    rec = ledger.subject("a")
    assert rec["state"] == "done" and rec["result"] == {"outputs": []} and rec["seconds"] >= 0
    kinds = [e["kind"] for e in ledger.events("a")]
    assert kinds == ["queued", "started", "requeued", "started", "done"]
    ledger.requeue("a", "too late")              # only running subjects go back to the queue
    assert ledger.subject("a")["state"] == "done"


def test_a_killed_run_leaves_its_running_subject_to_rejoin(tmp_path):
    led = L.Ledger(tmp_path / "l.sqlite")
    led.begin_run(1)
    led.sync([("a", "fp", [])])
    led.claim("a", "http://s1", "p1", "c1")
    led.db.close()                               # the process dies here
    led = L.Ledger(tmp_path / "l.sqlite")
    led.begin_run(2)
    assert [r["status"] for r in led.runs()] == ["killed", "running"]
    led.sync([("a", "fp", [])])                  # same inputs: it stays running, with its prompt
    rec = led.subject("a")
    assert (rec["state"], rec["prompt_id"], rec["client_id"], rec["server"]) == ("running", "p1", "c1", "http://s1")
    assert led.finish("a", "p1", {})
    led.close()


def test_changed_inputs_retry_failed_and_mark_done_stale(ledger):
    ledger.sync([("a", "1", []), ("b", "1", ["bad"])])
    ledger.claim("a", "s", "p", "c")
    ledger.finish("a", "p", {})
    ledger.sync([("a", "2", []), ("b", "2", [])])   # photos replaced
    assert ledger.subject("b")["state"] == "pending"
    assert ledger.subject("a")["state"] == "done" and ledger.counts()["stale"] == 1
    ledger.sync([("a", "2", []), ("b", "2", [])], redo_changed=True)
    assert ledger.subject("a")["state"] == "pending" and ledger.counts()["stale"] == 0
    ledger.sync([("a", "2", [])])                    # b left the catalogue: kept, not counted
    assert ledger.counts()["pending"] == 1 and ledger.subject("b") is not None


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "image.png"
    F.write_atomic(p, b"first")
    assert p.read_bytes() == b"first" and (p.stat().st_mode & 0o777) != 0o600

    def broken(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        F.write_atomic(p, b"second")
    assert p.read_bytes() == b"first"
    assert sorted(x.name for x in p.parent.iterdir()) == ["image.png"]     # no temporary left


def _safetensors(data: bytes, meta: dict) -> bytes:
    header = {"t": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}, "__metadata__": meta}
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_concept_payload_hash_ignores_the_metadata():
    a = _safetensors(b"\x01\x02\x03", {"stats": '{"seconds": 1.2}'})
    b = _safetensors(b"\x01\x02\x03", {"stats": '{"seconds": 3.4}'})
    c = _safetensors(b"\x01\x02\x04", {"stats": '{"seconds": 1.2}'})
    assert F.sha256(a) != F.sha256(b)
    assert F.safetensors_payload_hash(a) == F.safetensors_payload_hash(b) != F.safetensors_payload_hash(c)


def _png(array) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_saliency_check_reads_coverage_and_flags():
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:16, 8:16] = (200, 40, 40)              # the subject on a black backdrop
    on = np.zeros((32, 32, 3), np.uint8)
    on[6:18, 6:18] = 255                         # a mask around it
    off = np.zeros((32, 32, 3), np.uint8)
    off[20:30, 20:30] = 255                      # a mask elsewhere
    r, flags = C.saliency_check(_png(img), _png(on))
    assert r["coverage"] == 1.0 and r["subject_area"] == 64 / 1024 and r["precision"] == round(64 / 144, 4) and not flags
    r, flags = C.saliency_check(_png(img), _png(off), min_coverage=0.5)
    assert r["coverage"] == 0.0 and flags == ["the word's mask covers 0% of the subject (at least 50% wanted)"]
    _, flags = C.saliency_check(_png(img), _png(np.zeros_like(img)))
    assert "mask is empty" in flags[0]
    _, flags = C.saliency_check(_png(np.zeros_like(img)), _png(on))
    assert flags == ["no subject found: the image is all background"]
    r, flags = C.saliency_check(_png(img), _png(np.full_like(img, 255)), subject="mask")
    assert r == {"mask_area": 1.0} and "whole image" in flags[0]


def _subject(folder, name, n, cls="a dog"):
    d = folder / name
    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(d / f"p{i}.png")
    (d / "class.txt").write_text(cls)
    return d


def test_job_file_and_subject_problems_are_clear(tmp_path):
    with pytest.raises(CFG.ConfigError, match=r"Unknown key\(s\) in \[render\]: stepz.*Fix: Use only"):
        CFG.load_config({"subjects": "s", "render": {"stepz": 3}}, base=tmp_path)
    with pytest.raises(CFG.ConfigError, match="does not contain {class} or {word}"):
        CFG.load_config({"subjects": "s", "render": {"scenes": ["a beach"]}}, base=tmp_path)
    with pytest.raises(CFG.ConfigError, match="exactly one of url"):
        CFG.load_config({"subjects": "s", "servers": [{"gpus": 1}]}, base=tmp_path)
    _subject(tmp_path / "s", "ok", 3)
    _subject(tmp_path / "s", "few", 2)
    (_subject(tmp_path / "s", "junk", 3) / "notes.png").write_text("not a picture")
    cfg = CFG.load_config({"subjects": "s", "servers": ["http://127.0.0.1:8188"]}, base=tmp_path)
    assert cfg.servers[0].url == "http://127.0.0.1:8188" and cfg.output == tmp_path / "job_output"
    subjects = {s.name: s for s in CFG.load_subjects(cfg)}
    assert subjects["ok"].problems == [] and subjects["ok"].subject_word() == "dog"
    assert "has 2 photo(s)" in subjects["few"].problems[0] and "Fix:" in subjects["few"].problems[0]
    assert "'notes.png' is not an image" in subjects["junk"].problems[0]
    fp = CFG.subject_fingerprint(cfg, subjects["ok"])
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(tmp_path / "s" / "ok" / "p0.png")
    assert CFG.subject_fingerprint(cfg, subjects["ok"]) != fp       # a replaced photo is a change


def test_csv_catalogue(tmp_path):
    _subject(tmp_path / "photos", "rex", 3)
    (tmp_path / "cat.csv").write_text("name,class_prompt,photos,seed_search\nRex,a dog,photos/rex,yes\n"
                                      "Tom,a cat,photos/rex/p0.png;photos/rex/p1.png;photos/rex/p2.png,\n")
    cfg = CFG.load_config({"subjects": "cat.csv"}, base=tmp_path)
    rex, tom = CFG.load_subjects(cfg)
    assert (rex.name, rex.class_prompt, len(rex.photos), rex.seed_search) == ("Rex", "a dog", 3, True)
    assert (tom.class_prompt, len(tom.photos), tom.seed_search, tom.problems) == ("a cat", 3, None, [])


def test_a_users_workflow_gets_the_photos_and_the_subject(tmp_path):
    wf = {"1": {"class_type": "ConceptLabLoadDemoImages", "inputs": {"image_set": "three-subject"},
                "_meta": {"title": "catalogue:photos"}},
          "2": {"class_type": "ConceptLabConceptNeuronsExtract", "inputs": {"images": ["1", 0], "class_prompt": "{class}"}},
          "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "{job}/{subject}"},
                "_meta": {"title": "catalogue:image 1"}}}
    _subject(tmp_path / "s", "rex", 3)
    cfg = CFG.load_config({"name": "shop", "subjects": "s"}, base=tmp_path)
    subject = CFG.load_subjects(cfg)[0]
    g = W.build_custom(wf, cfg, subject, ["a.png", "b.png", "c.png"])
    assert "1" not in g
    loads = sorted(n["inputs"]["image"] for n in g.values() if n["class_type"] == "LoadImage")
    assert loads == ["a.png", "b.png", "c.png"]
    batch = g["2"]["inputs"]["images"]
    assert g[batch[0]]["class_type"] == "ImageBatch" and g["3"]["inputs"]["images"] == batch
    assert g["2"]["inputs"]["class_prompt"] == "a dog" and g["3"]["inputs"]["filename_prefix"] == "shop/rex"
    assert W.marks_of(g) == {"3": ("image", 1)}
    del wf["1"]["_meta"]
    with pytest.raises(CFG.ConfigError, match="titled 'catalogue:photos'"):
        W.build_custom(wf, cfg, subject, ["a.png"])


def test_saved_ui_workflow_to_api_prompt():
    info = {"KSampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {}], "steps": ["INT", {}],
                                                "sampler_name": [["euler", "dpmpp_2m"]], "text": ["STRING", {"forceInput": True}]}},
                         "input_order": {"required": ["model", "seed", "steps", "sampler_name", "text"]}},
            "Loader": {"input": {"required": {}}}}
    wf = {"nodes": [{"id": 1, "type": "Loader", "widgets_values": []},
                    {"id": 2, "type": "Reroute", "inputs": [{"name": "", "link": 1}]},
                    {"id": 3, "type": "KSampler", "title": "catalogue:image 1",
                     "inputs": [{"name": "model", "link": 2}, {"name": "steps", "link": None, "widget": {"name": "steps"}}],
                     "widgets_values": [42, "randomize", 20, "dpmpp_2m"]},
                    {"id": 4, "type": "Note", "widgets_values": ["hello"]}],
          "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"]]}
    api = W.ui_to_api(wf, info)
    assert api["3"] == {"class_type": "KSampler", "_meta": {"title": "catalogue:image 1"},
                        "inputs": {"model": ["1", 0], "seed": 42, "steps": 20, "sampler_name": "dpmpp_2m"}}
    assert set(api) == {"1", "3"}                # notes and reroutes are not sent
    wf["nodes"][0]["type"] = "Unknown"
    with pytest.raises(CFG.ConfigError, match="'Unknown' .* which the server does not have"):
        W.ui_to_api(wf, info)

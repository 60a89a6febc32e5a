"""End to end: a catalogue job (``python -m conceptlab_catalogue run``) on a local Ray, driving
real ComfyUI servers with the demo models over their HTTP API.

The catalogue: 12 digit "subjects" (held-out writers of the digits world, 3 photos each; the
eight asks for Seed Search) and 3 subjects with bad photos (two photos, 1x1 photos, a file that
is no image). Two servers run it; mid-job one server is killed (its PID only), then the job
itself (SIGKILL), and the job is started again. Then: every subject finished exactly once, the
bad ones failed with the node's (or the job's) clear error, each output's hash is the one in
the ledger and the one a one-server run (a server the job starts itself) produced with the same
seeds, and the report lists every subject. Settings are tiny (a subject takes seconds).
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conceptlab_comfy_runtime as cr  # the harness; tests/conftest.py loads it by path
from catalogue_helpers import catalogue as catalogue_module

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GOOD = 12
JOB_TIMEOUT = 420


def _db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), timeout=30)
    db.row_factory = sqlite3.Row
    return db


def _rows(path: Path, sql: str, *args) -> list:
    if not path.exists():
        return []
    db = _db(path)
    try:
        return [dict(r) for r in db.execute(sql, args)]
    except sqlite3.OperationalError:   # the job has not created its tables yet
        return []
    finally:
        db.close()


def _job_cmd(job: Path) -> list:
    return [sys.executable, "-m", "conceptlab_catalogue", "run", str(job)]


def _job_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_job(job: Path, log: Path) -> subprocess.Popen:
    f = open(log, "ab")
    return subprocess.Popen(_job_cmd(job), cwd=str(job.parent), env=_job_env(), stdout=f, stderr=subprocess.STDOUT)


def _wait(what: str, cond, proc: subprocess.Popen, log: Path, timeout: float = JOB_TIMEOUT):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the job, then the processes of its local Ray that outlive it (by their ids)."""
    import psutil
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.kill()
    proc.wait(30)
    time.sleep(1.0)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _job_file(folder: Path, demo, servers: list) -> Path:
    job = demo.demo_job(folder, servers)
    job["subjects"] = str(folder.parent / "subjects")
    job["server_wait"] = 120
    path = folder / "job.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job, indent=1))
    return path


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("ray", reason="catalogue jobs need Ray (requirements-dev.txt)")
    return catalogue_module("demo")


@pytest.fixture(scope="module")
def catalogue(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    names = demo.write_digits_catalogue(folder / "subjects", GOOD, bad=True)
    return folder, names


@pytest.fixture(scope="module")
def two_server_run(catalogue, demo):
    """The job on two servers: one server killed mid-job, the job killed and started again."""
    folder, names = catalogue
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"        # one torch thread per server: two fit 2 cores
    try:
        from concurrent.futures import ThreadPoolExecutor
        servers = [cr.ComfyServer(), cr.ComfyServer()]
        with ThreadPoolExecutor(2) as pool:        # started side by side
            started = [pool.submit(s.start) for s in servers]
        if any(f.exception() for f in started):
            for s in servers:
                s.stop()
            raise next(f.exception() for f in started if f.exception())
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    try:
        run = folder / "two"
        job = _job_file(run, demo, [{"url": s.url, "concept_dir": str(s.base / "models" / "concept_neurons")}
                                    for s in servers])
        ledger, log = run / "output" / "ledger.sqlite", run / "job.log"
        obs = {"servers": [s.url for s in servers],
               "concept_dirs": [str(s.base / "models" / "concept_neurons") for s in servers]}
        proc = _start_job(job, log)

        def busy(url, min_done):
            done = _rows(ledger, "SELECT COUNT(*) n FROM subjects WHERE state='done'")
            if not done or done[0]["n"] < min_done:
                return None
            r = _rows(ledger, "SELECT name, prompt_id FROM subjects WHERE state='running' AND server=?", url)
            return r[0] if r else None
        # one server killed while it runs a subject (its PID only)
        _wait("a subject running on the second server", lambda: busy(servers[1].url, 2), proc, log)
        os.kill(servers[1].proc.pid, signal.SIGKILL)
        servers[1].proc.wait(30)
        obs["live_report"] = (run / "output" / "report.html").read_text()
        # the job killed while the first server runs a subject; that prompt goes on meanwhile
        hit = _wait("six subjects done and one running", lambda: busy(servers[0].url, 6), proc, log)
        _kill_job(proc)
        row = _rows(ledger, "SELECT name, state, prompt_id FROM subjects WHERE name=?", hit["name"])[0]
        obs["at_job_kill"] = row
        obs["done_before_restart"] = _rows(ledger, "SELECT COUNT(*) n FROM subjects WHERE state='done'")[0]["n"]
        # started again: it resumes where it stopped
        again = subprocess.run(_job_cmd(job), cwd=str(job.parent), env=_job_env(), capture_output=True,
                               text=True, timeout=JOB_TIMEOUT)
        obs["restart"] = again
        obs["job_log"] = log.read_text()
        yield run / "output", obs
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def one_server_run(two_server_run, catalogue, demo):
    """The same catalogue, seeds and job name on one server that the job starts itself."""
    folder, _ = catalogue
    run = folder / "one"
    servers = demo.local_servers(run / "servers", 1, threads=1)
    job = _job_file(run, demo, servers)
    res = subprocess.run(_job_cmd(job), cwd=str(job.parent), env=_job_env(), capture_output=True, text=True,
                         timeout=JOB_TIMEOUT)
    return run / "output", res


@pytest.fixture(scope="module")
def custom_run(two_server_run, catalogue):
    """Two subjects through a user's workflow (the extract example, saved from the UI) with marked
    inputs, on the server that survived."""
    import shutil
    _, obs = two_server_run
    folder, names = catalogue
    run = folder / "custom"
    picked = [n for n in names if n.startswith(("three-", "seven-"))][:2]
    for n in picked:
        shutil.copytree(folder / "subjects" / n, run / "subjects" / n)
    wf = json.loads((ROOT / "example_workflows" / "concept_extract_then_save.json").read_text())
    for node in wf["nodes"]:
        if node["type"] == "ConceptLabLoadDemoImages":
            node["title"] = "catalogue:photos"
        elif node["type"] == "ConceptLabConceptNeuronsExtract":
            v = node["widgets_values"]     # class_prompt, ..., iterations, ..., prior_images, ...
            v[0], v[3], v[5] = "{class}", 4, 0
        elif node["type"] == "ConceptLabConceptNeuronsSave":
            node["widgets_values"][0] = "catalogue/{job}/{subject}"
    (run / "workflow.json").write_text(json.dumps(wf))
    job = run / "job.json"
    job.write_text(json.dumps({"name": "custom", "subjects": "subjects", "output": "output",
                               "workflow": "workflow.json",
                               "servers": [{"url": obs["servers"][0], "concept_dir": obs["concept_dirs"][0]}]}))
    res = subprocess.run(_job_cmd(job), cwd=str(run), env=_job_env(), capture_output=True, text=True,
                         timeout=JOB_TIMEOUT)
    return run / "output", picked, res


def _done(out: Path) -> dict:
    return {r["name"]: json.loads(r["result"]) for r in _rows(out / "ledger.sqlite",
                                                                "SELECT name, result FROM subjects WHERE state='done'")}


def test_every_subject_finished_exactly_once(two_server_run, catalogue):
    out, obs = two_server_run
    _, names = catalogue
    assert obs["restart"].returncode == 3, obs["restart"].stdout + obs["restart"].stderr   # 3: some failed
    states = {r["name"]: r["state"] for r in _rows(out / "ledger.sqlite", "SELECT name, state FROM subjects")}
    good = [n for n in names if not n.startswith("bad-")]
    assert len(good) == GOOD and {states[n] for n in good} == {"done"}, states
    events = _rows(out / "ledger.sqlite", "SELECT subject, kind, server, run, detail FROM events")
    for n in good:
        assert sum(1 for e in events if e["subject"] == n and e["kind"] == "done") == 1, n
    # the killed server's subject went back to the queue and was finished by the other server
    assert any(e["kind"] == "server lost" and e["server"] == obs["servers"][1] for e in events)
    lost = {e["subject"] for e in events if e["kind"] == "requeued" and e["server"] == obs["servers"][1]}
    assert lost, [e for e in events if e["server"] == obs["servers"][1]]
    for n in lost:
        assert [e["server"] for e in events if e["subject"] == n and e["kind"] == "done"] == [obs["servers"][0]], n
    # the job was killed with a subject running; the next run rejoined that same prompt (it went
    # on in ComfyUI meanwhile) instead of running the subject again
    at_kill = obs["at_job_kill"]
    if at_kill["state"] == "running":
        mine = [e for e in events if e["subject"] == at_kill["name"]]
        assert any(e["kind"] == "rejoining" and at_kill["prompt_id"] in e["detail"] for e in mine), mine
        assert [e["detail"] for e in mine if e["kind"] == "started"][-1].endswith(at_kill["prompt_id"])
    runs = _rows(out / "ledger.sqlite", "SELECT * FROM runs ORDER BY id")
    assert len(runs) == 2 and runs[1]["status"] == "finished", runs
    assert obs["done_before_restart"] >= 6


def test_bad_photos_fail_with_a_clear_error_and_the_job_goes_on(two_server_run):
    out, _ = two_server_run
    err = {r["name"]: r["error"] for r in _rows(out / "ledger.sqlite", "SELECT name, error FROM subjects "
                                                                        "WHERE state='failed'")}
    assert set(err) == {"bad-too-few", "bad-1x1", "bad-not-an-image"}, err
    assert err["bad-1x1"].startswith("ConceptLabConceptNeuronsExtract: [ConceptLab Concept Neurons Extract]")
    assert "1x1 pixels" in err["bad-1x1"] and "Fix:" in err["bad-1x1"]
    assert "has 2 photo(s)" in err["bad-too-few"] and "Fix:" in err["bad-too-few"]
    assert "'photo3.png' is not an image" in err["bad-not-an-image"] and "Fix:" in err["bad-not-an-image"]


def test_outputs_are_whole_and_match_their_hashes(two_server_run):
    import hashlib
    out, _ = two_server_run
    done = _done(out)
    assert len(done) == GOOD
    for name, res in done.items():
        roles = sorted(o["role"] for o in res["outputs"])
        assert roles.count("image") == 1 and roles.count("mask") == 1, (name, roles)
        assert ("loss" in roles) == name.startswith("eight"), (name, roles)    # Seed Search where asked
        for o in res["outputs"] + [res["concept"]]:
            data = Path(o["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == o["sha256"], o["path"]
        c = res["concept"]
        assert c["name_on_server"].startswith("catalogue/digits/") and "shut:" in c["info"]
        chk = res["checks"][0]
        assert set(chk["readings"]) >= {"coverage", "mask_area", "subject_area"}
        assert 0.0 <= chk["readings"]["coverage"] <= 1.0
        assert bool(chk["flags"]) == res["flagged"]
    assert not list(out.rglob("*.part")), "a half-written file was left behind"


def test_outputs_match_a_one_server_run_with_the_same_seeds(two_server_run, one_server_run):
    out2, _ = two_server_run
    out1, res = one_server_run
    assert res.returncode == 3, res.stdout + res.stderr
    two, one = _done(out2), _done(out1)
    assert set(one) == set(two) and len(one) == GOOD

    def hashes(r):
        return {(o["role"], o["scene"]): o["sha256"] for o in r["outputs"]}
    for name in one:
        assert hashes(one[name]) == hashes(two[name]), name
        assert one[name]["concept"]["indices_sha256"] == two[name]["concept"]["indices_sha256"], name
        assert one[name]["checks"] == two[name]["checks"], name
    # the server the job started was stopped at the end
    rec = _rows(out1 / "ledger.sqlite", "SELECT * FROM servers")
    assert len(rec) == 1 and rec[0]["state"] == "stopped", rec
    with pytest.raises(ProcessLookupError):
        os.kill(rec[0]["pid"], 0)


def test_report_lists_every_subject_and_opens_while_the_job_runs(two_server_run, catalogue):
    out, obs = two_server_run
    _, names = catalogue
    live = obs["live_report"]
    assert 'http-equiv="refresh"' in live and "Job running" in live
    assert all(f"id='{n}'" in live for n in names)
    final = (out / "report.html").read_text()
    assert "Job finished" in final and 'http-equiv="refresh"' not in final
    for n in names:
        assert f"id='{n}'" in final, n
    assert final.count(">done</td>") == GOOD and final.count(">failed</td>") == 3
    assert "concept.safetensors" in final and "scene1_mask.png" in final
    # the progress line: done, running and failed counts and the time left
    lines = [l for l in obs["job_log"].splitlines() + obs["restart"].stderr.splitlines() if "ETA" in l]
    assert lines and all("done" in l and "running" in l and "failed" in l for l in lines)
    assert any("ETA 0:" in l for l in lines), lines[-3:]
    assert "12 done, 3 failed" in obs["restart"].stdout


def test_a_users_workflow_with_marked_inputs(custom_run):
    out, picked, res = custom_run
    assert res.returncode == 0, res.stdout + res.stderr
    done = _done(out)
    assert sorted(done) == sorted(picked)
    for name, r in done.items():
        c = r["concept"]
        assert c["name_on_server"].startswith(f"catalogue/custom/{name}_"), c
        word = name.split("-")[0]
        assert f"(class 'a {word}'" in c["info"], c["info"]          # {class} was filled in
        assert Path(c["path"]).read_bytes()[:8] and c["bytes"] > 100
        assert r["outputs"] == []                                    # the example saves no image

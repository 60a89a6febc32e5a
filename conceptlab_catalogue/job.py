"""The job's driver: Ray, the server actors, the ledger, the outputs, the progress and the report.

Ray places the actors (one per ComfyUI server; a server the job starts asks Ray for its GPU),
runs the subjects on them as actor tasks, and restarts an actor whose process dies. The driver
keeps one subject in flight per server (a ComfyUI server runs one prompt at a time), so a fast
server simply takes more subjects and a dead one takes none: the work splits itself fairly.

What happens to a subject:

* ``pending`` -> ``running``: the ledger records the server, the attempt and a new prompt id
  *before* the prompt is queued, so a run that is killed right after still knows where to look.
* ``running`` -> ``done``: its images, masks and concept file are written atomically, hashed and
  checked, then the ledger records it in one transaction.
* a node's error (bad photos, a wrong setting) -> ``failed`` with that error; the job goes on.
* a lost server -> ``pending`` again (another server takes it); after ``max_attempts`` tries
  ``failed``.
* a run that is killed leaves ``running`` subjects; the next run rejoins each on its server (the
  prompt may even have finished meanwhile) or, if that server no longer knows it, runs it again.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import report as report_mod
from .actor import remote_class
from .checks import saliency_check
from .comfy import PromptFailed, PromptRejected, ServerLost
from .config import ERR, ConfigError, ServerSpec, load_config, load_subjects, subject_fingerprint
from .files import safetensors_payload_hash, sha256, write_atomic
from .ledger import Ledger
from .progress import ProgressLine, Rate
from .workflow import (Templates, build_custom, build_subject, fill_text, load_workflow, marks_of,
                       required_types, upload_folder, upload_name)

PKG_DIR = Path(__file__).resolve().parent
PACK_ROOT = PKG_DIR.parent
PROBE_EVERY = 10.0
ACTOR_DEATHS = 3          # a server whose actor died more often takes no more subjects in this run
EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_FAILED_SUBJECTS = 0, 1, 2, 3


class JobError(RuntimeError):
    pass


@dataclass
class Summary:
    name: str
    output: Path
    report: Path
    counts: dict
    status: str             # finished, stopped, no-servers
    seconds: float
    rate: float | None      # subjects per second in this run (first start to last end)
    exit_code: int
    finished_here: int = 0  # subjects this run finished
    work_seconds: float | None = None   # this run's first subject start to its last subject end
    work_window: tuple | None = None    # (first start, last end), epoch seconds

    def __str__(self):
        c = self.counts
        rate = f", {3600 * self.rate:.1f} subjects/hour" if self.rate else ""
        return (f"[catalogue] {self.name}: {c.get('done', 0)} done, {c.get('failed', 0)} failed, "
                f"{c.get('pending', 0) + c.get('running', 0)} left ({self.status}, {self.seconds:.0f} s{rate}). "
                f"Report: {self.report}")


@dataclass
class Server:
    spec: ServerSpec
    actor: object = None
    state: str = "starting"         # starting, up, down (probed), rejected, gone (its actor died for good)
    url: str = ""
    pid: int = 0
    comfyui: str = ""
    busy: str | None = None
    start_ref: object = None
    probe_ref: object = None
    next_probe: float = 0.0
    down_since: float | None = None
    done: int = 0
    note: str = ""
    resume: list = field(default_factory=list)
    actor_deaths: int = 0

    def view(self) -> dict:
        return {"label": self.spec.label, "url": self.url or self.spec.url, "state": self.state,
                "comfyui": self.comfyui, "done": self.done, "note": self.note}


def default_servers() -> list:
    """One server started from the ComfyUI this pack is installed in (…/custom_nodes/<pack>)."""
    comfy = PACK_ROOT.parent.parent
    if PACK_ROOT.parent.name == "custom_nodes" and (comfy / "main.py").is_file():
        return [ServerSpec(start=str(comfy), label="local")]
    raise ConfigError(f"{ERR} The job file lists no servers, and this pack is not inside a ComfyUI's "
                      "custom_nodes folder to start one from. Fix: add [[servers]] with url = "
                      "\"http://127.0.0.1:8188\" (a running ComfyUI with Concept Lab) or start = \"<ComfyUI folder>\".")


def init_ray(address: str | None, cfg):
    """``ray.init``: a local Ray by default, or the cluster at ``address`` (``auto``, an IP:port,
    or ``ray://host:10001``), which gets this package through ``py_modules``."""
    try:
        import ray
    except ImportError:
        raise JobError(f"{ERR} Catalogue jobs need Ray. Fix: pip install -r {PKG_DIR / 'requirements.txt'}") from None
    if ray.is_initialized():
        return ray, False
    # no usage report to Ray's servers (a studio's job should not phone home; set it to 1 to allow)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or cfg.ray.get("address") or None
    common = {"namespace": cfg.ray.get("namespace", "conceptlab-catalogue"), "log_to_driver": False}
    if address:
        ray.init(address=address, runtime_env={"py_modules": [str(PKG_DIR)]}, **common)
    else:
        paths = [str(PACK_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        # "local": a Ray of its own, never a cluster that a stale /tmp/ray/ray_current_cluster names
        ray.init(address="local", include_dashboard=False, num_cpus=cfg.ray.get("num_cpus"),
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}, **common)
    return ray, True


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


class Driver:
    def __init__(self, cfg, ledger: Ledger, subjects: list, ray, progress: bool = True, stream=None):
        self.cfg, self.ledger, self.ray = cfg, ledger, ray
        self.subjects = subjects
        self.by_name = {s.name: s for s in subjects}
        self.servers: list[Server] = []
        self.inflight: dict = {}
        self.templates: Templates | None = None
        self.workflow: dict | None = None
        self.live: dict = {}
        self.stopping = False
        self.rate = Rate()
        self.bar = ProgressLine(len(subjects), stream=stream, enabled=progress)
        self._report_due = self._progress_due = 0.0
        self._dirty = True

    # -- servers -----------------------------------------------------------------------------------
    def start_servers(self, specs: list) -> None:
        log_dir = str(self.cfg.output / "servers")
        has_gpus = self.ray.cluster_resources().get("GPU", 0) > 0
        for spec in specs:
            if spec.gpus < 0:    # a started server gets a GPU of its own where there are GPUs
                spec.gpus = 1.0 if spec.start and has_gpus else 0.0
            srv = Server(spec=spec, url=spec.url)
            record = self.ledger.server_record(spec.label) if spec.start else None
            adopt = record if record and record.get("state") == "up" else None
            cls = remote_class(self.ray, spec.to_dict(), (adopt or {}).get("node_id", ""))
            srv.actor = cls.remote(spec.to_dict(), log_dir)
            srv.start_ref = srv.actor.start.remote(adopt)
            self.servers.append(srv)
        known = {s.spec.url for s in self.servers if s.spec.url}
        known |= {(self.ledger.server_record(s.spec.label) or {}).get("url") for s in self.servers if s.spec.start}
        for rec in self.ledger.subjects("running"):
            if rec["server"] not in known:
                self.ledger.requeue(rec["name"], "its server is not part of this run", rec["server"] or "")

    def _server_up(self, srv: Server, info: dict) -> None:
        srv.state, srv.url, srv.pid, srv.comfyui = "up", info["url"], info.get("pid", 0), info.get("comfyui", "")
        srv.down_since, srv.note = None, ""
        if srv.spec.start:
            self.ledger.set_server(srv.spec.label, srv.url, srv.pid, info.get("node_id", ""), "up")
        self.ledger.event(None, "server up", f"ComfyUI {srv.comfyui}", srv.url)
        if self.templates is None:
            self._load_templates(srv)
        srv.resume = [r["name"] for r in self.ledger.subjects("running")
                      if r["server"] == srv.url and r["name"] not in self._inflight_names()]
        self._dirty = True

    def _load_templates(self, srv: Server) -> None:
        wf_raw = json.loads(self.cfg.workflow.read_text()) if self.cfg.workflow else None
        types = required_types(wf_raw)
        info = self.ray.get(srv.actor.object_info.remote(types))
        missing = sorted(types - set(info) - {"CheckpointLoaderSimple", "CLIPVisionLoader", "ImageScale"})
        if any(m.startswith("ConceptLab") for m in missing):
            raise JobError(f"{ERR} The server {srv.url} has no Concept Lab nodes ({', '.join(missing)}). Fix: "
                           "install this pack in that ComfyUI's custom_nodes and restart it.")
        if missing:
            raise JobError(f"{ERR} The server {srv.url} lacks the node(s) {', '.join(missing)} the catalogue "
                           "graph needs. Fix: update that ComfyUI.")
        self.templates = Templates(info)
        self.templates.check_inputs("ConceptLabConceptNeuronsExtract", self.cfg.extract, "extract")
        self.templates.check_inputs("ConceptLabSeedSearch", self.cfg.seed_search, "seed_search")
        if wf_raw is not None:
            self.workflow = load_workflow(self.cfg.workflow, info)

    def _server_down(self, srv: Server, reason: str) -> None:
        if srv.state != "down":
            self.ledger.event(None, "server lost", reason, srv.url)
            self.bar.message(f"[catalogue] server {srv.url or srv.spec.label} lost: {reason}. Its subject goes "
                             "back to the queue; the server is probed every "
                             f"{PROBE_EVERY:.0f} s and rejoins if it answers again.")
        srv.state, srv.note = "down", reason[:300]
        srv.down_since = srv.down_since or time.time()
        srv.next_probe = time.time() + PROBE_EVERY
        self._dirty = True

    def _actor_died(self, srv: Server, err) -> None:
        """Ray restarts a dead actor (a few times); the new one starts or takes over its server."""
        self._server_down(srv, f"its actor died ({type(err).__name__})")
        srv.actor_deaths += 1
        if srv.actor_deaths > ACTOR_DEATHS:
            srv.state, srv.note = "gone", f"its actor died {srv.actor_deaths} times"
            self._requeue_waiting(srv)
            return
        srv.state, srv.start_ref = "starting", srv.actor.start.remote(
            self.ledger.server_record(srv.spec.label) if srv.spec.start else None)

    def _inflight_names(self) -> set:
        return {v[1] for v in self.inflight.values()}

    # -- tasks ---------------------------------------------------------------------------------------
    def _task(self, name: str, prompt_id: str, client_id: str, resume: bool) -> dict:
        s = self.by_name[name]
        photos, names = [], []
        folder = upload_folder(self.cfg.name, s.slug)
        for p in s.photos:
            data = Path(p).read_bytes()
            n = upload_name(data, p.name)
            photos.append((folder, n, data))
            names.append(f"{folder}/{n}")
        if self.workflow is not None:
            prompt = build_custom(self.workflow, self.cfg, s, names)
        else:
            prompt = build_subject(self.templates, self.cfg, s, names)
        return {"subject": name, "prompt": prompt, "marks": marks_of(prompt), "photos": photos,
                "prompt_id": prompt_id, "client_id": client_id, "resume": resume}

    def _dispatch(self) -> None:
        pending = None
        for srv in self.servers:
            if srv.state != "up" or srv.busy is not None or self.stopping:
                continue
            if srv.resume:
                name = srv.resume.pop(0)
                rec = self.ledger.subject(name)
                if rec is None or rec["state"] != "running" or name not in self.by_name:
                    continue
                pid, cid, resume = rec["prompt_id"], rec["client_id"], True
                self.ledger.event(name, "rejoining", f"prompt {pid}", srv.url)
            else:
                if pending is None:
                    busy = self._inflight_names()
                    pending = [r for r in self.ledger.subjects("pending") if r["name"] not in busy]
                while pending and pending[0]["attempts"] >= self.cfg.max_attempts:
                    r = pending.pop(0)
                    self.ledger.fail(r["name"], f"{ERR} Gave up after {r['attempts']} attempts (see the events).")
                if not pending:
                    continue
                name = pending.pop(0)["name"]
                pid, cid, resume = str(uuid.uuid4()), str(uuid.uuid4()), False   # 0.33 wants UUIDs
                self.ledger.claim(name, srv.url, pid, cid)
            try:
                task = self._task(name, pid, cid, resume)
            except OSError as e:      # a photo went missing or unreadable since the job started
                self.ledger.fail(name, f"{ERR} Subject '{name}': a photo could not be read ({e}). Fix: restore "
                                 "it, then run the job again.", pid)
                continue
            ref = srv.actor.run.remote(task)
            self.inflight[ref] = (srv, name, pid, time.time())
            srv.busy = name
            self.rate.started()
            self._dirty = True

    def _retry(self, name: str, srv: Server, reason: str, prompt_id: str) -> None:
        rec = self.ledger.subject(name)
        if rec["state"] != "running" or rec["prompt_id"] != prompt_id:
            return
        if rec["attempts"] >= self.cfg.max_attempts:
            self.ledger.fail(name, f"{ERR} Gave up after {rec['attempts']} attempts; the last: {reason}", prompt_id)
            self.bar.message(f"[catalogue] {name}: failed after {rec['attempts']} attempts ({reason})")
        else:
            self.ledger.requeue(name, reason, srv.url)

    def _finished(self, ref) -> None:
        srv, name, pid, t0 = self.inflight.pop(ref)
        srv.busy = None
        self.live.pop(name, None)
        self._dirty = True
        try:
            out = self.ray.get(ref)
        except Exception as raw:  # noqa: BLE001  (sorted below)
            from ray.exceptions import RayActorError
            e = raw if isinstance(raw, RayActorError) else _cause(raw)
            if isinstance(e, RayActorError):
                self._actor_died(srv, raw)
                self._retry(name, srv, "the server's actor died", pid)
            elif isinstance(e, PromptFailed) and not e.retryable:
                self.ledger.fail(name, str(e), pid)
                self.bar.message(f"[catalogue] {name}: failed: {str(e).splitlines()[0][:300]}")
            elif isinstance(e, PromptFailed):
                self._retry(name, srv, str(e), pid)
            elif isinstance(e, PromptRejected):
                srv.state, srv.note = "rejected", str(e)[:1000]
                self.bar.message(f"[catalogue] server {srv.url} refused the graph; it takes no more subjects: {e}")
                self.ledger.event(name, "rejected", str(e), srv.url)
                self.ledger.requeue(name, "the server refused the graph", srv.url)
            elif isinstance(e, (ServerLost, ConnectionError, TimeoutError, OSError)):
                self._server_down(srv, str(e))
                self._retry(name, srv, f"server lost: {e}", pid)
            else:
                self._retry(name, srv, f"{type(e).__name__}: {e}", pid)
            return
        self._store(srv, name, pid, out)

    def _store(self, srv: Server, name: str, pid: str, out: dict) -> None:
        s = self.by_name[name]
        folder = self.cfg.output / "subjects" / s.slug
        outputs = []
        for f in sorted(out["files"], key=lambda f: (f["n"], f["role"], f["k"])):
            suffix = "" if f["role"] == "image" else f"_{f['role']}"
            fname = f"scene{f['n']}{suffix}{'_' + str(f['k']) if f['k'] else ''}.png"
            write_atomic(folder / fname, f["data"])
            outputs.append({"role": f["role"], "scene": f["n"], "path": str(folder / fname),
                            "sha256": sha256(f["data"]), "bytes": len(f["data"])})
        c = out.get("concept") or {}
        concept = {"name_on_server": c.get("name", ""), "info": c.get("info", ""), "where": c.get("where", "")}
        if c.get("data"):
            write_atomic(folder / "concept.safetensors", c["data"])
            concept.update(path=str(folder / "concept.safetensors"), sha256=sha256(c["data"]),
                           indices_sha256=safetensors_payload_hash(c["data"]), bytes=len(c["data"]))
        checks = []
        data = {(f["role"], f["n"]): f["data"] for f in out["files"] if f["k"] == 0}
        scenes = self.cfg.scenes
        for (role, n), img in sorted(data.items()):
            if role != "image":
                continue
            prompt = fill_text(scenes[n - 1], {"class": s.class_prompt, "word": s.subject_word(),
                                               "subject": s.name, "job": self.cfg.name}) if n <= len(scenes) else ""
            entry = {"scene": n, "prompt": prompt, "readings": {}, "flags": []}
            if ("mask", n) in data:
                entry["readings"], entry["flags"] = saliency_check(
                    img, data[("mask", n)], float(self.cfg.check_setting("min_coverage")),
                    self.cfg.check_setting("subject"), float(self.cfg.check_setting("background_tolerance")))
            checks.append(entry)
        result = {"outputs": outputs, "concept": concept, "checks": checks,
                  "flagged": any(c["flags"] for c in checks), "server": out.get("server", srv.url),
                  "resumed": bool(out.get("resumed"))}
        if self.ledger.finish(name, pid, result):
            srv.done += 1
            self.rate.one_finished()
            if result["flagged"]:
                self.bar.message(f"[catalogue] {name}: done, flagged: "
                                 + "; ".join(f for c in checks for f in c["flags"])[:300])

    # -- the loop ------------------------------------------------------------------------------------
    def _poll(self, ready: set) -> None:
        from ray.exceptions import RayActorError
        for srv in self.servers:
            if srv.start_ref is not None and srv.start_ref in ready:
                ref, srv.start_ref = srv.start_ref, None
                try:
                    self._server_up(srv, self.ray.get(ref))
                except JobError:
                    raise
                except RayActorError as err:
                    self._actor_died(srv, err)
                except Exception as raw:  # noqa: BLE001
                    self._server_down(srv, f"could not start or reach it: {str(_cause(raw)).splitlines()[0][:300]}")
                    self._requeue_waiting(srv)
            if srv.probe_ref is not None and srv.probe_ref in ready:
                ref, srv.probe_ref = srv.probe_ref, None
                try:
                    ok = bool(self.ray.get(ref))
                except RayActorError as err:
                    self._actor_died(srv, err)
                    continue
                except Exception:  # noqa: BLE001
                    ok = False
                if ok:
                    info = self.ray.get(srv.actor.info.remote())
                    self.bar.message(f"[catalogue] server {info['url']} answers again: it takes subjects again")
                    self._server_up(srv, info)
                else:
                    srv.next_probe = time.time() + PROBE_EVERY
        for ref in [r for r in self.inflight if r in ready]:
            self._finished(ref)

    def _sweep(self) -> None:
        """Once every server has started (or failed to), a subject still recorded as running on
        a server that is not up under that URL (a killed run's server, started again elsewhere
        or gone) goes back to the queue."""
        if any(s.state == "starting" for s in self.servers):
            return
        up = {s.url for s in self.servers if s.state == "up"}
        waiting = self._inflight_names() | {n for s in self.servers for n in s.resume}
        for r in self.ledger.subjects("running"):
            if r["name"] not in waiting and r["server"] not in up:
                self.ledger.requeue(r["name"], "its server is gone", r["server"] or "")

    def _requeue_waiting(self, srv: Server) -> None:
        url = srv.url or (self.ledger.server_record(srv.spec.label) or {}).get("url") or srv.spec.url
        for r in self.ledger.subjects("running"):
            if r["server"] == url and r["name"] not in self._inflight_names():
                self.ledger.requeue(r["name"], "its server did not come back", url)

    def _probe(self) -> None:
        now = time.time()
        for srv in self.servers:
            if srv.state == "down" and srv.probe_ref is None and srv.start_ref is None and now >= srv.next_probe:
                srv.probe_ref = srv.actor.health.remote()

    def _refresh(self, force: bool = False) -> None:
        ask = time.time() >= self._progress_due
        if ask:
            self._progress_due = time.time() + 2.0
        for srv in self.servers:
            if ask and srv.busy is not None and srv.state == "up":
                try:
                    ready, _ = self.ray.wait([p := srv.actor.progress.remote()], timeout=0.2)
                    if ready:
                        self.live[srv.busy] = self.ray.get(p)
                except Exception:  # noqa: BLE001
                    pass
        counts = self.ledger.counts()
        up = sum(1 for s in self.servers if s.state == "up")
        eta = self.rate.eta(counts["pending"] + counts["running"])
        self.bar.update(counts, eta, up, len(self.servers), force=force)
        if force or self._dirty or time.time() > self._report_due:
            self.write_report(running=True)
            self._dirty = False
            self._report_due = time.time() + 5

    def write_report(self, running: bool) -> Path:
        counts = self.ledger.counts()
        stats = {"rate": self.rate.rate, "eta": self.rate.eta(counts["pending"] + counts["running"])}
        path = report_mod.write(self.cfg, self.ledger, self.subjects, running, [s.view() for s in self.servers],
                                self.live, stats)
        write_results_csv(self.cfg, self.ledger)
        return path

    def loop(self) -> str:
        while True:
            if self.stopping:
                return "stopped"
            self._probe()
            self._sweep()
            self._dispatch()
            counts = self.ledger.counts()
            waiting = any(s.resume for s in self.servers)
            if not self.inflight and not counts["pending"] and not counts["running"] and not waiting:
                return "finished"
            usable = [s for s in self.servers if s.state in ("up", "starting")]
            if not usable:
                if all(s.state in ("rejected", "gone") for s in self.servers):
                    if all(s.state == "gone" for s in self.servers):
                        self.bar.message("[catalogue] every server's actor died; stopping. Run the job again to resume.")
                        return "no-servers"
                    note = next(s.note for s in self.servers if s.state == "rejected")
                    raise JobError(f"{ERR} Every server refused the graph: {note}")
                since = max(s.down_since or time.time() for s in self.servers)   # none usable since
                if time.time() - since > self.cfg.server_wait:
                    self.bar.message(f"[catalogue] no server has answered for {self.cfg.server_wait:.0f} s; "
                                     "stopping. Run the job again to resume where it stopped.")
                    return "no-servers"
            refs = list(self.inflight) + [r for s in self.servers for r in (s.start_ref, s.probe_ref) if r is not None]
            ready = set()
            if refs:
                ready = set(self.ray.wait(refs, num_returns=1, timeout=0.5)[0])
                if ready:
                    ready |= set(self.ray.wait(refs, num_returns=len(refs), timeout=0)[0])
            else:
                time.sleep(0.5)
            self._poll(ready)
            self._refresh()

    def shutdown(self, stop_servers: bool = True) -> None:
        for srv in self.servers:
            if srv.actor is None:
                continue
            if stop_servers and srv.spec.start:
                try:
                    self.ray.get(srv.actor.stop.remote(), timeout=60)
                    self.ledger.set_server(srv.spec.label, srv.url, srv.pid, "", "stopped")
                except Exception:  # noqa: BLE001
                    pass


def write_results_csv(cfg, ledger: Ledger) -> None:
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", "state", "attempts", "server", "seconds", "concept", "concept_sha256", "images",
                "flagged", "flags", "error"])
    for r in ledger.subjects():
        res = r["result"] or {}
        c = res.get("concept") or {}
        flags = [f for ch in res.get("checks", []) for f in ch.get("flags", [])]
        w.writerow([r["name"], r["state"], r["attempts"], r["server"] or "", f"{r['seconds']:.1f}" if r["seconds"] else "",
                    c.get("path") or c.get("where") or "", c.get("sha256", ""),
                    ";".join(o["path"] for o in res.get("outputs", []) if o["role"] == "image"),
                    int(bool(flags)), " | ".join(flags), (r["error"] or "").replace("\n", " ")])
    write_atomic(cfg.output / "results.csv", buf.getvalue().encode())


class _Lock:
    """One run per output folder at a time (the lock goes with the process, however it ends)."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.f = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.seek(0)
            other = self.f.read().strip()
            raise JobError(f"{ERR} Another run of this job is working in {folder} (pid {other or '?'}). "
                           "Fix: wait for it, or stop it first.") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()))
        self.f.flush()


def run(config, *, address: str | None = None, servers: list | None = None, retry_failed: bool = False,
        redo_changed: bool = False, progress: bool = True, stream=None) -> Summary:
    """Run, or resume, the catalogue job ``config`` (a job file path, a dict or a JobConfig).

    ``servers`` (URLs, or dicts like a ``[[servers]]`` entry) replace the job file's servers;
    ``address`` is a Ray address (default: a local Ray); ``retry_failed`` runs failed subjects
    again; ``redo_changed`` redoes done subjects whose photos or settings changed."""
    t0 = time.time()
    cfg = load_config(config)
    if servers:
        from .config import parse_servers
        cfg.servers = parse_servers(list(servers))
    subjects = load_subjects(cfg)
    cfg.output.mkdir(parents=True, exist_ok=True)
    lock = _Lock(cfg.output)
    ledger = Ledger(cfg.output / "ledger.sqlite")
    ledger.begin_run(os.getpid())
    stream = stream or sys.stderr
    changes = ledger.sync([(s.name, subject_fingerprint(cfg, s), s.problems) for s in subjects],
                          retry_failed=retry_failed, redo_changed=redo_changed)
    counts = ledger.counts()
    if progress:
        stream.write(f"[catalogue] {cfg.name}: {len(subjects)} subjects ({counts['done']} done, {counts['failed']} "
                     f"failed, {counts['running']} to rejoin, {counts['pending']} to do); output {cfg.output}\n")
        if changes["stale"]:
            stream.write(f"[catalogue] {changes['stale']} done subject(s) changed since they ran; they are kept. "
                         "Run with --redo-changed to redo them.\n")
    ray, own_ray = None, False
    driver = None
    status = "error"
    old = {}
    try:
        if counts["pending"] or counts["running"]:
            specs = cfg.servers or default_servers()
            ray, own_ray = init_ray(address, cfg)
            driver = Driver(cfg, ledger, subjects, ray, progress=progress, stream=stream)

            def on_signal(signum, frame):
                if driver.stopping:
                    raise KeyboardInterrupt
                driver.stopping = True
                driver.bar.message("[catalogue] stopping (again to stop at once); subjects still running stay "
                                   "recorded and are rejoined by the next run")
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    old[sig] = signal.signal(sig, on_signal)
                except ValueError:   # not the main thread
                    pass
            driver.start_servers(specs)
            status = driver.loop()
        else:
            status = "finished"
        report = (driver.write_report(running=False) if driver is not None else
                  report_mod.write(cfg, ledger, subjects, False, []))
        if driver is None:
            write_results_csv(cfg, ledger)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if driver is not None:
            driver.bar.close()
            driver.shutdown(stop_servers=True)
        if ray is not None and own_ray:
            ray.shutdown()
        ledger.end_run(status)
    counts = ledger.counts()
    r = driver.rate if driver is not None else None
    ledger.close()
    lock.f.close()
    code = EXIT_OK if status == "finished" and not counts["failed"] else (
        EXIT_FAILED_SUBJECTS if status == "finished" else EXIT_ERROR)
    return Summary(cfg.name, cfg.output, report, counts, status, time.time() - t0, r and r.rate, code,
                   r.finished if r else 0, r and r.seconds, (r.t0, r.t_last) if r and r.t_last else None)

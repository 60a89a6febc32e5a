"""The Ray actor that owns one ComfyUI server.

It either owns a URL (a server the user runs) or starts a local ComfyUI (on the GPU Ray gave
it). It uploads a subject's photos, queues the subject's graph under the prompt id the ledger
recorded, follows it on the websocket, and brings back the outputs: the images through ``/view``
and the concept file from the server's concept folder, where the actor can see it (always for a
server it started; for a URL server when ``concept_dir`` is set).

The class is plain Python; :func:`remote_class` makes it a Ray actor (threaded, so the job can
ask for progress while a subject runs).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .comfy import ComfyClient, LocalServer, PromptFailed, ServerLost

#: restarts of a local server the actor started, after which it stays down
LOCAL_RESTARTS = 3


class ServerActor:
    def __init__(self, spec: dict, log_dir: str):
        self.spec = dict(spec)
        self.log_dir = Path(log_dir)
        self.local: LocalServer | None = None
        self.url = self.spec.get("url", "")
        self.client = ComfyClient(self.url) if self.url else None
        self.concept_dir = self.spec.get("concept_dir", "")
        self.restarts = 0
        self._progress = {}
        self._lock = threading.Lock()

    # -- life ------------------------------------------------------------------------------------
    def start(self, adopt: dict | None = None) -> dict:
        """Reach (or start) the server; returns what the ledger keeps about it."""
        if self.spec.get("start"):
            s = self.spec
            self.local = LocalServer(s["start"], self.log_dir / f"{_safe(s['label'])}.log", python=s.get("python", ""),
                                     args=s.get("args", []), env=s.get("env", {}), port=int(s.get("port", 0)))
            if not (adopt and self.local.adopt(int(adopt.get("pid") or 0), adopt.get("url", ""))):
                if adopt and adopt.get("pid"):
                    _stop_stale(int(adopt["pid"]))
                self.local.start()
            self.url = self.local.url
            self.client = ComfyClient(self.url)
            self.concept_dir = self.concept_dir or self.local.concept_dir
        if not self.client.alive():
            raise ServerLost(f"{self.url} does not answer (is ComfyUI running there?)")
        return self.info()

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()

    def health(self) -> bool:
        """Whether the server answers; a local server that died is started again (a few times)."""
        if self.local is not None and not self.local.alive():
            if self.restarts >= LOCAL_RESTARTS:
                return False
            self.restarts += 1
            try:
                self.local.port = 0
                self.url = self.local.start()
                self.client = ComfyClient(self.url)
            except Exception:  # noqa: BLE001
                return False
        return self.client is not None and self.client.alive()

    def info(self) -> dict:
        stats = self.client.system_stats() if self.client is not None else {}
        return {"url": self.url, "pid": self.local.pid if self.local else 0, "node_id": _node_id(),
                "comfyui": ((stats or {}).get("system") or {}).get("comfyui_version", "?"),
                "concept_dir": self.concept_dir}

    def object_info(self, types) -> dict:
        return self.client.object_info(sorted(types))

    def progress(self) -> dict:
        with self._lock:
            return dict(self._progress)

    # -- one subject -------------------------------------------------------------------------------
    def run(self, task: dict) -> dict:
        """Run (or, with ``task['resume']``, rejoin) one subject's prompt; returns its outputs."""
        t0 = time.time()
        c = self.client
        if c is None:
            raise ServerLost("the server was never reached")
        pid, cid = task["prompt_id"], task["client_id"]
        resumed = False
        if task.get("resume"):
            try:
                running, pending = c.queue_ids()
                resumed = pid in running | pending or c.history(pid) is not None
            except ServerLost:
                raise
        with self._lock:
            self._progress = {"subject": task["subject"], "node": "", "value": 0, "max": 0, "since": t0}
        if not resumed:
            for subfolder, name, data in task["photos"]:
                c.upload(data, name, subfolder)
            c.submit(task["prompt"], pid, cid)
        alive = self.local.alive if self.local is not None else None
        entry = c.wait(pid, cid, on_event=lambda k, d: self._event(task["prompt"], k, d), process_alive=alive)
        out = self._collect(entry, task)
        out.update(seconds=time.time() - t0, resumed=resumed, server=self.url)
        with self._lock:
            self._progress = {}
        return out

    def _event(self, prompt: dict, kind: str, data: dict) -> None:
        with self._lock:
            if kind == "executing" and data.get("node") is not None:
                node = prompt.get(str(data["node"]), {})
                self._progress.update(node=node.get("class_type", str(data["node"])), value=0, max=0)
            elif kind == "progress":
                self._progress.update(value=data.get("value", 0), max=data.get("max", 0))
                node = prompt.get(str(data.get("node")), {})
                if node:
                    self._progress["node"] = node.get("class_type", "")

    def _collect(self, entry: dict, task: dict) -> dict:
        marks = task["marks"]
        files, concept = [], {}
        for nid, out in (entry.get("outputs") or {}).items():
            role = marks.get(str(nid))
            if role is None:
                continue
            role, n = role
            if role == "concept":
                concept["name"] = _concept_name(out)
                prefix = str(task["prompt"].get(str(nid), {}).get("inputs", {}).get("filename_prefix", ""))
                concept.update(self._concept_file(concept["name"], prefix))
            elif role == "concept_info":
                concept["info"] = "\n".join(str(x) for x in out.get("text", []))
            else:
                for k, img in enumerate(out.get("images", [])):
                    data = self.client.view(img["filename"], img.get("subfolder", ""), img.get("type", "output"))
                    files.append({"role": role, "n": n, "k": k, "data": data, "server_name": img["filename"]})
        if not files and not concept.get("name"):
            raise PromptFailed("[ConceptLab Catalogue] The workflow produced neither images nor a concept file. "
                               "Fix: end it with Save Image and/or ConceptLab Concept Neurons Save.")
        return {"files": files, "concept": concept}

    def _concept_file(self, name: str, prefix: str) -> dict:
        """The concept file Save wrote: by the name it showed, else the newest file of its prefix
        (``<prefix>_00001_.safetensors``, counted up like Save Image)."""
        if not self.concept_dir:
            return {"where": f"{self.url}: models/concept_neurons/{name}"} if name else {}
        folder = Path(self.concept_dir)
        path = folder / name if name else None
        if (path is None or not path.is_file()) and prefix:
            found = sorted(folder.glob(f"{prefix}_*.safetensors"), key=lambda p: p.stat().st_mtime)
            path = found[-1] if found else path
        if path is None:
            return {}
        try:
            return {"data": path.read_bytes(), "name": str(path.relative_to(folder))}
        except (OSError, ValueError) as e:
            return {"where": f"{self.url}: models/concept_neurons/{name}", "read_error": str(e)}


def _concept_name(out: dict) -> str:
    """Concept Neurons Save shows 'name (N bytes)'."""
    texts = out.get("text") or []
    if not texts:
        return ""
    t = str(texts[0])
    return t.rsplit(" (", 1)[0] if t.endswith(" bytes)") else t


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _node_id() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return ""


def _stop_stale(pid: int) -> None:
    """A server a killed run started that no longer answers: stop it (it is ours: the ledger
    recorded its pid when this job started it)."""
    import signal
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def remote_class(ray, spec: dict, node_id: str = ""):
    """:class:`ServerActor` as a Ray actor class with the resources ``spec`` needs: a GPU for a
    server it starts with ``gpus``, and the node it must run on (``node``: an IP, for a
    ``concept_dir`` only that node sees; ``node_id``: where a killed run's server may still
    run, if that node is still there)."""
    opts = {"num_cpus": 0, "max_concurrency": 4, "max_restarts": 2, "num_gpus": max(float(spec.get("gpus") or 0), 0.0)}
    if spec.get("node"):
        opts["resources"] = {f"node:{spec['node']}": 0.001}
    elif node_id:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    return ray.remote(ServerActor).options(**opts)

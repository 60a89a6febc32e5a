"""One ComfyUI server, through its own API: ``/prompt``, ``/history``, ``/queue``, ``/view``,
``/upload/image``, ``/object_info``, ``/system_stats`` and the ``/ws`` websocket; and a local
server the job starts itself.

Errors are of three kinds, because the job treats them differently:

* :class:`ServerLost`: the server stopped answering (killed, crashed, restarted, network gone).
  The subject goes back to the queue; nothing it did on that server counts.
* :class:`PromptFailed`: the server ran the prompt and a node raised, e.g. Concept Neurons
  Extract refusing 1x1 photos. Its message is the node's own. The same subject would fail the
  same way anywhere, so it is not retried (an out-of-memory error is: another server may fit it).
* :class:`PromptRejected`: ``/prompt`` refused the graph (a missing node or model file).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class ServerLost(ConnectionError):
    pass


class PromptRejected(RuntimeError):
    pass


class PromptFailed(RuntimeError):
    def __init__(self, message: str, node_type: str = "", exception_type: str = ""):
        super().__init__(message)
        self.node_type, self.exception_type = node_type, exception_type

    @property
    def retryable(self) -> bool:
        return "OutOfMemory" in self.exception_type or "out of memory" in str(self).lower()


#: seconds of refused connections after which a server counts as gone
REFUSED_FOR = 3.0
_NET_ERRORS = (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError)


class ComfyClient:
    """HTTP and websocket client of one ComfyUI server at ``url``."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    # -- plain HTTP --------------------------------------------------------------------------------
    def _open(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout=None):
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError:
            raise
        except _NET_ERRORS as e:
            raise ServerLost(f"{self.url} does not answer ({e})") from None

    def get(self, path: str, timeout=None):
        body = self._open(path, timeout=timeout)
        return json.loads(body) if body else None

    def post(self, path: str, payload: dict):
        return json.loads(self._open(path, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"}) or b"null")

    def alive(self, timeout: float = 5.0) -> bool:
        try:
            self.get("/system_stats", timeout=timeout)
            return True
        except (ServerLost, urllib.error.HTTPError):
            return False

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def object_info(self, types=None) -> dict:
        if types is None:
            return self.get("/object_info", timeout=120)
        out = {}
        for t in types:
            try:
                out.update(self.get(f"/object_info/{urllib.parse.quote(t)}") or {})
            except urllib.error.HTTPError:
                pass
        return out

    def queue_ids(self) -> tuple[set, set]:
        """(running, pending) prompt ids."""
        q = self.get("/queue") or {}
        return ({item[1] for item in q.get("queue_running", [])},
                {item[1] for item in q.get("queue_pending", [])})

    def history(self, prompt_id: str) -> dict | None:
        h = self.get(f"/history/{urllib.parse.quote(prompt_id)}") or {}
        return h.get(prompt_id)

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        return self._open(f"/view?{q}", timeout=120)

    def upload(self, data: bytes, name: str, subfolder: str) -> str:
        """Upload ``data`` to the server's input folder as ``subfolder/name`` (overwriting: the
        job names uploads by their content). Returns the name Load Image takes."""
        boundary = uuid.uuid4().hex
        parts = []
        for key, value in (("subfolder", subfolder), ("type", "input"), ("overwrite", "true")):
            parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n".encode())
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        try:
            res = json.loads(self._open("/upload/image", b"".join(parts),
                                        {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=120))
        except urllib.error.HTTPError as e:
            raise PromptRejected(f"{self.url}/upload/image refused '{name}' (HTTP {e.code})") from None
        return f"{res['subfolder']}/{res['name']}" if res.get("subfolder") else res["name"]

    def submit(self, prompt: dict, prompt_id: str, client_id: str) -> None:
        try:
            self.post("/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": client_id})
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise PromptRejected(f"{self.url}/prompt refused the workflow (HTTP {e.code}): {_rejection(body)}") from None

    # -- waiting for a prompt ----------------------------------------------------------------------
    def wait(self, prompt_id: str, client_id: str, on_event=None, process_alive=None,
             lost_after: float = 20.0, timeout: float = 24 * 3600.0) -> dict:
        """Wait for ``prompt_id`` and return its ``/history`` entry (raises :class:`PromptFailed`
        for a node error). Progress comes from the websocket (``on_event(kind, data)``), which
        also tells when the prompt ends; ``/history`` is polled as well, so a missed message only
        costs a poll interval. The server counts as lost when ``process_alive()`` says so, when
        it stops answering for ``lost_after`` seconds, or when it no longer knows the prompt
        (it restarted)."""
        ws = self._connect_ws(client_id)
        deadline = time.time() + timeout
        last_ok, next_poll, refused_since = time.time(), 0.0, None
        try:
            while time.time() < deadline:
                if process_alive is not None and not process_alive():
                    raise ServerLost(f"the ComfyUI process of {self.url} exited")
                msg = self._recv(ws) if ws is not None else None
                if msg == "closed":
                    ws = None
                    next_poll = 0.0
                elif msg:
                    kind, data = msg.get("type"), msg.get("data") or {}
                    if data.get("prompt_id") in (None, prompt_id):
                        if on_event is not None and kind in ("progress", "executing", "execution_cached"):
                            on_event(kind, data)
                        if kind in ("execution_success", "execution_error", "execution_interrupted") or (
                                kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id):
                            next_poll = 0.0
                if ws is None:
                    time.sleep(0.5)
                if time.time() < next_poll:
                    continue
                try:
                    entry = self.history(prompt_id)
                    if entry is None:
                        running, pending = self.queue_ids()
                        entry = self.history(prompt_id)   # it may have finished in between
                        if entry is None and prompt_id not in running | pending:
                            raise ServerLost(f"{self.url} no longer knows prompt {prompt_id} (it restarted)")
                    last_ok, refused_since = time.time(), None
                except ServerLost as e:
                    # refused connections: nothing listens any more (quick verdict); other
                    # failures may be a slow network (the full lost_after)
                    if "refused" in str(e).lower():
                        refused_since = refused_since or time.time()
                    if time.time() - last_ok > lost_after or (
                            refused_since is not None and time.time() - refused_since > REFUSED_FOR):
                        raise
                    entry = None
                if entry is not None and _finished(entry):
                    return _checked(entry)
                if ws is None and time.time() - last_ok < 1.0:
                    ws = self._connect_ws(client_id)
                next_poll = time.time() + (2.0 if ws is not None else 0.5)
            raise TimeoutError(f"prompt {prompt_id} on {self.url} did not finish in {timeout:.0f} s")
        finally:
            if ws is not None:
                try:
                    ws.close()
                except Exception:  # noqa: BLE001
                    pass

    def _connect_ws(self, client_id: str):
        try:
            import websocket  # websocket-client
        except ImportError:
            return None       # progress by polling only
        u = urllib.parse.urlsplit(self.url)
        scheme = "wss" if u.scheme == "https" else "ws"
        try:
            ws = websocket.create_connection(f"{scheme}://{u.netloc}{u.path}/ws?clientId={client_id}", timeout=10)
            ws.settimeout(1.0)
            return ws
        except Exception:  # noqa: BLE001
            return None

    @staticmethod
    def _recv(ws):
        import websocket
        try:
            raw = ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except Exception:  # noqa: BLE001  (closed, reset)
            return "closed"
        if isinstance(raw, bytes) or not raw:
            return None       # preview images
        try:
            return json.loads(raw)
        except ValueError:
            return None


def _finished(entry: dict) -> bool:
    status = entry.get("status") or {}
    return bool(status.get("completed")) or status.get("status_str") in ("success", "error") or (
        not status and bool(entry.get("outputs")))


def _checked(entry: dict) -> dict:
    status = entry.get("status") or {}
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            node = data.get("node_type", "")
            msg = (data.get("exception_message") or "").strip()
            raise PromptFailed(f"{node}: {msg}" if node and node not in msg else msg, node,
                               data.get("exception_type", ""))
        if kind == "execution_interrupted":
            raise PromptFailed("the prompt was cancelled on the server (Cancel or /interrupt)",
                               data.get("node_type", ""), "Interrupted")
    if status.get("status_str") == "error":
        raise PromptFailed("the prompt ended in an error without a message")
    return entry


def _rejection(body: str) -> str:
    try:
        d = json.loads(body)
    except ValueError:
        return body[:1000]
    parts = [(d.get("error") or {}).get("message", "")]
    for nid, ne in (d.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(p for p in parts if p)[:2000]


# ----------------------------------------------------------------------------------------------
# a server the job starts
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(extra: dict) -> dict:
    """This process's environment for a ComfyUI child, without PYTHONPATH entries that would put
    this pack's folder on its path (its nodes/ package must never shadow ComfyUI's nodes.py)."""
    env = dict(os.environ)
    pack = str(Path(__file__).resolve().parent.parent)
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != pack]
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    else:
        env.pop("PYTHONPATH", None)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class LocalServer:
    """``python <comfyui>/main.py --listen 127.0.0.1 --port P <args>``, its output in ``log``.

    It runs in its own session, so a Ctrl-C in the job's terminal reaches the job, which stops
    it in order. :meth:`adopt` takes over a server a killed run of the job left running."""

    def __init__(self, comfyui: str, log: Path, python: str = "", args=(), env=None, port: int = 0):
        self.comfyui = Path(comfyui)
        self.python = python or sys.executable
        self.args, self.env, self.port = list(args), dict(env or {}), port
        self.log = Path(log)
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.url = ""

    @property
    def concept_dir(self) -> str:
        base = self.comfyui
        if "--base-directory" in self.args:
            base = Path(self.args[self.args.index("--base-directory") + 1])
        return str(base / "models" / "concept_neurons")

    def start(self, timeout: float = 300.0) -> str:
        main = self.comfyui / "main.py"
        if not main.is_file():
            raise FileNotFoundError(f"[ConceptLab Catalogue] {self.comfyui} is not a ComfyUI folder (no main.py). "
                                    "Fix: point the server's 'start' at your ComfyUI folder.")
        self.port = self.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.python, str(main), "--listen", "127.0.0.1", "--port", str(self.port),
                                          *self.args], cwd=str(self.comfyui), stdout=log, stderr=subprocess.STDOUT,
                                         env=_clean_env(self.env), start_new_session=True)
        self.pid = self.proc.pid
        client = ComfyClient(self.url)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"[ConceptLab Catalogue] ComfyUI exited during start-up (code "
                                   f"{self.proc.returncode}); its log: {self.log}\n{self.tail()}")
            if client.alive(timeout=2):
                return self.url
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"[ConceptLab Catalogue] ComfyUI did not answer within {timeout:.0f} s; its log: {self.log}")

    def adopt(self, pid: int, url: str) -> bool:
        """Take over the server ``pid`` at ``url`` if it is alive and answers."""
        if not pid or not _pid_alive(pid) or not ComfyClient(url).alive():
            return False
        self.pid, self.url, self.proc = pid, url, None
        self.port = urllib.parse.urlsplit(url).port or 0
        return True

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_alive(self.pid)

    def stop(self, grace: float = 20.0) -> None:
        if not self.pid or not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.time() + grace
        while time.time() < end and self.alive():
            time.sleep(0.2)
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True

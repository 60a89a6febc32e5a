"""Concept Lab's translations, kept in step with the node definitions.

ComfyUI serves every custom-node pack's ``locales/<lang>/`` at ``/i18n`` (app/custom_node_manager.py,
``build_translations``: ``main.json`` with ``nodeDefs.json``, ``commands.json`` and ``settings.json``
merged in under those keys), and the front end merges that into its own messages. What it reads
(front ends 1.48.7 and 1.58.1):

- ``nodeDefs.<NodeId>.display_name`` and ``.description``: the node's title (node library, search,
  new nodes) and its description;
- ``nodeDefs.<NodeId>.inputs.<input>.name`` and ``.tooltip``: input socket and widget labels, and
  the tooltips;
- ``nodeDefs.<NodeId>.outputs.<index>.name`` and ``.tooltip``: output labels (only read when the
  output's name differs from its type; otherwise the front end's ``dataTypes.<TYPE>`` is used) and
  tooltips;
- ``settings.<setting id with '.' -> '_'>.name`` and ``.tooltip``;
- ``nodeCategories.<word>`` (main.json): each word of a node's category path.

``locales/en`` is generated here from the server's ``/object_info`` and from
``web/concept_lab.js``, so that it is always the nodes' own text; ``locales/ja`` and ``locales/zh``
are written by hand and checked against it: every node, input, output and setting of ``en`` must
have its entries there, and nothing else may be there (an entry for an input that no longer
exists is an error). ``locales/translated_from.json`` records, per language, a fingerprint of the
English text each message was translated from, so a changed English tooltip shows up as a stale
translation until someone translates it again and records that with ``--translated ja zh``.

vue-i18n compiles messages (front end 1.48.7 compiles tooltips too): ``{ } | @`` are message syntax
(``|`` separates plural forms), so no message may contain them. In ``en`` they are replaced by
look-alikes (``||z||`` -> ``‖z‖``); see :data:`SAFE`.

    bash scripts/lab.sh bench locales                      # regenerate locales/en, then check ja and zh
    bash scripts/lab.sh bench locales --check              # write nothing; exit 1 on any problem
    bash scripts/lab.sh bench locales --translated ja zh   # after updating translations

The checks also run in the test suite (tests/e2e/test_locales.py, against a real server's
/object_info), and that test reads the translations back from the front end in Chromium.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales"
NODE_PREFIX = "ConceptLab"
LANGUAGES = ("ja", "zh")          # written by hand; "en" is generated
FILES = ("main.json", "nodeDefs.json", "settings.json")
SOURCES = LOCALES / "translated_from.json"
#: Category words that other packs and ComfyUI use too: left to the front end (a pack's
#: nodeCategories entry would rename them for every node).
SHARED_CATEGORY_WORDS = {"utils"}
#: vue-i18n message syntax, and what stands in for it in generated English text.
SPECIAL = re.compile(r"[{}|@]")
SAFE = [("||", "‖"), ("|", "｜"), ("{", "｛"), ("}", "｝"), ("@", "＠")]
#: A message in Japanese or Chinese has at least one CJK character (kana, kanji, hanzi).
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uff01-\uff5e]")


def safe(text: str) -> str:
    for a, b in SAFE:
        text = text.replace(a, b)
    return text


# ------------------------------------------------------------------------------------------------
# what the pack defines
# ------------------------------------------------------------------------------------------------
def pack_setting(js: Path = ROOT / "web" / "concept_lab.js") -> dict:
    """The setting the front-end extension registers: ``{"id", "name", "tooltip"}``, read from
    web/concept_lab.js (``settingDef()``, or the extension's ``settings: [{...}]``)."""
    src = js.read_text(encoding="utf-8")
    if "function settingDef()" in src:
        body = src[src.index("function settingDef()"):]
        body = body[:body.index("\n}")]
    else:                       # declared in the extension's own settings list
        body = src[src.index("settings: [{"):]
        body = body[:body.index("}]")]
    out = {}
    for key in ("id", "name", "tooltip"):
        m = re.search(rf"\b{key}:\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[A-Z_]+)", body)
        if not m:
            raise ValueError(f"web/concept_lab.js: settingDef() has no {key}")
        value = m.group(1)
        if value[0] in "\"'":
            out[key] = json.loads('"' + value[1:-1].replace('"', '\\"') + '"') if value[0] == "'" else json.loads(value)
        else:  # a constant, e.g. SETTING_ID
            c = re.search(rf"\bconst {value}\s*=\s*\"([^\"]+)\"", src)
            if not c:
                raise ValueError(f"web/concept_lab.js: constant {value} not found")
            out[key] = c.group(1)
    return out


def pack_nodes(object_info: dict) -> dict:
    return {k: v for k, v in sorted(object_info.items()) if k.startswith(NODE_PREFIX)}


AUTOGROW = "COMFY_AUTOGROW_V3"


def _grown(group: str, names: list, opts: dict) -> list[tuple[str, dict]]:
    """The entries of inputs that grow as the user connects them (``io.Autogrow``, ComfyUI 0.33;
    fixed optional inputs of the same names on 0.3.75, marked with ``autogrow_group``): each under
    its own name (the socket's name on 0.3.75, and in workflows saved before, which 0.33 keeps on
    the node) and under ``<group>_<name>`` (the key the front end reads for the socket
    ``<group>.<name>`` that Autogrow adds). The same entries on both versions."""
    return [(key, dict(opts, display_name=n)) for n in names for key in (n, f"{group}_{n}")]


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def _carried(combo: str, spec: tuple) -> list[tuple[str, dict]]:
    """The inputs that a DynamicCombo's options carry (ComfyUI 0.33), once each, in order:
    ``[(name, opts)]``."""
    out, seen = [], set()
    for option in (spec[1] if len(spec) > 1 else {}).get("options", []):
        for section in ("required", "optional"):
            for name, s in (option.get("inputs", {}).get(section) or {}).items():
                if name not in seen:
                    seen.add(name)
                    out.append((name, s[1] if len(s) > 1 and isinstance(s[1], dict) else {}))
    return out


def _chosen(combo: str, name: str, opts: dict) -> list[tuple[str, dict]]:
    """The entries of an input that a combo's options carry (``io.DynamicCombo``, ComfyUI 0.33;
    a flat input of the same name on 0.3.75, marked with ``dynamic_combo``): under its own name
    (the widget on 0.3.75, and the value that workflows saved before send) and under
    ``<combo>_<name>`` (the key the front end reads for the widget ``<combo>.<name>``). The same
    entries on both versions."""
    opts = {k: v for k, v in opts.items() if k not in ("dynamic_combo", "dynamic_options")}
    return [(key, dict(opts, display_name=opts.get("display_name") or name)) for key in (name, f"{combo}_{name}")]


def _inputs(info: dict) -> list[tuple[str, dict]]:
    spec = info.get("input", {})
    order = info.get("input_order") or {}
    listed = []
    for section in ("required", "optional"):
        for name in order.get(section) or list(spec.get(section, {})):
            s = spec.get(section, {}).get(name)
            opts = s[1] if isinstance(s, (list, tuple)) and len(s) > 1 and isinstance(s[1], dict) else {}
            listed.append((name, s, opts))
    fixed = {}                                   # 0.3.75: a group's inputs, fixed (in order)
    for name, _, opts in listed:
        if opts.get("autogrow_group"):
            fixed.setdefault(opts["autogrow_group"], []).append(name)
    out = []
    for name, s, opts in listed:
        if s and s[0] == AUTOGROW:               # 0.33: the group, with its template input
            template = opts.get("template", {})
            first = next(v for d in template.get("input", {}).values() for v in d.values())
            grown = template.get("names") or [f"{template.get('prefix', '')}{i}" for i in range(template.get("max", 0))]
            out += _grown(name, grown, first[1] if len(first) > 1 else {})
        elif opts.get("autogrow_group"):
            group = opts["autogrow_group"]
            if fixed.get(group, [None])[0] == name:   # the whole group, where its first input is
                out += _grown(group, fixed[group], {k: v for k, v in opts.items() if k != "autogrow_group"})
        elif s and s[0] == DYNAMIC_COMBO:        # 0.33: the combo, then the inputs its options carry
            out.append((name, {k: v for k, v in opts.items() if k != "options"}))
            for carried, carried_opts in _carried(name, s):
                out += _chosen(name, carried, carried_opts)
        elif opts.get("dynamic_combo"):          # 0.3.75: an input a combo's options use, flat
            out += _chosen(opts["dynamic_combo"], name, opts)
        else:
            out.append((name, opts))
    return out


def other_form(info: dict) -> set:
    """The input entries of a node that the running ComfyUI shows under another name: on a ComfyUI
    with Autogrow the inputs' own names (only workflows saved before carry such sockets), without
    it the ``<group>_<name>`` keys (there is no Autogrow socket). Likewise for the inputs that a
    DynamicCombo's options carry: on 0.33 the flat name is no widget (only a saved workflow's
    value) and ``<combo>_<name>`` is the widget ``<combo>.<name>`` (:func:`dynamic_widgets`, which
    the front end adds under the chosen option); on 0.3.75 ``<combo>_<name>`` is nothing."""
    names = {n for n, _ in _inputs(info)}
    spec = info.get("input", {})
    present = {n for section in ("required", "optional") for n, s in spec.get(section, {}).items()
               if not (s and s[0] == AUTOGROW)}
    grown = {f"{g}_{n}" for g, s in ((g, s) for section in ("required", "optional")
                                     for g, s in spec.get(section, {}).items() if s and s[0] == AUTOGROW)
             for n in (s[1].get("template", {}).get("names") or [])}
    return names - present - grown


def dynamic_widgets(info: dict) -> dict:
    """``{locale entry: widget name}`` of the inputs that a DynamicCombo's options carry (ComfyUI
    0.33): ``threshold_mode_threshold`` -> ``threshold_mode.threshold``. Empty on 0.3.75."""
    out = {}
    for section in ("required", "optional"):
        for name, s in info.get("input", {}).get(section, {}).items():
            if s and s[0] == DYNAMIC_COMBO:
                out.update({f"{name}_{n}": f"{name}.{n}" for n, _ in _carried(name, s)})
    return out


def english(object_info: dict, setting: dict | None = None) -> dict:
    """The English locale files, ``{file name: content}``, from the node definitions."""
    setting = setting or pack_setting()
    node_defs, words = {}, set()
    for node_id, info in pack_nodes(object_info).items():
        entry = {"display_name": safe(info.get("display_name") or node_id)}
        if info.get("description"):
            entry["description"] = safe(info["description"])
        inputs = {}
        for name, opts in _inputs(info):
            inputs[name] = {"name": safe(opts.get("display_name") or name)}
            if opts.get("tooltip"):
                inputs[name]["tooltip"] = safe(opts["tooltip"])
        if inputs:
            entry["inputs"] = inputs
        outputs = {}
        types = info.get("output") or []
        names = info.get("output_name") or types
        tips = info.get("output_tooltips") or []
        for i, typ in enumerate(types):
            o = {}
            if names[i] != typ:
                o["name"] = safe(names[i])
            if i < len(tips) and tips[i]:
                o["tooltip"] = safe(tips[i])
            if o:
                outputs[str(i)] = o
        if outputs:
            entry["outputs"] = outputs
        node_defs[node_id] = entry
        words.update(w for w in (info.get("category") or "").split("/")[1:] if w not in SHARED_CATEGORY_WORDS)
    key = setting["id"].replace(".", "_")
    return {
        "main.json": {"nodeCategories": {w: w for w in sorted(words)}},
        "nodeDefs.json": node_defs,
        "settings.json": {key: {"name": safe(setting["name"]), "tooltip": safe(setting["tooltip"])}},
    }


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def read(lang: str, locales: Path = LOCALES) -> dict:
    out = {}
    for name in FILES:
        p = locales / lang / name
        out[name] = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    return out


def _walk(ref, got, path: str, lang: str, problems: list) -> None:
    """``got`` must have exactly ``ref``'s keys; strings must be translated messages."""
    if isinstance(ref, dict):
        if not isinstance(got, dict):
            problems.append(f"{lang}: {path}: missing" if got is None else f"{lang}: {path}: not an object")
            return
        for k in ref:
            _walk(ref[k], got.get(k), f"{path}.{k}" if path else k, lang, problems)
        for k in got:
            if k not in ref:
                problems.append(f"{lang}: {path}.{k}: no such {_what(path)} in the node definitions "
                                f"(left over from an older version?)")
        return
    if not isinstance(got, str) or not got.strip():
        problems.append(f"{lang}: {path}: missing" if got is None else f"{lang}: {path}: not a non-empty string")
        return
    if SPECIAL.search(got):
        problems.append(f"{lang}: {path}: contains vue-i18n message syntax ({{ }} | @): {got!r}")
    leaf = path.rsplit(".", 1)[-1]
    if (leaf in ("description", "tooltip") or path.startswith(("settings.", "main.")) or path.endswith("display_name")) \
            and not CJK.search(got):
        problems.append(f"{lang}: {path}: not translated: {got!r}")
    if path.endswith("display_name") and not got.startswith(NODE_PREFIX):
        problems.append(f"{lang}: {path}: should keep the '{NODE_PREFIX}' prefix: {got!r}")


def _what(path: str) -> str:
    parts = path.split(".")
    if len(parts) == 1:
        return {"nodeDefs": "node", "settings": "setting", "main": "key"}.get(parts[0], "key")
    if parts[-1] == "inputs":
        return "input"
    if parts[-1] == "outputs":
        return "output"
    return "key"


def flatten(files: dict) -> dict:
    """``{"nodeDefs.<node>.inputs.<input>.tooltip": text, ...}`` for a language's files."""
    out = {}

    def walk(o, path):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}.{k}")
        elif isinstance(o, str):
            out[path] = o
    for name, content in files.items():
        walk(content or {}, name.removesuffix(".json"))
    return out


def fingerprints(english_files: dict) -> dict:
    return {k: hashlib.sha1(v.encode()).hexdigest()[:12] for k, v in flatten(english_files).items()}


def check(object_info: dict, locales: Path = LOCALES, setting: dict | None = None) -> list[str]:
    """Everything wrong with the shipped locales, as readable lines (empty: all good)."""
    problems = []
    want = english(object_info, setting)
    have = read("en", locales)
    for name in FILES:
        if have[name] != want[name]:
            problems.append(f"en: {name} is not what the node definitions say; run "
                            f"'bash scripts/lab.sh bench locales'")
    now = fingerprints(want)
    texts = flatten(want)
    sources_file = locales / SOURCES.name
    sources = json.loads(sources_file.read_text()) if sources_file.is_file() else {}
    for lang in LANGUAGES:
        got = read(lang, locales)
        for name in FILES:
            _walk(want[name], got[name], name.removesuffix(".json"), lang, problems)
        recorded = sources.get(lang, {})
        present = flatten(got)
        for path, fp in now.items():
            if path in present and recorded.get(path) != fp:
                problems.append(f"{lang}: {path}: translated from another English text (or never "
                                f"recorded); English now: {texts[path]!r}. Translate it, then run "
                                f"'bash scripts/lab.sh bench locales --translated {lang}'")
    for d in sorted(p.name for p in locales.iterdir() if p.is_dir()):
        if d not in ("en", *LANGUAGES):
            problems.append(f"locales/{d}: not a language this script knows (add it to LANGUAGES)")
    return problems


def record_translated(object_info: dict, langs, locales: Path = LOCALES) -> Path:
    """Record that ``langs`` are translated from the current English text."""
    path = locales / SOURCES.name
    sources = json.loads(path.read_text()) if path.is_file() else {}
    now = fingerprints(english(object_info))
    for lang in langs:
        sources[lang] = now
    path.write_text(json.dumps(dict(sorted(sources.items())), indent=1, sort_keys=True) + "\n")
    return path


def write_english(object_info: dict, locales: Path = LOCALES) -> list[Path]:
    written = []
    for name, content in english(object_info).items():
        p = locales / "en" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            p.write_text(text, encoding="utf-8")
            written.append(p)
    return written


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def server_object_info() -> dict:
    """``/object_info`` of a real ComfyUI server with the pack (benchmarks/comfy_runtime.py)."""
    from . import comfy_runtime as cr
    with cr.ComfyServer() as srv:
        return srv.get("/object_info")


def add_arguments(p) -> None:
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 on any problem")
    p.add_argument("--translated", nargs="+", metavar="LANG", choices=LANGUAGES,
                   help="record that these languages are translated from the current English text")
    p.add_argument("--object-info", help="read the node definitions from this JSON file "
                                         "(a saved /object_info) instead of starting a server")


def run(args) -> dict:
    if args.object_info:
        info = json.loads(Path(args.object_info).read_text())
    else:
        info = server_object_info()
    written = []
    if not args.check:
        written = [str(p.relative_to(ROOT)) for p in write_english(info)]
        if args.translated:
            written.append(str(record_translated(info, args.translated).relative_to(ROOT)))
        for w in written:
            print(f"wrote {w}")
    problems = check(info)
    n = len(pack_nodes(info))
    if problems:
        print(f"{len(problems)} problem(s) in locales/ ({n} nodes):")
        print("\n".join(f"  {x}" for x in problems))
        raise SystemExit(1)
    print(f"locales/ en, {', '.join(LANGUAGES)}: every node ({n}), input, output and setting covered")
    return {"nodes": n, "languages": ["en", *LANGUAGES], "written": written, "problems": problems}

"""The nodes' help pages for ComfyUI's node help panel, generated from one source per language.

The front end's node help panel (front ends 1.32.9, 1.48.7, 1.58.1: ``services/nodeHelpService.ts``)
loads a custom node's page from the pack's web directory: ``/extensions/<pack>/docs/<NodeClass>/<locale>.md``
(``en``, ``ja``, ``zh``, ... the front end's language code), then ``/extensions/<pack>/docs/<NodeClass>.md``.
It renders the Markdown with relative image paths rebased on ``/extensions/<pack>/docs/``.

Sources (written once, read on GitHub as they are):

- ``docs/nodes.md`` (English), ``docs/ja/nodes.md``, ``docs/zh/nodes.md``: one section per node,
  opened by a marker line ``<!-- node: ConceptLabX -->`` (in the translations
  ``<!-- node: ConceptLabX; translated from en <fingerprint> -->``, the fingerprint of the English
  hand-written part it was translated from, so a changed English section shows up as a stale
  translation). A section holds a generated part (title, description, inputs, outputs, between the
  marker and ``<!-- end of generated part -->``) and a hand-written part (a picture where one helps,
  a typical graph, the limits). ``<!-- end of nodes -->`` closes the last section.
- The generated part is the node's own text as the front end shows it: ``locales/<lang>/nodeDefs.json``
  (display name, description, input and output names and tooltips; ``locales/en`` is generated from
  the nodes by ``python -m benchmarks locales``), and the output types from ``/object_info``.
- Pictures are figures the pack renders itself (``docs/images``, ``python -m benchmarks gallery``):
  the help pages get small WebP copies in ``web/docs/images`` (at most :data:`MAX_WIDTH` px wide).

Written here: the generated parts of the three sources (in place), ``web/docs/<NodeClass>/<lang>.md``
for en, ja and zh, ``web/docs/<NodeClass>.md`` (English, for every other language) and the pictures.
Links to other docs become links to the repository (the help panel has no docs/ folder).

    bash scripts/lab.sh bench help-pages                     # regenerate (needs a ComfyUI server: starts one)
    bash scripts/lab.sh bench help-pages --check             # write nothing; exit 1 if anything is stale
    bash scripts/lab.sh bench help-pages --translated ja zh  # after translating changed sections

tests/e2e/test_help_pages.py checks that everything is current and that the front end shows the pages.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
WEB_DOCS = ROOT / "web" / "docs"
LOCALES = ROOT / "locales"
LANGUAGES = ("en", "ja", "zh")          # the front end's language codes
SOURCES = {"en": DOCS / "nodes.md", "ja": DOCS / "ja" / "nodes.md", "zh": DOCS / "zh" / "nodes.md"}
MAX_WIDTH = 480
WEBP_QUALITY = 80

MARKER = re.compile(r"^<!-- node: (?P<node>\w+)(?:; translated from en (?P<fp>[0-9a-f]{12}))? -->$", re.M)
END_GENERATED = "<!-- end of generated part -->"
END_NODES = "<!-- end of nodes -->"
IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<href>[^)\s]+)\)")

WORDS = {
    "en": {"inputs": "Inputs", "outputs": "Outputs", "input": "input", "output": "output",
           "what": "what it is", "none": "(none)",
           "note": "generated from locales/en/nodeDefs.json by `bash scripts/lab.sh bench help-pages`: "
                   "change the node's own text, not this part"},
    "ja": {"inputs": "入力", "outputs": "出力", "input": "入力", "output": "出力", "what": "説明",
           "none": "（なし）",
           "note": "locales/ja/nodeDefs.json から `bash scripts/lab.sh bench help-pages` で生成: "
                   "この部分ではなく翻訳ファイルを編集してください"},
    "zh": {"inputs": "输入", "outputs": "输出", "input": "输入", "output": "输出", "what": "说明",
           "none": "（无）",
           "note": "由 `bash scripts/lab.sh bench help-pages` 从 locales/zh/nodeDefs.json 生成："
                   "请修改翻译文件，而不是这一部分"},
}


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------
def fingerprint(text: str) -> str:
    """Of a hand-written part, whitespace-insensitive."""
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()[:12]


def parse(text: str) -> tuple[str, list[dict], str]:
    """``(preamble, sections, tail)``; each section ``{node, fp, generated, written}``."""
    if END_NODES not in text:
        raise ValueError(f"no '{END_NODES}' line")
    body, tail = text.split(END_NODES, 1)
    marks = list(MARKER.finditer(body))
    if not marks:
        raise ValueError("no '<!-- node: ... -->' section")
    sections = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        chunk = body[m.end():nxt.start() if nxt else len(body)]
        if END_GENERATED not in chunk:
            raise ValueError(f"section {m['node']}: no '{END_GENERATED}' line")
        generated, written = chunk.split(END_GENERATED, 1)
        sections.append({"node": m["node"], "fp": m["fp"], "generated": generated.strip("\n"),
                         "written": written.strip("\n")})
    return body[:marks[0].start()], sections, tail


def render_source(preamble: str, sections: list[dict], tail: str) -> str:
    out = [preamble.rstrip("\n") + "\n"]
    for s in sections:
        fp = f"; translated from en {s['fp']}" if s.get("fp") else ""
        out.append(f"\n<!-- node: {s['node']}{fp} -->\n{s['generated']}\n{END_GENERATED}\n\n{s['written']}\n")
    return "".join(out) + "\n" + END_NODES + tail


def node_defs(lang: str) -> dict:
    return json.loads((LOCALES / lang / "nodeDefs.json").read_text(encoding="utf-8"))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def generated_part(node: str, lang: str, object_info: dict) -> str:
    """Title, description, inputs and outputs of ``node`` in ``lang``, as Markdown (## title)."""
    w, d = WORDS[lang], node_defs(lang)[node]
    info = object_info[node]
    lines = [f"<!-- {w['note']} -->", f"## {d['display_name']}", "", _cell(d.get("description", "")), "",
             f"### {w['inputs']}", ""]
    inputs = d.get("inputs", {})
    if inputs:
        lines += [f"| {w['input']} | {w['what']} |", "|---|---|"]
        seen = set()
        for name, spec in inputs.items():
            label = spec.get("name", name)
            if label in seen:    # a growing input's second key (locales/: references_2 and
                continue         # more_references_references_2, one socket)
            seen.add(label)
            shown = f"**{_cell(label)}**" + (f" (`{name}`)" if label != name else "")
            lines.append(f"| {shown} | {_cell(spec.get('tooltip', ''))} |")
    else:
        lines.append(w["none"])
    lines += ["", f"### {w['outputs']}", "", f"| {w['output']} | {w['what']} |", "|---|---|"]
    types = list(info.get("output", []))
    names = list(info.get("output_name") or types)
    for i, typ in enumerate(types):
        spec = d.get("outputs", {}).get(str(i), {})
        label = spec.get("name", names[i] if i < len(names) else typ)
        shown = f"**{_cell(label)}**" + (f" (`{typ}`)" if label != typ else "")
        lines.append(f"| {shown} | {_cell(spec.get('tooltip', ''))} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# help pages
# ------------------------------------------------------------------------------------------------
def repository() -> str:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return meta["project"]["urls"]["Repository"].rstrip("/")


def picture_name(src: Path) -> str:
    return f"{src.stem}.webp"


def _page_links(text: str, source: Path, pictures: dict) -> str:
    """Pictures -> images/<name>.webp in web/docs; relative links to docs -> the repository."""
    def image(m):
        src = (source.parent / m["src"]).resolve()
        pictures[picture_name(src)] = src
        return f"![{m['alt']}](images/{picture_name(src)})"

    def link(m):
        href = m["href"]
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", href):
            return m[0]
        target = (source.parent / href.split("#")[0]).resolve()
        anchor = "#" + href.split("#", 1)[1] if "#" in href else ""
        rel = target.relative_to(ROOT).as_posix()
        return f"[{m['text']}]({repository()}/blob/main/{rel}{anchor})"
    return LINK.sub(link, IMAGE.sub(image, text))


def page(section: dict, source: Path, pictures: dict) -> str:
    """A node's help page: the section with its headings one level up, and its links rewritten."""
    text = section["generated"] + "\n\n" + section["written"]
    text = "\n".join(line for line in text.splitlines() if not line.startswith("<!-- "))
    text = re.sub(r"^#(#+) ", r"\1 ", text, flags=re.M)
    return _page_links(text, source, pictures).strip() + "\n"


def picture_bytes(src: Path) -> tuple[bytes, tuple[int, int]]:
    from PIL import Image
    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.width > MAX_WIDTH:
            im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "WEBP", quality=WEBP_QUALITY, method=6)
        return buf.getvalue(), im.size


# ------------------------------------------------------------------------------------------------
# the whole job
# ------------------------------------------------------------------------------------------------
def build(object_info: dict, stamp: tuple = ()) -> tuple[dict, dict, list[str]]:
    """Everything generated: ``({path: text}, {picture name: source path}, problems)``. The
    sources' generated parts are refreshed in the returned texts; ``stamp`` lists languages whose
    translation fingerprints are set to the current English sections (``--translated``)."""
    texts, pictures, problems = {}, {}, []
    english = None
    nodes = sorted(n for n in node_defs("en"))
    for lang in LANGUAGES:
        source = SOURCES[lang]
        rel = source.relative_to(ROOT)
        try:
            preamble, sections, tail = parse(source.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            problems.append(f"{rel}: {e}")
            continue
        names = [s["node"] for s in sections]
        for n in sorted(set(nodes) - set(names)):
            problems.append(f"{rel}: no section for {n}")
        for n in sorted(set(names) - set(nodes)):
            problems.append(f"{rel}: a section for {n}, which is not a node")
        for n in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"{rel}: two sections for {n}")
        defs = node_defs(lang)
        for s in sections:
            if s["node"] not in nodes or s["node"] not in defs or s["node"] not in object_info:
                continue
            s["generated"] = generated_part(s["node"], lang, object_info)
            if not s["written"].strip():
                problems.append(f"{rel}: {s['node']} has no hand-written part (a typical graph, the limits)")
            if lang == "en":
                s["fp"] = None
            else:
                want = fingerprint(english[s["node"]]) if english and s["node"] in english else None
                if lang in stamp:
                    s["fp"] = want
                elif s["fp"] != want:
                    problems.append(f"{rel}: {s['node']} was translated from another English text "
                                    f"({s['fp']} != {want}): translate the section again, then "
                                    f"'bash scripts/lab.sh bench help-pages --translated {lang}'")
            for page_lang_path in ([WEB_DOCS / s["node"] / f"{lang}.md"]
                                   + ([WEB_DOCS / f"{s['node']}.md"] if lang == "en" else [])):
                texts[page_lang_path] = page(s, source, pictures)
        texts[source] = render_source(preamble, sections, tail)
        if lang == "en":
            english = {s["node"]: s["written"] for s in sections}
    for name, src in pictures.items():
        if not src.is_file():
            problems.append(f"a picture that does not exist: {src.relative_to(ROOT)}")
    return texts, pictures, problems


def stale(texts: dict, pictures: dict) -> list[str]:
    """What on disk differs from what :func:`build` made (pictures: by size, pixels compared by
    the test)."""
    out = []
    for path, text in texts.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(f"{path.relative_to(ROOT)} is not current")
    made = {p for p in texts if p.is_relative_to(WEB_DOCS)} | {WEB_DOCS / "images" / n for n in pictures}
    for p in sorted(WEB_DOCS.rglob("*")) if WEB_DOCS.is_dir() else []:
        if p.is_file() and p not in made:
            out.append(f"{p.relative_to(ROOT)} is not made by the generator (remove it)")
    for name in pictures:
        if not (WEB_DOCS / "images" / name).is_file():
            out.append(f"web/docs/images/{name} is missing")
    return out


def write(texts: dict, pictures: dict) -> list[Path]:
    written = []
    made = set(texts) | {WEB_DOCS / "images" / n for n in pictures}
    for p in sorted(WEB_DOCS.rglob("*"), reverse=True) if WEB_DOCS.is_dir() else []:
        if p.is_file() and p not in made:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    for path, text in texts.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    for name, src in pictures.items():
        dest = WEB_DOCS / "images" / name
        data, _ = picture_bytes(src)
        if not dest.is_file() or dest.read_bytes() != data:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            written.append(dest)
    return written


def add_arguments(p) -> None:
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything is stale")
    p.add_argument("--translated", nargs="*", default=[], choices=[lang for lang in LANGUAGES if lang != "en"],
                   help="record that these languages' sections were translated from the current English")


def run(args) -> dict:
    from . import locales
    texts, pictures, problems = build(locales.server_object_info(), stamp=tuple(args.translated))
    if args.check:
        problems += stale(texts, pictures)
        written = []
    else:
        written = [str(p.relative_to(ROOT)) for p in write(texts, pictures)] if not problems else []
    for line in problems:
        print(f"[help-pages] {line}")
    print(f"[help-pages] {len(written)} file(s) written; {len(problems)} problem(s)")
    return {"written": written, "problems": problems, "ok": not problems}

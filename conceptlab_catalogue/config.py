"""A catalogue job's settings (a TOML or JSON file, or a dict) and its subjects (a folder or CSV).

Every relative path in the file is relative to the file's own folder. Unknown keys are refused
with the list of known ones, so a typo never silently runs a 500-subject job with defaults.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
#: files in a subject folder that are not photos
SUBJECT_FILES = {"class.txt", "word.txt", "seed_search", "seed_search.txt", "thumbs.db", "desktop.ini"}
ERR = "[ConceptLab Catalogue]"


class ConfigError(ValueError):
    """A job file or catalogue the job cannot run; the message names the problem and the fix."""


def _err(problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{ERR} {problem} Fix: {fix}")


# ----------------------------------------------------------------------------------------------
# the job file
# ----------------------------------------------------------------------------------------------
TOP_KEYS = {"name", "subjects", "output", "class_prompt", "min_photos", "max_attempts", "workflow",
            "model", "extract", "render", "seed_search", "check", "ray", "servers", "server_wait"}
RENDER_KEYS = {"scenes", "negative", "width", "height", "steps", "cfg", "sampler", "scheduler",
               "seed", "strength", "seed_search", "photo_size"}
CHECK_KEYS = {"threshold", "threshold_mode", "refine", "min_coverage", "subject", "background_tolerance"}
MODEL_KEYS = {"demo", "checkpoint", "clip_vision"}
RAY_KEYS = {"address", "namespace", "num_cpus"}
SERVER_KEYS = {"url", "concept_dir", "start", "python", "args", "env", "gpus", "count", "port", "node"}
CHECK_SUBJECT_MODES = ("foreground", "mask")


@dataclass
class ServerSpec:
    """One ComfyUI server: ``url`` (one the user runs) or ``start`` (a ComfyUI folder the job
    starts a server from, on a GPU of its own when ``gpus`` is 1)."""
    url: str = ""
    start: str = ""
    python: str = ""
    args: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    gpus: float = -1             # -1: one GPU for a started server where Ray has GPUs, else none
    port: int = 0
    concept_dir: str = ""        # where this server's Concept Neurons Save writes, as the actor sees it
    node: str = ""               # Ray node IP the actor must run on (for concept_dir)
    label: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class JobConfig:
    name: str
    path: Path                      # the job file (or the folder relative paths resolve against)
    subjects_source: Path
    output: Path
    class_prompt: str = ""
    min_photos: int = 3
    max_attempts: int = 3
    server_wait: float = 600.0
    workflow: Path | None = None
    model: dict = field(default_factory=lambda: {"demo": "digits-unet"})
    extract: dict = field(default_factory=dict)
    render: dict = field(default_factory=dict)
    seed_search: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    ray: dict = field(default_factory=dict)
    servers: list = field(default_factory=list)

    @property
    def scenes(self) -> list:
        return list(self.render.get("scenes") or ["{class}"])

    def check_setting(self, key: str):
        defaults = {"threshold": 0.5, "threshold_mode": "fixed", "refine": "crf", "min_coverage": 0.5,
                    "subject": "foreground", "background_tolerance": 0.12}
        return self.check.get(key, defaults[key])

    def pipeline_signature(self) -> str:
        """What every subject's outputs depend on besides its own inputs (the check is computed
        by the job, so it is not part of it)."""
        blob = {"model": self.model, "extract": self.extract, "render": self.render,
                "seed_search": self.seed_search, "refine": self.check_setting("refine"),
                "threshold": self.check_setting("threshold"),
                "threshold_mode": self.check_setting("threshold_mode"), "name": self.name,
                "workflow": _file_hash(self.workflow) if self.workflow else None}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_file(path: Path) -> dict:
    text = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise _err(f"{path} is not valid JSON ({e}).", "Correct the file.") from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise _err(f"Reading {path} needs Python 3.11 or the 'tomli' package.",
                       "pip install tomli, or write the job file as JSON (same keys).") from None
    try:
        return tomllib.loads(text.decode())
    except tomllib.TOMLDecodeError as e:
        raise _err(f"{path} is not valid TOML ({e}).", "Correct the file.") from None


def _unknown(section: str, got: dict, known: set) -> None:
    bad = sorted(set(got) - known)
    if bad:
        raise _err(f"Unknown key(s) in {section}: {', '.join(bad)}.",
                   f"Use only: {', '.join(sorted(known))}.")


def _slug(name: str) -> str:
    s = re.sub(r"[^\w\-.]+", "_", name.strip()).strip("._")
    return s or "subject"


def load_config(source, base: Path | None = None) -> JobConfig:
    """A :class:`JobConfig` from a job file path (TOML or JSON) or a dict (relative paths then
    resolve against ``base``, default the current folder)."""
    if isinstance(source, JobConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise _err(f"The job file {path} does not exist.", "Pass the path of your catalogue's .toml file.")
        raw, folder = _read_file(path), path.parent
    elif isinstance(source, dict):
        raw, folder = dict(source), Path(base or os.getcwd()).resolve()
        path = folder / "job"
    else:
        raise TypeError(f"load_config takes a path or a dict, not {type(source).__name__}")
    _unknown("the job file", raw, TOP_KEYS)

    def rel(p) -> Path:
        return (folder / Path(str(p)).expanduser()).resolve()

    if not raw.get("subjects"):
        raise _err("The job file names no subjects.",
                   "Add subjects = \"<folder of subject folders>\" or \"<file>.csv\".")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[\w\-.]+", name):
        raise _err(f"The job name '{name}' is used in file names on the servers and may hold only "
                   "letters, digits, '-', '_' and '.'.", "Rename it, e.g. name = \"spring-catalogue\".")
    cfg = JobConfig(name=name, path=path, subjects_source=rel(raw["subjects"]),
                    output=rel(raw.get("output") or f"{name}_output"),
                    class_prompt=str(raw.get("class_prompt", "")),
                    min_photos=int(raw.get("min_photos", 3)), max_attempts=int(raw.get("max_attempts", 3)),
                    server_wait=float(raw.get("server_wait", 600)),
                    workflow=rel(raw["workflow"]) if raw.get("workflow") else None)
    for key, known in (("model", MODEL_KEYS), ("render", RENDER_KEYS), ("check", CHECK_KEYS), ("ray", RAY_KEYS)):
        section = raw.get(key) or {}
        if not isinstance(section, dict):
            raise _err(f"'{key}' must be a table of settings.", f"Write it as [{key}] with key = value lines.")
        _unknown(f"[{key}]", section, known)
        setattr(cfg, key, dict(section))
    cfg.model = cfg.model or {"demo": "digits-unet"}
    if bool(cfg.model.get("demo")) == bool(cfg.model.get("checkpoint")):
        raise _err("[model] needs exactly one of demo = \"digits-unet\" or checkpoint = \"<file in "
                   "models/checkpoints>\".", "Set one of them.")
    cfg.extract = dict(raw.get("extract") or {})     # node input names, checked against the server
    cfg.seed_search = dict(raw.get("seed_search") or {})
    for scene in cfg.scenes:
        if "{class}" not in scene and "{word}" not in scene:
            raise _err(f"The scene prompt '{scene}' does not contain {{class}} or {{word}}: the "
                       "concept is drawn by its class prompt, and the saliency check needs the word.",
                       "Write scenes like \"{class} on a beach\".")
    mode = cfg.check_setting("subject")
    if mode not in CHECK_SUBJECT_MODES:
        raise _err(f"[check] subject = '{mode}' is not known.", f"Use one of: {', '.join(CHECK_SUBJECT_MODES)}.")
    if cfg.workflow is not None and not cfg.workflow.is_file():
        raise _err(f"The workflow file {cfg.workflow} does not exist.", "Fix the path, or remove 'workflow'.")
    cfg.servers = parse_servers(raw.get("servers") or [], rel)
    return cfg


def parse_servers(entries: list, rel=lambda p: Path(p).resolve()) -> list:
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"url": e}
        _unknown(f"server {i + 1}", e, SERVER_KEYS)
        if bool(e.get("url")) == bool(e.get("start")):
            raise _err(f"Server {i + 1} needs exactly one of url = \"http://host:8188\" (a server you run) "
                       "or start = \"<ComfyUI folder>\" (the job starts one).", "Set one of them.")
        for n in range(int(e.get("count", 1))):
            spec = ServerSpec(url=str(e.get("url", "")).rstrip("/"), start=str(rel(e["start"])) if e.get("start") else "",
                              python=str(e.get("python", "")), args=[str(a) for a in e.get("args", [])],
                              env={str(k): str(v) for k, v in (e.get("env") or {}).items()},
                              gpus=float(e.get("gpus", -1)), port=int(e.get("port", 0)) + (n if e.get("port") else 0),
                              concept_dir=str(rel(e["concept_dir"])) if e.get("concept_dir") else "",
                              node=str(e.get("node", "")))
            spec.label = spec.url or f"start:{Path(spec.start).name}#{len(out) + 1}"
            out.append(spec)
    return out


# ----------------------------------------------------------------------------------------------
# subjects
# ----------------------------------------------------------------------------------------------
@dataclass
class Subject:
    name: str
    class_prompt: str
    photos: list                      # Paths
    word: str = ""
    seed_search: bool | None = None   # None: the job's render.seed_search
    problems: list = field(default_factory=list)   # found before any server is asked

    @property
    def slug(self) -> str:
        return _slug(self.name)

    def subject_word(self) -> str:
        if self.word:
            return self.word
        words = re.findall(r"[\w\-]+", self.class_prompt)
        return words[-1] if words else ""


def _truthy(v) -> bool | None:
    if v is None or str(v).strip() == "":
        return None
    return str(v).strip().lower() in ("1", "true", "yes", "y", "on")


def _folder_photos(folder: Path) -> list:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.lower() not in SUBJECT_FILES)


def load_subjects(cfg: JobConfig) -> list:
    """The catalogue's subjects, in order, each with the problems found in its photos."""
    src = cfg.subjects_source
    if src.is_dir():
        subjects = []
        for d in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
            cls_file, word_file = d / "class.txt", d / "word.txt"
            ss = next((d / n for n in ("seed_search", "seed_search.txt") if (d / n).exists()), None)
            subjects.append(Subject(
                name=d.name,
                class_prompt=cls_file.read_text().strip() if cls_file.is_file() else cfg.class_prompt,
                photos=_folder_photos(d), word=word_file.read_text().strip() if word_file.is_file() else "",
                seed_search=(_truthy(ss.read_text()) if ss.read_text().strip() else True) if ss else None))
    elif src.is_file() and src.suffix.lower() == ".csv":
        subjects = _csv_subjects(cfg, src)
    else:
        raise _err(f"The subjects source {src} is neither a folder nor a .csv file.",
                   "Point 'subjects' at a folder with one sub-folder of photos per subject, or a CSV "
                   "with columns name, class_prompt, photos.")
    if not subjects:
        raise _err(f"{src} holds no subjects.", "Add one sub-folder (or CSV row) per subject.")
    seen = {}
    for s in subjects:
        if s.slug in seen:
            raise _err(f"Subjects '{seen[s.slug]}' and '{s.name}' share the file name '{s.slug}'.",
                       "Give every subject a distinct name.")
        seen[s.slug] = s.name
        check_photos(cfg, s)
    return subjects


def _csv_subjects(cfg: JobConfig, src: Path) -> list:
    with open(src, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    need = {"name", "photos"}
    cols = set(rows[0]) if rows else set()
    if rows and not need <= cols:
        raise _err(f"{src} lacks the column(s) {', '.join(sorted(need - cols))}.",
                   "Use a header row: name,class_prompt,photos[,word][,seed_search].")
    subjects = []
    for r in rows:
        spec = (r.get("photos") or "").strip()
        p = (src.parent / spec).resolve() if spec else None
        if p is not None and p.is_dir():
            photos = _folder_photos(p)
        else:
            photos = [(src.parent / x.strip()).resolve() for x in spec.split(";") if x.strip()]
        subjects.append(Subject(name=(r.get("name") or "").strip(), photos=photos,
                                class_prompt=(r.get("class_prompt") or cfg.class_prompt).strip(),
                                word=(r.get("word") or "").strip(), seed_search=_truthy(r.get("seed_search"))))
    return subjects


def check_photos(cfg: JobConfig, s: Subject) -> None:
    """What the job can tell about a subject before a server sees it: a name, a class prompt,
    enough photos, and that each is an image. Everything else (sizes, more than 10 photos) is
    for Concept Neurons Extract, whose own error is recorded."""
    if not s.name:
        s.problems.append(f"{ERR} A subject has no name. Fix: fill the 'name' column.")
    if not s.class_prompt.strip():
        s.problems.append(f"{ERR} Subject '{s.name}' has no class prompt. Fix: write its class "
                          "('a dog') in class.txt, the CSV's class_prompt column, or the job's class_prompt.")
    if len(s.photos) < cfg.min_photos:
        s.problems.append(f"{ERR} Subject '{s.name}' has {len(s.photos)} photo(s); Concept Neurons "
                          f"Extract needs at least {cfg.min_photos} (3 to 10 different views work best). "
                          "Fix: add photos of the subject.")
    from PIL import Image
    for p in s.photos:
        try:
            with Image.open(p) as im:
                im.verify()
        except FileNotFoundError:
            s.problems.append(f"{ERR} Subject '{s.name}': the photo {p} does not exist. Fix: correct the path.")
        except Exception as e:  # noqa: BLE001  (PIL raises many kinds)
            s.problems.append(f"{ERR} Subject '{s.name}': '{p.name}' is not an image ({type(e).__name__}). "
                              "Fix: replace it with a PNG, JPEG or WebP photo, or remove it.")


def subject_fingerprint(cfg: JobConfig, s: Subject) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([s.class_prompt, s.subject_word(), s.seed_search, cfg.pipeline_signature()]).encode())
    for p in s.photos:
        try:
            h.update(hashlib.sha256(Path(p).read_bytes()).digest())
        except OSError:
            h.update(b"missing:" + str(p).encode())
    return h.hexdigest()

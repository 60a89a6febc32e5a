"""The graph each subject runs: the pack's example workflows filled in for the subject, or the
user's own workflow with marked inputs.

Built in (``build_subject``): the nodes and default widget values of

* ``concept_extract_then_save``  - the photos, Concept Neurons Extract, Save and Info;
* ``concept_load_apply_sample``  - Concept Neurons Apply, the prompts, the empty latent, KSampler,
  VAE Decode, Save Image (the concept comes straight from Extract: the same concept Save wrote);
* ``seed_select_then_custom_advanced`` - for subjects that ask for it, Seed Search with the
  subject's photos as references, then SamplerCustomAdvanced;
* ``saliency_unet_heatmaps``     - Saliency Capture on the subject's word, Saliency Maps, Mask To
  Image, so the job can check where the word landed.

Your own workflow (``workflow = "file.json"``, saved from ComfyUI in either format): give the
node that loads the subject's pictures the title ``catalogue:photos`` (it is replaced by the
subject's uploaded photos); write ``{subject}``, ``{class}``, ``{word}`` or ``{job}`` in any text
input; title the Save Image of each rendered image ``catalogue:image <n>`` and the Save Image of
its mask (Mask To Image) ``catalogue:mask <n>`` for the saliency check. Concept Neurons Save
nodes are collected as the subject's concept.

Marks travel in each node's ``_meta.title``; :func:`marks_of` reads them back, so both kinds of
graph are collected and checked by the same code.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

from .config import ERR, ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"
TEMPLATES = ("concept_extract_then_save", "concept_load_apply_sample", "seed_select_then_custom_advanced",
             "saliency_unet_heatmaps")
PHOTOS_MARK = "catalogue:photos"
_PASSIVE = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


# ----------------------------------------------------------------------------------------------
# saved UI workflow (LiteGraph) -> API prompt
# ----------------------------------------------------------------------------------------------
def is_api_format(wf: dict) -> bool:
    return bool(wf) and "nodes" not in wf and all(isinstance(v, dict) and "class_type" in v for v in wf.values())


def _input_names(info: dict) -> list:
    """A node's input names with their specs, in the order the front end lays out widgets."""
    spec, order = info.get("input", {}), info.get("input_order") or {}
    names = []
    for section in ("required", "optional"):
        for n in order.get(section) or list(spec.get(section, {})):
            names.append((n, spec.get(section, {}).get(n) or [None]))
    return names


def _has_widget(spec) -> bool:
    kind = spec[0] if spec else None
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) \
        and not opts.get("forceInput")


def _follows_control(name: str, spec, values: list) -> bool:
    """Whether the front end stored a 'control after generate' entry after this INT widget."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    seedlike = spec[0] == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate"))
    return bool(seedlike and values and values[0] in _CONTROL_VALUES)


def ui_to_api(wf: dict, object_info: dict) -> dict:
    """The API prompt ComfyUI's front end would queue for the saved workflow ``wf``: widget values
    matched to the inputs in the node's input order, links resolved through reroutes, titles kept
    in ``_meta``."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: (l[1], l[2]) for l in wf.get("links", [])}

    def origin(link_id):
        src, slot = links[link_id]
        while nodes.get(src, {}).get("type") == "Reroute":
            inp = (nodes[src].get("inputs") or [{}])[0]
            if inp.get("link") is None:
                return None
            src, slot = links[inp["link"]]
        return src, slot

    prompt = {}
    for node in wf["nodes"]:
        kind = node["type"]
        if kind in _PASSIVE or node.get("mode", 0) in (2, 4):     # notes, reroutes; muted, bypassed
            continue
        if kind not in object_info:
            raise ConfigError(f"{ERR} The workflow uses the node '{kind}' (node {node['id']}), which the "
                              "server does not have. Fix: install that node pack on every server, or "
                              "replace the node.")
        values = list(node.get("widgets_values") or []) if isinstance(node.get("widgets_values"), list) else []
        linked, socketed = {}, set()
        for inp in node.get("inputs") or []:
            if inp.get("widget"):
                socketed.add(inp["name"])   # a widget with a socket: its value is still stored
            if inp.get("link") is None:
                continue
            o = origin(inp["link"])
            if o is None or nodes.get(o[0], {}).get("type") == "PrimitiveNode":
                continue          # a widget fed by a primitive keeps its own stored value
            linked[inp["name"]] = [str(o[0]), o[1]]
        inputs = {}
        for name, spec in _input_names(object_info[kind]):
            stored = _has_widget(spec) and bool(values) and (name not in linked or name in socketed)
            value = values.pop(0) if stored else None
            if stored and _follows_control(name, spec, values):
                values.pop(0)
            if name in linked:
                inputs[name] = linked[name]
            elif stored:
                inputs[name] = value
        entry = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def load_workflow(path: Path, object_info: dict) -> dict:
    wf = json.loads(Path(path).read_text())
    return copy.deepcopy(wf) if is_api_format(wf) else ui_to_api(wf, object_info)


def required_types(workflow: dict | None = None) -> set:
    """The node types the built-in graph (or a loaded UI workflow) needs from a server."""
    types = set()
    for name in TEMPLATES:
        types |= {n["type"] for n in json.loads((EXAMPLES / f"{name}.json").read_text())["nodes"]}
    types |= {"LoadImage", "ImageBatch", "ImageScale", "CheckpointLoaderSimple", "CLIPVisionLoader"}
    if workflow is not None:
        types |= {n["type"] for n in workflow.get("nodes", [])} if "nodes" in workflow else \
                 {v["class_type"] for v in workflow.values()}
    return types - _PASSIVE


# ----------------------------------------------------------------------------------------------
# building graphs
# ----------------------------------------------------------------------------------------------
class Templates:
    """The example workflows as API prompts: each node's widget values are the defaults."""

    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.api = {name: ui_to_api(json.loads((EXAMPLES / f"{name}.json").read_text()), object_info)
                    for name in TEMPLATES}

    def values(self, example: str, class_type: str) -> dict:
        """The widget values of the first ``class_type`` node of ``example`` (links left out)."""
        for node in self.api[example].values():
            if node["class_type"] == class_type:
                return {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        raise KeyError(f"{class_type} is not in example_workflows/{example}.json")

    def check_inputs(self, class_type: str, given: dict, section: str) -> None:
        known = {n for n, _ in _input_names(self.object_info[class_type])}
        bad = sorted(set(given) - known)
        if bad:
            raise ConfigError(f"{ERR} [{section}] has setting(s) {', '.join(bad)} that {class_type} does not "
                              f"take. Fix: use its input names: {', '.join(sorted(known))}.")


class Graph:
    """An API prompt under construction; node ids are numbers in insertion order."""

    def __init__(self, nodes: dict | None = None):
        self.nodes = nodes or {}
        self._next = 1 + max((int(k) for k in self.nodes if str(k).isdigit()), default=0)

    def add(self, class_type: str, inputs: dict, title: str | None = None) -> str:
        nid = str(self._next)
        self._next += 1
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        if title:
            self.nodes[nid]["_meta"] = {"title": title}
        return nid


def upload_name(data: bytes, original: str) -> str:
    """Photos are uploaded under their content's hash: the same photo, the same name on every
    server and every attempt (the name is part of the prompt saved in each output PNG)."""
    suffix = Path(original).suffix.lower() or ".png"
    return hashlib.sha256(data).hexdigest()[:20] + suffix


def upload_folder(job: str, subject_slug: str) -> str:
    return f"catalogue/{job}/{subject_slug}"


def photo_batch(g: Graph, names: list, size=None) -> list:
    """Load Image per uploaded photo (optionally Image Scale to ``size`` = [w, h], centre crop),
    joined by Image Batch (which resizes later photos to the first one's size)."""
    outs = []
    for name in names:
        out = [g.add("LoadImage", {"image": name}), 0]
        if size:
            out = [g.add("ImageScale", {"image": out, "upscale_method": "lanczos", "width": int(size[0]),
                                        "height": int(size[1]), "crop": "center"}), 0]
        outs.append(out)
    batch = outs[0]
    for o in outs[1:]:
        batch = [g.add("ImageBatch", {"image1": batch, "image2": o}), 0]
    return batch


def fill_text(text: str, values: dict) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


def build_subject(t: Templates, cfg, subject, photo_names: list) -> dict:
    """The built-in graph for one subject (see the module doc)."""
    g = Graph()
    r = cfg.render
    prefix = f"catalogue/{cfg.name}/{subject.slug}"
    if cfg.model.get("demo"):
        loader = g.add("ConceptLabLoadDemoModel", {"demo_model": cfg.model["demo"]})
    else:
        loader = g.add("CheckpointLoaderSimple", {"ckpt_name": cfg.model["checkpoint"]})
    model, clip, vae = [loader, 0], [loader, 1], [loader, 2]
    photos = photo_batch(g, photo_names, r.get("photo_size"))
    ex_name = "ConceptLabConceptNeuronsExtract"
    t.check_inputs(ex_name, cfg.extract, "extract")
    extract = g.add(ex_name, {**t.values("concept_extract_then_save", ex_name), **cfg.extract,
                              "model": model, "clip": clip, "vae": vae, "images": photos,
                              "class_prompt": subject.class_prompt})
    concept = [extract, 0]
    g.add("ConceptLabConceptNeuronsSave", {"concept": concept, "filename_prefix": prefix}, "catalogue:concept")
    g.add("ConceptLabConceptNeuronsInfo", {"concept": concept}, "catalogue:concept_info")
    apply = t.values("concept_load_apply_sample", "ConceptLabConceptNeuronsApply")
    applied = [g.add("ConceptLabConceptNeuronsApply", {**apply, "model": model, "concept": concept,
                                                       "strength": float(r.get("strength", apply.get("strength", 1.0)))}), 0]
    ks = t.values("concept_load_apply_sample", "KSampler")
    lat = t.values("concept_load_apply_sample", "EmptyLatentImage")
    steps, cfg_scale = int(r.get("steps", ks["steps"])), float(r.get("cfg", ks["cfg"]))
    sampler, scheduler = r.get("sampler", ks["sampler_name"]), r.get("scheduler", ks["scheduler"])
    seed0 = int(r.get("seed", ks["seed"]))
    word = subject.subject_word()
    fill = {"class": subject.class_prompt, "word": word, "subject": subject.name, "job": cfg.name}
    search = subject.seed_search if subject.seed_search is not None else bool(r.get("seed_search", False))
    ss_name = "ConceptLabSeedSearch"
    if search:
        t.check_inputs(ss_name, cfg.seed_search, "seed_search")
        if cfg.model.get("clip_vision") == "demo":
            clip_vision = [g.add("ConceptLabLoadDemoCLIPVision", {}), 0]
        elif cfg.model.get("clip_vision"):
            clip_vision = [g.add("CLIPVisionLoader", {"clip_name": cfg.model["clip_vision"]}), 0]
        else:
            clip_vision = None
    for k, scene in enumerate(cfg.scenes, 1):
        text = fill_text(scene, fill)
        cap = g.add("ConceptLabSaliencyCapture", {**t.values("saliency_unet_heatmaps", "ConceptLabSaliencyCapture"),
                                                  "model": applied, "clip": clip, "prompt": text, "concepts": word})
        pos = [g.add("CLIPTextEncode", {"text": text, "clip": clip}), 0]
        neg = [g.add("CLIPTextEncode", {"text": fill_text(str(r.get("negative", "")), fill), "clip": clip}), 0]
        latent = [g.add("EmptyLatentImage", {**lat, "width": int(r.get("width", lat["width"])),
                                             "height": int(r.get("height", lat["height"])), "batch_size": 1}), 0]
        seed = seed0 + k - 1
        if search:
            ss = {**t.values("seed_select_then_custom_advanced", ss_name), **cfg.seed_search,
                  "model": applied, "vae": vae, "positive": pos, "negative": neg, "latent": latent,
                  "references": photos, "seed": seed, "cfg": cfg_scale}
            if clip_vision is not None:
                ss["clip_vision"] = clip_vision
            found = g.add(ss_name, ss)
            g.add("SaveImage", {"images": [found, 2], "filename_prefix": f"{prefix}/scene{k}_loss"}, f"catalogue:loss {k}")
            guider = g.add("CFGGuider", {"model": [cap, 0], "positive": pos, "negative": neg, "cfg": cfg_scale})
            pick = g.add("KSamplerSelect", {"sampler_name": sampler})
            sigmas = g.add("BasicScheduler", {"model": applied, "scheduler": scheduler, "steps": steps, "denoise": 1.0})
            samples = [g.add("SamplerCustomAdvanced", {"noise": [found, 0], "guider": [guider, 0], "sampler": [pick, 0],
                                                       "sigmas": [sigmas, 0], "latent_image": latent}), 0]
        else:
            samples = [g.add("KSampler", {**ks, "model": [cap, 0], "seed": seed, "steps": steps, "cfg": cfg_scale,
                                          "sampler_name": sampler, "scheduler": scheduler, "positive": pos,
                                          "negative": neg, "latent_image": latent}), 0]
        image = [g.add("VAEDecode", {"samples": samples, "vae": vae}), 0]
        g.add("SaveImage", {"images": image, "filename_prefix": f"{prefix}/scene{k}"}, f"catalogue:image {k}")
        maps = g.add("ConceptLabSaliencyMaps", {**t.values("saliency_unet_heatmaps", "ConceptLabSaliencyMaps"),
                                                "recording": [cap, 1], "images": image,
                                                "threshold_mode": cfg.check_setting("threshold_mode"),
                                                "threshold": float(cfg.check_setting("threshold")),
                                                "refine": cfg.check_setting("refine")})
        as_image = g.add("MaskToImage", {"mask": [maps, 2]})
        g.add("SaveImage", {"images": [as_image, 0], "filename_prefix": f"{prefix}/scene{k}_mask"}, f"catalogue:mask {k}")
    return g.nodes


def build_custom(workflow: dict, cfg, subject, photo_names: list) -> dict:
    """The user's workflow (API form) for one subject: the ``catalogue:photos`` node replaced by
    the photos, placeholders filled in."""
    g = Graph(copy.deepcopy(workflow))
    marked = [nid for nid, n in g.nodes.items() if _title(n).lower() == PHOTOS_MARK]
    if len(marked) != 1:
        raise ConfigError(f"{ERR} The workflow has {len(marked)} node(s) titled '{PHOTOS_MARK}'; it needs "
                          "exactly one: the node whose IMAGE output stands for the subject's photos. "
                          "Fix: set that node's title (right-click > Title) and save the workflow again.")
    old = marked[0]
    del g.nodes[old]
    batch = photo_batch(g, photo_names, cfg.render.get("photo_size"))
    fill = {"class": subject.class_prompt, "word": subject.subject_word(), "subject": subject.name, "job": cfg.name}
    for node in g.nodes.values():
        for k, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and str(v[0]) == old:
                node["inputs"][k] = batch
            elif isinstance(v, str):
                node["inputs"][k] = fill_text(v, fill)
    return g.nodes


def _title(node: dict) -> str:
    return ((node.get("_meta") or {}).get("title") or "").strip()


def marks_of(prompt: dict) -> dict:
    """{node id: (role, n)}: role is concept, concept_info, image, mask or loss."""
    out = {}
    for nid, node in prompt.items():
        title = _title(node).lower()
        m = re.fullmatch(r"catalogue:(image|mask|loss)\s*(\d*)", title)
        if m:
            out[nid] = (m.group(1), int(m.group(2) or 1))
        elif title == "catalogue:concept" or node["class_type"] == "ConceptLabConceptNeuronsSave":
            out[nid] = ("concept", 0)
        elif title == "catalogue:concept_info" or node["class_type"] == "ConceptLabConceptNeuronsInfo":
            out[nid] = ("concept_info", 0)
    if not any(r == "image" for r, _ in out.values()):     # a custom workflow without marks
        n = 0
        for nid, node in prompt.items():
            if node["class_type"] == "SaveImage" and nid not in out:
                n += 1
                out[nid] = ("image", n)
    return out

"""The pack's subgraph blueprints (``subgraphs/*.json``), written from the specifications below.

ComfyUI serves every custom-node pack's ``subgraphs/*.json`` at ``/global_subgraphs``
(``app/subgraph_manager.py``, ComfyUI 0.3.75 and 0.33), and the front end lists each file as one
node under *Subgraph Blueprints* (its file name is the node's name; 1.48 and newer file it under
``Subgraph Blueprints/<category>``). Adding one puts a subgraph node on the canvas: the inner graph
below, its open ends as the subgraph node's inputs (MODEL, CLIP, VAE, ... from the user's own
loaders) and a few of the inner widgets shown on the subgraph node itself (the prompt, the word, the
seed, the size).

A blueprint is a workflow whose one node is an instance of the subgraph it defines (the format of
ComfyUI 0.33's own ``blueprints/`` folder). Widgets are shown on the subgraph node the way every
supported front end (1.32.9, 1.48.7, 1.58.1) reads: a subgraph input linked to the inner nodes'
widget inputs; one input may feed several widgets (the blueprint's prompt is the positive prompt
and the text Saliency Capture reads its tokens from, so the two cannot drift apart).

    bash scripts/lab.sh bench blueprints           # write subgraphs/*.json
    bash scripts/lab.sh bench blueprints --check   # exit 1 if a file is not what this writes

tests/e2e/test_blueprints.py checks the files are current, that the front end lists them, and runs
each one from the page on the demo models.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "subgraphs"
CATEGORY = "Concept Lab"
IN_NODE, OUT_NODE = -10, -20      # the subgraph's input and output nodes, as link ends
_NS = uuid.UUID("6f1c3d3e-8a51-4c7e-9a0e-3c2b1f0a7d21")   # stable ids: uuid5 of names


# Each inner node's widget inputs, in the order the front end lists them after its sockets: a link
# into a widget input is saved by its slot index, and front end 1.32 reads that index before it
# matches inputs by name, so every widget input is saved, in this order.
WIDGETS = {
    "CLIPTextEncode": ["text:STRING"],
    "EmptyLatentImage": ["width:INT", "height:INT", "batch_size:INT"],
    "KSampler": ["seed:INT", "steps:INT", "cfg:FLOAT", "sampler_name:COMBO", "scheduler:COMBO", "denoise:FLOAT"],
    "VAEDecode": [],
    "CFGGuider": ["cfg:FLOAT"],
    "KSamplerSelect": ["sampler_name:COMBO"],
    "BasicScheduler": ["scheduler:COMBO", "steps:INT", "denoise:FLOAT"],
    "SamplerCustomAdvanced": [],
    "ConceptLabSaliencyCapture": ["prompt:STRING", "concepts:STRING", "method:COMBO", "layers:STRING",
                                  "start_percent:FLOAT", "end_percent:FLOAT"],
    "ConceptLabSaliencyMaps": ["threshold_mode:COMBO", "threshold:FLOAT", "blur:BOOLEAN", "refine:COMBO"],
    "ConceptLabMaskFromConcept": ["concept:STRING", "threshold_mode:COMBO", "threshold:FLOAT", "grow:INT",
                                  "refine:COMBO"],
    "ConceptLabSeedSearch": ["seed:INT", "cfg:FLOAT", "iterations:INT", "search_steps:INT", "learning_rate:FLOAT",
                             "lr_drop_after:INT", "norm_regulariser:BOOLEAN", "norm_weight:FLOAT",
                             "semantic_steps:INT", "semantic_weight:FLOAT", "appearance_weight:FLOAT",
                             "appearance_target:COMBO", "memory:COMBO"],
    "ConceptLabConceptNeuronsLoad": ["concept_file:COMBO"],
    "ConceptLabConceptNeuronsApply": ["strength:FLOAT"],
}


@dataclass
class Node:
    id: int
    type: str
    widgets: list = field(default_factory=list)        # widgets_values, in the node's widget order
    sockets: list = field(default_factory=list)        # [(input name, type)] of its socket inputs
    outputs: list = field(default_factory=list)        # [(output name, type)]
    title: str | None = None


@dataclass
class Blueprint:
    name: str                 # the file name, shown as the node's name
    description: str
    nodes: list               # [Node]
    links: list               # [(from node id, output slot, to node id, input name)]
    inputs: list              # [(name, type, label, [(node id, input name)], default or None)]
    outputs: list             # [(name, type, label, (node id, output slot))]


def _demo_sampling(start: int, model_from: tuple, prompt_default: str, seed: int, batch: int = 1) -> tuple:
    """CLIP Text Encode (positive, negative), Empty Latent Image, KSampler, VAE Decode: nodes and
    links, from ``start`` on; the KSampler's model comes from ``model_from`` (node id, slot)."""
    pos, neg, latent, sampler, decode = range(start, start + 5)
    nodes = [
        Node(pos, "CLIPTextEncode", [prompt_default], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")],
             "CLIP Text Encode (Prompt)"),
        Node(neg, "CLIPTextEncode", [""], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")],
             "CLIP Text Encode (Negative)"),
        Node(latent, "EmptyLatentImage", [64, 64, batch], [], [("LATENT", "LATENT")]),
        Node(sampler, "KSampler", [seed, "fixed", 20, 3.0, "euler", "normal", 1.0],
             [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
              ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
        Node(decode, "VAEDecode", [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    ]
    links = [(*model_from, sampler, "model"), (pos, 0, sampler, "positive"), (neg, 0, sampler, "negative"),
             (latent, 0, sampler, "latent_image"), (sampler, 0, decode, "samples")]
    return nodes, links


def _size_inputs(latent: int) -> list:
    return [("width", "INT", "width", [(latent, "width")], 64),
            ("height", "INT", "height", [(latent, "height")], 64)]


def blueprints() -> list[Blueprint]:
    # 1. a word's mask from a prompt: Saliency Capture -> sampler -> Saliency Maps -> Mask From Concept
    s_nodes, s_links = _demo_sampling(2, (1, 0), "a red seven on the left and a blue two on the right", 1234)
    word_mask = Blueprint(
        name="Word Mask from Prompt (Concept Lab)",
        description=("Samples the prompt with your model and returns the image, the mask of one word of the "
                     "prompt (where the model put it: DAAM on UNets, ConceptAttention or cross-attention on "
                     "DiTs, refined with the image) and the heat-map overlay. Connect your MODEL, CLIP and "
                     "VAE; the word must occur in the prompt."),
        nodes=[Node(1, "ConceptLabSaliencyCapture",
                    ["a red seven on the left and a blue two on the right", "seven", "auto", "auto", 0.0, 1.0],
                    [("model", "MODEL"), ("clip", "CLIP")], [("model", "MODEL"), ("recording", "SALIENCY_RECORDING")]),
               *s_nodes,
               Node(7, "ConceptLabSaliencyMaps", ["fixed", 0.5, False, "crf"],
                    [("recording", "SALIENCY_RECORDING"), ("images", "IMAGE")],
                    [("saliency", "SALIENCY"), ("overlay", "IMAGE"), ("masks", "MASK")]),
               Node(8, "ConceptLabMaskFromConcept", ["seven", "fixed", 0.5, 0, "as saliency maps"],
                    [("saliency", "SALIENCY")], [("mask", "MASK")])],
        links=[*s_links, (1, 1, 7, "recording"), (6, 0, 7, "images"), (7, 0, 8, "saliency")],
        inputs=[("model", "MODEL", None, [(1, "model")], None),
                ("clip", "CLIP", None, [(1, "clip"), (2, "clip"), (3, "clip")], None),
                ("vae", "VAE", None, [(6, "vae")], None),
                ("prompt", "STRING", "prompt", [(2, "text"), (1, "prompt")],
                 "a red seven on the left and a blue two on the right"),
                ("word", "STRING", "word", [(1, "concepts"), (8, "concept")], "seven"),
                ("seed", "INT", "seed", [(5, "seed")], 1234),
                *_size_inputs(4)],
        outputs=[("image", "IMAGE", "image", (6, 0)), ("mask", "MASK", "mask", (8, 0)),
                 ("overlay", "IMAGE", "overlay", (7, 1))],
    )

    # 2. a rare concept through Seed Search: its NOISE into SamplerCustomAdvanced
    pos, neg, latent, search, guider, select, sched, custom, decode = range(1, 10)
    rare = Blueprint(
        name="Rare Concept by Seed Search (Concept Lab)",
        description=("Draws a concept your model rarely draws: Seed Search optimises the starting noise "
                     "towards your reference pictures (SeedSelect), then SamplerCustomAdvanced samples it "
                     "with the same prompt and CFG. Connect your MODEL, CLIP, VAE, a CLIP_VISION and 1 to "
                     "10 reference pictures as one IMAGE batch."),
        nodes=[Node(pos, "CLIPTextEncode", ["an eight"], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")],
                    "CLIP Text Encode (Prompt)"),
               Node(neg, "CLIPTextEncode", [""], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")],
                    "CLIP Text Encode (Negative)"),
               Node(latent, "EmptyLatentImage", [64, 64, 1], [], [("LATENT", "LATENT")]),
               Node(search, "ConceptLabSeedSearch",
                    [0, "fixed", 3.0, 40, 10, 0.3, 100, True, 0.1, 1, 10.0, 1.0, "nearest"],
                    [("model", "MODEL"), ("vae", "VAE"), ("positive", "CONDITIONING"),
                     ("negative", "CONDITIONING"), ("latent", "LATENT"), ("references", "IMAGE"),
                     ("clip_vision", "CLIP_VISION"), ("references_2", "IMAGE"), ("references_3", "IMAGE")],
                    [("noise", "NOISE"), ("noise_latent", "LATENT"), ("loss_curve", "IMAGE")]),
               Node(guider, "CFGGuider", [3.0], [("model", "MODEL"), ("positive", "CONDITIONING"),
                                                 ("negative", "CONDITIONING")], [("GUIDER", "GUIDER")]),
               Node(select, "KSamplerSelect", ["euler"], [], [("SAMPLER", "SAMPLER")]),
               Node(sched, "BasicScheduler", ["normal", 20, 1.0], [("model", "MODEL")], [("SIGMAS", "SIGMAS")]),
               Node(custom, "SamplerCustomAdvanced", [],
                    [("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                     ("latent_image", "LATENT")], [("output", "LATENT"), ("denoised_output", "LATENT")]),
               Node(decode, "VAEDecode", [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")])],
        links=[(pos, 0, search, "positive"), (neg, 0, search, "negative"), (latent, 0, search, "latent"),
               (pos, 0, guider, "positive"), (neg, 0, guider, "negative"), (search, 0, custom, "noise"),
               (guider, 0, custom, "guider"), (select, 0, custom, "sampler"), (sched, 0, custom, "sigmas"),
               (latent, 0, custom, "latent_image"), (custom, 0, decode, "samples")],
        inputs=[("model", "MODEL", None, [(search, "model"), (guider, "model"), (sched, "model")], None),
                ("clip", "CLIP", None, [(pos, "clip"), (neg, "clip")], None),
                ("vae", "VAE", None, [(search, "vae"), (decode, "vae")], None),
                ("clip_vision", "CLIP_VISION", None, [(search, "clip_vision")], None),
                ("references", "IMAGE", None, [(search, "references")], None),
                ("prompt", "STRING", "prompt", [(pos, "text")], "an eight"),
                ("seed", "INT", "seed", [(search, "seed")], 0),
                ("iterations", "INT", "iterations", [(search, "iterations")], 40),
                *_size_inputs(latent)],
        outputs=[("image", "IMAGE", "image", (decode, 0)), ("loss_curve", "IMAGE", "loss_curve", (search, 2))],
    )

    # 3. a stored concept applied and sampled: Load -> Apply -> sampler
    c_nodes, c_links = _demo_sampling(3, (2, 0), "a three", 1234)
    stored = Blueprint(
        name="Stored Concept, Applied and Sampled (Concept Lab)",
        description=("Loads a concept from models/concept_neurons, applies it to your MODEL (a patched copy; "
                     "yours is unchanged) and samples the plain class prompt, e.g. 'a three', which then draws "
                     "the concept's subject. Connect the MODEL, CLIP and VAE the concept was extracted from."),
        nodes=[Node(1, "ConceptLabConceptNeuronsLoad", ["digits_unet_three_subject.safetensors"], [],
                    [("concept", "CONCEPT_NEURONS"), ("info", "STRING")]),
               Node(2, "ConceptLabConceptNeuronsApply", [1.0], [("model", "MODEL"), ("concept", "CONCEPT_NEURONS")],
                    [("MODEL", "MODEL")]),
               *c_nodes],
        links=[(1, 0, 2, "concept"), *c_links],
        inputs=[("model", "MODEL", None, [(2, "model")], None),
                ("clip", "CLIP", None, [(3, "clip"), (4, "clip")], None),
                ("vae", "VAE", None, [(7, "vae")], None),
                ("concept_file", "COMBO", "concept_file", [(1, "concept_file")],
                 "digits_unet_three_subject.safetensors"),
                ("strength", "FLOAT", "strength", [(2, "strength")], 1.0),
                ("prompt", "STRING", "prompt", [(3, "text")], "a three"),
                ("seed", "INT", "seed", [(6, "seed")], 1234),
                *_size_inputs(5)],
        outputs=[("image", "IMAGE", "image", (7, 0))],
    )
    return [word_mask, rare, stored]


# ------------------------------------------------------------------------------------------------
# the file format
# ------------------------------------------------------------------------------------------------
def _uid(*parts) -> str:
    return str(uuid.uuid5(_NS, "/".join(str(p) for p in parts)))


def to_json(bp: Blueprint) -> dict:
    """The blueprint as ComfyUI's front end saves one (workflow 0.4 with one subgraph definition)."""
    sg_id = _uid(bp.name)
    by_id = {n.id: n for n in bp.nodes}
    links, next_link = [], 1
    node_inputs = {n.id: [{"name": name, "type": typ, "link": None} for name, typ in n.sockets]
                   + [{"name": w.split(":")[0], "type": w.split(":")[1], "widget": {"name": w.split(":")[0]}, "link": None}
                      for w in WIDGETS[n.type]] for n in bp.nodes}
    node_outputs = {n.id: [{"name": name, "type": typ, "links": []} for name, typ in n.outputs] for n in bp.nodes}

    def connect(origin, slot, target, name, typ, widget=False):
        nonlocal next_link
        ins = node_inputs[target]
        entry = next((i for i in ins if i["name"] == name), None)
        if entry is None:
            raise ValueError(f"{bp.name}: {by_id[target].type} has no input {name!r} here (WIDGETS, sockets)")
        if entry["link"] is not None:
            raise ValueError(f"{bp.name}: {by_id[target].type}.{name} is linked twice")
        entry["link"] = next_link
        if origin != IN_NODE:
            node_outputs[origin][slot]["links"].append(next_link)
        links.append({"id": next_link, "origin_id": origin, "origin_slot": slot, "target_id": target,
                      "target_slot": ins.index(entry), "type": typ})
        next_link += 1
        return next_link - 1

    for origin, slot, target, name in bp.links:
        connect(origin, slot, target, name, by_id[origin].outputs[slot][1])
    sg_inputs, root_inputs, root_values = [], [], []
    for i, (name, typ, label, targets, default) in enumerate(bp.inputs):
        ids = [connect(IN_NODE, i, t, n, typ) for t, n in targets]
        sg_inputs.append({"id": _uid(bp.name, "in", name), "name": name, "type": typ, "linkIds": ids,
                          **({"label": label} if label else {}), "pos": [0, 20 * i]})
        entry = {"name": name, "type": typ, "link": None}
        if default is not None:      # a widget on the subgraph node
            entry["widget"] = {"name": name}
            root_values.append(default)
        root_inputs.append(entry)
    sg_outputs, root_outputs = [], []
    for i, (name, typ, label, (origin, slot)) in enumerate(bp.outputs):
        lid = next_link
        links.append({"id": lid, "origin_id": origin, "origin_slot": slot, "target_id": OUT_NODE,
                      "target_slot": i, "type": typ})
        node_outputs[origin][slot]["links"].append(lid)
        next_link += 1
        sg_outputs.append({"id": _uid(bp.name, "out", name), "name": name, "type": typ, "linkIds": [lid],
                           **({"label": label} if label else {}), "pos": [0, 20 * i]})
        root_outputs.append({"name": name, "type": typ, "links": None})
    nodes = []
    for order, n in enumerate(bp.nodes):
        col, row = order % 4, order // 4
        nodes.append({
            "id": n.id, "type": n.type, "pos": [300 * col, 320 * row], "size": [270, 200], "flags": {},
            "order": order, "mode": 0, "inputs": node_inputs[n.id],
            "outputs": [dict(o, links=o["links"] or None) for o in node_outputs[n.id]],
            "properties": {"Node name for S&R": n.type}, "widgets_values": list(n.widgets),
            **({"title": n.title} if n.title else {})})
    width = 300 * min(4, len(nodes))
    subgraph = {
        "id": sg_id, "version": 1,
        "state": {"lastGroupId": 0, "lastNodeId": max(by_id), "lastLinkId": next_link - 1, "lastRerouteId": 0},
        "revision": 0, "config": {}, "name": bp.name,
        "inputNode": {"id": IN_NODE, "bounding": [-220, 0, 120, 40 + 20 * len(sg_inputs)]},
        "outputNode": {"id": OUT_NODE, "bounding": [width + 40, 0, 120, 40 + 20 * len(sg_outputs)]},
        "inputs": sg_inputs, "outputs": sg_outputs, "widgets": [], "nodes": nodes, "groups": [],
        "links": links, "extra": {}, "category": CATEGORY, "description": bp.description,
    }
    root = {"id": max(by_id) + 1, "type": sg_id, "pos": [0, 0], "size": [320, 60 + 24 * len(root_inputs)],
            "flags": {}, "order": 0, "mode": 0, "inputs": root_inputs, "outputs": root_outputs,
            "properties": {}, "widgets_values": root_values, "title": bp.name}
    return {"revision": 0, "last_node_id": root["id"], "last_link_id": 0, "nodes": [root], "links": [],
            "version": 0.4, "definitions": {"subgraphs": [subgraph]},
            "extra": {"BlueprintDescription": bp.description}}


def texts() -> dict:
    return {FOLDER / f"{bp.name}.json": json.dumps(to_json(bp), indent=1, ensure_ascii=False) + "\n"
            for bp in blueprints()}


def stale() -> list[str]:
    want = texts()
    out = [f"{p.relative_to(ROOT)} is not current" for p, t in want.items()
           if not p.is_file() or p.read_text(encoding="utf-8") != t]
    out += [f"{p.relative_to(ROOT)} is not made by benchmarks/blueprints.py" for p in sorted(FOLDER.glob("*.json"))
            if p not in want]
    return out


def add_arguments(p) -> None:
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is not current")


def run(args) -> dict:
    if args.check:
        problems = stale()
        for line in problems:
            print(f"[blueprints] {line}")
        return {"ok": not problems, "problems": problems}
    FOLDER.mkdir(exist_ok=True)
    written = []
    for path, text in texts().items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(str(path.relative_to(ROOT)))
    for path in sorted(FOLDER.glob("*.json")):
        if path not in texts():
            path.unlink()
            written.append(f"removed {path.relative_to(ROOT)}")
    print(f"[blueprints] {len(written)} file(s) written")
    return {"ok": True, "written": written}

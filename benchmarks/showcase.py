"""Run the pack's example workflows through a real ComfyUI server and collect what they made.

Shared by the demo (``python -m benchmarks demo``), the gallery (README pictures, template
thumbnails) and tests. A workflow is taken from ``example_workflows/`` in its saved UI format,
converted as the front end converts it when you press Queue (``comfy_runtime.ui_to_api``),
optionally with some inputs changed, posted to ``/prompt``, and waited for; its saved and
previewed images are read back from the server's folders.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import comfy_runtime as cr

#: Reference images that the seed-search examples load with LoadImage (their names in ComfyUI's
#: input folder): three held-out real eights, never seen in training.
REFERENCE_NAMES = [f"conceptlab_ref_eight_{k + 1}.png" for k in range(3)]


def write_reference_images(input_dir: Path, cls: int = 8, names=REFERENCE_NAMES) -> list[str]:
    """Render held-out real digits of class ``cls`` into ``input_dir`` under ``names``."""
    from PIL import Image
    from .world import scenes as S
    cfg = S.WorldConfig()
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    for name, idx in zip(names, S.heldout_indices(cfg, cls)):
        Image.fromarray(S.render_subject(cfg, int(idx)).image).save(input_dir / name)
    return list(names)


#: The picture sets that ConceptLab Load Demo Images serves (demo/images/<set>/NN.png): held-out
#: real handwriting, never seen in training. (class, sample indices or None for the first
#: held-out samples of the class, renderings per sample, varied colour / position / scale).
DEMO_IMAGE_SETS = {
    "eight-references": (8, None, 3, False),      # seed search: three writers' eights
    "three-subject": (3, [1750], 6, True),        # concept neurons: one writer's three
    "seven-subject": (7, [1753], 6, True),        # ... and one writer's seven
}


def write_demo_images(dest: Path | None = None) -> dict:
    """Render the pack's demo picture sets into ``demo/images`` (deterministic; 64x64 PNGs)."""
    from PIL import Image
    from .world import scenes as S
    cfg = S.WorldConfig()
    dest = Path(dest or cr.PACK_ROOT / "demo" / "images")
    written = {}
    for name, (cls, samples, n, varied) in DEMO_IMAGE_SETS.items():
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        rng = np.random.default_rng(cls)
        pool = samples or [int(i) for i in S.heldout_indices(cfg, cls)[:n]]
        lo, hi = cfg.scale_range
        files = []
        for k in range(n):
            sample = pool[k % len(pool)]
            if varied:
                scene = S.render_subject(cfg, sample, colour=cfg.colour_names[k % len(cfg.colour_names)],
                                         position=S.POSITIONS[k % 3], scale=int(rng.integers(lo, hi + 1)),
                                         rng=rng)
            else:
                scene = S.render_subject(cfg, sample)
            path = folder / f"{k + 1:02d}.png"
            Image.fromarray(scene.image).save(path, optimize=True)
            files.append(path.name)
        written[name] = {"class": cls, "samples": pool, "files": files}
    return written


@dataclass
class WorkflowRun:
    """One finished run of a workflow: its API prompt, its /history entry and where it ran."""

    name: str
    prompt: dict
    entry: dict
    seconds: float
    server_base: Path

    def ids(self, class_type: str) -> list[str]:
        return [k for k, v in self.prompt.items() if v["class_type"] == class_type]

    def image_refs(self, node_id: str) -> list[dict]:
        return list(self.entry.get("outputs", {}).get(str(node_id), {}).get("images", []))

    def image_paths(self, node_id: str) -> list[Path]:
        out = []
        for im in self.image_refs(node_id):
            folder = "temp" if im.get("type") == "temp" else "output"
            out.append(self.server_base / folder / im.get("subfolder", "") / im["filename"])
        return out

    def images(self, node_id: str) -> list[np.ndarray]:
        """The node's images as H x W x 3 uint8 arrays."""
        from PIL import Image
        arrays = []
        for p in self.image_paths(node_id):
            with Image.open(p) as pic:
                arrays.append(np.asarray(pic.convert("RGB")))
        return arrays

    def ui(self, node_id: str, key: str):
        return self.entry.get("outputs", {}).get(str(node_id), {}).get(key)

    def shown(self, node: str, output: int = 0) -> list[np.ndarray]:
        """The images that the workflow's SaveImage / PreviewImage nodes show (directly or through
        MaskToImage) of output number ``output`` of ``node``: a node id, or a class type for the
        first node of that type (e.g. Saliency Maps' overlays)."""
        src = node if node in self.prompt else (self.ids(node)[:1] or [None])[0]
        if src is None:
            raise KeyError(f"{self.name} has no {node} node")
        found, frontier = [], [[src, output]]
        while frontier:
            link = frontier.pop(0)
            for node_id, node in self.prompt.items():
                if link not in node["inputs"].values():
                    continue
                if node["class_type"] in ("SaveImage", "PreviewImage"):
                    found += self.images(node_id)
                elif node["class_type"] == "MaskToImage":   # a mask shown as a picture
                    frontier.append([node_id, 0])
        return found


def set_inputs(prompt: dict, changes: dict) -> dict:
    """Change inputs in an API prompt: ``{node id or class_type: {input: value}}``; a class type
    changes every node of that type. Unknown keys raise (a renamed input must not pass silently)."""
    for key, values in (changes or {}).items():
        targets = [key] if key in prompt else [k for k, v in prompt.items() if v["class_type"] == key]
        if not targets:
            raise KeyError(f"no node {key!r} in the prompt")
        for t in targets:
            for name, value in values.items():
                if name not in prompt[t]["inputs"]:
                    raise KeyError(f"node {t} ({prompt[t]['class_type']}) has no input {name!r}")
                prompt[t]["inputs"][name] = value
    return prompt


def add_previews(prompt: dict, object_info: dict, outputs) -> list[str]:
    """Show more of a workflow's outputs: for each ``(node id or class_type, output index)`` a
    PreviewImage is added to the API prompt (through a MaskToImage for a MASK output), unless the
    workflow already shows that output. A class type means its first node. Returns the new
    PreviewImage ids."""
    added = []
    for key, index in outputs:
        src = key if key in prompt else next((k for k, v in prompt.items() if v["class_type"] == key), None)
        if src is None:
            raise KeyError(f"no node {key!r} in the prompt")
        kind = object_info[prompt[src]["class_type"]]["output"][index]
        link = [src, index]
        shown = any(v["class_type"] in ("SaveImage", "PreviewImage", "MaskToImage")
                    and link in v["inputs"].values() for v in prompt.values())
        if shown or kind not in ("IMAGE", "MASK"):
            continue
        next_id = max(int(k) for k in prompt if k.isdigit()) + 1
        if kind == "MASK":
            prompt[str(next_id)] = {"class_type": "MaskToImage", "inputs": {"mask": link}}
            link, next_id = [str(next_id), 0], next_id + 1
        prompt[str(next_id)] = {"class_type": "PreviewImage", "inputs": {"images": link}}
        added.append(str(next_id))
    return added


def run_example(srv: "cr.ComfyServer", object_info: dict, name: str, changes: dict | None = None,
                timeout: float = 900, on_wait=None, previews=None) -> WorkflowRun:
    """Run ``example_workflows/<name>`` (with ``changes``) on ``srv``; raise with the server's
    error message if the prompt fails. ``previews``: more outputs to show, see
    :func:`add_previews` (then read them with :meth:`WorkflowRun.shown`)."""
    prompt = set_inputs(cr.example_prompt(name, object_info), changes or {})
    add_previews(prompt, object_info, previews or ())
    t0 = time.time()
    entry = srv.run_prompt(prompt, timeout=timeout, on_wait=on_wait)
    err = cr.history_error(entry)
    if err:
        raise RuntimeError(f"the workflow {name} failed on the server: {err}\n{srv.log()[-3000:]}")
    return WorkflowRun(name, prompt, entry, time.time() - t0, Path(srv.base))


def demo_images(image_set: str) -> list[np.ndarray]:
    """The bundled pictures of ``image_set`` (demo/images) as H x W x 3 uint8 arrays."""
    from PIL import Image
    folder = cr.PACK_ROOT / "demo" / "images" / image_set
    out = []
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as pic:
            out.append(np.asarray(pic.convert("RGB")))
    return out

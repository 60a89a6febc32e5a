"""A digits-world catalogue for trying the job, its tests and its benchmark (developer checkout).

Each subject is one held-out writer's digit of the digits world (``benchmarks/world``: writers the
demo models never saw), photographed in a few colours; its class prompt is the digit's ("a
three"). Optionally three bad subjects: two photos only, 1x1 photos, and a file that is no image.

Servers come from the ComfyUI at ``COMFYUI_PATH`` (what ``scripts/lab.sh`` sets), each in a base
folder of its own whose ``custom_nodes`` links to this pack, on the CPU, with one torch thread
each (two servers on a 2-core machine would otherwise fight over both cores).
"""
from __future__ import annotations

import os
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
#: tiny settings: a subject takes seconds on a CPU
QUICK = {
    "extract": {"iterations": 4, "prior_images": 0, "noise_draws": 2, "budget_percent": 1.0},
    "render": {"scenes": ["{class}"], "steps": 8, "seed_search": False},
    "seed_search": {"iterations": 3, "search_steps": 3, "semantic_steps": 1},
}
BAD_SUBJECTS = ("bad-too-few", "bad-1x1", "bad-not-an-image")


def _world():
    try:
        from benchmarks.world import scenes
    except ImportError as e:
        raise RuntimeError("The digits catalogue needs the pack's benchmarks package (a developer checkout, "
                           f"run from the pack's folder) and scikit-learn: {e}") from None
    return scenes


def write_digits_catalogue(folder: Path, n_subjects: int = 12, photos: int = 3, bad: bool = False,
                           seed_search_classes=(8,)) -> list:
    """Subject folders under ``folder``; returns their names. Digits cycle 0..9 (writer after
    writer); subjects of ``seed_search_classes`` (the world's rare eights) ask for Seed Search."""
    import numpy as np
    from PIL import Image
    S = _world()
    cfg = S.WorldConfig()
    colours = cfg.colour_names
    folder = Path(folder)
    names = []
    for i in range(n_subjects):
        cls = i % 10
        writer = int(S.heldout_indices(cfg, cls)[i // 10])
        name = f"{S.DIGIT_WORDS[cls]}-{writer}"
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for j in range(photos):
            img = S.render_subject(cfg, writer, colour=colours[(i + j) % len(colours)]).image
            Image.fromarray(np.asarray(img, dtype=np.uint8)).save(d / f"photo{j + 1}.png")
        (d / "class.txt").write_text(S.class_prompt(cls) + "\n")
        if cls in seed_search_classes:
            (d / "seed_search").write_text("yes\n")
        names.append(name)
    if bad:
        writer = int(S.heldout_indices(cfg, 3)[0])
        img = np.asarray(S.render_subject(cfg, writer).image, dtype=np.uint8)
        few, tiny, notimg = (folder / n for n in BAD_SUBJECTS)
        for d in (few, tiny, notimg):
            d.mkdir(parents=True, exist_ok=True)
            (d / "class.txt").write_text("a three\n")
        for j in range(2):
            Image.fromarray(img).save(few / f"photo{j + 1}.png")
        for j in range(3):
            Image.fromarray(img[:1, :1]).save(tiny / f"photo{j + 1}.png")
        for j in range(2):
            Image.fromarray(img).save(notimg / f"photo{j + 1}.png")
        (notimg / "photo3.png").write_text("these are notes, not a photo\n")
        names += list(BAD_SUBJECTS)
    return names


def comfyui_path() -> Path:
    p = os.environ.get("COMFYUI_PATH")
    if p and (Path(p) / "main.py").is_file():
        return Path(p)
    unpacked = PACK_ROOT / ".lab" / "comfyui" / "0.3.75"
    if (unpacked / "main.py").is_file():
        return unpacked
    raise RuntimeError("No ComfyUI: set COMFYUI_PATH (bash scripts/lab.sh does).")


def server_base(folder: Path) -> Path:
    """A ComfyUI base folder (for ``--base-directory``) whose custom_nodes holds this pack."""
    folder = Path(folder)
    for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    link = folder / "custom_nodes" / "ConceptLab"
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    return folder


def server_args(comfyui: Path, base: Path) -> list:
    """ComfyUI arguments for a CPU server in ``base`` (the flags this ComfyUI knows)."""
    cli = (Path(comfyui) / "comfy" / "cli_args.py").read_text()
    args = ["--cpu", "--base-directory", str(base)]
    for flag, extra in (("--disable-api-nodes", []), ("--database-url", ["sqlite:///:memory:"])):
        if flag in cli:
            args += [flag, *extra]
    return args


def local_servers(folder: Path, count: int, threads: int = 1) -> list:
    """``[[servers]]`` entries: ``count`` CPU servers the job starts, one base folder each."""
    comfy = comfyui_path()
    out = []
    for i in range(count):
        base = server_base(Path(folder) / f"server{i + 1}")
        out.append({"start": str(comfy), "args": server_args(comfy, base), "gpus": 0,
                    "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                            "HF_HUB_OFFLINE": "1"}})
    return out


def demo_job(folder: Path, servers: list, name: str = "digits", quick: bool = True) -> dict:
    """A job dict for the catalogue in ``folder/subjects`` on ``servers``."""
    job = {"name": name, "subjects": str(Path(folder) / "subjects"), "output": str(Path(folder) / "output"),
           "model": {"demo": "digits-unet", "clip_vision": "demo"}, "servers": servers}
    if quick:
        job.update({k: dict(v) for k, v in QUICK.items()})
    return job

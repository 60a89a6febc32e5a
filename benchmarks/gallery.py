"""``python -m benchmarks gallery``: the README's pictures and the template thumbnails, from real runs.

One real ComfyUI server (``comfy_runtime.ComfyServer``, CPU) runs the pack's example workflows as
the front end would queue them (``showcase.run_example``); every picture is made of what those
runs saved or previewed, read by the digits world's judge where a caption says what is drawn
(``world/judge.py``: an SVM on real handwriting, no generative model; through the demo's
``Reader``). Headless Chromium
(``browser.py``) takes the two pictures that show the front end itself.

Parts (``--only``, repeatable; default all):

- ``thumbnails``: ``example_workflows/<name>.jpg`` beside every ``example_workflows/<name>.json``:
  the file the front end's template browser loads for a custom-node template (front ends 1.48.7
  and 1.58.1: ``mediaSubtype: 'jpg'``, ``/api/workflow_templates/<pack folder>/<name>.jpg``;
  tests/e2e/test_templates.py). The workflow's own SaveImage / PreviewImage images, tiled on a
  320 x 320 square (the browser's cards are square), JPEG quality 80. A workflow that cannot run
  here because this ComfyUI lacks its model files (the Flux example: no Flux weights) gets a
  screenshot of that workflow loaded in the real front end instead, and the job says so.
- ``readme``: ``docs/images/`` (``--out``): ``txt2img.png`` (both demo models),
  ``concept_neurons.png`` (the plain class prompt next to the applied concept; two subjects
  combined), ``seed_search.png`` (Seed Search on the rare class 'an eight', with the settings
  ``python -m benchmarks seed-search`` measures with unless ``--seed-settings workflow``, against
  the same starting noises sampled as they are), ``saliency.png`` (per-word overlays and masks; a mask
  driving an inpaint, before and after) and ``accuracy_vs_frequency.png`` (class-prompt accuracy
  against training frequency: the same images and figures as ``python -m benchmarks world``).
- ``screenshot``: ``docs/images/saliency_viewer.webp``: the graph with the Saliency Maps viewer
  open after a run queued from the page.

Needs ComfyUI 0.3.x or later (the DiT demo model, Seed Search's NOISE output, the PyPI front end).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import comfy_runtime as cr
from . import showcase as sc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "example_workflows"
PARTS = ("thumbnails", "readme", "screenshot")

THUMB = 320                 # template thumbnails: THUMB x THUMB, JPEG
THUMB_QUALITY = 80
CELL = 128                  # README pictures: a 64 px image drawn 2x
BG, FG, DIM = (21, 18, 31), (236, 232, 246), (170, 162, 200)
GOOD, BAD = (143, 227, 161), (255, 157, 138)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

# Workflows the README pictures are made from.
TXT2IMG = ("demo_model_txt2img.json", "demo_dit_txt2img.json")
CONCEPT_APPLY = "concept_load_apply_sample.json"
CONCEPT_TWO = "concept_two_subjects.json"
SEED_SEARCH = "seed_select_then_custom_advanced.json"
SALIENCY = "saliency_unet_heatmaps.json"
VIEWER_WORKFLOW = SALIENCY


def add_arguments(p) -> None:
    p.add_argument("--only", action="append", choices=PARTS,
                   help="render only this part (repeatable): thumbnails, readme or screenshot")
    p.add_argument("--out", default=str(ROOT / "docs" / "images"), help="where the README's pictures go")
    p.add_argument("--thumbnails-dir", default=str(EXAMPLES),
                   help="where the template thumbnails go (default: beside the workflows)")
    p.add_argument("--per-class", type=int, default=40,
                   help="images per class prompt for the accuracy plot (40, seeds 100 + class: the same "
                        "images as python -m benchmarks world, so the same figures)")
    p.add_argument("--seed-batch", type=int, default=4,
                   help="starting noises for the seed-search picture (the workflow's batch otherwise)")
    p.add_argument("--seed-settings", choices=("benchmark", "workflow"), default="benchmark",
                   help="Seed Search's settings for the seed-search picture: those python -m benchmarks "
                        "seed-search measures with (default), or the example workflow's own quick ones")
    p.add_argument("--json", help="write what was rendered to this path")


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------
def _font(size: int, bold: bool = False):
    from PIL import ImageFont
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size=size)


def _pil(image):
    from PIL import Image
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))


def _fit(image, w: int, h: int):
    """``image`` scaled to fit a w x h box, keeping its aspect (pixel-doubled when it is an exact
    integer enlargement, so the tiny demo images stay crisp)."""
    from PIL import Image
    im = _pil(image).convert("RGB")
    s = min(w / im.width, h / im.height)
    size = (max(1, round(im.width * s)), max(1, round(im.height * s)))
    exact = s >= 1 and abs(s - round(s)) < 1e-9
    return im.resize(size, Image.NEAREST if exact else Image.LANCZOS)


def tile(images: list, size: int = THUMB, bg=BG):
    """Images on a ``size`` x ``size`` square, in a near-square grid, centred."""
    from PIL import Image
    canvas = Image.new("RGB", (size, size), bg)
    n = len(images)
    if not n:
        return canvas
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    gap = 4 if n > 1 else 0
    cell = (size - gap * (max(cols, rows) - 1)) // max(cols, rows)
    x0 = (size - (cols * cell + gap * (cols - 1))) // 2
    y0 = (size - (rows * cell + gap * (rows - 1))) // 2
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        pic = _fit(im, cell, cell)
        canvas.paste(pic, (x0 + c * (cell + gap) + (cell - pic.width) // 2,
                           y0 + r * (cell + gap) + (cell - pic.height) // 2))
    return canvas


@dataclass
class Pic:
    image: object
    caption: str = ""
    ok: bool | None = None      # the judge's verdict: caption in green / red


def _wrap(draw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = w
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + "…", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return lines


def sheet(title: str, rows: list, note: str = "", cell: int = CELL):
    """A picture of labelled rows of captioned images: ``rows`` = [(label, [Pic, ...]), ...]."""
    from PIL import Image, ImageDraw
    t_font, l_font, c_font, n_font = _font(20, True), _font(15, True), _font(12), _font(13)
    pad, gap, line = 18, 10, 15
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ncol = max((len(p) for _, p in rows), default=1)
    width = max(pad * 2 + ncol * (cell + gap) - gap, int(probe.textlength(title, font=t_font)) + 2 * pad)
    widest = max((probe.textlength(label, font=l_font) for label, _ in rows), default=0)
    width = max(width, min(int(widest) + 2 * pad, 980))
    labels = [_wrap(probe, label, l_font, width - 2 * pad) for label, _ in rows]
    note_lines = []
    for para in note.split("\n") if note else []:
        note_lines += _wrap(probe, para, n_font, width - 2 * pad, max_lines=99) or [""]
    row_h = 22 + cell + 4 + 2 * line + 8
    height = pad + 30 + len(rows) * row_h + 19 * sum(len(lab) - 1 for lab in labels) \
        + (len(note_lines) * 17 + 6 if note_lines else 0) + pad
    im = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(im)
    d.text((pad, pad), title, font=t_font, fill=FG)
    y = pad + 30
    for (_, pics), label in zip(rows, labels):
        for j, text in enumerate(label):
            d.text((pad, y), text, font=l_font, fill=FG)
            y += 19 if j < len(label) - 1 else 0
        for k, p in enumerate(pics):
            x = pad + k * (cell + gap)
            pic = _fit(p.image, cell, cell)
            d.rectangle([x - 1, y + 21, x + cell, y + 22 + cell], outline=(44, 37, 69))
            im.paste(pic, (x + (cell - pic.width) // 2, y + 22 + (cell - pic.height) // 2))
            colour = DIM if p.ok is None else (GOOD if p.ok else BAD)
            for j, text in enumerate(_wrap(d, p.caption, c_font, cell)):
                d.text((x, y + 22 + cell + 4 + j * line), text, font=c_font, fill=colour)
        y += row_h
    for j, text in enumerate(note_lines):
        d.text((pad, y + j * 17), text, font=n_font, fill=DIM)
    return im


def save_png(im, path: Path) -> Path:
    """PNG, reduced to a 256-colour palette when that loses nothing visible (flat backgrounds,
    small pictures): a fraction of the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert("RGB").quantize(colors=256, method=2, dither=0).save(path, optimize=True)
    return path


def save_jpeg(im, path: Path, quality: int = THUMB_QUALITY) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert("RGB").save(path, quality=quality, optimize=True, progressive=True)
    return path


# ------------------------------------------------------------------------------------------------
# the judge (benchmarks/demo.py's Reader: world/judge.py reading a picture)
# ------------------------------------------------------------------------------------------------
def _reading(reader, image, caption: str) -> Pic:
    """The picture captioned with what the judge reads in it against a templated caption."""
    text, ok = reader.scene(image, caption)
    return Pic(image, text, ok)


def _word(reader, cls) -> str:
    return "nothing" if cls is None else reader.S.DIGIT_WORDS[cls]


# ------------------------------------------------------------------------------------------------
# reading a prompt
# ------------------------------------------------------------------------------------------------
def _source(prompt: dict, node_id: str, input_name: str) -> str | None:
    v = prompt[node_id]["inputs"].get(input_name)
    return v[0] if isinstance(v, list) else None


def _text_of(prompt: dict, node_id: str, input_name: str = "positive") -> str:
    """The prompt text behind a CONDITIONING input (through FluxGuidance-style nodes)."""
    src = _source(prompt, node_id, input_name)
    seen = set()
    while src and src not in seen:
        seen.add(src)
        inputs = prompt[src]["inputs"]
        if isinstance(inputs.get("text"), str):
            return inputs["text"]
        src = next((v[0] for v in inputs.values() if isinstance(v, list)), None)
    return ""


def _demo_model(run: sc.WorkflowRun) -> str:
    """The demo model a run loaded ('digits-unet', ...)."""
    return run.prompt[run.ids("ConceptLabLoadDemoModel")[0]]["inputs"]["demo_model"].split(" (")[0]


def final_images(run: sc.WorkflowRun) -> list:
    """What the workflow's SaveImage / PreviewImage nodes show, in node order."""
    ids = sorted(run.ids("SaveImage") + run.ids("PreviewImage"), key=lambda k: (len(k), k))
    return [im for node_id in ids for im in run.images(node_id)]


def _saved(run: sc.WorkflowRun) -> list:
    """The images of the workflow's last SaveImage."""
    ids = sorted(run.ids("SaveImage"), key=lambda k: (len(k), k))
    return run.images(ids[-1]) if ids else []


class Missing(RuntimeError):
    """The workflow needs files this ComfyUI does not have (model weights)."""


MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def _missing_files(err: cr.PromptRejected) -> str | None:
    """When the server refused the prompt only because model files are not there (every error a
    file name not in a loader's list), what is missing; else None."""
    try:
        body = json.loads(err.body)
    except ValueError:
        return None
    errors = [e for node in (body.get("node_errors") or {}).values() for e in node.get("errors", [])]
    missing = []
    for e in errors:
        value = (e.get("extra_info") or {}).get("received_value")
        if e.get("type") != "value_not_in_list" or not str(value).lower().endswith(MODEL_FILE_SUFFIXES):
            return None
        missing.append(str(value))
    return ", ".join(missing) if missing else None


# ------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------
class Gallery:
    def __init__(self, srv, info: dict, args, stack: contextlib.ExitStack):
        self.srv, self.info, self.args, self.stack = srv, info, args, stack
        self.out = Path(args.out).resolve()
        self.thumb_dir = Path(args.thumbnails_dir).resolve()
        self._runs: dict = {}
        self._reader = None
        self._browser = None
        self.made: list = []          # {"path", "bytes", "from", "note"}

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def reader(self):
        if self._reader is None:
            from .demo import Reader
            self._reader = Reader()
        return self._reader

    def run(self, name: str, changes: dict | None = None, previews=()) -> sc.WorkflowRun:
        key = json.dumps([name, changes, list(previews)], sort_keys=True)
        if key not in self._runs:
            try:
                self._runs[key] = sc.run_example(self.srv, self.info, name, changes=changes,
                                                 previews=list(previews))
            except cr.PromptRejected as e:
                why = _missing_files(e)
                if why:
                    raise Missing(why) from None
                raise
            r = self._runs[key]
            print(f"[gallery]   ran {name}{' with ' + json.dumps(changes) if changes else ''} "
                  f"({r.seconds:.1f}s)", flush=True)
        return self._runs[key]

    def prompt(self, name: str) -> dict:
        return cr.example_prompt(name, self.info)

    def record(self, path: Path, source: str, note: str = "") -> None:
        self.made.append({"path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                          "bytes": path.stat().st_size, "from": source, "note": note})
        print(f"[gallery] {path.name:<48} {path.stat().st_size / 1024:6.1f} KB  {note}", flush=True)

    def browser(self):
        if self._browser is None:
            from . import browser as br
            why = br.available()
            if why:
                raise RuntimeError(why)
            from playwright.sync_api import sync_playwright
            pw = self.stack.enter_context(sync_playwright())
            self._browser = br.launch(pw)
            self.stack.callback(self._browser.close)
        return self._browser

    # -- thumbnails ------------------------------------------------------------------------------
    def thumbnails(self) -> None:
        for wf in sorted(EXAMPLES.glob("*.json")):
            dest = self.thumb_dir / f"{wf.stem}.jpg"
            try:
                run = self.run(wf.name)
            except (Missing, KeyError) as e:
                # not runnable here: a picture of the workflow itself, from the real front end
                why = f"cannot run here (no {e}); screenshot of the workflow in the front end"
                try:
                    pic = self.workflow_screenshot(json.loads(wf.read_text()))
                except RuntimeError as no_browser:   # no Chromium / playwright here
                    if not dest.is_file():
                        raise
                    print(f"[gallery] {dest.name}: kept as it is ({no_browser})", flush=True)
                    continue
                self.record(save_jpeg(pic, dest), wf.name, why)
                continue
            images = final_images(run)
            if not images:
                raise RuntimeError(f"{wf.name} saved or previewed no image to make a thumbnail of")
            self.record(save_jpeg(tile(images[:9]), dest), wf.name,
                        f"{len(images[:9])} image(s) from the run")

    # -- README pictures -------------------------------------------------------------------------
    def readme(self) -> None:
        for name, make in (("txt2img.png", self.fig_txt2img), ("concept_neurons.png", self.fig_concepts),
                           ("seed_search.png", self.fig_seed_search), ("saliency.png", self.fig_saliency),
                           ("accuracy_vs_frequency.png", self.fig_accuracy)):
            t0 = time.time()
            im, source, note = make()
            self.record(save_png(im, self.out / name), source, f"{note} ({time.time() - t0:.0f}s)")

    def fig_txt2img(self):
        rows, notes = [], []
        for name in TXT2IMG:
            run = self.run(name)
            sampler = run.ids("KSampler")[0]
            caption = _text_of(run.prompt, sampler)
            model = _demo_model(run)
            pics = [_reading(self.reader, im, caption) for im in _saved(run)]
            rows.append((f'{model}: "{caption}"', pics))
            notes.append(f"{model} {sum(p.ok for p in pics)}/{len(pics)}")
        note = ("Both demo models through ComfyUI's stock CLIPTextEncode, KSampler and VAEDecode "
                f"({', '.join(TXT2IMG)}). Under each image: what the judge reads (green: class, colour "
                f"and position of every digit right). Fully right: {', '.join(notes)}.")
        return sheet("Text to image: the two demo models", rows, note), ", ".join(TXT2IMG), "; ".join(notes)

    def _subject(self, cls_word: str):
        """(sample index, pictures) of the demo subject of a class (showcase.DEMO_IMAGE_SETS): the
        pack's pictures of it (demo/images/<set>/), or else a rendering of the sample."""
        from PIL import Image
        sets = getattr(sc, "DEMO_IMAGE_SETS", {})
        for key, (cls, samples, *_rest) in sets.items():
            if self.reader.S.DIGIT_WORDS[cls] == cls_word and samples:
                pics = []
                for p in sorted((ROOT / "demo" / "images" / key).glob("*.png"))[:4]:
                    with Image.open(p) as f:
                        pics.append(np.asarray(f.convert("RGB")))
                if not pics:
                    pics = [self.reader.S.render_subject(self.reader.cfg, int(samples[0])).image]
                return int(samples[0]), pics
        return None, []

    def fig_concepts(self):
        rows = []
        three, three_pics = self._subject("three")
        seven, seven_pics = self._subject("seven")
        if three_pics:
            subjects = [Pic(im, f"three: sample {three}") for im in three_pics[:3]]
            subjects += [Pic(im, f"seven: sample {seven}") for im in seven_pics[:2]] if seven is not None else []
            rows.append(("the subjects: held-out handwriting the model never saw, which the shipped concepts "
                         "were extracted from", subjects))
        for strength, label in ((0.0, "plain class prompt (strength 0)"), (1.0, "concept applied (strength 1)")):
            run = self.run(CONCEPT_APPLY, {"ConceptLabConceptNeuronsApply": {"strength": strength}})
            caption = _text_of(run.prompt, run.ids("KSampler")[0])
            pics = []
            for im in _saved(run):
                if three is not None:
                    pics.append(Pic(im, f"similarity {self.reader.similarity(im, three):.2f}"))
                else:
                    pics.append(Pic(im, "reads: " + _word(self.reader, self.reader.main_class(im))))
            rows.append((f"'{caption}', {label}", pics))
        for strength, label in ((0.0, "without the concepts"), (1.0, "three + seven concepts combined")):
            run = self.run(CONCEPT_TWO, {"ConceptLabConceptNeuronsApply": {"strength": strength}})
            caption = _text_of(run.prompt, run.ids("KSampler")[0])
            pics = []
            for im in _saved(run):
                found = self.reader.digit_masks(im)
                side = {pos: max((d for d in found if d.position == pos), key=lambda d: d.area, default=None)
                        for pos in ("left", "right")}
                if three is not None and seven is not None:
                    a = self.reader.similarity(side["left"], three) if side["left"] else 0.0
                    b = self.reader.similarity(side["right"], seven) if side["right"] else 0.0
                    pics.append(Pic(im, f"three {a:.2f}, seven {b:.2f}"))
                else:
                    pics.append(_reading(self.reader, im, caption))
            rows.append((f"'{caption}', {label}", pics))
        note = (f"ConceptLab Concept Neurons Load / Apply ({CONCEPT_APPLY}) and Combine ({CONCEPT_TWO}): "
                "the same seeds with the concept's K/V weights left alone (strength 0) and shut (strength 1). "
                + ("Under each image: the judge's subject similarity to that writer's digit (a generic digit "
                   "of the class scores about 0.5, the subject itself about 1)." if three is not None else
                   "Under each image: what the judge reads."))
        return sheet("Concept neurons: a subject from a few pictures, applied and combined", rows, note), \
            f"{CONCEPT_APPLY}, {CONCEPT_TWO}", "strength 0 and 1"

    def fig_seed_search(self):
        prompt = self.prompt(SEED_SEARCH)
        search = next(k for k, v in prompt.items() if v["class_type"] == "ConceptLabSeedSearch")
        ref_sources = [(v[0], v[1]) for k, v in prompt[search]["inputs"].items()
                       if k.startswith("references") and isinstance(v, list)]
        latent = _source(prompt, search, "latent")
        changes = {latent: {"batch_size": self.args.seed_batch}} if self.args.seed_batch else {}
        settings = "the example workflow's settings"
        if self.args.seed_settings == "benchmark":
            bench = benchmark_seed_settings()
            changes[search] = {k: v for k, v in bench.items() if k in prompt[search]["inputs"]}
            from .seed_search import noise_seed
            changes[search]["seed"] = noise_seed(8)      # the benchmark's own starting noises
            settings = ("python -m benchmarks seed-search's settings: " +
                        ", ".join(f"{k} {v}" for k, v in changes[search].items()))
        run = self.run(SEED_SEARCH, changes, previews=ref_sources)
        caption = _text_of(run.prompt, search)
        want = self.reader.S.parse_caption(caption)[0][0]
        seed = run.prompt[search]["inputs"]["seed"]
        batch = run.prompt[_source(run.prompt, search, "latent")]["inputs"]["batch_size"]
        refs = _shown_by(run, ref_sources)
        found = _saved_from_decode(run)
        # the same starting noises sampled as they are: a stock KSampler with the search's seed
        base = self.prompt(TXT2IMG[0])
        ks = next(k for k, v in base.items() if v["class_type"] == "KSampler")
        pos = _source(base, ks, "positive")
        sampler = {"seed": seed}
        for cls, key, name in (("CFGGuider", "cfg", "cfg"), ("BasicScheduler", "steps", "steps"),
                               ("BasicScheduler", "scheduler", "scheduler"),
                               ("KSamplerSelect", "sampler_name", "sampler_name")):
            ids = run.ids(cls)
            if ids and not isinstance(run.prompt[ids[0]]["inputs"].get(key), list):
                sampler[name] = run.prompt[ids[0]]["inputs"][key]
        plain = self.run(TXT2IMG[0], {pos: {"text": caption}, _source(base, ks, "latent_image"): {"batch_size": batch},
                                      ks: sampler})
        word = self.reader.S.DIGIT_WORDS[want]

        def judged(images):
            out = []
            for im in images:
                c = self.reader.main_class(im)
                out.append(Pic(im, f"reads: {_word(self.reader, c)}", c == want))
            return out
        random_pics, search_pics = judged(_saved(plain)), judged(found)
        r, s = sum(p.ok for p in random_pics), sum(p.ok for p in search_pics)
        rows = [(f"references: {len(refs)} held-out real {word}s", [Pic(im, "reference") for im in refs]),
                (f"'{caption}', seeds {seed}..: the starting noises sampled as they are ({r}/{len(random_pics)} {word}s)",
                 random_pics),
                (f"the same noises after ConceptLab Seed Search ({s}/{len(search_pics)} {word}s)", search_pics)]
        note = (f"{SEED_SEARCH} ({settings}): Seed Search optimises each starting noise towards the references "
                "(semantic loss on the demo CLIP vision model, appearance loss on VAE latents) and hands the "
                "NOISE to SamplerCustomAdvanced. The row above it samples the same noises with a stock KSampler "
                f"(same prompt, sampler, steps and CFG; {TXT2IMG[0]}). Under each image: the class the judge "
                "reads in its most prominent digit. python -m benchmarks seed-search measures this over more "
                "noises and both rare classes.")
        return sheet(f"Seed search: the rare class '{caption}'", rows, note), \
            f"{SEED_SEARCH}, {TXT2IMG[0]}", f"random {r}/{len(random_pics)}, search {s}/{len(search_pics)}"

    def fig_saliency(self):
        prompt = self.prompt(SALIENCY)
        maps = next(k for k, v in prompt.items() if v["class_type"] == "ConceptLabSaliencyMaps")
        image_src = _source(prompt, maps, "images")
        run = self.run(SALIENCY, previews=[(maps, 1), (maps, 2), (image_src, 0)])
        cap = run.ids("ConceptLabSaliencyCapture")[0]
        words = [w.strip() for w in run.prompt[cap]["inputs"]["concepts"].split(",") if w.strip()]
        caption = run.prompt[cap]["inputs"]["prompt"]
        model = _demo_model(run)
        images = _shown_by(run, [(image_src, 0)])
        overlays, masks = run.shown("ConceptLabSaliencyMaps", 1), run.shown("ConceptLabSaliencyMaps", 2)
        rows = []
        for i, im in enumerate(images):
            pics = [_reading(self.reader, im, caption)]
            for kind, batch in (("heat map", overlays), ("mask", masks)):
                for j, w in enumerate(words):
                    k = i * len(words) + j
                    if k < len(batch):
                        pics.append(Pic(batch[k], f'"{w}" {kind}'))
            rows.append((f'{model}, image {i + 1}: "{caption}"', pics))
        sources = [SALIENCY]
        inpaint = sorted(EXAMPLES.glob("saliency_*inpaint*.json"))
        if inpaint:
            name = inpaint[0].name
            p2 = self.prompt(name)
            maps2 = next(k for k, v in p2.items() if v["class_type"] == "ConceptLabSaliencyMaps")
            mfc = next(k for k, v in p2.items() if v["class_type"] == "ConceptLabMaskFromConcept")
            before_src = _source(p2, maps2, "images")
            run2 = self.run(name, previews=[(before_src, 0), (mfc, 0)])
            samplers = sorted(run2.ids("KSampler"), key=lambda k: (len(k), k))
            first, second = _text_of(run2.prompt, samplers[0]), _text_of(run2.prompt, samplers[-1])
            word = run2.prompt[mfc]["inputs"]["concept"]
            model = _demo_model(run2)
            before = _shown_by(run2, [(before_src, 0)])
            mask = run2.shown("ConceptLabMaskFromConcept", 0)
            after = _saved(run2)
            pics = [Pic(p.image, "before, " + p.caption, p.ok) for p in (_reading(self.reader, im, first) for im in before)]
            pics += [Pic(m, f'mask of "{word}"') for m in mask]
            pics += [Pic(p.image, "after, " + p.caption, p.ok) for p in (_reading(self.reader, im, second) for im in after)]
            rows.append((f'{model}: mask of "{word}", then inpaint "{second}"', pics))
            sources.append(name)
        note = ("ConceptLab Saliency Capture records where each word lands while the stock KSampler samples; "
                "Saliency Maps refines the maps with the decoded image (a fully connected CRF) into colour "
                "overlays and masks; Mask From Concept turns one word into a MASK, here driving an inpaint "
                f"({', '.join(sources)}). Captions under the samples: what the judge reads.")
        return sheet("Attention saliency: where each word lands", rows, note), ", ".join(sources), \
            f"{len(images)} image(s) x {len(words)} words"

    def fig_accuracy(self):
        from PIL import Image
        from .world import evaluate as E
        S = self.reader.S
        per_class = self.args.per_class
        panels, figures = [], []
        for name in TXT2IMG:
            base = self.prompt(name)
            ks = next(k for k, v in base.items() if v["class_type"] == "KSampler")
            key = base[next(k for k, v in base.items() if v["class_type"] == "ConceptLabLoadDemoModel")]
            key = "digits_dit" if "dit" in key["inputs"]["demo_model"] else "digits_unet"
            weights = cr.PACK_ROOT / "demo" / f"{key}.safetensors"
            wcfg = E.world_config_of(weights) if weights.is_file() else S.WorldConfig()
            freqs = {c: float(f) for c, f in enumerate(S.class_frequencies(wcfg))}
            accs = {}
            for c in range(10):
                run = self.run(name, {_source(base, ks, "positive"): {"text": S.class_prompt(c)},
                                      _source(base, ks, "latent_image"): {"batch_size": per_class},
                                      ks: {"seed": 100 + c}})
                accs[c] = E.class_accuracy(np.stack(_saved(run)), c, self.reader.judge)
            rare = tuple(wcfg.rare_classes)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "plot.png"
                E.plot_curve(path, freqs, accs, rare,
                             f"{key}: class-prompt accuracy vs training frequency ({per_class} images/class)")
                with Image.open(path) as f:
                    panels.append(f.convert("RGB"))
            frequent = [c for c in range(10) if c not in rare]
            figures.append(f"{key} frequent {np.mean([accs[c] for c in frequent]):.2f}, "
                           f"rare {np.mean([accs[c] for c in rare]):.2f}")
        w = sum(p.width for p in panels) + 10 * (len(panels) - 1)
        im = Image.new("RGB", (w, max(p.height for p in panels)), "white")
        x = 0
        for p in panels:
            im.paste(p, (x, 0))
            x += p.width + 10
        return im, ", ".join(TXT2IMG), "; ".join(figures)

    # -- the front end ---------------------------------------------------------------------------
    def _page(self, viewport=(1400, 900)):
        from . import browser as br
        page, _watch = br.open_app(self.browser(), self.srv.url, viewport=viewport)
        page.wait_for_timeout(1000)
        return page

    def workflow_screenshot(self, workflow: dict):
        """The workflow loaded in the real front end, the whole graph in view, without the
        surrounding menus; cropped to a THUMB x THUMB square."""
        from PIL import Image
        import io
        page = self._page(viewport=(1400, 1000))
        try:
            page.evaluate(LOAD_JS, workflow)
            page.wait_for_timeout(800)
            page.evaluate(FRAME_JS, [None, 0.0])
            page.add_style_tag(content=CANVAS_ONLY_CSS)
            page.wait_for_timeout(800)
            png = page.locator("#graph-canvas").screenshot()
        finally:
            page.close()
        shot = Image.open(io.BytesIO(png)).convert("RGB")
        # crop to what the graph covers (the canvas background is flat), then to a square
        arr = np.asarray(shot).astype(int)
        bgc = np.median(arr.reshape(-1, 3), axis=0)
        ys, xs = np.nonzero(np.abs(arr - bgc).sum(-1) > 40)
        if len(xs):
            shot = shot.crop((max(0, xs.min() - 8), max(0, ys.min() - 8), xs.max() + 8, ys.max() + 8))
        side = max(shot.width, shot.height)
        square = Image.new("RGB", (side, side), tuple(int(c) for c in bgc))
        square.paste(shot, ((side - shot.width) // 2, (side - shot.height) // 2))
        return square.resize((THUMB, THUMB), Image.LANCZOS)

    def screenshot(self) -> None:
        """docs/images/saliency_viewer.webp: the graph after a run queued from the page, with the
        Saliency Maps node's viewer showing."""
        from PIL import Image
        import io
        t0 = time.time()
        workflow = json.loads((EXAMPLES / VIEWER_WORKFLOW).read_text())
        page = self._page(viewport=(1400, 860))
        try:
            page.evaluate(LOAD_JS, workflow)
            node_id = page.evaluate(FRAME_JS, ["ConceptLabSaliencyMaps", 0.06])
            if node_id is None:
                raise RuntimeError(f"{VIEWER_WORKFLOW} has no ConceptLab Saliency Maps node")
            page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
            page.wait_for_function(
                """(id) => { const v = window.app.graph.getNodeById(id)?.conceptLabSaliency;
                             return v && v.drawn > 0 && v.root.dataset.state === "ready"; }""",
                arg=node_id, timeout=180_000)
            page.wait_for_timeout(1500)
            png = page.screenshot()
        finally:
            page.close()
        path = self.out / "saliency_viewer.webp"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(png)).convert("RGB").save(path, quality=80, method=6)
        self.record(path, VIEWER_WORKFLOW, f"front end {_front_end()} ({time.time() - t0:.0f}s)")


def benchmark_seed_settings() -> dict:
    """Seed Search's inputs as ``python -m benchmarks seed-search`` sets them (its defaults)."""
    import argparse
    from . import seed_search as bench
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args([])
    return dict(iterations=a.iterations, search_steps=a.search_steps, learning_rate=a.lr,
                lr_drop_after=a.lr_drop_after, norm_regulariser=True, norm_weight=a.norm_weight,
                semantic_steps=a.semantic_steps, semantic_weight=a.semantic_weight,
                appearance_weight=a.appearance_weight, appearance_target=a.appearance_target, cfg=a.cfg)


def _shown_by(run: sc.WorkflowRun, sources) -> list:
    """The images that the first SaveImage / PreviewImage showing each ``(node id, output)`` of
    ``sources`` holds."""
    out = []
    for src, idx in sources:
        for k in sorted(run.ids("SaveImage") + run.ids("PreviewImage"), key=lambda k: (len(k), k)):
            if run.prompt[k]["inputs"].get("images") == [src, idx]:
                out += run.images(k)
                break
    return out


def _saved_from_decode(run: sc.WorkflowRun) -> list:
    """The images a SaveImage shows of a VAEDecode (the sampled pictures, not a plot)."""
    for k in sorted(run.ids("SaveImage"), key=lambda k: (len(k), k)):
        src = _source(run.prompt, k, "images")
        if src and run.prompt[src]["class_type"] == "VAEDecode":
            return run.images(k)
    return _saved(run)


def _front_end() -> str:
    from . import browser as br
    return br.front_end_version()


# Load a saved (UI) workflow into the page as a user would open it.
LOAD_JS = """
async (wf) => {
  await window.app.loadGraphData(wf, true, false, null, {deferWarnings: true, skipAssetScans: true});
}
"""

# Fit the graph into the canvas (type null), or bring one node type into view at the left third
# with the whole graph's height (then returns that node's id). ``margin``: fraction kept free.
FRAME_JS = """
([type, margin]) => {
  const app = window.app, canvas = app.canvas, el = canvas.canvas;
  const nodes = app.graph._nodes;
  if (!nodes.length) return null;
  const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const W = el.clientWidth || el.width, H = el.clientHeight || el.height;
  const m = margin || 0.02;
  const s = Math.min(W * (1 - 2 * m) / (x1 - x0), H * (1 - 2 * m) / (y1 - y0), 1.2);
  canvas.ds.scale = s;
  canvas.ds.offset[0] = (W / s - (x1 - x0)) / 2 - x0;
  canvas.ds.offset[1] = (H / s - (y1 - y0)) / 2 - y0;
  let id = null;
  if (type) {
    const node = nodes.find((n) => (n.comfyClass || n.type) === type);
    id = node ? node.id : null;
  }
  canvas.setDirty(true, true);
  return id;
}
"""

# Only the graph: the canvas and the widgets drawn over it (text boxes, the saliency viewer).
CANVAS_ONLY_CSS = """
body * { visibility: hidden !important; }
#graph-canvas, .dom-widget, .dom-widget *, [class*="dom-widget"], [class*="dom-widget"] * {
  visibility: visible !important; }
"""


def run(args) -> dict:
    parts = args.only or list(PARTS)
    # one torch thread in the server: on a busy 2-core machine OpenMP threads wait on each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    print(f"[gallery] ComfyUI {cr.comfy_version()} at {cr.comfy_root()}; parts: {', '.join(parts)}", flush=True)
    from . import browser as br
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="conceptlab-gallery-")))
        br.seed_user(base, extra={"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False})
        srv = stack.enter_context(cr.ComfyServer(base=base))
        print(f"[gallery] server up at {srv.url} in {time.time() - t0:.0f}s", flush=True)
        info = srv.get("/object_info")
        sc.write_reference_images(base / "input")
        g = Gallery(srv, info, args, stack)
        for part in PARTS:
            if part in parts:
                getattr(g, part)()
    seconds = time.time() - t0
    total = sum(m["bytes"] for m in g.made)
    docs = sum(p.stat().st_size for p in g.out.glob("*") if p.is_file()) if g.out.is_dir() else 0
    thumbs = sum(p.stat().st_size for p in g.thumb_dir.glob("*.jpg"))
    print(f"[gallery] {len(g.made)} file(s), {total / 1024:.0f} KB written, in {seconds:.0f}s; "
          f"{g.out} holds {docs / 1024:.0f} KB, the thumbnails {thumbs / 1024:.0f} KB")
    return {"comfyui": cr.comfy_version(), "front_end": _front_end(), "seconds": round(seconds, 1),
            "files": g.made, "docs_images_bytes": docs, "thumbnails_bytes": thumbs}

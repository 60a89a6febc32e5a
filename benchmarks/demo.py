"""The digits-world demo: every capability of the pack, end to end through a real ComfyUI server.

``python -m benchmarks demo`` (``bash scripts/lab.sh demo``) starts ComfyUI on 127.0.0.1 in a
throw-away folder with the pack in its ``custom_nodes``, posts the pack's example workflows to
``/prompt`` (some with a changed input, named on the page), and writes ``demo_output/index.html``:
one self-contained page with every image, its prompt, and the judge's reading under it (the
judge is an SVM on real handwriting, ``benchmarks/world/judge.py``; no generative model wrote
it). It prints a short table and the page's path.

Sections: text to image (both demo models); attention saliency (per-word overlays and masks, a
mask driving an inpaint); seed search (the UNet's rare class, an eight, next to random seeds); a
concept extracted from a held-out writer's threes, applied, next to the plain class prompt; two
concepts combined.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import comfy_runtime as cr
from . import showcase as sc

ROOT = Path(__file__).resolve().parent.parent

#: The held-out writers' samples behind the demo subjects (demo/images, demo/concept_neurons).
SUBJECT_THREE = 1750
SUBJECT_SEVEN = 1753

#: The live extraction's subject: the writer's seven (the benchmark moves it most: 0.53 -> 0.65;
#: the three moves little, 0.47 -> 0.50, see docs/concept-neurons.md), shown on 8 images.
SUBJECT, SUBJECT_PROMPT = SUBJECT_SEVEN, "a seven"
EXTRACT_CHANGES = {"ConceptLabLoadDemoImages": {"image_set": "seven-subject"},
                   "ConceptLabConceptNeuronsExtract": {"class_prompt": SUBJECT_PROMPT},
                   "ConceptLabConceptNeuronsSave": {"filename_prefix": "concept_neurons_demo/seven"}}
EXTRACT_NOTE = " (subject: the seven-subject pictures, class prompt 'a seven')"
APPLY_CHANGES = {"4": {"text": SUBJECT_PROMPT}, "EmptyLatentImage": {"batch_size": 8}}
APPLY_NOTE = "; prompt 'a seven', 8 images"


# ----------------------------------------------------------------------------------------------
# what the page shows
# ----------------------------------------------------------------------------------------------
@dataclass
class Picture:
    image: np.ndarray
    caption: str
    ok: bool | None = None          # the judge's verdict when there is one (green / red caption)


@dataclass
class Panel:
    title: str
    pictures: list
    note: str = ""


@dataclass
class Section:
    key: str
    title: str
    text: str
    workflows: list
    panels: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)     # short label -> value (the printed table)
    seconds: float = 0.0


def _png_data_uri(image: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #14111f; color: #ece8f6; }
header { padding: 24px 32px 8px; } h1 { margin: 0 0 4px; font-size: 26px; }
header p, section > p { color: #bdb5d6; max-width: 980px; }
section { padding: 8px 32px 16px; border-top: 1px solid #2c2545; }
h2 { font-size: 20px; margin: 16px 0 4px; } h3 { font-size: 15px; margin: 12px 0 6px; color: #d8cff7; }
.wf { font: 12px ui-monospace, monospace; color: #9d93c4; }
.row { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 148px; }
figure img { width: 144px; height: 144px; image-rendering: pixelated; border: 2px solid #2c2545;
  border-radius: 4px; background: #000; display: block; }
figcaption { font-size: 12px; color: #cfc6ea; margin-top: 3px; }
figcaption.ok { color: #8fe3a1; } figcaption.bad { color: #ff9d8a; }
.note { font-size: 13px; color: #a79fc6; margin: 4px 0 8px; }
table.figs { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
table.figs td { padding: 2px 12px 2px 0; } table.figs td:first-child { color: #bdb5d6; }
"""


def write_page(path: Path, sections: list, meta: dict) -> None:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Concept Lab demo</title>"
             f"<style>{_CSS}</style></head><body><header><h1>Concept Lab: the digits-world demo</h1>"
             f"<p>Every picture below was made just now by ComfyUI {html.escape(meta['comfyui'])} "
             f"running the pack's example workflows through its <code>/prompt</code> API, on the "
             f"bundled demo models (a {html.escape(meta['device'])} run, {meta['seconds']:.0f} s). "
             f"The text under each picture is what the judge reads in it: an SVM trained on real "
             f"handwriting, which no generative model wrote.</p></header>"]
    for s in sections:
        parts.append(f"<section id='{s.key}'><h2>{html.escape(s.title)}</h2><p>{s.text}</p>")
        parts.append("<div class='wf'>workflow" + ("s" if len(s.workflows) > 1 else "") + ": "
                     + ", ".join(f"example_workflows/{html.escape(w)}" for w in s.workflows)
                     + f" &middot; {s.seconds:.0f} s</div>")
        if s.figures:
            parts.append("<table class='figs'>" + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in s.figures.items())
                + "</table>")
        for p in s.panels:
            parts.append(f"<h3>{html.escape(p.title)}</h3>")
            if p.note:
                parts.append(f"<div class='note'>{p.note}</div>")
            parts.append("<div class='row'>")
            for pic in p.pictures:
                cls = "" if pic.ok is None else (" class='ok'" if pic.ok else " class='bad'")
                parts.append(f"<figure><img alt='{html.escape(pic.caption)}' src='{_png_data_uri(pic.image)}'>"
                             f"<figcaption{cls}>{html.escape(pic.caption)}</figcaption></figure>")
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    path.write_text("".join(parts))


# ----------------------------------------------------------------------------------------------
# the judge's readings
# ----------------------------------------------------------------------------------------------
class Reader:
    def __init__(self):
        from .world import judge as J
        from .world import scenes as S
        self.J, self.S = J, S
        self.cfg = S.WorldConfig()
        self.judge = J.get_judge(self.cfg)

    def scene(self, image, caption: str) -> tuple[str, bool]:
        chk = self.J.check_scene(image, caption, self.judge, self.cfg)
        bits = []
        for d in chk["digits"]:
            if not d["found"]:
                bits.append(f"no {self.S.DIGIT_WORDS[d['cls']]}")
                continue
            word = self.S.DIGIT_WORDS[d["read_cls"]]
            colour = f"{d['read_colour']} " if d["colour"] else ""
            bits.append(colour + word)
        return "reads: " + ", ".join(bits) if bits else "reads: nothing", bool(chk["all_ok"])

    def main_class(self, image) -> int | None:
        found = self.J.find_digits(image, self.judge, self.cfg)
        return max(found, key=lambda d: d.area).cls if found else None

    def digit_masks(self, image):
        return self.J.find_digits(image, self.judge, self.cfg)

    def similarity(self, image, subject: int) -> float:
        return self.J.subject_similarity(image, subject, self.cfg, judge=self.judge)


def _word(reader: Reader, cls) -> str:
    return "nothing" if cls is None else reader.S.DIGIT_WORDS[cls]


# ----------------------------------------------------------------------------------------------
# the sections
# ----------------------------------------------------------------------------------------------
def text_to_image(srv, info, reader: Reader, on_wait) -> Section:
    s = Section("txt2img", "Text to image: the two demo models",
                "ConceptLab Load Demo Model gives an ordinary MODEL, CLIP and VAE, sampled here by "
                "ComfyUI's stock CLIPTextEncode, KSampler and VAEDecode. digits-unet is an "
                "SD1.x-architecture UNet, digits-dit an SD3 MMDiT; both were trained on this CPU "
                "in under 30 minutes.", [])
    t0 = time.time()
    for name, label in (("demo_model_txt2img.json", "digits-unet"), ("demo_dit_txt2img.json", "digits-dit")):
        run = sc.run_example(srv, info, name, on_wait=on_wait(label))
        s.workflows.append(name)
        caption = run.prompt[run.ids("CLIPTextEncode")[0]]["inputs"]["text"]
        pics = []
        for im in run.images(run.ids("SaveImage")[0]):
            text, ok = reader.scene(im, caption)
            pics.append(Picture(im, text, ok))
        right = sum(p.ok for p in pics)
        s.figures[f"{label}: images fully right"] = f"{right}/{len(pics)} (class, colour and position of every digit)"
        s.panels.append(Panel(f'{label}: "{caption}"', pics))
    s.seconds = time.time() - t0
    return s


def _mask_on_word(reader: Reader, image, mask: np.ndarray, cls: int) -> tuple[float, float]:
    """(share of the mask on the digit of class ``cls``, share of that digit covered)."""
    digits = [d for d in reader.digit_masks(image) if d.cls == cls]
    m = mask > 0.5
    if not digits or not m.any():
        return 0.0, 0.0
    ink = np.zeros_like(m)
    for d in digits:
        ink |= d.mask
    grown = _dilate(ink, 2)
    return float((m & grown).sum() / m.sum()), float((m & ink).sum() / max(ink.sum(), 1))


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def attention_saliency(srv, info, reader: Reader, on_wait) -> Section:
    s = Section("saliency", "Attention saliency: where each word lands",
                "ConceptLab Saliency Capture patches a clone of the MODEL; any sampler then records, "
                "per word, where attention put it (DAAM on UNets). Saliency Maps refines the maps with "
                "the decoded image and outputs overlays and masks; in ComfyUI it also shows an "
                "interactive viewer. Mask From Concept turns one word into a MASK, here driving an "
                "inpaint. The sampled image is bit-identical with and without capture.", [])
    t0 = time.time()
    run = sc.run_example(srv, info, "saliency_unet_heatmaps.json", on_wait=on_wait("saliency"))
    s.workflows.append("saliency_unet_heatmaps.json")
    cap_id = run.ids("ConceptLabSaliencyCapture")[0]
    words = [w.strip() for w in run.prompt[cap_id]["inputs"]["concepts"].split(",") if w.strip()]
    caption = run.prompt[cap_id]["inputs"]["prompt"]
    images = run.images(run.ids("SaveImage")[0])
    overlays = run.shown("ConceptLabSaliencyMaps", 1)
    masks = run.shown("ConceptLabSaliencyMaps", 2)
    on_word = []
    for i, im in enumerate(images):
        text, ok = reader.scene(im, caption)
        pics = [Picture(im, text, ok)]
        for j, w in enumerate(words):
            k = i * len(words) + j
            if k < len(overlays):
                pics.append(Picture(overlays[k], f'"{w}" map'))
            if k < len(masks):
                cls = reader.S.DIGIT_WORDS.index(w) if w in reader.S.DIGIT_WORDS else None
                if cls is not None:
                    prec, cover = _mask_on_word(reader, im, masks[k][..., 0] / 255.0, cls)
                    on_word.append(prec)
                    pics.append(Picture(masks[k], f'"{w}" mask: {prec:.0%} on the {w}', prec >= 0.5))
                else:
                    pics.append(Picture(masks[k], f'"{w}" mask'))
        s.panels.append(Panel(f'digits-unet, image {i + 1}: "{caption}"', pics))
    if on_word:
        s.figures["masks mostly on their word's digit"] = f"{sum(p >= 0.5 for p in on_word)}/{len(on_word)}"
    inpaint = [n for n in sorted((ROOT / "example_workflows").glob("saliency_dit_*inpaint*.json"))]
    if inpaint:
        name = inpaint[0].name
        run = sc.run_example(srv, info, name, on_wait=on_wait("mask + inpaint"))
        s.workflows.append(name)
        samplers = run.ids("KSampler")
        first_caption = _positive_text(run, samplers[0])
        second_caption = _positive_text(run, samplers[-1])
        word = run.prompt[run.ids("ConceptLabMaskFromConcept")[0]]["inputs"]["concept"]
        first_decode = next(k for k in run.ids("VAEDecode")
                            if run.prompt[k]["inputs"]["samples"] == [samplers[0], 0])
        before = run.shown(first_decode, 0)
        mask_imgs = run.shown("ConceptLabMaskFromConcept", 0)
        after = run.images(run.ids("SaveImage")[0])
        pics = []
        for im in before:
            text, ok = reader.scene(im, first_caption)
            pics.append(Picture(im, "before: " + text, ok))
        cls = reader.S.DIGIT_WORDS.index(word) if word in reader.S.DIGIT_WORDS else None
        for im, base_im in zip(mask_imgs, before):
            prec, _cover = _mask_on_word(reader, base_im, im[..., 0] / 255.0, cls) if cls is not None else (0, 0)
            pics.append(Picture(im, f'mask of "{word}": {prec:.0%} on the {word}', prec >= 0.5))
        for im in after:
            text, ok = reader.scene(im, second_caption)
            pics.append(Picture(im, "after: " + text, ok))
        method = (run.ui(run.ids("ConceptLabSaliencyMaps")[0], "concept_lab_saliency") or [{}])[0]
        note = html.escape(method.get("method_note", "")) if isinstance(method, dict) else ""
        s.panels.append(Panel(f'digits-dit: mask of "{word}", then inpaint "{second_caption}"', pics, note=note))
    s.seconds = time.time() - t0
    return s


def _positive_text(run: sc.WorkflowRun, sampler: str) -> str:
    return run.prompt[run.prompt[sampler]["inputs"]["positive"][0]]["inputs"]["text"]


def _shower_of(run: sc.WorkflowRun, node_id: str) -> str | None:
    """The SaveImage / PreviewImage node showing ``node_id``'s first output, if any."""
    for k, v in run.prompt.items():
        if v["class_type"] in ("SaveImage", "PreviewImage") and v["inputs"].get("images") == [node_id, 0]:
            return k
    return None


def seed_search(srv, info, reader: Reader, on_wait, noises: int = 4) -> Section:
    s = Section("seed-search", "Seed search: making the model draw a rare class",
                "The demo UNet saw an eight in 1.5% of its training scenes, so the prompt 'an eight' "
                "mostly draws something else. ConceptLab Seed Search (SeedSelect) optimises the "
                "initial noise towards three reference eights (held-out real handwriting, read by "
                "the demo CLIP vision model) and hands the NOISE to SamplerCustomAdvanced. The same "
                "starting noises, sampled as they are by a stock KSampler, are shown first. These "
                "are the first of the noises python -m benchmarks seed-search measures: over 20 "
                "noises of both rare classes, 0.95 draw the rare class after the search, against "
                "0.30 as they are.", [])
    t0 = time.time()
    from .seed_search import noise_seed
    seed = noise_seed(8)       # the first starting noises that python -m benchmarks seed-search measures
    base = sc.run_example(srv, info, "demo_model_txt2img.json", changes={
        "2": {"text": "an eight"}, "EmptyLatentImage": {"batch_size": noises},
        "KSampler": {"seed": seed}}, on_wait=on_wait("the noises as they are"))
    s.workflows.append(f"demo_model_txt2img.json (prompt 'an eight', seed {seed}, {noises} images)")
    rnd = [Picture(im, f"reads: {_word(reader, c)}", c == 8)
           for im in base.images(base.ids("SaveImage")[0]) for c in [reader.main_class(im)]]
    s.panels.append(Panel(f"{noises} starting noises (seed {seed}) sampled as they are", rnd))
    s.figures["starting noises drawing an eight, as they are"] = f"{sum(p.ok for p in rnd)}/{len(rnd)}"
    name = "seed_select_then_custom_advanced.json"
    run = sc.run_example(srv, info, name, changes={"EmptyLatentImage": {"batch_size": noises},
                                                   "ConceptLabSeedSearch": {"seed": seed}},
                         on_wait=on_wait("seed search"))
    s.workflows.append(f"{name} (seed {seed}, {noises} starting noises)")
    found = run.images(_shower_of(run, run.ids("VAEDecode")[0]))
    pics = [Picture(im, f"reads: {_word(reader, c)}", c == 8) for im in found for c in [reader.main_class(im)]]
    refs = sc.demo_images("eight-references")
    s.panels.insert(0, Panel("the references (ConceptLab Load Demo Images: three held-out writers' eights)",
                             [Picture(im, "reference") for im in refs]))
    s.panels.append(Panel(f"Seed Search ({len(pics)})", pics))
    s.figures["after Seed Search: drawing an eight"] = f"{sum(p.ok for p in pics)}/{len(pics)}"
    s.seconds = time.time() - t0
    return s


def concept_neurons(srv, info, reader: Reader, on_wait) -> Section:
    s = Section("concept-neurons", "Concept neurons: one writer's seven, from six pictures",
                "ConceptLab Concept Neurons Extract finds the few cross-attention K/V weights (0.4 %) "
                "whose shutting makes the plain prompt 'a seven' draw one held-out writer's seven, "
                "from six pictures of it, and Save stores them as a file of a few kilobytes. Apply "
                "then shuts them in a clone of the MODEL. The number under each picture is the "
                "judge's subject similarity to that writer's seven (a generic seven scores about "
                "0.5, the subject itself about 1). On models this small the effect is modest "
                "(docs/concept-neurons.md). Two stored concepts (a three and a seven) combine into one.", [])
    t0 = time.time()
    ext = sc.run_example(srv, info, "concept_extract_then_save.json", changes=EXTRACT_CHANGES,
                         on_wait=on_wait("extract"))
    s.workflows.append("concept_extract_then_save.json" + EXTRACT_NOTE)
    refs = []
    for node_id in ext.ids("PreviewImage"):
        refs += ext.images(node_id)
    s.panels.append(Panel("the subject's pictures (Extract's references)",
                          [Picture(im, f"sample {SUBJECT}") for im in refs[:6]]))
    saved = ext.ui(ext.ids("ConceptLabConceptNeuronsSave")[0], "text")[0].split(" (")[0]
    s.figures["concept file"] = ext.ui(ext.ids("ConceptLabConceptNeuronsSave")[0], "text")[0]
    rows = {}
    for strength, label in ((0.0, "plain prompt (strength 0)"), (1.0, "concept applied (strength 1)")):
        run = sc.run_example(srv, info, "concept_load_apply_sample.json", changes={
            "ConceptLabConceptNeuronsLoad": {"concept_file": saved},
            "ConceptLabConceptNeuronsApply": {"strength": strength}, **APPLY_CHANGES}, on_wait=on_wait(label))
        ims = run.images(run.ids("SaveImage")[0])
        sims = [reader.similarity(im, SUBJECT) for im in ims]
        rows[label] = float(np.mean(sims))
        s.panels.append(Panel(f"'{SUBJECT_PROMPT}', {label}",
                              [Picture(im, f"similarity {v:.2f}") for im, v in zip(ims, sims)]))
    s.workflows.append("concept_load_apply_sample.json (this run's file; strength 0 and 1" + APPLY_NOTE + ")")
    for k, v in rows.items():
        s.figures[f"subject similarity, {k}"] = f"{v:.2f}"
    # two stored concepts combined
    for strength, label in ((0.0, "without the concepts"), (1.0, "three + seven concepts combined")):
        run = sc.run_example(srv, info, "concept_two_subjects.json", changes={
            "ConceptLabConceptNeuronsApply": {"strength": strength}}, on_wait=on_wait(label))
        caption = _positive_text(run, run.ids("KSampler")[0])
        pics = []
        for im in run.images(run.ids("SaveImage")[0]):
            left = [d for d in reader.digit_masks(im) if d.position == "left"]
            right = [d for d in reader.digit_masks(im) if d.position == "right"]
            a = reader.similarity(max(left, key=lambda d: d.area), SUBJECT_THREE) if left else 0.0
            b = reader.similarity(max(right, key=lambda d: d.area), SUBJECT_SEVEN) if right else 0.0
            pics.append(Picture(im, f"three {a:.2f}, seven {b:.2f}"))
        s.panels.append(Panel(f"'{caption}', {label}", pics))
    s.workflows.append("concept_two_subjects.json (shipped concepts; strength 0 and 1)")
    s.seconds = time.time() - t0
    return s


# ----------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------
def _progress(t0: float):
    def for_label(label: str):
        last = [None]

        def show(srv) -> None:
            prog = srv.sampling_progress()
            if prog and prog != last[0]:
                done, total = prog
                bar = "#" * round(20 * done / max(total, 1))
                print(f"\r[demo] {label:<28} step {done:>3}/{total:<3} [{bar:<20}] {time.time() - t0:6.1f}s",
                      end="", flush=True)
                last[0] = prog
        return show
    return for_label


def add_arguments(p) -> None:
    p.add_argument("--out", default=str(ROOT / "demo_output"), help="where index.html and summary.json go")
    p.add_argument("--only", choices=["txt2img", "saliency", "seed-search", "concept-neurons"],
                   action="append", help="run only these sections (repeatable)")
    p.add_argument("--json", help="also write the summary to this path")


def run(args) -> dict:
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[demo] ComfyUI {cr.comfy_version()} at {cr.comfy_root()}")
    reader = Reader()
    jobs = [("txt2img", text_to_image), ("saliency", attention_saliency), ("seed-search", seed_search),
            ("concept-neurons", concept_neurons)]
    sections = []
    with cr.ComfyServer() as srv:
        print(f"[demo] server up at {srv.url} in {time.time() - t0:.1f}s")
        info = srv.get("/object_info")
        progress = _progress(t0)
        for key, job in jobs:
            if args.only and key not in args.only:
                continue
            sections.append(job(srv, info, reader, progress))
            print(f"\r[demo] {sections[-1].title:<60} {sections[-1].seconds:6.1f}s{' ' * 20}")
    seconds = time.time() - t0
    meta = {"comfyui": cr.comfy_version(), "device": "CPU", "seconds": seconds}
    page = out_dir / "index.html"
    write_page(page, sections, meta)
    summary = {"comfyui": meta["comfyui"], "seconds": round(seconds, 1), "page": str(page),
               "sections": {s.key: {"title": s.title, "workflows": s.workflows, "figures": s.figures,
                                    "seconds": round(s.seconds, 1)} for s in sections}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [("ComfyUI", meta["comfyui"])]
    for s in sections:
        rows.append((s.title, f"{s.seconds:.0f} s"))
        rows += [(f"  {k}", str(v)) for k, v in s.figures.items()]
    rows += [("total", f"{seconds:.0f} s"), ("page", str(page))]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows))
    return summary

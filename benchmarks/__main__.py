"""Concept Lab's command line: ``python -m benchmarks <job> [--json PATH]``.

Jobs:
  world       the digits world measured: judge accuracy, class-prompt accuracy vs frequency
  train       train a digits-world demo model on the CPU in under 30 minutes
              (--model unet: VAE + text encoder + UNet; --model dit: the MMDiT, ComfyUI 0.3.x)
  saliency    attention saliency on digits-world scenes: mIoU of DAAM (UNet), ConceptAttention and
              cross-attention (DiT, ComfyUI 0.3.x), capture overhead, bit-identity, memory
  concept-neurons  Cones on the digits world: subject fidelity before / after applying a concept,
              against a K/V fine-tune baseline, shut fraction, file bytes, two subjects, time ratio
  seed-search SeedSelect / Seed Rank on the digits world's rare classes: success rates against
              random seeds and best-of-N at equal wall time, time and memory ratios
  foundation  what gradients through a ComfyUI model cost (bytes copied, snapshot bytes, time)
  assets      the bundled demo pictures (demo/images: held-out handwriting for the examples)
  scale       the pack at real geometry (SD1.5, SD2.1 768-v, SDXL, Flux; seeded weights): saliency
              overhead and memory, Seed Search peak memory, extraction against a fine-tune step
  families    each capability's mechanics on a tiny model of every family (Flux.1, Flux.2, Chroma,
              Qwen-Image, Z-Image, SD3/SD3.5): {family: {capability: true|false|"unsupported: ..."}}
  locales     locales/en generated from the nodes' own text; the ja / zh translations checked
  help-pages  the nodes' help pages (web/docs/, ComfyUI's node help panel) from docs/nodes.md and
              its ja / zh translations, with the nodes' own text (see benchmarks/help_pages.py)
  blueprints  the pack's subgraph blueprints (subgraphs/*.json) from benchmarks/blueprints.py
  gallery     the README's pictures (docs/images/) and every example workflow's template
              thumbnail (example_workflows/<name>.jpg), rendered from real runs
  demo        every capability on the digits-world demo models, end to end through a real ComfyUI
              server: the example workflows posted to /prompt; demo_output/index.html shows every
              image with its prompt and the judge's reading (see benchmarks/demo.py).

Run from the pack root. The pack root is removed from sys.path before ComfyUI is touched (our
``nodes/`` package would otherwise shadow ComfyUI's ``nodes`` module).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def _print_world(res: dict) -> None:
    rows = [("ComfyUI", res["comfyui"]), ("judge_accuracy_real", f"{res['judge_accuracy_real']:.3f}")]
    for k in ("unet", "dit"):
        r = res[k]
        if "skipped" in r:
            rows.append((f"{k}", "skipped: " + r["skipped"]))
            continue
        rows += [(f"{k}.frequent_class_accuracy", f"{r['frequent_class_accuracy']:.3f}"),
                 (f"{k}.rare_class_accuracy", f"{r['rare_class_accuracy']:.3f} (classes {r['rare_classes']})"),
                 (f"{k}.plot", r["plot"])]
        rows += [(f"{k}.class {c}", f"acc {v['accuracy']:.2f}  freq {v['train_frequency']:.3f}")
                 for c, v in r["per_class"].items()]
    print(_table(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="job", required=True)
    d = sub.add_parser("demo", help="every capability on the demo models through a real ComfyUI server")
    from . import demo as demo_job
    demo_job.add_arguments(d)
    w = sub.add_parser("world", help="measure the digits world and its demo models")
    from .world import evaluate as world_eval
    world_eval.add_arguments(w)
    t = sub.add_parser("train", help="train the digits-world demo models on this CPU")
    from .world import train as world_train
    world_train.add_arguments(t)
    t.add_argument("--json", help="write the training figures to this path")
    sl = sub.add_parser("saliency", help="measure DAAM / ConceptAttention saliency on the demo models")
    from . import saliency as saliency_bench
    saliency_bench.add_arguments(sl)
    cn = sub.add_parser("concept-neurons", help="measure concept-neuron extraction / application (Cones)")
    from . import concept_neurons as concept_bench
    concept_bench.add_arguments(cn)
    ss = sub.add_parser("seed-search", help="measure seed search (SeedSelect, Seed Rank) on rare classes")
    from . import seed_search as seed_bench
    seed_bench.add_arguments(ss)
    a = sub.add_parser("assets", help="regenerate the bundled demo pictures (demo/images) from the digits world")
    a.add_argument("--json", help="write what was rendered to this path")
    sc = sub.add_parser("scale", help="the pack at real geometry: SD1.5, SD2.1, SDXL, Flux (memory, time)")
    from . import scale as scale_job
    scale_job.add_arguments(sc)
    fa = sub.add_parser("families", help="every capability's mechanics on a tiny model of every family")
    from . import families as families_job
    families_job.add_arguments(fa)
    lo = sub.add_parser("locales", help="regenerate locales/en from the nodes and check the ja / zh translations")
    from . import locales as locales_job
    locales_job.add_arguments(lo)
    lo.add_argument("--json", help="write the result to this path")
    hp = sub.add_parser("help-pages", help="generate the nodes' help pages (web/docs/) from docs/nodes.md")
    from . import help_pages as help_job
    help_job.add_arguments(hp)
    bl = sub.add_parser("blueprints", help="write the subgraph blueprints (subgraphs/*.json)")
    from . import blueprints as blueprints_job
    blueprints_job.add_arguments(bl)
    g = sub.add_parser("gallery", help="render the README pictures and the template thumbnails from real runs")
    from . import gallery as gallery_job
    gallery_job.add_arguments(g)
    f = sub.add_parser("foundation", help="cost of gradients through a ComfyUI model")
    f.add_argument("--json", help="write the figures to this path")
    args = p.parse_args(argv)
    if args.job == "demo":
        res = demo_job.run(args)
    elif args.job == "world":
        res = world_eval.run(args)
        _print_world(res)
    elif args.job == "train":
        res = world_train.main(args)
    elif args.job == "saliency":
        res = saliency_bench.run(args)
        if not args.memory_probe:
            print(_table([(k, str(v)) for k, v in res.items() if not isinstance(v, dict)]))
    elif args.job == "concept-neurons":
        res = concept_bench.run(args)
        print(_table([(k, str(v)) for k, v in res.items() if not isinstance(v, (dict, list))]))
    elif args.job == "seed-search":
        res = seed_bench.run(args)
        print(_table([(k, str(v)) for k, v in res.items() if not isinstance(v, (dict, list))]))
    elif args.job == "assets":
        from . import showcase
        res = showcase.write_demo_images()
        print(_table([(k, f"{len(v['files'])} pictures of sample(s) {v['samples']}") for k, v in res.items()]))
    elif args.job == "scale":
        res = scale_job.run(args)
    elif args.job == "families":
        res = families_job.run(args)
        print(_table([(f, ", ".join(f"{c} {v}" for c, v in r.items())) for f, r in res["families"].items()]))
    elif args.job == "locales":
        res = locales_job.run(args)
    elif args.job == "help-pages":
        res = help_job.run(args)
        if not res["ok"]:
            return 1
    elif args.job == "blueprints":
        res = blueprints_job.run(args)
        if not res["ok"]:
            return 1
    elif args.job == "gallery":
        res = gallery_job.run(args)
    elif args.job == "foundation":
        from . import foundation
        res = foundation.run(args)
        for name in ("demo_unet", "mid_unet"):
            print(f"{name}:")
            print(_table([(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
                          for k, v in res[name].items()]))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

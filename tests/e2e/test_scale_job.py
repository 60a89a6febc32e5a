"""The real-scale benchmark as a job (issue 15): ``python -m benchmarks scale --quick --json PATH``
runs every section, each probe in a fresh process, and writes every figure the issue asks for.
Quick mode shrinks the models, so its numbers mean nothing; the full-size figures are committed in
docs/figures/scale.json (read by tests/kernels/test_memory.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import skip_version

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

FIGURES = {
    "saliency.sd15": ("capture_overhead_ratio", "extra_peak_mb", "recording_bytes", "image_bit_identical"),
    "saliency.flux": ("capture_overhead_ratio", "image_bit_identical"),
    "seed_search.sd15": ("peak_growth_2_to_6_steps", "seconds_per_iteration_over_step"),
    "seed_search.sd21_768": ("peak_gb", "fp32", "bf16"),
    "seed_search.sdxl_1024": ("peak_gb", "fits", "arithmetic"),
    "concept_neurons.sd15": ("peak_over_finetune_step", "weights_copied_bytes"),
    "concept_neurons.flux": ("peak_gb_projected", "arithmetic"),
}


def _failed(node, where=""):
    if isinstance(node, dict):
        if "failed" in node:
            yield where, node["failed"], node.get("log_tail", "")[-1500:]
        for k, v in node.items():
            yield from _failed(v, f"{where}/{k}")


def test_scale_job_writes_every_figure(lab, tmp_path):
    if importlib.util.find_spec("comfy.ldm.flux") is None:
        skip_version(f"ComfyUI {lab.version} has no Flux classes, which the scale job's Flux slice needs")
    out = tmp_path / "scale.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "scale", "--quick", "--repeats", "1", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not list(_failed(data)), list(_failed(data))
    assert data["quick"] is True and data["threads"] == 1 and data["attention"] == "pytorch"
    for key, fields in FIGURES.items():
        missing = [f for f in fields if f not in data.get(key, {})]
        assert not missing, (key, missing)
    assert data["saliency.sd15"]["image_bit_identical"] and data["saliency.flux"]["image_bit_identical"]
    rec = data["saliency.sd15"]["recording_bytes"]
    assert len(set(rec.values())) == 1, rec                  # the recording does not grow with steps
    assert data["seed_search.sdxl_1024"]["how"] == "extrapolated"
    assert data["concept_neurons.flux"]["how"] == "extrapolated"
    # the fit section (issue 23), quick: the SD1.5 targets counted in fake tensors, the node's plan
    # on each card, the time ratio and the counter against the process's memory
    for key in ("fit.seed_search.sd15_512_fp16", "fit.concept_neurons.sd15_512_fp16"):
        fit = data[key]
        assert fit["peak_gb"] > fit["weights_gib"] > 0 and fit["node"]["setting"], fit
    assert data["fit.seed_search.sd15.time_ratio_checkpointed"] > 0
    assert data["fit.counter_vs_rss"]["cases"] and data["fit.counter_vs_heap"]["cases"]
    cards = data["fit.cards"]
    assert {c["runs"] for node in cards.values() for model in node.values() for c in model.values()} <= {True, False}

"""``python -m benchmarks scale --json PATH``: the pack at real geometry (issue 15).

Full-size models are built through ComfyUI's own config and model classes (``supported_models``
``SD15``, ``SD20`` with SD2.1's 768-v settings, ``SDXL``, ``Flux``) with seeded random weights of a
sensible scale (normal, std 1/sqrt(fan-in): ComfyUI's ops leave weights uninitialised). Random
weights are fine for cost; quality is measured in the digits world.

Every figure comes from a **fresh process per probe** (``--probe``): memory is that process's peak
RSS while the measured work runs (a thread reads /proc/self/statm every 2 ms), minus its RSS
after the models were built and loaded, reported next to the absolute peak. Times are ratios
measured in one process, interleaved (the SD1.5 saliency probe: in alternating pairs with no
memory poller running, the median of the per-pair ratios). Torch threads are pinned (``--threads``, default 2).

Sections (``--section``, repeatable; default all; about 45 minutes on a quiet 2-core CPU):

- ``saliency-sd15``: SD1.5 at 512 px, KSampler with CFG, a few steps, DAAM on every
  cross-attention layer: ``capture_overhead_ratio``, ``extra_peak_mb``, recording bytes at 2 and
  6 steps;
- ``saliency-flux``: a full-width Flux slice (hidden 3072, 1 double + 1 single block, 512 px),
  ConceptAttention with 3 concepts: ``capture_overhead_ratio``;
- ``seed-sd15``: one Seed Search iteration on SD1.5 at 512 px: peak at 2 and at 6 search steps,
  and an iteration's time in plain sampling steps;
- ``seed-sd21``: one Seed Search iteration at SD2.1 768-v geometry, 768 px, with the semantic
  loss through a real-size CLIP vision model (ViT-H/14) and the appearance loss: peak, fp32 and
  bf16;
- ``seed-sdxl``: SDXL measured at 512 px in fp32 with a ViT-H/14 CLIP vision model (the encoder
  most SDXL IP-Adapters use; ``--sdxl-clip-vision g`` for ViT-bigG/14), extrapolated to 1024 px
  and to bf16;
- ``cn-sd15``: one extraction gradient evaluation against one dense K/V fine-tune step on the
  same batch (SD1.5, 512 px), and the bytes of model weights copied;
- ``cn-flux``: the same gradient evaluation on the Flux slice at 512 px, projected to a full Flux
  (19 double + 38 single blocks) at 1024 px.

Attention implementation: ComfyUI's ``--use-pytorch-cross-attention`` (torch SDPA), which is what
ComfyUI uses on GPUs; its CPU default (sub-quadratic attention) was killed for lack of memory at
SD2.1 768 px on this 24 GB machine. Chosen with ``--attention`` (``pytorch`` or ``default``).

What is measured and what is extrapolated is said per figure (``"how": "measured" |
"extrapolated"`` with the arithmetic). ``--quick`` shrinks every model (for a smoke test of the
job itself; its figures mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from . import comfy_runtime as cr

ROOT = Path(__file__).resolve().parent.parent
RESULT = "SCALE-RESULT "

SECTIONS = ("saliency-sd15", "saliency-flux", "seed-sd15", "seed-sd21", "seed-sdxl", "cn-sd15", "cn-flux", "fit")

# ---------------------------------------------------------------------------------------------
# real geometry (the unet_configs ComfyUI's model detection produces for the released checkpoints)
# ---------------------------------------------------------------------------------------------
_UNET_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "in_channels": 4, "model_channels": 320,
                "use_temporal_attention": False, "use_temporal_resblock": False}
SD15 = dict(_UNET_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
            use_linear_in_transformer=False, context_dim=768, num_heads=8,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
SD21 = dict(_UNET_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
            use_linear_in_transformer=True, context_dim=1024, num_head_channels=64,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
SDXL = dict(_UNET_COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
            use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
#: Flux.1-dev's geometry; the slice keeps 1 double-stream and 1 single-stream block.
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
            hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
            axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
#: SD's VAE (AutoencoderKL, 4 latent channels, 8x down).
SD_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                       "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                       "attn_resolutions": [], "dropout": 0.0}}


def _quick(cfg: dict) -> dict:
    """A shrunken copy (smoke tests of the job)."""
    out = dict(cfg)
    if "model_channels" in out:
        # 64 wide: SD20's own config forces 64-channel heads, so that is one head
        out.update(model_channels=64, num_head_channels=64) if "num_head_channels" in out else out.update(
            model_channels=64, num_heads=2)
    if "hidden_size" in out:
        out.update(hidden_size=128, num_heads=2, axes_dim=[16, 24, 24], context_in_dim=64, vec_in_dim=64)
    return out


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2 ** 20


class Peak:
    """Peak RSS (MB) while the ``with`` block runs, by a thread reading /proc every 2 ms."""

    def __enter__(self):
        self.start = rss_mb()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def extra(self) -> float:
        return self.peak - self.start


class Counted:
    """:class:`Peak`'s counterpart for a probe run in fake tensors (``--probe-opts '{"fake": true}'``):
    the peak of live tensor bytes while the block runs, above what was live when it began (MB),
    counted by ``benchmarks/fakemem.py``."""

    def __init__(self, job):
        self.job = job

    def __enter__(self):
        c = self.job.counter
        self.start = c.live / 2 ** 20
        c.reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = self.job.counter.peak / 2 ** 20

    @property
    def extra(self) -> float:
        return self.peak - self.start


@contextlib.contextmanager
def counting(o: dict):
    """The probe's models and work in fake tensors when ``o["fake"]`` (yields the fake job), else
    as they are (yields None)."""
    if not o.get("fake"):
        yield None
        return
    from . import fakemem
    ss = cr.pack_module("nodes.seed_search")
    real = ss.preview_image
    ss.preview_image = lambda images: None      # a JPEG of fake pixels cannot be made
    try:
        with fakemem.fake_job() as job:
            yield job
    finally:
        ss.preview_image = real


def meter(job):
    """Peak RSS for a real run, the fake-tensor count for a fake one."""
    return Counted(job) if job is not None else Peak()


def init_(module: torch.nn.Module, seed: int = 0) -> None:
    """Seeded normal weights, std 1/sqrt(fan-in) (biases 0, norms 1), in each tensor's dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for name, p in module.named_parameters():
            if p.numel() == 0 or (not p.is_floating_point()
                                  and p.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)):
                continue
            if p.ndim >= 2:
                vals = torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1))
            elif name.endswith("bias"):
                vals = torch.zeros(p.shape)
            else:
                vals = torch.ones(p.shape)
            p.copy_(vals.to(p.dtype))


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def unet(kind: str, dtype: torch.dtype, quick: bool = False, compute: torch.dtype | None = None):
    """``compute``: ComfyUI's manual-cast dtype (weights stored in ``dtype``, cast layer by layer)."""
    import comfy.model_base as mb
    import comfy.supported_models as sm
    cfg = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}[kind]
    cfg = dict(_quick(cfg) if quick else cfg, dtype=dtype)
    mc = {"sd15": sm.SD15, "sd21": sm.SD20, "sdxl": sm.SDXL}[kind](cfg)
    mc.set_inference_dtype(dtype, compute)
    with torch.inference_mode():
        if kind == "sd21":          # the 768-v checkpoint: v-prediction
            base = mb.BaseModel(mc, model_type=mb.ModelType.V_PREDICTION)
        else:
            base = mc.get_model({})
    init_(base.diffusion_model)
    return cr_patcher(base)


def flux_slice(dtype: torch.dtype, quick: bool = False):
    import dataclasses

    import comfy.ldm.flux.model as fm
    import comfy.supported_models as sm
    cfg = dict(_quick(FLUX) if quick else FLUX, depth=1, depth_single_blocks=1)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(fm.FluxParams)}:
        cfg["txt_ids_dims"] = []
    mc = sm.Flux(cfg)
    mc.set_inference_dtype(dtype, None)
    with torch.inference_mode():
        base = mc.get_model({})
    init_(base.diffusion_model)
    return cr_patcher(base)


def cr_patcher(base):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def sd_vae(quick: bool = False):
    import copy

    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = copy.deepcopy(SD_VAE)
    if quick:
        params["ddconfig"].update(ch=32, num_res_blocks=1)
    with torch.inference_mode():
        probe = AutoencoderKL(**params)
    init_(probe, 3)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=probe.state_dict(), config={"params": params})


def clip_vision(config: str = "clip_vision_config_h.json", quick: bool = False):
    import tempfile

    import comfy.clip_vision
    path = cr.comfy_root() / "comfy" / config
    cfg = json.loads(path.read_text())
    if quick:
        cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                   projection_dim=64)
    # ClipVisionModel takes the path of a JSON config in every ComfyUI (0.33 also takes a dict,
    # 0.3.75 opens whatever it is given), so the config goes through a file
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / config
        f.write_text(json.dumps(cfg))
        cv = comfy.clip_vision.ClipVisionModel(str(f))
    init_(cv.model, 4)
    return cv


def sd1_clip(quick: bool = False):
    """SD1.x's text encoder (CLIP ViT-L/14 text model, 123 M parameters) with its tokenizer."""
    import comfy.sd
    import comfy.sd1_clip

    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params = {}
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=Target)
    init_(clip.cond_stage_model, 2)
    return clip


class PrecomputedText:
    """A stand-in text encoder for the Flux slice: Flux's own T5 tokenizer, and seeded 4096-wide
    vectors per token (T5-XXL would add 4.7 B parameters that neither the capture overhead nor
    the extraction's gradient involves; the conditioning vectors are inputs there)."""

    def __init__(self, width: int = 4096, pooled: int = 768):
        import comfy.text_encoders.flux as tf
        self.tok = tf.FluxTokenizer()
        self.width, self.pooled = width, pooled

    def tokenize(self, text: str):
        return self.tok.tokenize_with_weights(text)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        ids = [t[0] for t in tokens["t5xxl"][0]]
        g = torch.Generator().manual_seed(sum(int(i) for i in ids) % (2 ** 31))
        cond = torch.randn(1, len(ids), self.width, generator=g)
        pooled = torch.randn(1, self.pooled, generator=g)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond


def conditioning(ctx: torch.Tensor, pooled: torch.Tensor | None = None, **extra):
    d = dict(extra)
    if pooled is not None:
        d["pooled_output"] = pooled
    return [[ctx, d]]


def empty_latent(size_px: int, channels: int = 4, batch: int = 1) -> dict:
    return {"samples": torch.zeros(batch, channels, size_px // 8, size_px // 8)}


# ---------------------------------------------------------------------------------------------
# probes (each runs in its own process)
# ---------------------------------------------------------------------------------------------
def _ksampler(model, pos, neg, lat, steps: int, cfg: float = 5.0, seed: int = 1):
    import nodes as N
    with torch.inference_mode():
        (out,) = N.KSampler().sample(model, seed, steps, cfg, "euler", "normal", pos, neg, lat)
    return out["samples"]


def probe_saliency_sd15(o: dict) -> dict:
    cr.bootstrap(pytorch_attention=o["attention"] == "pytorch")
    model, clip = unet("sd15", torch.float32, o["quick"]), sd1_clip(o["quick"])
    import nodes as N
    prompt = "a photo of a corgi on a red sofa in front of a window"
    with torch.inference_mode():
        (pos,) = N.CLIPTextEncode().encode(clip, prompt)
        (neg,) = N.CLIPTextEncode().encode(clip, "")
    size = 128 if o["quick"] else 512
    lat = empty_latent(size)
    cap = cr.pack_nodes()["ConceptLabSaliencyCapture"]
    with torch.inference_mode():
        patched, rec = cap.execute(model, clip, prompt, "corgi, sofa, window", "daam", "all", 0.0, 1.0)
    steps = o["steps"]
    _ksampler(model, pos, neg, lat, 1)            # warm-up: load, first-call costs
    _ksampler(patched, pos, neg, lat, 1)
    # time: pairs in alternating order (plain-capture, capture-plain, ...), no memory poller
    # running; the ratio is the median of the per-pair ratios. The capture's own code (the DAAM
    # kernel and the recording) is timed inside the capture runs too.
    own = _CaptureClock(rec)
    pairs, a, b = [], None, None
    with own:
        for i in range(o["repeats"]):
            t = {}
            for name in (("plain", "capture") if i % 2 == 0 else ("capture", "plain")):
                own.on = name == "capture"
                t0 = time.perf_counter()
                out = _ksampler(model if name == "plain" else patched, pos, neg, lat, steps)
                t[name] = time.perf_counter() - t0
                a, b = (out, b) if name == "plain" else (a, out)
            pairs.append(t)
    # memory: one run each under the poller
    with Peak() as p:
        _ksampler(model, pos, neg, lat, steps)
    plain_x = p.extra
    with Peak() as p:
        _ksampler(patched, pos, neg, lat, steps)
    cap_x = p.extra
    bytes_n = rec.state_bytes()
    _ksampler(patched, pos, neg, lat, 2 * steps)
    bytes_2n = rec.state_bytes()
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    ratios = [t["capture"] / t["plain"] for t in pairs]
    cap_s = sum(t["capture"] for t in pairs)
    return {"capture_overhead_ratio": round(med(ratios), 4),
            "pair_ratios": [round(r, 4) for r in ratios],
            "seconds_plain": round(med([t["plain"] for t in pairs]), 2),
            "seconds_capture": round(med([t["capture"] for t in pairs]), 2),
            "capture_code_share": round(own.seconds / cap_s, 4),
            "capture_code_seconds_per_run": round(own.seconds / len(pairs), 3),
            "extra_peak_mb": round(cap_x - plain_x, 1),
            "peak_above_loaded_mb_plain": round(plain_x, 1), "peak_above_loaded_mb_capture": round(cap_x, 1),
            "image_bit_identical": bool(torch.equal(a, b)),
            "recording_bytes": {str(steps): bytes_n, str(2 * steps): bytes_2n},
            "setting": f"SD1.5 {size} px, KSampler euler {steps} steps, CFG 5 (batch 2 per call), DAAM on all "
                       f"16 cross-attention layers, 3 words; {o['repeats']} pairs in alternating order, "
                       f"median of the per-pair ratios"}


class _CaptureClock:
    """Wall time inside the capture's own work during a block: the DAAM kernel
    (``kernels.saliency.daam_token_maps``) and the recording's ``add``."""

    def __init__(self, rec):
        self.rec, self.seconds, self.on = rec, 0.0, False

    def _timed(self, fn):
        def run(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        return run

    def __enter__(self):
        self.K = cr.pack_module("kernels.saliency")
        self.maps = self.K.daam_token_maps
        self.K.daam_token_maps = self._timed(self.maps)
        self.rec.add = self._timed(type(self.rec).add.__get__(self.rec))
        return self

    def __exit__(self, *exc):
        self.K.daam_token_maps = self.maps
        del self.rec.add


def probe_saliency_flux(o: dict) -> dict:
    cr.bootstrap(pytorch_attention=o["attention"] == "pytorch")
    model = flux_slice(torch.float32, o["quick"])
    width = 64 if o["quick"] else 4096
    clip = PrecomputedText(width, 64 if o["quick"] else 768)
    prompt = "a corgi sitting on a red sofa in front of a window"
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    pos = conditioning(cond, pooled, guidance=3.5)
    neg = conditioning(torch.zeros_like(cond[:, :1]), torch.zeros_like(pooled), guidance=3.5)
    size = 128 if o["quick"] else 512
    lat = empty_latent(size, 16)
    cap = cr.pack_nodes()["ConceptLabSaliencyCapture"]
    with torch.inference_mode():
        patched, rec = cap.execute(model, clip, prompt, "corgi, sofa, window", "conceptattention", "all", 0.0, 1.0)
    steps = o["steps"]
    _ksampler(model, pos, neg, lat, 1, cfg=1.0)
    _ksampler(patched, pos, neg, lat, 1, cfg=1.0)
    plain_t, cap_t = [], []
    for _ in range(o["repeats"]):
        with Peak() as p:
            a = _ksampler(model, pos, neg, lat, steps, cfg=1.0)
        plain_t.append(p.seconds)
        with Peak() as p:
            b = _ksampler(patched, pos, neg, lat, steps, cfg=1.0)
        cap_t.append(p.seconds)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"capture_overhead_ratio": round(med(cap_t) / med(plain_t), 4),
            "seconds_plain": round(med(plain_t), 2), "seconds_capture": round(med(cap_t), 2),
            "image_bit_identical": bool(torch.equal(a, b)),
            "setting": f"Flux slice (hidden 3072, 24 heads, 1 double + 1 single block, fp32) at {size} px, "
                       f"{steps} steps, cfg 1 (guidance-distilled), ConceptAttention with 3 concepts in the "
                       f"double block; text: {PrecomputedText.__doc__.split(':')[0]}"}


def _seed_inputs(o: dict, kind: str, dtype: torch.dtype, size: int):
    ctx_dim = {"sd15": 768, "sd21": 1024, "sdxl": 2048}[kind]
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, 77, ctx_dim, generator=g)
    extra = {}
    pooled = None
    if kind == "sdxl":
        pooled = torch.randn(1, 1280, generator=g)
        extra = {"width": size, "height": size, "crop_w": 0, "crop_h": 0, "target_width": size,
                 "target_height": size}
    pos = conditioning(ctx, pooled, **extra)
    neg = conditioning(torch.zeros_like(ctx), None if pooled is None else torch.zeros_like(pooled), **extra)
    refs = torch.rand(3, size, size, 3, generator=g)
    return pos, neg, refs


def _estimate(compute, kernel: str):
    """The node's memory estimate, and the arguments it handed ``kernels.memory.<kernel>`` (as
    JSON), so that tests can re-evaluate the kernel on these measurements when its factors change."""
    import dataclasses
    M = cr.pack_module("kernels.memory")
    real, seen = getattr(M, kernel), []

    def recording(*a, **k):
        seen.append((a, k))
        return real(*a, **k)

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {type(v).__name__: dataclasses.asdict(v)}     # VitShape, KVGeometry
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (int, float, str, type(None))) else str(v).replace("torch.", "")

    setattr(M, kernel, recording)
    try:
        est = compute()
    finally:
        setattr(M, kernel, real)
    a, k = seen[-1]
    return est, {"kernel": kernel, "args": plain(list(a)), "kwargs": {n: plain(v) for n, v in k.items()}}


def probe_seed(o: dict) -> dict:
    """One Seed Search iteration: peak memory and time (o: kind, dtype, size, steps; memory: the
    node's memory setting; fake: count it in fake tensors instead of running it)."""
    cr.bootstrap(pytorch_attention=o["attention"] == "pytorch")
    with counting(o) as job:
        return _probe_seed(o, job)


def _probe_seed(o: dict, job) -> dict:
    kind, size, steps = o["kind"], o["size"], o["search_steps"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[o["dtype"]]
    # bf16/fp16 weights compute in fp32 through manual cast, which is what ComfyUI does on a
    # device without fast half precision (``unet_manual_cast``): on this AVX2 CPU a bf16 matrix
    # multiply takes about 100x the fp32 one (docs/scale.md)
    compute = None if dtype == torch.float32 else torch.float32
    model = unet(kind, dtype, o["quick"], compute)
    vae = sd_vae(o["quick"])
    cv_config = "clip_vision_config_g.json" if o.get("clip_vision") == "g" else "clip_vision_config_h.json"
    cv = clip_vision(cv_config, o["quick"]) if o.get("semantic", True) else None
    pos, neg, refs = _seed_inputs(o, kind, dtype, size)
    lat = empty_latent(size)
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    args = dict(seed=1, cfg=5.0, iterations=1, search_steps=steps, learning_rate=0.1, lr_drop_after=10,
                norm_regulariser=True, norm_weight=0.1, semantic_steps=1,
                semantic_weight=1.0 if cv is not None else 0.0, appearance_weight=1.0, appearance_target="mean")
    if o.get("memory"):
        args["memory"] = o["memory"]
    loaded = rss_mb() if job is None else job.counter.live / 2 ** 20
    phases = _PhaseClock({"diffusion forward without gradients": (model.model.diffusion_model, False),
                          "diffusion forward with gradients (recompute)": (model.model.diffusion_model, True),
                          "VAE decode forward": (vae.first_stage_model.decoder, None),
                          "CLIP vision forward": (cv.model if cv is not None else None, None)})
    est, est_args = _estimate(lambda: cr.pack_module("nodes.seed_search").memory_estimate(
        model, vae, cv, lat["samples"], args["cfg"], steps), "seed_search_estimate")
    with meter(job) as p, phases:
        with torch.inference_mode():
            out = cr.pack_module("nodes.seed_search").search_noise(model, vae, pos, neg, lat, refs, clip_vision=cv,
                                                                  **args)
    res = {"peak_gb": round(p.peak / 1024, 2), "peak_above_loaded_gb": round(p.extra / 1024, 2),
           "loaded_gb": round(loaded / 1024, 2), "seconds_per_iteration": round(p.seconds, 1),
           "estimate_gb": round(est.total / 2 ** 30, 2),
           "estimate_parts_gb": {k: round(v / 2 ** 30, 2) for k, v in est.as_dict().items()},
           "estimate_args": est_args,
           "unet_params": sum(t.numel() for t in model.model.diffusion_model.parameters()),
           "memory": out.memory, "how": "counted (fake tensors)" if job is not None else "measured (RSS)",
           "setting": f"{kind} {o['dtype']}{' weights, fp32 compute (manual cast)' if compute else ''} {size} px, Seed Search 1 iteration of {steps} search steps, CFG 5 "
                      f"(batch 2 per model call), semantic loss {_semantic_setting(cv, cv_config)}, appearance loss on"}
    if cv is not None:
        res["clip_vision"] = _vit_figures(cv_config, cv, quick=o["quick"])
        if kind == "sdxl":      # the other SDXL encoder, for the arithmetic (not built)
            other = "clip_vision_config_h.json" if cv_config.endswith("_g.json") else "clip_vision_config_g.json"
            res["clip_vision_other"] = _vit_figures(other, None, cv.dtype, o["quick"])
    if o.get("time_step") and job is None:
        # one plain sampling step of the same model (KSampler, 1 step, same CFG and latent)
        _ksampler(model, pos, neg, lat, 1)
        with Peak() as q:
            _ksampler(model, pos, neg, lat, 1)
        res["seconds_plain_step"] = round(q.seconds, 2)
        split = phases.seconds()
        split["backward passes and the rest"] = round(p.seconds - sum(split.values()), 1)
        res["seconds_split"] = split
        res["in_plain_steps"] = {k: round(v / q.seconds, 1) for k, v in split.items()}
    return res


def _semantic_setting(cv, config: str) -> str:
    if cv is None:
        return "off"
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    compute = cr.pack_module("nodes.seed_search").clip_vision_compute_dtype(cv)
    return (f"on {_vit_name(config)} CLIP vision (stored {name(cv.dtype)} as ComfyUI loads it, "
            f"computing in {name(compute)})")


def _vit_name(config: str) -> str:
    return "ViT-bigG/14" if config.endswith("_g.json") else "ViT-H/14"


def _vit_figures(config: str, cv=None, dtype=None, quick: bool = False) -> dict:
    """A CLIP vision model's parameters (counted on ``cv``, or from its config by the standard ViT
    arithmetic) and the node's estimate of what its backward keeps for one image."""
    M = cr.pack_module("kernels.memory")
    cfg = json.loads((cr.comfy_root() / "comfy" / config).read_text())
    if quick:
        cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, projection_dim=64)
    w, mlp, n, ps, size = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                           cfg["patch_size"], cfg["image_size"])
    vit = M.VitShape(size, ps, n, w, mlp)
    if cv is not None:
        params, dtype = sum(t.numel() for t in cv.model.parameters()), cv.dtype
    else:   # patch conv, class + position embeddings, pre-LN; per layer attention, MLP, 2 LNs; post-LN, projection
        params = (3 * ps * ps * w + w + vit.tokens * w + 2 * w
                  + n * (4 * w * w + 4 * w + 2 * w * mlp + mlp + w + 4 * w) + 2 * w + w * cfg["projection_dim"])
    return {"name": _vit_name(config), "params": params, "dtype": str(dtype).replace("torch.", ""),
            "weight_gb": round(params * M.dtype_bytes(dtype) / 2 ** 30, 2),
            "backward_activations_gb_estimate": round(M.transformer_train_bytes(vit, 1, dtype) / 2 ** 30, 2)}


class _PhaseClock:
    """Wall time spent inside given modules' forwards during a block (module hooks), split by
    whether gradients were on (``True``/``False``; ``None``: either). Calls nested inside an
    already-timed forward of the same module are not counted twice. What is left of the block's
    time is backward (including checkpointed recomputes inside it) and everything else."""

    def __init__(self, spec: dict):
        self.spec = {k: v for k, v in spec.items() if v[0] is not None}
        self.total = dict.fromkeys(self.spec, 0.0)
        self.handles = []

    def __enter__(self):
        for name, (mod, grad) in self.spec.items():
            state = {"depth": 0, "t0": 0.0}

            def pre(_m, _a, name=name, grad=grad, state=state):
                if grad is not None and torch.is_grad_enabled() != grad:
                    return
                if state["depth"] == 0:
                    state["t0"] = time.perf_counter()
                state["depth"] += 1

            def post(_m, _a, _o, name=name, grad=grad, state=state):
                if grad is not None and torch.is_grad_enabled() != grad:
                    return
                state["depth"] -= 1
                if state["depth"] == 0:
                    self.total[name] += time.perf_counter() - state["t0"]

            self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def seconds(self) -> dict:
        return {k: round(v, 1) for k, v in self.total.items()}


def probe_cn(o: dict) -> dict:
    """One extraction gradient evaluation vs one dense K/V fine-tune step (same batch; memory: the
    node's memory setting; fake: count it in fake tensors instead of running it)."""
    pack = cr.bootstrap(pytorch_attention=o["attention"] == "pytorch")
    with counting(o) as job:
        return _probe_cn(o, job, pack)


def _probe_cn(o: dict, job, pack) -> dict:
    import importlib

    cn = importlib.import_module(f"{pack.__name__}.nodes.concept_neurons")
    rt = cr.pack_module("nodes._runtime")
    size = o["size"]
    if o["kind"] == "flux":
        model = flux_slice(torch.float32, o["quick"])
        clip = PrecomputedText(64 if o["quick"] else 4096, 64 if o["quick"] else 768)
    else:
        model, clip = unet("sd15", torch.float32, o["quick"]), sd1_clip(o["quick"])
    channels = rt.latent_channels(model.model)
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(o["batch"], channels, size // 8, size // 8, generator=g)
    cond, pooled = cn.encode_text(clip, "a photo of a dog")
    settings = cn.ExtractSettings(procedure="iterative", budget_fraction=0.004, iterations=1, prior_images=0,
                                  noise_draws=o["batch"], chunk=int(o.get("chunk") or 0))
    layers = cn.model_layers(model)
    rt.load_for_compute(model)
    setting = o.get("memory") or "full"
    plan = cn.memory_plan(model, lat, 0, settings, layers, setting)
    est, est_args = _estimate(lambda: cn.memory_estimate(model, lat, 0, settings, layers, setting, plan.chunk),
                              "extract_estimate")
    loss = cn.ConceptLoss(model, lat, lat[:0], cond, pooled, settings, layers, plan)
    mode = o["mode"]
    with torch.inference_mode(False):
        leaves = {n: (torch.ones if mode == "extract" else torch.zeros)(layers[n]["shape"]) for n in layers}
    with meter(job) as p:
        if mode == "extract":      # one gradient evaluation of the search: d loss / d multipliers
            loss(leaves)
        else:                      # one dense K/V fine-tune step: d loss / d deltas, then Adam
            _, grads = loss.gradient(leaves, "add")
            with torch.inference_mode(False):
                deltas = {n: v.clone().requires_grad_(True) for n, v in leaves.items()}
                opt = torch.optim.Adam(list(deltas.values()), lr=1e-3)
                for n, d in deltas.items():
                    d.grad = grads[n]
                opt.step()
    copied = loss.copied_bytes
    return {"mode": mode, "peak_above_loaded_mb": round(p.extra, 1), "peak_gb": round(p.peak / 1024, 2),
            "seconds": round(p.seconds, 1), "weights_copied_bytes": int(copied),
            "estimate_mb": round(est.total / 2 ** 20, 1),
            "estimate_parts_mb": {k: round(v / 2 ** 20, 1) for k, v in est.as_dict().items()},
            "estimate_args": est_args,
            "kv_weights": int(sum(math.prod(v["shape"]) * (2 / 3 if v["kind"] == "qkv" else 1)
                                  for v in layers.values())),
            "memory": plan.as_dict(), "how": "counted (fake tensors)" if job is not None else "measured (RSS)",
            "setting": f"{o['kind']} fp32 {size} px, batch {o['batch']} (noise draws), {mode}"}


def probe_fit(o: dict) -> dict:
    from . import fit
    cr.bootstrap(pytorch_attention=True)
    return fit.probe(o)


def probe_fit_time(o: dict) -> dict:
    from . import fit
    return fit.probe_time(o)


def probe_fit_parts(o: dict) -> dict:
    from . import fit
    return fit.probe_parts(o)


PROBES = {"saliency-sd15": probe_saliency_sd15, "saliency-flux": probe_saliency_flux, "seed": probe_seed,
          "cn": probe_cn, "fit": probe_fit, "fit-time": probe_fit_time, "fit-parts": probe_fit_parts}


# ---------------------------------------------------------------------------------------------
# the job: one fresh process per probe
# ---------------------------------------------------------------------------------------------
def _spawn(name: str, opts: dict, threads: int, timeout: float = 3600, env: dict | None = None) -> dict:
    """Run probe ``name`` in a fresh process (``env``: extra environment variables for it)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(env or {}))
    cmd = [sys.executable, "-m", "benchmarks", "scale", "--probe", name, "--probe-opts", json.dumps(opts),
           "--threads", str(threads)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            out = json.loads(line[len(RESULT):])
            out["probe_seconds"] = round(time.time() - t0, 1)
            print(f"[scale] {name} {json.dumps(opts)} -> {json.dumps(out)[:300]}", flush=True)
            return out
    rc = proc.returncode
    why = "killed (out of memory?)" if rc in (-9, 137) else f"exit code {rc}"
    tail = (proc.stdout[-1500:] + proc.stderr[-2500:])
    print(f"[scale] {name} {json.dumps(opts)} failed: {why}\n{tail}", flush=True)
    return {"failed": why, "log_tail": tail[-2000:]}


def add_arguments(p) -> None:
    p.add_argument("--json", help="write the figures to this path")
    p.add_argument("--section", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every probe")
    p.add_argument("--attention", choices=("pytorch", "default"), default="pytorch",
                   help="pytorch: torch SDPA (ComfyUI --use-pytorch-cross-attention, its GPU default); "
                        "default: ComfyUI's CPU default")
    p.add_argument("--quick", action="store_true", help="tiny models: a smoke test of the job only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sd21-dtype", action="append", choices=("fp32", "bf16"),
                   help="seed-sd21: only these weight dtypes (repeatable; default fp32 and bf16)")
    p.add_argument("--no-seed-six", dest="seed_six", action="store_false",
                   help="seed-sd15: skip the 6-step probe (time figures only; no peak growth)")
    p.add_argument("--sdxl-clip-vision", choices=("h", "g"), default="h",
                   help="CLIP vision model of the SDXL Seed Search probe: ViT-H/14 (default) or ViT-bigG/14")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-opts", default="{}", help=argparse.SUPPRESS)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.probe:
        opts = json.loads(args.probe_opts)
        res = PROBES[args.probe](opts)
        print(RESULT + json.dumps(res), flush=True)
        raise SystemExit(0)
    base = {"attention": args.attention, "quick": args.quick}
    chosen = args.section or list(SECTIONS)
    out = {"comfyui": cr.comfy_version(), "threads": args.threads, "attention": args.attention,
           "quick": args.quick, "device": "CPU (2 cores, 24 GB)", "sections": {}}
    t0 = time.time()
    spawn = lambda name, env=None, **kw: _spawn(name, dict(base, **kw), args.threads, env=env)  # noqa: E731
    if "saliency-sd15" in chosen:
        r = spawn("saliency-sd15", steps=3, repeats=args.repeats)
        out["saliency.sd15"] = dict(r, how="measured")
    if "saliency-flux" in chosen:
        r = spawn("saliency-flux", steps=3, repeats=args.repeats)
        out["saliency.flux"] = dict(r, how="measured")
    if "seed-sd15" in chosen:
        size = 128 if args.quick else 512
        two = spawn("seed", kind="sd15", dtype="fp32", size=size, search_steps=2, time_step=True)
        six = spawn("seed", kind="sd15", dtype="fp32", size=size, search_steps=6) if args.seed_six else {}
        fig = {"two_steps": two, "six_steps": six, "how": "measured"}
        if "peak_above_loaded_gb" in two:
            fig["seconds_per_iteration_over_step"] = round(two["seconds_per_iteration"] / two["seconds_plain_step"], 1)
        if "peak_above_loaded_gb" in two and "peak_above_loaded_gb" in six:
            fig["peak_growth_2_to_6_steps"] = round(six["peak_gb"] / two["peak_gb"], 3)
            fig["peak_above_loaded_growth_2_to_6_steps"] = round(
                six["peak_above_loaded_gb"] / max(two["peak_above_loaded_gb"], 1e-6), 3)
        out["seed_search.sd15"] = fig
    if "seed-sd21" in chosen:
        size = 192 if args.quick else 768
        fig = {d: spawn("seed", kind="sd21", dtype=d, size=size, search_steps=2) for d in args.sd21_dtype or ("fp32", "bf16")}
        fig["how"] = "measured"
        if "peak_gb" in fig.get("fp32", {}):
            fig["peak_gb"] = fig["fp32"]["peak_gb"]
        out["seed_search.sd21_768"] = fig
    if "seed-sdxl" in chosen:
        size = 128 if args.quick else 512
        r = spawn("seed", kind="sdxl", dtype="fp32", size=size, search_steps=2, clip_vision=args.sdxl_clip_vision)
        fig = {"measured_512": r}
        if "peak_gb" in r:
            fig.update(sdxl_extrapolate(r))
        out["seed_search.sdxl_1024"] = fig
    if "cn-sd15" in chosen:
        size = 128 if args.quick else 512
        ex = spawn("cn", kind="sd15", mode="extract", size=size, batch=2)
        ft = spawn("cn", kind="sd15", mode="finetune", size=size, batch=2)
        fig = {"extract": ex, "finetune": ft, "how": "measured"}
        if "peak_above_loaded_mb" in ex and "peak_above_loaded_mb" in ft:
            fig["peak_over_finetune_step"] = round(ex["peak_gb"] / ft["peak_gb"], 3)
            fig["peak_above_loaded_over_finetune_step"] = round(
                ex["peak_above_loaded_mb"] / max(ft["peak_above_loaded_mb"], 1e-6), 3)
            fig["weights_copied_bytes"] = ex["weights_copied_bytes"]
        out["concept_neurons.sd15"] = fig
    if "cn-flux" in chosen:
        size = 128 if args.quick else 512
        ex = spawn("cn", kind="flux", mode="extract", size=size, batch=1)
        fig = {"slice_512": ex}
        if "peak_gb" in ex:
            fig.update(flux_project(ex, size))
        out["concept_neurons.flux"] = fig
    if "fit" in chosen:
        from . import fit
        fit.run_section(args, spawn, out)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def sdxl_extrapolate(r: dict) -> dict:
    """SDXL at 1024 px from the fp32 measurement at 512 px. What lies above the loaded weights grows
    with the token count (4x the pixels; SDPA keeps no attention matrices), except the CLIP vision
    part, which sees 224 px whatever the image size, so the 4x is an upper bound. bf16 weights
    and bf16 compute (a GPU: no fp32 casts) halve the UNet's weights and the activations. The
    other SDXL encoder (ViT-bigG/14 against ViT-H/14) adds its weights and its backward."""
    loaded, extra = r["loaded_gb"], r["peak_above_loaded_gb"]
    unet32 = r["unet_params"] * 4 / 2 ** 30
    fp32 = loaded + 4 * extra
    bf16 = loaded - unet32 / 2 + 2 * extra
    out = {"peak_gb": round(bf16, 1), "peak_gb_fp32": round(fp32, 1), "how": "extrapolated",
           "arithmetic": f"fp32 at 1024 px: loaded {loaded} GB + 4 x the {extra} GB measured above it at 512 px "
                         f"= {fp32:.1f} GB. bf16 (weights and compute, as on a GPU): the UNet's {unet32:.1f} GB of "
                         f"fp32 weights halve and so do the activations: {loaded} - {unet32 / 2:.1f} + 2 x {extra} "
                         f"= {bf16:.1f} GB",
           "fits": {f"{g} GB": bf16 <= g for g in (12, 16, 24)},
           "fits_fp32": {f"{g} GB": fp32 <= g for g in (12, 16, 24)}}
    cv, other = r.get("clip_vision"), r.get("clip_vision_other")
    if cv and other:
        weights = other["weight_gb"] - cv["weight_gb"]
        backward = max(0.0, other["backward_activations_gb_estimate"] - cv["backward_activations_gb_estimate"])
        total = bf16 + weights + backward
        out[f"peak_gb_with_{other['name']}"] = round(total, 1)
        out["arithmetic"] += (f". With {other['name']} instead of {cv['name']}: + {weights:.2f} GB of {other['dtype']} "
                              f"weights + {backward:.2f} GB more kept for its backward (the node's estimate) = {total:.1f} GB")
        out[f"fits_with_{other['name']}"] = {f"{g} GB": total <= g for g in (12, 16, 24)}
    return out


def flux_project(ex: dict, size: int, text_tokens: int = 77) -> dict:
    """A full Flux.1 (19 double + 38 single blocks, 11.9 B parameters) extracting at 1024 px,
    from the 2-block slice measured at ``size`` px: the slice's activations per block, times 57
    blocks, times the growth of the token count (image tokens x4, the 77 text tokens of ComfyUI's
    T5 padding stay); plus the fp32 K/V tensors per block (the node's own estimate of them on
    the slice) times 57, plus the weights."""
    gib = 2 ** 30
    kv_slice = sum(v for k, v in ex["estimate_parts_mb"].items() if "K/V" in k) * 2 ** 20
    act_slice = ex["peak_above_loaded_mb"] * 2 ** 20 - kv_slice
    blocks = 19 + 38
    img, img_full = (size // 16) ** 2, (1024 // 16) ** 2
    growth = (img_full + text_tokens) / (img + text_tokens)
    act = act_slice / 2 * blocks * growth
    kv = kv_slice / 2 * blocks
    weights = 11.9e9 * 4
    fp32 = (weights + act + kv) / gib
    bf16 = (weights / 2 + act / 2 + kv) / gib
    return {"peak_gb_projected": round(fp32, 1), "peak_gb_projected_bf16": round(bf16, 1), "how": "extrapolated",
            "arithmetic": f"weights {weights / gib:.1f} GiB (fp32) + activations {act_slice / 2 / gib:.3f} GiB per "
                          f"block (slice: {act_slice / gib:.2f} GiB above the weights and K/V tensors, 2 blocks) x "
                          f"{blocks} blocks x {growth:.2f} (tokens {img_full}+{text_tokens} against {img}+{text_tokens}) "
                          f"= {act / gib:.1f} GiB + K/V tensors {kv_slice / 2 / gib:.3f} GiB per block x {blocks} = "
                          f"{kv / gib:.1f} GiB; total {fp32:.1f} GiB. With bf16 weights and activations (a GPU): "
                          f"{bf16:.1f} GiB"}

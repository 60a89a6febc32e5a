"""``python -m benchmarks scale --section fit``: what Extract and Seed Search need on the GPUs users
have (issue 23), counted at full size for every family in its real precision.

Each model is built through ComfyUI's own config and model classes at the released geometry
(``MODELS``), in fake tensors (``benchmarks/fakemem.py``): no data, every allocation counted at
the size and dtype a GPU would make it. The pack's own nodes then run through their real code
paths (ComfyUI's sampler, the pack's autograd, checkpointing and offloading) for one Seed Search
iteration or one Extract gradient evaluation, with every memory setting the nodes offer, and the
automatic choice the nodes would make on a 12, 16 and 24 GB card. What the count leaves out (the
caching allocator's fragmentation, kernel workspaces) is added as a stated margin
(``fakemem.with_margin``).

The count is checked against measured process memory on the cases this CPU can run (SD1.5 in
fp32: ``counter_vs_rss``), and the time the low-memory settings cost is measured on SD1.5 for
real, as ratios within one process (``time_ratio_checkpointed``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import statistics
import time
from dataclasses import dataclass, field

import torch

from . import comfy_runtime as cr
from . import fakemem
from .scale import FLUX as _FLUX, SD15, SDXL   # (scale imports this module inside its probes)

GIB = fakemem.GIB
CARDS_GB = (12, 16, 24)

# ---------------------------------------------------------------------------------------------
# geometry: the configs ComfyUI's model detection makes of the released checkpoints
# ---------------------------------------------------------------------------------------------
FLUX1 = dict(_FLUX, txt_ids_dims=[])
#: Flux.2-dev: 6144 wide (48 heads of 128), 8 double + 48 single blocks, Mistral-3 text 15360 wide.
FLUX2 = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=15360,
             hidden_size=6144, mlp_ratio=3.0, num_heads=48, depth=8, depth_single_blocks=48,
             axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True,
             txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
             default_ref_method="index", ref_index_scale=10.0, yak_mlp=False, txt_norm=False)
#: Qwen-Image: 60 blocks of 3072 (24 heads of 128), Qwen2.5-VL text 3584 wide, 2x2 patches of 16 channels.
QWEN_IMAGE = dict(image_model="qwen_image", in_channels=64, num_layers=60)
#: Z-Image (Turbo): NextDiT 3840 wide, 30 layers (30 heads), Qwen3-4B captions 2560 wide.
ZIMAGE = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30,
              qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
              rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
              pad_tokens_multiple=32)
#: SD3.5 Large: MMDiT depth 38 (2432 wide), 192-patch position embedding, T5 + CLIP text 4096 wide.
SD35_LARGE = dict(in_channels=16, patch_size=2, out_channels=16, depth=38, input_size=None, adm_in_channels=2048,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 2432}},
                  num_patches=192 * 192, pos_embed_max_size=192, qk_norm="rms", pos_embed_scaling_factor=None,
                  x_block_self_attn_layers=[])

_KL = {"double_z": True, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4],
       "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


@dataclass(frozen=True)
class Spec:
    """A model family at full size: how to build it and what its text encoder hands it."""
    key: str                       # the JSON key (fit.<node>.<key>_...)
    label: str
    config_class: str              # comfy.supported_models.<class>
    unet_config: dict
    px: int                        # the resolution the targets are set at
    vae: str                       # kl4 | kl16 | flux2 | wan21
    text_tokens: int               # tokens of the conditioning (ComfyUI's padding, or a typical prompt)
    text_width: int
    pooled: int | None = None      # pooled vector width (SDXL, SD3, Flux.1)
    extra: tuple = ()              # extra conditioning keys (SDXL sizes, Flux guidance)


MODELS: dict[str, Spec] = {s.key: s for s in (
    Spec("sd15", "SD1.5", "SD15", SD15, 512, "kl4", 77, 768),
    Spec("sdxl", "SDXL", "SDXL", SDXL, 1024, "kl4", 77, 2048, 1280, ("sizes",)),
    Spec("flux1", "Flux.1-dev", "Flux", FLUX1, 1024, "kl16", 256, 4096, 768, ("guidance",)),
    Spec("flux2", "Flux.2-dev", "Flux2", FLUX2, 1024, "flux2", 128, 15360, None, ("guidance",)),
    Spec("qwen_image", "Qwen-Image", "QwenImage", QWEN_IMAGE, 1024, "wan21", 128, 3584),
    Spec("zimage", "Z-Image", "ZImage", ZIMAGE, 1024, "kl16", 128, 2560),
    Spec("sd35_large", "SD3.5 Large", "SD3", SD35_LARGE, 1024, "kl16", 333, 4096, 2048),
)}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def compute_dtype_for(weights: str) -> torch.dtype | None:
    """What a GPU computes a model stored in ``weights`` in: fp8 through ComfyUI's manual cast to
    bf16 (fp8 matmuls need ``--fast`` on compute capability 8.9+), the rest natively."""
    return torch.bfloat16 if weights == "fp8" else None


# ---------------------------------------------------------------------------------------------
# building (inside fakemem.fake_job())
# ---------------------------------------------------------------------------------------------
def build_model(spec: Spec, weights: str):
    """The diffusion model as ComfyUI's loader makes it: ``supported_models.<class>(config)``,
    its weight and manual-cast dtypes, a ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    dtype = DTYPES[weights]
    mc = getattr(sm, spec.config_class)(dict(spec.unet_config, dtype=dtype) if spec.key in ("sd15", "sdxl")
                                        else dict(spec.unet_config))
    mc.set_inference_dtype(dtype, compute_dtype_for(weights))
    with torch.inference_mode():
        base = mc.get_model({})
    with fakemem.real():
        # the sigma schedule stays real: samplers branch on its values
        import comfy.model_base
        base.model_sampling = comfy.model_base.model_sampling(mc, base.model_type)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_vae(kind: str):
    """The family's VAE at full size as ``comfy.sd.VAE`` (which picks its own dtype)."""
    import comfy.sd
    with torch.inference_mode():
        if kind == "wan21":
            from comfy.ldm.wan.vae import WanVAE
            probe = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
            sd = probe.state_dict()
            del probe
            return comfy.sd.VAE(sd=sd)
        from comfy.ldm.models.autoencoder import AutoencoderKL
        z = {"kl4": 4, "kl16": 16, "flux2": 32}[kind]
        ddconfig = dict(_KL, z_channels=z)
        if kind == "flux2":
            ddconfig["batch_norm_latent"] = True
        params = {"embed_dim": z, "ddconfig": ddconfig}
        probe = AutoencoderKL(**copy.deepcopy(params))
        sd = probe.state_dict()
        del probe
        # Flux.2's VAE is detected from its state dict (its latent BatchNorm), as ComfyUI loads it:
        # 128 latent channels at 1/16, and its decode estimate
        vae = comfy.sd.VAE(sd=sd) if kind == "flux2" else comfy.sd.VAE(sd=sd, config={"params": params})
    fakemem.fakeify(vae.first_stage_model)
    vae.latent_channels = {"kl4": 4, "kl16": 16, "flux2": 128}[kind]
    assert kind != "flux2" or vae.downscale_ratio == 16, vae.downscale_ratio
    return vae


def build_clip_vision(config: str = "clip_vision_config_h.json"):
    """ComfyUI's CLIP vision model from its own config (ViT-H/14 by default), stored as ComfyUI
    stores it (fp16 on a device fast at it)."""
    import tempfile
    from pathlib import Path

    import comfy.clip_vision
    cfg = json.loads((cr.comfy_root() / "comfy" / config).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / config
        f.write_text(json.dumps(cfg))
        return comfy.clip_vision.ClipVisionModel(str(f))


class FakeText:
    """A text encoder's output at the family's shape (fake tensors): the T5 / Mistral / Qwen
    encoders run before the gradient work and ComfyUI offloads them for it."""

    def __init__(self, spec: Spec, dtype=torch.float32):
        self.spec, self.dtype = spec, dtype

    def tokenize(self, text: str):
        return {"text": text}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        s = self.spec
        cond = torch.randn(1, s.text_tokens, s.text_width, dtype=self.dtype)
        pooled = torch.randn(1, s.pooled, dtype=self.dtype) if s.pooled else None
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond


def conditioning(spec: Spec, px: int, empty: bool = False):
    """CONDITIONING as the family's text encode node hands it to a sampler."""
    cond, pooled = FakeText(spec).encode_from_tokens(None, return_pooled=True)
    d = {}
    if pooled is not None:
        d["pooled_output"] = pooled
    if "sizes" in spec.extra:
        d.update(width=px, height=px, crop_w=0, crop_h=0, target_width=px, target_height=px)
    if "guidance" in spec.extra:
        d["guidance"] = 3.5
    return [[torch.zeros_like(cond) if empty else cond, d]]


def empty_latent(spec: Spec, px: int, batch: int = 1) -> dict:
    """The latent ComfyUI's empty-latent node makes for the family (fixed by the samplers)."""
    ratio = 16 if spec.vae == "flux2" else 8
    ch = {"kl4": 4, "kl16": 16, "flux2": 128, "wan21": 16}[spec.vae]
    shape = (batch, ch, 1, px // ratio, px // ratio) if spec.vae == "wan21" else (batch, ch, px // ratio, px // ratio)
    return {"samples": torch.zeros(shape)}


# ---------------------------------------------------------------------------------------------
# counting one node run
# ---------------------------------------------------------------------------------------------
@dataclass
class Count:
    """One counted run: bytes resident before the work (weights on the device), the peak during
    it, and the peak with the margin, in GiB; plus what the node reported."""
    weights_gib: float
    counted_peak_gib: float
    peak_gib: float
    host_weights_gib: float = 0.0
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)     # live GiB at the peak by what made them
    where: str = ""                                # what ran at the peak
    node: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


@contextlib.contextmanager
def _no_picture(module):
    """The live preview's last step, a JPEG of the decoded candidate, reads the pixels' values,
    which fake tensors do not have (the decode before it is counted)."""
    real = getattr(module, "preview_image", None)
    if real is None:
        yield
        return
    module.preview_image = lambda images: None
    try:
        yield
    finally:
        module.preview_image = real


class _Counted(Exception):
    """Raised once the counted work is done (what follows it is host-side bookkeeping)."""


@contextlib.contextmanager
def _one_gradient(cn_module):
    """Extract up to the end of its first gradient evaluation. What follows on the host (choosing
    the neurons: data-dependent shapes that fake tensors cannot have; the fingerprint: hashes of
    the weights' bytes) allocates nothing on the device of note. The prior images are sampled
    one batch only (the others repeat it), the gradient's chunks two only (the peak is reached by
    the second; the accumulators exist from the first)."""
    real = cn_module.ConceptLoss.gradient
    real_prior = cn_module.sample_prior

    def first_batch(model, clip, prompt, n, hw, steps, cfg, seed, batch=0):
        # the prior images are sampled ``batch`` at a time, each call alike: one is counted
        one = real_prior(model, clip, prompt, min(n, batch or n), hw, steps, cfg, seed, batch)
        return one[:1].expand(n, *one.shape[1:]).clone() if one.shape[0] < n else one

    def once(self, *a, **k):
        self.chunks_limit = 2      # the peak is reached by the second chunk; the rest repeat it
        out = real(self, *a, **k)
        _LAST_PLAN["plan"] = self.plan.as_dict() if self.plan is not None else {}
        raise _Counted(out)

    cn_module.ConceptLoss.gradient = once
    cn_module.sample_prior = first_batch
    try:
        yield
    finally:
        cn_module.ConceptLoss.gradient = real
        cn_module.sample_prior = real_prior


def count_node(spec: Spec, node: str, weights: str, px: int | None = None, memory: str | None = None,
               card_gb: float | None = None, references: int = 3) -> Count:
    """One Seed Search iteration (``node="seed"``; one search step: every step alike, the peak is
    one step's, as measured on SD1.5 from 2 to 6 steps) or one Extract gradient evaluation
    (``node="extract"``, with its prior images sampled first) of the pack's node on the full-size
    model, counted in fake tensors. ``memory``: the node's memory setting (None: its default);
    ``card_gb``: the card the node sees (its free memory), for the automatic choice."""
    cr.bootstrap(pytorch_attention=True)
    import comfy.model_management as mm
    px = px or spec.px
    t0 = time.time()
    mm.unload_all_models()
    with fakemem.fake_job() as job, _gpu_precisions(), _card(card_gb, job), _host_copies(job):
        c = job.counter
        with c.labelled("weights"):
            model = build_model(spec, weights)
            vae = build_vae(spec.vae)
            cv = build_clip_vision() if node == "seed" else None
        # what building made besides the weights (state dicts, probes) lives in host memory
        job.modules = _modules(model, vae, cv)
        c.keep_only(t for m in job.modules for t in list(m.parameters()) + list(m.buffers()))
        with c.labelled("inputs"):
            refs = torch.rand(references, px, px, 3)
        if card_gb is not None:     # the weights wait in system memory until the node loads them
            c.exclude(t for m in job.modules for t in list(m.parameters()) + list(m.buffers()))
        job.built_bytes = c.live
        c.reset_peak()
        kwargs = {"memory": memory} if memory is not None else {}
        watch = {"diffusion model": model.model.diffusion_model,
                 "VAE decoder": getattr(vae.first_stage_model, "decoder", None),
                 "VAE encoder": getattr(vae.first_stage_model, "encoder", None),
                 "CLIP vision": cv.model if cv is not None else None}
        with c.watching(watch):
            if node == "seed":
                ss = cr.pack_module("nodes.seed_search")
                with c.labelled("inputs"):
                    lat = empty_latent(spec, px)
                    pos, neg = conditioning(spec, px), conditioning(spec, px, empty=True)
                args = dict(seed=1, cfg=1.0 if "guidance" in spec.extra else 5.0, iterations=1, search_steps=1,
                            learning_rate=0.1, lr_drop_after=10, norm_regulariser=True, norm_weight=1.0,
                            semantic_steps=1, semantic_weight=1.0, appearance_weight=1.0, appearance_target="mean")
                with torch.inference_mode(), _no_picture(ss):
                    out = ss.search_noise(model, vae, pos, neg, lat, refs, clip_vision=cv, **args, **kwargs)
            else:
                cn = cr.pack_module("nodes.concept_neurons")
                settings = cn.ExtractSettings(iterations=1, prior_steps=1, **kwargs)
                with torch.inference_mode(), _one_gradient(cn), _host_side(c, cn):
                    try:
                        out = cn.extract(model, FakeText(spec), vae, refs, "a photo of a dog", settings)
                    except _Counted as done:
                        out = done
        node_info = _node_info(out)
        host = getattr(job, "host_bytes", 0)
        resident = _resident_weights(model, vae, cv) - host
    return Count(weights_gib=resident / GIB, counted_peak_gib=c.peak / GIB,
                 peak_gib=fakemem.with_margin(c.peak, resident) / GIB, host_weights_gib=host / GIB,
                 seconds=time.time() - t0, phases={k: round(v / GIB, 2) for k, v in c.peak_by_kind.items()},
                 where=c.peak_where, node=node_info)


@contextlib.contextmanager
def _gpu_precisions():
    """ComfyUI chooses precisions as on a GPU that is fast at fp16 and bf16 (an RTX 30/40/50 or
    later): the VAE in bf16, CLIP vision in fp16 computing in fp16. On this CPU it would choose
    fp32 for both."""
    import comfy.model_management as mm
    saved = {n: getattr(mm, n) for n in ("should_use_fp16", "should_use_bf16", "in_training") if hasattr(mm, n)}
    mm.should_use_fp16 = lambda *a, **k: True
    mm.should_use_bf16 = lambda *a, **k: True
    # comfy_kitchen's fused RoPE has no fake-tensor rule that keeps the dtype; ComfyUI's own
    # training switch takes the plain torch path (what the gradient work runs anyway)
    mm.in_training = True
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(mm, n, f)


def _modules(*parts) -> list:
    """The torch modules of a MODEL, VAE and CLIP vision (None parts skipped)."""
    mods = []
    for p in parts:
        if p is None:
            continue
        m = getattr(p, "first_stage_model", None) or getattr(p, "model", None)
        if isinstance(m, torch.nn.Module):
            mods.append(m)
    return mods


def _resident_weights(*parts) -> int:
    return fakemem.module_bytes(*_modules(*parts))


@contextlib.contextmanager
def _host_copies(job):
    """Checkpointed inputs offloaded to system memory ("checkpoint + offload") are host copies."""
    ka = cr.pack_module("kernels.autograd")
    real = ka._Offloaded.__init__

    def init(self, *a, **k):
        with job.counter.labelled(fakemem.HOST):
            real(self, *a, **k)
    ka._Offloaded.__init__ = init
    try:
        yield
    finally:
        ka._Offloaded.__init__ = real


@contextlib.contextmanager
def _host_side(counter, cn_module):
    """Extract's search runs on the host: its multipliers, masks and scores are host tensors (the
    K/V layers copy what they need to the device while they run, which is counted). Its gradient
    evaluation is device work."""
    kc = importlib.import_module(cn_module.__name__.rsplit(".", 2)[0] + ".kernels.concept_neurons")
    saved = []

    def wrap(owner, name, kind):
        real = getattr(owner, name)

        def run(*a, **k):
            with counter.labelled(kind):
                return real(*a, **k)
        saved.append((owner, name, real))
        setattr(owner, name, run)

    wrap(cn_module, "run_search", fakemem.HOST)
    wrap(cn_module.ConceptLoss, "gradient", None)
    wrap(kc.ScoredLayer, "__init__", fakemem.HOST)
    wrap(kc.ScoredLayer, "multiplier_grads", fakemem.HOST)
    try:
        yield
    finally:
        for owner, name, real in reversed(saved):
            setattr(owner, name, real)


def _node_info(out) -> dict:
    """What the node said about its memory plan."""
    for obj in (out, getattr(out, "args", [None])[0] if isinstance(out, Exception) else None):
        stats = getattr(obj, "stats", None)
        if isinstance(stats, dict) and "memory" in stats:
            return stats["memory"]
        mem = getattr(obj, "memory", None)
        if isinstance(mem, dict):
            return mem
    return _LAST_PLAN.get("plan", {})


#: The plan of the last run (Extract's is in the concept it returns; the count stops earlier)
_LAST_PLAN: dict = {}


@contextlib.contextmanager
def _card(card_gb, job):
    """ComfyUI sees a card of ``card_gb`` while the block runs: its free memory is the card minus
    what the counter holds that is not the harness's models' weights, and a model that does not
    fit next to the memory a node asks ``load_models_gpu`` for is loaded partially, as ComfyUI
    does on a GPU (here ``load_models_gpu`` loads a CPU model whole, so its own partial unload is
    applied afterwards, with the budget its GPU path computes: free memory minus what the node
    asked for minus ComfyUI's reserve). The offloaded weights then live in host memory (not
    counted); their casts at each forward are counted. Nothing changes without a card."""
    if card_gb is None:
        yield
        return
    import comfy.model_management as mm
    real_free, real_total, real_load = mm.get_free_memory, mm.get_total_memory, mm.load_models_gpu
    total = int(card_gb * GIB)
    c = job.counter

    def weights_live() -> int:
        return sum(c._sizes.get(t.untyped_storage()._cdata, (0, ""))[0]
                   for m in getattr(job, "modules", []) for t in list(m.parameters()) + list(m.buffers()))

    def free(dev=None, torch_free_too=False):
        f = max(0, total - (c.live - weights_live()))
        return (f, f) if torch_free_too else f

    def load(models, memory_required=0, *a, **k):
        out = real_load(models, memory_required, *a, **k)   # here: loaded whole, weights in place
        job.loaded = list(dict.fromkeys(list(getattr(job, "loaded", [])) + [p.model for p in models
                                                                           if isinstance(getattr(p, "model", None),
                                                                                         torch.nn.Module)]))
        tensors = [t for m in job.loaded for t in list(m.parameters()) + list(m.buffers())]
        budget = total - (c.live - weights_live()) - int(memory_required) - int(mm.extra_reserved_memory())
        over = fakemem.module_bytes(*job.loaded) - budget
        diffusion = next((m for m in models if hasattr(getattr(m, "model", None), "diffusion_model")), None)
        if diffusion is not None:   # loaded again: what it streams is decided anew
            job.streamed = []
            if over > 0:
                diffusion.partially_unload(diffusion.offload_device, int(over))
                job.streamed = [t for mod in diffusion.model.modules()
                                if getattr(mod, "comfy_patched_weights", True) is False
                                for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))]
        streamed = list(getattr(job, "streamed", []))
        # on the device from now on: what is loaded, but the weights streamed at each forward
        # (a model loaded earlier stays as it was: loading the VAE leaves the diffusion model's
        # streamed weights in system memory)
        gone = {t.untyped_storage()._cdata for t in streamed}
        c.include([t for t in tensors if t.untyped_storage()._cdata not in gone])
        c.exclude(streamed)
        job.host_bytes = sum({t.untyped_storage()._cdata: int(t.untyped_storage().nbytes()) for t in streamed}.values())
        return out

    mm.get_free_memory = free
    mm.get_total_memory = lambda dev=None, torch_total_too=False: (total, total) if torch_total_too else total
    mm.load_models_gpu = load
    try:
        yield
    finally:
        mm.get_free_memory, mm.get_total_memory, mm.load_models_gpu = real_free, real_total, real_load


# ---------------------------------------------------------------------------------------------
# the section: targets, what runs on which card, the counter against RSS, the time ratios
# ---------------------------------------------------------------------------------------------
#: (key, node, model, weights, card GB the target is set at, target GB). The peak reported for a
#: target is the node's own automatic choice on a card of the target's size.
TARGETS = (
    ("fit.seed_search.sd15_512_fp16", "seed", "sd15", "fp16", 6),
    ("fit.seed_search.sdxl_1024_bf16", "seed", "sdxl", "bf16", 12),
    ("fit.seed_search.flux1_1024_fp8", "seed", "flux1", "fp8", 20),
    ("fit.concept_neurons.sd15_512_fp16", "extract", "sd15", "fp16", 5),
    ("fit.concept_neurons.sdxl_1024_bf16", "extract", "sdxl", "bf16", 10),
    ("fit.concept_neurons.flux1_1024_fp8", "extract", "flux1", "fp8", 20),
    ("fit.seed_search.flux2_1024_fp8_streamed", "seed", "flux2", "fp8", 24),
    ("fit.concept_neurons.qwen_image_1024_fp8_streamed", "extract", "qwen_image", "fp8", 24),
)
#: Reported without targets (issue 23): Z-Image and SD3.5 Large at 1024 px in bf16.
REPORTS = (
    ("fit.seed_search.zimage_1024_bf16", "seed", "zimage", "bf16", 24),
    ("fit.concept_neurons.zimage_1024_bf16", "extract", "zimage", "bf16", 24),
    ("fit.seed_search.sd35_large_1024_bf16", "seed", "sd35_large", "bf16", 24),
    ("fit.concept_neurons.sd35_large_1024_bf16", "extract", "sd35_large", "bf16", 24),
)
#: The weights each model runs in on 12, 16 and 24 GB cards (the table): half precision where it
#: is small enough, fp8 for the large DiTs.
CARD_WEIGHTS = {"sd15": "fp16", "sdxl": "bf16", "flux1": "fp8", "flux2": "fp8", "qwen_image": "fp8",
                "zimage": "bf16", "sd35_large": "fp8"}


def probe(o: dict) -> dict:
    """One counted run in this process (``scale --probe fit``), or with ``o["plans"]`` only the
    memory plan the node would make on each card of ``o["cards"]`` (no work run)."""
    torch.set_num_threads(1)
    if o.get("plans"):
        return plans(MODELS[o["model"]], o["node"], o["weights"], o["cards"])
    c = count_node(MODELS[o["model"]], o["node"], o["weights"], px=o.get("px"), memory=o.get("memory"),
                   card_gb=o.get("card"))
    return c.as_dict()


def plans(spec: Spec, node: str, weights: str, cards) -> dict:
    """{card: the node's memory plan there} for the model built in fake tensors (the plan needs
    shapes only: the model's, the latent's, the references')."""
    cr.bootstrap(pytorch_attention=True)
    px = spec.px
    out = {}
    with fakemem.fake_job() as job, _gpu_precisions():
        c = job.counter
        model, vae = build_model(spec, weights), build_vae(spec.vae)
        cv = build_clip_vision() if node == "seed" else None
        job.modules = _modules(model, vae, cv)
        c.keep_only(t for m in job.modules for t in list(m.parameters()) + list(m.buffers()))
        job.built_bytes = c.live
        lat = empty_latent(spec, px)["samples"]
        for card in cards:
            with _card(card, job):
                if node == "seed":
                    ss = cr.pack_module("nodes.seed_search")
                    cfg = 1.0 if "guidance" in spec.extra else 5.0
                    plan = ss.memory_plan(model, vae, cv, lat, cfg, 2, True, "auto")
                else:
                    cn = cr.pack_module("nodes.concept_neurons")
                    settings = cn.ExtractSettings()
                    subject = torch.zeros(3, *lat.shape[1:])
                    plan = cn.memory_plan(model, subject, settings.prior_images, settings, cn.model_layers(model),
                                          "auto")
            out[str(card)] = plan.as_dict()
    return out


def _fits(peak_gib: float, card: float) -> bool:
    return peak_gib <= card


#: What the RSS probes ask of glibc: every block over 128 KiB in its own mapping, returned to the
#: system when freed. By default glibc raises that threshold as large blocks are freed, after which
#: freed tensors stay in its heap and RSS holds them (measured: SD1.5 Extract fp32, counted
#: 6,003 MB, RSS 8,984 MB by default and 6,027 MB with this; ``docs/fit.md``).
RSS_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _counter_cases(size: int) -> dict:
    """The real cases the fake count is checked on (SD1.5 fp32 on this CPU), per setting: the probe,
    its options and the key of its peak above the loaded weights. Extract runs its 4 latents in
    one forward (``chunk``) in every run, counted or measured."""
    cases = {}
    for memory in ("full", "checkpoint"):
        cases[("seed_search", memory)] = ("seed", dict(kind="sd15", dtype="fp32", size=size, search_steps=2,
                                                      memory=memory), "peak_above_loaded_gb")
        cases[("concept_neurons", memory)] = ("cn", dict(kind="sd15", mode="extract", size=size, batch=2, chunk=4,
                                                         memory=memory), "peak_above_loaded_mb")
    return cases


def _mb(r: dict, key: str):
    return None if key not in r else r[key] * (1024 if key.endswith("_gb") else 1)


def run_section(args, spawn, out: dict) -> None:
    """Every fit figure, into ``out`` (the scale job's JSON). ``spawn(name, env=None, **opts)``: a
    probe in a fresh process. The counts the real runs are checked against run first, alone; then
    the other counts and the RSS runs (whose memory does not depend on the CPU they get) two at a
    time; the timed probe last, alone."""
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.time()
    quick = args.quick
    size = 128 if quick else 512
    jobs = {key: dict(node=node, model=model, weights=weights, card=card)
            for key, node, model, weights, card in TARGETS + REPORTS}
    grid = [(node, model, weights) for model, weights in CARD_WEIGHTS.items() for node in ("seed", "extract")]
    if quick:    # a smoke test of the job: two counts, one grid row
        jobs = {k: v for k, v in jobs.items() if k in ("fit.seed_search.sd15_512_fp16",
                                                        "fit.concept_neurons.sd15_512_fp16")}
        grid = grid[:1]
    real_cases = _counter_cases(size)
    # the counts the real runs are checked against, first and one at a time: ComfyUI makes room
    # for a node by what the machine reports free, so a count made beside another probe's real run
    # can differ from the real run made alone (Seed Search full, measured: 4,096 MB beside the RSS
    # run, 4,229 MB alone, the timed run's heap 4,228 MB)
    counted_runs = {case: spawn(probe_name, fake=True, **opts) for case, (probe_name, opts, _key) in real_cases.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        # the RSS runs first (the longest), one after the other (each holds ~10 GB) beside the
        # counts: a fresh process each
        rss_runs = pool.submit(lambda: {case: spawn(probe_name, env=RSS_MALLOC, **opts)
                                        for case, (probe_name, opts, _key) in real_cases.items()
                                        if case[1] == "full"})
        planned = dict(zip(grid, pool.map(lambda g: spawn("fit", node=g[0], model=g[1], weights=g[2],
                                                          plans=True, cards=list(CARDS_GB)), grid)))
        # the card table: one count per setting and chunk the nodes choose (the card matters only
        # where weights are streamed: those are counted on each card)
        counts = {}
        planned = {g: {card: plan for card, plan in by.items() if card.isdigit() and isinstance(plan, dict)}
                   for g, by in planned.items()}
        for (node, model, weights), by_card in planned.items():
            for card, plan in by_card.items():
                if "setting" not in plan:
                    continue
                streamed = plan["setting"] == "checkpoint + offload"
                key = (node, model, weights, plan["setting"], plan["chunk"], card if streamed else None)
                counts.setdefault(key, dict(node=node, model=model, weights=weights, card=int(card)))
        keys = list(jobs) + list(counts)
        results = list(pool.map(lambda o: spawn("fit", **o), list(jobs.values()) + list(counts.values())))
        rss_runs = rss_runs.result()
    done = dict(zip(keys, results))
    for key, node, model, weights, card in TARGETS + REPORTS:
        if key not in done:
            continue
        r = done[key]
        out[key] = dict(r, peak_gb=r.get("peak_gib"), card_gb=card, model=MODELS[model].label, weights=weights,
                        node_name={"seed": "Seed Search", "extract": "Concept Neurons Extract"}[node],
                        px=MODELS[model].px, how="counted (fake tensors, margin added)")
    cards = {}
    for (node, model, weights), by_card in planned.items():
        for card, plan in by_card.items():
            streamed = plan.get("setting") == "checkpoint + offload"
            r = done.get((node, model, weights, plan.get("setting"), plan.get("chunk"), card if streamed else None), {})
            cards.setdefault(node, {}).setdefault(model, {})[f"{card} GB"] = {
                "runs": "peak_gib" in r and _fits(r["peak_gib"], float(card)),
                "setting": plan.get("setting"), "chunk": plan.get("chunk"), "peak_gib": r.get("peak_gib"),
                "weights": weights, "plan_gib": round((plan.get("weights_bytes", 0) + plan.get("work_bytes", 0)) / GIB, 2),
                **({"failed": r.get("failed") or plan.get("failed")} if r.get("failed") or plan.get("failed") else {})}
    out["fit.cards"] = cards
    out["fit.counted_seconds"] = round(time.time() - t0, 1)

    # real compute on this CPU, alone: the time checkpointing costs, and the heap of those same
    # runs against their fake count (SD1.5, fp32: what this CPU computes in)
    t1 = time.time()
    timed = spawn("fit-time", size=size, quick=quick)
    for name in ("seed_search", "concept_neurons"):
        if name in timed:
            out[f"fit.{name}.sd15.time_ratio_checkpointed"] = timed[name]["time_ratio_checkpointed"]
    out["fit.timing"] = timed
    rss, heap = {}, {}
    for (name, memory), (_probe, _opts, key) in real_cases.items():
        case = f"{name}.sd15_{size}_fp32.{memory}"
        counted = _mb(counted_runs[(name, memory)], key)
        measured = timed.get(name, {}).get("heap_above_start_mb", {}).get(memory)
        if counted and measured:
            heap[case] = {"counted_mb": round(counted, 1), "measured_mb": measured,
                          "ratio": round(counted / measured, 3)}
        real = _mb(rss_runs.get((name, memory), {}), key)
        if counted and real:
            rss[case] = {"counted_mb": round(counted, 1), "rss_mb": round(real, 1),
                         "ratio": round(counted / real, 3)}
    malloc = " ".join(f"{k}={v}" for k, v in RSS_MALLOC.items())
    what = {"fit.counter_vs_rss": (rss, "the fake-tensor count of the work's peak above the loaded weights / "
                                        "the peak RSS above the loaded weights of the same run computed for real "
                                        f"(fp32 on this CPU, a fresh process, {malloc}: glibc returns every "
                                        "freed tensor to the system instead of keeping it in its heap)"),
            "fit.counter_vs_heap": (heap, "the same count / the peak of the process heap's bytes in use (glibc, "
                                          "read after every torch operation) above its level when the run began, "
                                          "both settings in one process")}
    for key, (cases, text) in what.items():
        if cases:
            values = [r["ratio"] for r in cases.values()]
            out[key] = {"cases": cases, "min": min(values), "max": max(values), "what": text}
    out["fit.real_seconds"] = round(time.time() - t1, 1)
    out["fit.section_seconds"] = round(time.time() - t0, 1)


def probe_time(o: dict) -> dict:
    """``scale --probe fit-time``: what checkpointing costs in time on SD1.5 (fp32, this CPU), both
    settings in one process, interleaved: one Seed Search iteration (2 search steps, CLIP-H
    semantic + appearance losses, CFG 5; once per setting) and one Extract gradient evaluation (2
    latents x 2 noise draws in one forward; twice per setting), with memory "full" and "checkpoint",
    after a warm-up run; the medians are compared. The process's heap in use is read after
    every torch operation of each run (``fakemem.HeapPeak``: glibc's bytes in use, where torch's CPU
    tensors live; RSS cannot tell runs in one process apart, freed memory stays mapped), and the
    fake-tensor count of the same run is checked against its peak above the start."""
    from . import scale as S
    cr.bootstrap(pytorch_attention=True)
    import comfy.model_management as mm
    torch.set_num_threads(int(o.get("threads", 2)))
    quick, size = o.get("quick", False), int(o.get("size", 512))
    ss, cn = cr.pack_module("nodes.seed_search"), cr.pack_module("nodes.concept_neurons")
    model = S.unet("sd15", torch.float32, quick)
    vae, cv, clip = S.sd_vae(quick), S.clip_vision("clip_vision_config_h.json", quick), S.sd1_clip(quick)
    pos, neg, refs = S._seed_inputs({}, "sd15", torch.float32, size)
    lat = S.empty_latent(size)
    # the very runs the fake counts are checked against (their heap is compared with the count)
    cases = _counter_cases(size)
    seed_opts, extract_opts = cases[("seed_search", "full")][1], cases[("concept_neurons", "full")][1]
    args = dict(seed=1, cfg=5.0, iterations=1, search_steps=seed_opts["search_steps"], learning_rate=0.1,
                lr_drop_after=10, norm_regulariser=True, norm_weight=0.1, semantic_steps=1, semantic_weight=1.0,
                appearance_weight=1.0, appearance_target="mean")
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(extract_opts["batch"], 4, size // 8, size // 8, generator=g)
    cond, pooled = cn.encode_text(clip, "a photo of a dog")
    # latents x noise draws in one forward with either setting, as the fake count runs them
    settings = cn.ExtractSettings(iterations=1, prior_images=0, noise_draws=extract_opts["batch"],
                                  chunk=extract_opts["chunk"])
    layers = cn.model_layers(model)
    mm.load_models_gpu([model, vae.patcher, cv.patcher])
    ones = {n: torch.ones(l["shape"]) for n, l in layers.items()}

    def seed(memory, **over):
        with torch.inference_mode():
            ss.search_noise(model, vae, pos, neg, lat, refs, clip_vision=cv, memory=memory, **dict(args, **over))

    def extract(memory):
        plan = cn.memory_plan(model, latents, 0, settings, layers, memory)
        cn.ConceptLoss(model, latents, latents[:0], cond, pooled, settings, layers, plan)(ones)

    out = {}
    # warm-up (caches, first-call costs at these shapes), then the settings interleaved; Seed
    # Search warms up on one search step (the same shapes), its runs take minutes each
    for name, work, warm, order in (
            ("seed_search", seed, lambda: seed("full", search_steps=1), ("checkpoint", "full")),
            ("concept_neurons", extract, lambda: extract("full"), ("checkpoint", "full") * (1 if quick else 2))):
        warm()
        runs = {m: [] for m in order}
        for m in order:
            heap = fakemem.HeapPeak()      # the heap's bytes in use, read after every operation
            t = time.perf_counter()
            with heap:
                work(m)
            runs[m].append((time.perf_counter() - t, heap.added / 2 ** 20))
        med = {m: (statistics.median(a for a, _ in r), statistics.median(b for _, b in r)) for m, r in runs.items()}
        out[name] = {"seconds": {m: round(v[0], 2) for m, v in med.items()},
                     "heap_above_start_mb": {m: round(v[1], 1) for m, v in med.items()},
                     "time_ratio_checkpointed": round(med["checkpoint"][0] / med["full"][0], 3),
                     "runs": {m: [(round(a, 2), round(b, 1)) for a, b in r] for m, r in runs.items()}}
    out["setting"] = (f"SD1.5 fp32 at {size} px on this CPU ({torch.get_num_threads()} threads), torch SDPA, "
                      "one process, runs interleaved after a warm-up run")
    return out


def probe_parts(o: dict) -> dict:
    """``scale --probe fit-parts``: the diffusion model's share alone, for calibrating the
    estimates (``kernels/memory.py``): the peak above the weights of one forward with autograd
    and its backward, on ``batch`` latents at the model's resolution, kept whole and checkpointed,
    next to the terms the estimate gives for them."""
    cr.bootstrap(pytorch_attention=True)
    torch.set_num_threads(1)
    spec = MODELS[o["model"]]
    MEM, M = cr.pack_module("nodes._memory"), cr.pack_module("kernels.memory")
    rt = cr.pack_module("nodes._runtime")
    batch = int(o.get("batch", 1))
    out = {}
    with fakemem.fake_job() as job, _gpu_precisions():
        c = job.counter
        model = build_model(spec, o.get("weights", "bf16"))
        base = model.model
        dm = base.diffusion_model
        c.keep_only(t for t in list(base.parameters()) + list(base.buffers()))
        lat = empty_latent(spec, spec.px, batch)["samples"]
        cond = conditioning(spec, spec.px)
        dtype = rt.compute_dtype(base)
        import comfy.model_management as mm
        mm.load_models_gpu([model])
        x = lat.to(dtype)
        sigma = torch.full((batch,), 0.5)
        kw = {k: v.process_cond(batch_size=batch, device=x.device, area=(0, 0, 0, 0)).cond
              for k, v in base.extra_conds(pooled_output=cond[0][1].get("pooled_output"), cross_attn=cond[0][0],
                                           width=spec.px, height=spec.px, device=x.device,
                                           noise=lat[:1], guidance=cond[0][1].get("guidance")).items()
              if k != "c_concat"}
        for setting in ("full", "checkpoint"):
            levers = MEM.Levers.of(setting)
            with rt.gradients_through(model, snapshot_saved=False), contextlib.ExitStack() as stack:
                if levers.checkpoint:
                    stack.enter_context(MEM.checkpointed_units(dm))
                weights = list(dm.parameters()) + list(dm.buffers())
                stack.enter_context(cr.pack_module("kernels.autograd").activation_snapshots(weights))
                xi = x.detach().requires_grad_(True)
                start = c.live
                c.reset_peak()
                den = base.apply_model(xi, sigma, **kw)
                den.float().pow(2).mean().backward()
                out[setting] = round((c.peak - start) / GIB, 3)
                del den, xi
        shape = tuple(lat.shape)
        usage = rt.train_usage_factor(model)
        blocks = rt.dit_blocks(model)
        out["estimate_full"] = round(M.train_forward_bytes(shape, dtype, usage, blocks) / GIB, 3)
        units = MEM.unit_input_bytes(model, shape, dtype, spec.text_tokens)
        out["unit_inputs"] = round(units / GIB, 3)
        out["estimate_checkpoint"] = round(M.checkpointed_forward_bytes(shape, dtype, usage, blocks, units) / GIB, 3)
        out["inference"] = round(M.inference_forward_bytes(shape, dtype, usage) / GIB, 3)
        out["blocks"] = blocks
    return out


def card_table(data: dict) -> str:
    """The README's table: which node runs on which model on a 12, 16 and 24 GB card, from the fit
    section's JSON (``fit.cards``): the setting the node picks and its counted peak, or what it
    would take."""
    cards = data.get("fit.cards", {})
    names = {"seed": "Seed Search", "extract": "Concept Neurons Extract"}
    rows = ["| node | model (weights) | 12 GB | 16 GB | 24 GB |", "|---|---|---|---|---|"]
    for node in ("seed", "extract"):
        for model, by_card in cards.get(node, {}).items():
            cells = []
            for card in CARDS_GB:
                c = by_card.get(f"{card} GB", {})
                peak = c.get("peak_gib")
                if c.get("runs"):
                    how = c["setting"] + (f", {c['chunk']} latent(s) a pass" if c.get("chunk") else "")
                    cells.append(f"yes: {how} ({peak:.1f} GB)")
                elif peak:
                    bigger = next((g for g in CARDS_GB + (32, 48, 80) if g >= peak), None)
                    cells.append(f"no: needs {peak:.1f} GB ({f'a {bigger} GB card' if bigger else 'more'}, or a "
                                 "lower resolution)")
                else:
                    cells.append("not counted")
            spec = MODELS[model]
            rows.append(f"| {names[node]} | {spec.label}, {spec.px} px ({by_card.get('12 GB', {}).get('weights', '')}) "
                        f"| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets_table(data: dict) -> str:
    """docs/fit.md's table of the issue's targets, from the fit section's JSON."""
    rows = ["| key | model, size, weights | target | counted peak (margin in) | weights on the card | "
            "setting the node chose | within |", "|---|---|---|---|---|---|---|"]
    for key, node, model, weights, card in TARGETS:
        r = data.get(key)
        if not r:
            rows.append(f"| `{key}.peak_gb` | | ≤ {card} | not measured | | | no |")
            continue
        n = r.get("node", {})
        how = n.get("setting", "") + (f", {n['chunk']} latents a forward" if n.get("chunk") else "")
        streamed = f" (+{r['host_weights_gib']:.1f} GB streamed)" if r.get("host_weights_gib") else ""
        rows.append(f"| `{key}.peak_gb` | {r['model']}, {r['px']} px, {weights} | ≤ {card} | {r['peak_gb']:.2f} | "
                    f"{r['weights_gib']:.2f}{streamed} | {how} | {'yes' if r['peak_gb'] <= card else '**no**'} |")
    for name, what in (("seed_search", "a Seed Search iteration"), ("concept_neurons", "an Extract step")):
        ratio = data.get(f"fit.{name}.sd15.time_ratio_checkpointed")
        if ratio is not None:
            rows.append(f"| `fit.{name}.sd15.time_ratio_checkpointed` | SD1.5, {what}: time with checkpoint / "
                        f"full | ≤ 1.4 | {ratio:.2f} | | | {'yes' if ratio <= 1.4 else '**no**'} |")
    rss = data.get("fit.counter_vs_rss")
    if rss:
        ok = 0.8 <= rss["min"] and rss["max"] <= 1.25
        rows.append(f"| `fit.counter_vs_rss` | fake count / measured RSS, fp32 | 0.8–1.25 | "
                    f"{rss['min']:.3f}–{rss['max']:.3f} | | | {'yes' if ok else '**no**'} |")
    return "\n".join(rows)

"""Pieces of the demo-model training (benchmarks/world/train.py) that must be exact: the latent
standardisation folded into ComfyUI's AutoencoderKL leaves decode(encode(x)) unchanged, the
class-alignment targets match the scene masks, and world settings survive the safetensors
metadata round trip."""
from __future__ import annotations

import json

import numpy as np
import torch

from benchmarks.world import evaluate as E
from benchmarks.world import scenes as S
from benchmarks.world import train as T


def test_standardise_latents_is_an_exact_reparametrisation(lab):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    torch.manual_seed(0)
    with torch.no_grad():
        ae = AutoencoderKL(**lab.demo.VAE_PARAMS)
    T._default_init_(ae)
    ae.eval()
    ds = S.make_dataset(S.WorldConfig(), 64, seed=3)
    x = T.to_model_images(ds.images)
    with torch.no_grad():
        before = ae.decoder(ae.post_quant_conv(T.posterior_means(ae, x)))
        norm = T.standardise_latents(ae, x)
        z = T.encode_latents(ae, x)  # what the diffusion models see
        after = ae.decoder(ae.post_quant_conv(T.posterior_means(ae, x)))
    assert norm["scale"] > 0
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert abs(z.std().item() - 1.0) < 1e-2


def test_latent_class_targets_follow_the_masks():
    ds = S.make_dataset(S.WorldConfig(), 50, seed=5)
    target, weight = T.latent_class_targets(ds)
    labels = ds.label_maps()
    assert target.shape == weight.shape == (50, 8, 8)
    for n in range(50):
        for r in ds.records[n]:
            cover = r.mask.reshape(8, 8, 8, 8).mean(axis=(1, 3))
            y, x = np.unravel_index(cover.argmax(), cover.shape)
            assert target[n, y, x] == r.cls and weight[n, y, x] >= cover.max() - 1e-6
        blank = labels[n].reshape(8, 8, 8, 8).max(axis=(1, 3)) == 0
        assert (weight[n].numpy()[blank] == 0).all()


def test_world_config_round_trips_through_metadata(tmp_path):
    import safetensors.torch
    from dataclasses import asdict
    cfg = S.WorldConfig(seed=1, rare_classes=(3, 5), count_probs=(0.5, 0.3, 0.2))
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(path), metadata={"world": json.dumps(asdict(cfg))})
    back = E.world_config_of(path)
    assert back == cfg and hash(back) == hash(cfg)

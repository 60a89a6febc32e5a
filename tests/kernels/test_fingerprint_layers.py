"""kernels.fingerprint (bitwise digests) and kernels.layers (which weights are K/V)."""
import torch



def test_digest_is_bitwise(K):
    t = torch.tensor([0.0, 1.0, 2.0])
    d = K.fingerprint.tensor_digest(t)
    assert d == K.fingerprint.tensor_digest(t.clone())
    # -0.0 == 0.0 numerically, but not bitwise: the digest must see it
    assert d != K.fingerprint.tensor_digest(torch.tensor([-0.0, 1.0, 2.0]))
    assert d != K.fingerprint.tensor_digest(t.to(torch.float64))
    assert d != K.fingerprint.tensor_digest(t.reshape(3, 1))
    nxt = torch.nextafter(t[1:2], torch.tensor([2.0]))
    assert d != K.fingerprint.tensor_digest(torch.cat([t[:1], nxt, t[2:]]))


def test_diff_and_combined_digests(K):
    a = K.fingerprint.state_digest({"x": torch.zeros(2), "y": torch.ones(2)})
    b = K.fingerprint.state_digest({"x": torch.zeros(2), "y": torch.ones(2) * 2, "z": torch.ones(1)})
    assert K.fingerprint.diff_digests(a, b) == ["y", "z"]
    assert K.fingerprint.combined_digest(a) != K.fingerprint.combined_digest(b)


def test_concept_kv_layers_unet_and_dit_names(K):
    names = [
        "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight",
        "double_blocks.3.txt_attn.qkv.weight",
        "double_blocks.3.img_attn.qkv.weight",
        "joint_blocks.0.context_block.attn.qkv.weight",
    ]
    cross = K.layers.concept_kv_layers(names)
    assert [(l.name.split(".")[-2] if l.kind != "qkv" else l.name, l.kind) for l in cross] == [
        ("double_blocks.3.txt_attn.qkv.weight", "qkv"),
        ("to_k", "k"), ("to_v", "v"),
        ("joint_blocks.0.context_block.attn.qkv.weight", "qkv"),
    ]
    with_self = K.layers.concept_kv_layers(names, include_self_attention=True)
    assert len(with_self) == 5 and any(not l.cross for l in with_self)
    shapes = {n: (6, 4) for n in names}
    assert K.layers.kv_weight_count(cross, shapes) == 16 + 24 + 24 + 16


def test_kernels_never_import_comfy(K):
    import re
    from pathlib import Path
    for f in (Path(__file__).resolve().parents[2] / "kernels").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+comfy", f.read_text(), re.M), f

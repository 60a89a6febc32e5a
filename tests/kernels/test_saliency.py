"""kernels/saliency.py: pure torch, no ComfyUI."""
import pytest
import torch


@pytest.fixture(scope="module")
def S(K):
    return K.saliency


def test_token_positions_cover_every_occurrence(S):
    assert S.find_token_positions([1, 5, 6, 2, 5, 6, 9], [5, 6]) == [1, 2, 4, 5]
    assert S.find_token_positions([1, 2, 3], [7]) == []
    assert S.find_token_positions([1, 2, 3], []) == []


def test_grid_shape_handles_non_square_and_odd_latents(S):
    assert S.grid_shape(8 * 12, 8, 12) == (8, 12)
    assert S.grid_shape(4 * 6, 8, 12) == (4, 6)
    assert S.grid_shape(3 * 4, 5, 7) == (3, 4)       # ceil(5/2) x ceil(7/2)
    with pytest.raises(ValueError):
        S.grid_shape(7, 8, 8)


def test_daam_maps_are_the_model_softmax_summed_over_heads(S):
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    maps = S.daam_token_maps(q, k, heads=2, groups=[[1], [2, 3], []])
    qh, kh = q.view(2, 6, 2, 4).transpose(1, 2), k.view(2, 5, 2, 4).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, -1).sum(1)
    assert torch.allclose(maps[..., 0], probs[..., 1], atol=1e-6)
    assert torch.allclose(maps[..., 1], probs[..., 2] + probs[..., 3], atol=1e-6)
    assert torch.equal(maps[..., 2], torch.zeros(2, 6))


def test_concept_attention_is_one_way_and_saliency_is_a_softmax(S):
    torch.manual_seed(1)
    b, n, c, d, h = 2, 9, 3, 8, 2
    k_img, v_img = torch.randn(b, n, d), torch.randn(b, n, d)
    q_c, k_c, v_c = torch.randn(b, c, d), torch.randn(b, c, d), torch.randn(b, c, d)
    o_c = S.concept_attention(q_c, k_c, v_c, k_img, v_img, h)
    assert o_c.shape == (b, c, d)
    # the same result from explicit per-head attention over [image; concepts]
    keys, vals = torch.cat((k_img, k_c), 1), torch.cat((v_img, v_c), 1)
    qh = q_c.view(b, c, h, 4).transpose(1, 2)
    kh, vh = keys.view(b, -1, h, 4).transpose(1, 2), vals.view(b, -1, h, 4).transpose(1, 2)
    ref = (torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, -1) @ vh).transpose(1, 2).reshape(b, c, d)
    assert torch.allclose(o_c, ref, atol=1e-5)
    # 4-d (B, T, heads, d) inputs, as ComfyUI's MMDiT hands out values, give the same
    o4 = S.concept_attention(q_c, k_c, v_c.view(b, c, h, 4), k_img, v_img.view(b, n, h, 4), h)
    assert torch.allclose(o4, o_c)
    sal = S.concept_saliency(torch.randn(b, n, d), o_c)
    assert sal.shape == (b, n, c) and torch.allclose(sal.sum(-1), torch.ones(b, n))
    ca = S.cross_attention_saliency(torch.randn(b, n, d), k_c, h)
    assert torch.allclose(ca.sum(-1), torch.ones(b, n))


def test_running_maps_average_per_row_with_fixed_memory(S):
    acc = S.RunningMaps(2, 3, 4, 4)
    size = acc.nbytes()
    for i in range(50):
        acc.add(torch.full((2, 3, 4, 4), float(i)))
    assert acc.nbytes() == size
    assert torch.allclose(acc.mean(), torch.full((2, 3, 4, 4), 24.5))
    acc.add(torch.full((1, 3, 4, 4), 100.0), rows=[1])
    assert torch.allclose(acc.mean()[0], torch.full((3, 4, 4), 24.5))


def test_masks_from_maps_modes(S):
    m = torch.zeros(1, 2, 4, 4)
    m[0, 0, :2] = 1.0
    m[0, 1, 2:] = 0.8
    m[0, 1, :2] = 0.3
    assert S.masks_from_maps(m, "fixed", 0.5)[0, 0].sum() == 8
    assert S.masks_from_maps(m, "mean")[0, 1].sum() == 8
    assert S.masks_from_maps(m, "otsu")[0, 0].sum() == 8
    am = S.masks_from_maps(m, "argmax", 0.5)
    assert am[0, 0, :2].all() and am[0, 1, 2:].all() and (am.sum(1) <= 1).all()
    with pytest.raises(ValueError):
        S.masks_from_maps(m, "nope")


def test_normalise_colormap_and_figures(S):
    x = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]]])
    n = S.normalise(x)
    assert n.min() == 0 and n.max() == 1
    rgb = S.colormap(n[0, 0])
    assert rgb.shape == (2, 2, 3) and 0 <= rgb.min() and rgb.max() <= 1
    assert S.overlay(torch.zeros(2, 2, 3), n[0, 0]).shape == (2, 2, 3)
    a = torch.tensor([[1, 1], [0, 0]])
    b = torch.tensor([[1, 0], [0, 0]])
    assert S.iou(a, b) == 0.5 and S.pixel_accuracy(a, b) == 0.75

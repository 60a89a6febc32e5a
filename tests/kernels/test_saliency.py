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
    # the same through every selection form, and through the explicit path (more words than the
    # head width: the fused-attention path cannot carry them)
    for sel in (S.token_columns([[1], [2, 3], []], 5), S.token_selection([[1], [2, 3], []], 5)):
        assert torch.allclose(S.daam_token_maps(q, k, 2, [[1], [2, 3], []], sel), maps, atol=1e-6)
    many = [[0], [1], [2], [3], [4]]
    wide = S.daam_token_maps(q, k, heads=4, groups=many)                  # head width 2 < 5 words
    qh, kh = q.view(2, 6, 4, 2).transpose(1, 2), k.view(2, 5, 4, 2).transpose(1, 2)
    ref = torch.softmax(qh @ kh.transpose(-1, -2) / 2 ** 0.5, -1).sum(1)
    assert torch.allclose(wide, ref, atol=1e-6)


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


def test_box_mean_is_a_border_cut_window_mean(S):
    torch.manual_seed(2)
    x = torch.rand(2, 3, 9, 13)
    ref = torch.nn.functional.avg_pool2d(x.reshape(-1, 1, 9, 13), 5, stride=1, padding=2,
                                         count_include_pad=False).reshape(x.shape)
    assert torch.allclose(S.box_mean(x, 2), ref, atol=1e-5)
    assert torch.allclose(S.box_mean(x, 50), x.mean((-2, -1), keepdim=True).expand_as(x), atol=1e-5)


def test_guided_filter_follows_the_guide_edges(S):
    # a coarse blob over a thin red stroke on black: the filter keeps the stroke and lowers
    # the black pixels around it; a flat guide gives the box mean of the box means
    img = torch.zeros(1, 32, 32, 3)
    img[0, 8:24, 15:17] = torch.tensor([1.0, 0.2, 0.1])
    coarse = torch.zeros(1, 1, 4, 4)
    coarse[0, 0, 1:3, 1:3] = 1.0
    up = S.resize(coarse, 32, 32)
    q = S.guided_filter(up, img, radius=8, eps=1e-3)
    assert q[0, 0, 16, 15] > 0.8 and q[0, 0, 16, 11] < 0.5 * up[0, 0, 16, 11]
    flat = S.guided_filter(up, torch.full((1, 32, 32, 3), 0.5), radius=2, eps=1e-2)
    assert torch.allclose(flat, S.box_mean(S.box_mean(up, 2), 2), atol=1e-5)
    sig = torch.rand(2, 3, 3, 5, 5)
    sig = sig + sig.transpose(1, 2) + 3 * torch.eye(3).view(1, 3, 3, 1, 1)
    rhs = torch.rand(2, 4, 3, 5, 5)
    ref = torch.linalg.solve(sig.permute(0, 3, 4, 1, 2).unsqueeze(1),
                             rhs.permute(0, 1, 3, 4, 2).unsqueeze(-1))
    assert torch.allclose(S._solve_spd(sig, rhs), ref.squeeze(-1).permute(0, 1, 4, 2, 3), atol=1e-5)


def _two_strokes():
    """A red and a blue stroke on grey, and the truth mask of each."""
    img = torch.full((1, 32, 32, 3), 0.3)
    img[0, 6:26, 7:9] = torch.tensor([0.9, 0.1, 0.1])
    img[0, 6:26, 23:25] = torch.tensor([0.1, 0.2, 0.9])
    truth = torch.zeros(2, 32, 32, dtype=torch.bool)
    truth[0, 6:26, 7:9] = True
    truth[1, 6:26, 23:25] = True
    return img, truth


def test_dense_crf_snaps_coarse_maps_to_the_strokes(S):
    img, truth = _two_strokes()
    # coarse maps that each cover one stroke's neighbourhood, as latent-grid maps do
    coarse = torch.zeros(1, 2, 4, 4)
    coarse[0, 0, 1:3, 0:2] = 1.0
    coarse[0, 1, 1:3, 2:4] = 1.0
    maps = S.normalise(S.resize(coarse, 32, 32))
    raw_iou = [S.iou(maps[0, j] >= 0.5, truth[j]) for j in range(2)]
    q = S.dense_crf(maps, img)
    assert q.shape == maps.shape and 0 <= q.min() and q.max() <= 1
    crf_iou = [S.iou(q[0, j] >= 0.5, truth[j]) for j in range(2)]
    assert all(c > 0.7 for c in crf_iou) and all(c > r + 0.3 for c, r in zip(crf_iou, raw_iou))
    # a larger image is solved at the working size and upsampled: same masks, scaled
    big = torch.nn.functional.interpolate(img.permute(0, 3, 1, 2), scale_factor=4,
                                          mode="nearest").permute(0, 2, 3, 1)
    qb = S.dense_crf(S.resize(maps, 128, 128), big, max_side=32)
    assert qb.shape == (1, 2, 128, 128)
    small = torch.nn.functional.avg_pool2d((qb >= 0.5).float(), 4) >= 0.5
    assert S.iou(small[0, 0], truth[0]) > 0.6
    for method in S.REFINE_METHODS:
        out = S.refine_maps(maps, img, method)
        assert out.shape == maps.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(S.refine_maps(maps, img, "none"), maps)
    with pytest.raises(ValueError):
        S.refine_maps(maps, img, "nope")

"""kernels/seed_search.py: pure torch, no ComfyUI."""
import math

import pytest
import torch


@pytest.fixture(scope="module")
def S(K):
    return K.seed_search


def _toy_denoiser(seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(8, 4, 3, 3, generator=g) * 0.3
    w2 = torch.randn(4, 8, 3, 3, generator=g) * 0.3

    def denoise(x, s):
        h = torch.nn.functional.conv2d(x / (1 + s ** 2).sqrt(), w1, padding=1)
        h = torch.tanh(h)                  # a non-linear "x0 prediction"
        out = torch.nn.functional.conv2d(h, w2, padding=1)
        out += 0.1 * x                     # an in-place update, as ComfyUI's blocks do
        return out
    return denoise


def _sigmas(n=4, smax=5.0):
    return torch.linspace(smax, 0.0, n + 1)


def test_norm_penalty_is_zero_on_the_gaussian_shell_and_grows_off_it(S):
    d = 4 * 8 * 8
    direction = torch.nn.functional.normalize(torch.randn(1, 4, 8, 8).flatten(1), dim=1).view(1, 4, 8, 8)
    on = direction * math.sqrt(d - 1)
    assert abs(float(S.norm_penalty(on))) < 1e-5
    for r in (0.5, 0.9, 1.1, 2.0):
        assert float(S.norm_penalty(on * r)) > 1.0
    # a unit-variance sample is near the shell: small penalty (chi noise, about 1/2 on average)
    z = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(S.norm_penalty(z).mean()) < 2.0
    # the gradient points back to the shell
    z = (on * 1.5).requires_grad_(True)
    S.norm_penalty(z).sum().backward()
    assert float((z.grad * z.detach()).sum()) > 0          # descending shrinks ||z||


def test_semantic_and_appearance_losses(S):
    refs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    ref_dir = S.reference_direction(refs)
    assert torch.allclose(ref_dir, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    e = torch.tensor([[3.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(S.semantic_loss(e, ref_dir), torch.tensor([0.0, 1.0]), atol=1e-6)
    lat = torch.zeros(2, 4, 2, 2)
    lat[1] += 2
    refs = torch.stack([torch.zeros(4, 2, 2), torch.full((4, 2, 2), 2.0)])
    assert torch.allclose(S.appearance_loss(lat, refs), torch.tensor([1.0, 1.0]))
    assert torch.allclose(S.appearance_loss(lat, refs, "nearest"), torch.tensor([0.0, 0.0]))


def test_step_weights_follow_seedselect_and_renormalise(S):
    assert S.step_weights(20) == {17: 0.05, 18: 0.25, 19: 0.7}
    w = S.step_weights(2)
    assert set(w) == {0, 1} and abs(sum(w.values()) - 1) < 1e-9 and w[1] > w[0]
    assert S.step_weights(5, (1.0,)) == {4: 1.0}


def test_vision_preprocessing_keeps_the_gradient(S):
    img = torch.rand(2, 37, 53, 3, requires_grad=True)
    px = S.preprocess_for_vision(img, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert px.shape == (2, 3, 16, 16)
    px.sum().backward()
    assert img.grad is not None and float(img.grad.abs().sum()) > 0
    flat = torch.full((1, 16, 16, 3), 0.75)
    out = S.preprocess_for_vision(flat, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(out, torch.ones_like(out))


def test_latent_embedding_reads_the_object_wherever_it_sits(S):
    def blob(y, x, c=0):
        m = torch.zeros(1, 4, 8, 8)
        m[0, c, y:y + 3, x:x + 2] = 2.0
        m[0, (c + 1) % 4, y + 1, x] = -1.0
        return m
    a, b, other = blob(1, 1), blob(4, 5), blob(2, 2, c=2)
    ea, eb, eo = (S.latent_embedding(t) for t in (a, b, other))
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(ea, eb)) > 0.9 > float(cos(ea, eo))
    x = b.clone().requires_grad_(True)
    S.latent_embedding(x).pow(2).sum().backward()
    assert float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("n_steps", [1, 4])
def test_checkpointed_gradient_equals_the_full_graph(S, n_steps):
    denoise = _toy_denoiser()
    sig = _sigmas(n_steps)
    target = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    weights = S.step_weights(n_steps)

    def step_loss(x0, i):
        if i not in weights:
            return None
        return weights[i] * (x0 - target).pow(2).flatten(1).mean(1)

    def to_x(z):
        return z * sig[0]
    z = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    l_full, x_full, g_full = S.sample_and_grad(z, to_x, denoise, sig, step_loss, checkpoint=False)
    l_ck, x_ck, g_ck = S.sample_and_grad(z, to_x, denoise, sig, step_loss, checkpoint=True)
    assert l_full.shape == (3,)
    assert torch.allclose(l_full, l_ck, atol=1e-6) and torch.allclose(x_full, x_ck, atol=1e-6)
    assert torch.allclose(g_full, g_ck, atol=1e-6)
    # and it is the true derivative: finite difference along a random direction
    v = torch.randn_like(z)
    eps = 1e-3
    lp = S.sample_and_grad(z + eps * v, to_x, denoise, sig, step_loss, with_grad=False)[0].sum()
    lm = S.sample_and_grad(z - eps * v, to_x, denoise, sig, step_loss, with_grad=False)[0].sum()
    assert abs(float((lp - lm) / (2 * eps)) - float((g_ck * v).sum())) < 1e-2 * max(1.0, float(g_ck.norm()))


def _toy_problem(S, n_steps=3):
    denoise = _toy_denoiser(2)
    sig = _sigmas(n_steps)
    target = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4)) * 0.3

    def step_loss(x0, i):
        return (x0 - target).pow(2).flatten(1).mean(1) if i == n_steps - 1 else None
    return denoise, sig, step_loss, (lambda z: z * sig[0])


def test_optimiser_lowers_the_loss_and_keeps_the_best_iterate(S):
    denoise, sig, step_loss, to_x = _toy_problem(S)
    z0 = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    seen = []
    res = S.optimise_noise(z0, to_x, denoise, sig, step_loss, iterations=12, lr=0.05, lr_drop_after=100,
                           norm_weight=1.0, on_iteration=lambda it, v: seen.append(v))
    assert seen == res.curve and res.iterations == len(res.curve) == 12
    assert res.curve[-1] < res.curve[0]
    # the returned noise really has the returned (best) loss
    l_best = S.sample_and_grad(res.best_z, to_x, denoise, sig, step_loss, with_grad=False)[0]
    assert torch.allclose(l_best + S.norm_penalty(res.best_z), res.best_loss, atol=1e-4)
    assert bool((res.best_loss <= res.curve[0] + 1e-6).all())


def test_early_stop_when_the_loss_keeps_rising(S):
    denoise, sig, _, to_x = _toy_problem(S)
    z0 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    calls = []

    def rising(x0, i):       # an objective that rises at every evaluation, whatever the noise
        if i != len(sig) - 2:
            return None
        calls.append(i)
        return x0.flatten(1).sum(1) * 0 + len(calls)
    res = S.optimise_noise(z0, to_x, denoise, sig, rising, iterations=30, lr=0.2, lr_drop_after=100,
                           norm_weight=0.0, patience=3)
    assert res.stopped_early and res.iterations == 5        # rose 4 times (> 3): stop
    assert torch.equal(res.best_iteration, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(res.best_z, z0)                   # the start was the best


def test_norm_prior_keeps_the_noise_on_the_shell(S):
    denoise, sig, step_loss, to_x = _toy_problem(S)
    z0 = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(7))
    d = z0[0].numel()
    kw = dict(iterations=25, lr=0.3, lr_drop_after=100)
    free = S.optimise_noise(z0, to_x, denoise, sig, step_loss, norm_weight=0.0, **kw)
    held = S.optimise_noise(z0, to_x, denoise, sig, step_loss, norm_weight=1.0, **kw)

    def off_shell(z):
        return float((z.flatten(1).norm(dim=1) / math.sqrt(d) - 1).abs().mean())
    assert off_shell(held.best_z) < off_shell(free.best_z)


def test_one_step_scores_and_rank(S):
    denoise, sig, _, to_x = _toy_problem(S)
    z = torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(8))
    scores, x0 = S.one_step_scores(z, to_x, denoise, sig[0], lambda x: x.flatten(1).pow(2).mean(1))
    assert scores.shape == (5,) and x0.shape == z.shape and not scores.requires_grad
    ranking = S.rank(torch.tensor([0.3, 0.1, 0.3, 0.2]), [10, 11, 12, 13])
    assert ranking == [(11, pytest.approx(0.1)), (13, pytest.approx(0.2)), (10, pytest.approx(0.3)),
                       (12, pytest.approx(0.3))]

"""kernels.concept_neurons: scores, both procedures on a toy loss, budgets, index coding, set algebra."""
import pytest
import torch


@pytest.fixture(scope="module")
def C(K):
    return K.concept_neurons


def test_taylor_score_predicts_the_loss_change_of_zeroing(C):
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    target = torch.randn(6, 5)

    def loss(t):
        return ((t - target) ** 2).sum()

    wg = w.clone().requires_grad_(True)
    loss(wg).backward()
    s = C.taylor_scores({"w": w}, {"w": wg.grad})["w"]
    i = int(s.argmax())
    zeroed = w.clone().view(-1)
    zeroed[i] = 0
    # first-order: L(theta) - L(theta with i zeroed) ~ s_i (exact up to the quadratic term w_i^2)
    assert float(loss(w) - loss(zeroed.view(6, 5))) == pytest.approx(float(s.view(-1)[i]) - float(w.view(-1)[i] ** 2), rel=1e-5)
    assert s.view(-1)[i] > 0


def _toy(C, shapes, good):
    """A loss that falls when exactly the weights in ``good`` are zeroed."""
    torch.manual_seed(1)
    theta0 = {n: torch.randn(s).abs() + 0.5 for n, s in shapes.items()}
    targets = {n: theta0[n].clone() for n in shapes}
    for n, idx in good.items():
        targets[n].view(-1)[idx] = 0.0

    def grad_fn(current):
        ws = {n: t.detach().clone().requires_grad_(True) for n, t in current.items()}
        loss = sum(((ws[n] - targets[n]) ** 2).sum() for n in ws)
        loss.backward()
        return float(loss.detach()), {n: ws[n].grad for n in ws}
    return theta0, grad_fn


@pytest.mark.parametrize("procedure", ["iterative", "accumulated"])
def test_both_procedures_find_the_planted_neurons_within_budget(C, procedure):
    shapes = {"a": (8, 16), "b": (4, 16)}
    good = {"a": torch.tensor([3, 40, 77]), "b": torch.tensor([5, 60])}
    theta0, grad_fn = _toy(C, shapes, good)
    if procedure == "iterative":
        res = C.iterative_shutting(theta0, grad_fn, count=5, rounds=5)
    else:
        res = C.accumulated_scaledown(theta0, grad_fn, count=5, iterations=10, rate=0.2)
    assert res.count == 5
    for n in shapes:
        assert torch.equal(res.indices[n], torch.sort(good[n]).values)
    assert res.losses[-1] <= res.losses[0]


def test_budget_is_a_fraction_and_never_exceeded(C):
    assert C.budget_count(10_000, 0.004) == 40
    assert C.budget_count(10, 0.0001) == 1
    with pytest.raises(ValueError):
        C.budget_count(100, 0.0)
    shapes = {"a": (8, 16)}
    theta0, grad_fn = _toy(C, shapes, {"a": torch.arange(0, 128, 2)})
    res = C.iterative_shutting(theta0, grad_fn, count=7, rounds=3)
    assert res.count == 7


def test_target_loss_stops_early(C):
    theta0, grad_fn = _toy(C, {"a": (8, 16)}, {"a": torch.arange(0, 128, 2)})
    res = C.iterative_shutting(theta0, grad_fn, count=64, rounds=32, target_loss_ratio=0.5)
    assert res.stopped_early and res.count < 64 and res.losses[-1] <= 0.5 * res.losses[0]


def test_fused_qkv_only_k_and_v_rows_are_candidates(C):
    m = C.candidate_mask((6, 4), "qkv")
    assert not m[:2].any() and m[2:].all()
    assert C.candidate_count((6, 4), "qkv") == 16 and C.candidate_count((6, 4), "k") == 24
    scores = {"w": torch.arange(24, dtype=torch.float32).flip(0).reshape(6, 4)}  # Q rows score highest
    top = C.top_positive(scores, 3, candidates={"w": m})["w"]
    assert torch.all(top >= 8)


@pytest.mark.parametrize("n,numel", [(0, 100), (1, 1), (37, 1000), (500, 19_200_000), (2000, 2000)])
def test_index_coding_round_trip(C, n, numel):
    g = torch.Generator().manual_seed(n)
    idx = torch.sort(torch.randperm(numel, generator=g)[:n]).values
    blob = C.encode_indices(idx)
    assert blob.dtype == torch.uint8 and blob.ndim == 1
    assert torch.equal(C.decode_indices(blob, n, numel), idx)


def test_index_coding_is_compact_for_sparse_sets(C):
    g = torch.Generator().manual_seed(0)
    numel = 1_000_000
    idx = torch.sort(torch.randperm(numel, generator=g)[:4000]).values  # 0.4 %
    assert C.encode_indices(idx).numel() / 4000 < 1.25  # entropy of the gaps is ~1.18 B


def test_decoding_refuses_corrupt_and_hostile_blobs(C):
    idx = torch.tensor([1, 5, 9, 200])
    blob = C.encode_indices(idx)
    with pytest.raises(C.CorruptIndices):
        C.decode_indices(blob, 4, 100)             # index 200 out of range
    with pytest.raises(C.CorruptIndices):
        C.decode_indices(blob, 5, 1000)            # wrong count
    with pytest.raises(C.CorruptIndices):
        C.decode_indices(blob[:-3], 4, 1000)       # truncated
    bad = blob.clone()
    bad[0] = 9
    with pytest.raises(C.CorruptIndices):
        C.decode_indices(bad, 4, 1000)             # impossible width
    with pytest.raises(C.CorruptIndices):
        C.decode_indices(blob, 10**12, 1000)       # absurd count
    with pytest.raises(ValueError):
        C.encode_indices(torch.tensor([5, 3]))     # unsorted


def test_union_overlap_and_shut_diff(C):
    a = {"x": torch.tensor([1, 2, 3]), "y": torch.tensor([0])}
    b = {"x": torch.tensor([3, 4]), "z": torch.tensor([7])}
    u = C.union([a, b])
    assert torch.equal(u["x"], torch.tensor([1, 2, 3, 4])) and set(u) == {"x", "y", "z"}
    rep = C.overlap_report([("A", a), ("B", b)])
    assert rep["pairs"][0]["shared"] == 1 and rep["union_count"] == 6
    w = torch.arange(1.0, 7.0).reshape(2, 3)
    d = C.shut_diff(w, torch.tensor([0, 4]), 1.0)
    assert torch.equal(w + d, torch.tensor([[0.0, 2, 3], [4, 0, 6]]))
    half = C.shut_diff(w, torch.tensor([0]), 0.5)
    assert (w + half)[0, 0] == 0.5

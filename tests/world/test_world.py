"""The digits world (benchmarks/world): scenes are deterministic, masks exact, captions right,
the long tail as configured, held-out handwriting never used for training scenes; the judge reads
held-out real digits and clean scenes correctly, and subject similarity separates one specific
handwriting sample from its class. Pure numpy / scikit-learn; no ComfyUI."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from benchmarks.world import judge as J
from benchmarks.world import scenes as S

CFG = S.WorldConfig()


@pytest.fixture(scope="module")
def dataset():
    return S.make_dataset(CFG, 600)


@pytest.fixture(scope="module")
def the_judge():
    return J.get_judge(CFG)


@pytest.fixture(scope="module")
def judge_report(the_judge):
    return J.evaluate_judge(CFG, n_scenes=300, judge=the_judge)


# ------------------------------------------------------------------------------- scenes

def test_deterministic_from_seed(dataset):
    again = S.make_dataset(CFG, 600)
    assert np.array_equal(dataset.images, again.images)
    assert dataset.captions == again.captions
    assert [[(r.sample_index, r.bbox) for r in recs] for recs in dataset.records] == \
        [[(r.sample_index, r.bbox) for r in recs] for recs in again.records]
    other = S.make_dataset(CFG, 600, seed=CFG.seed + 1)
    assert not np.array_equal(dataset.images, other.images)
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    a, b = S.make_scene(rng_a, CFG), S.make_scene(rng_b, CFG)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption


def test_shapes_and_counts(dataset):
    assert dataset.images.shape == (600, 64, 64, 3) and dataset.images.dtype == np.uint8
    counts = np.bincount([len(r) for r in dataset.records], minlength=4)
    assert counts[0] == 0 and all(c > 120 for c in counts[1:])  # 1..3 digits, ~uniform
    scales = [r.scale for recs in dataset.records for r in recs]
    assert min(scales) >= CFG.scale_range[0] and max(scales) <= CFG.scale_range[1]


def test_masks_exact_disjoint_and_painted(dataset):
    for n in range(len(dataset)):
        scene = dataset[n]
        painted = scene.image.max(-1) > 0
        masks = [r.mask for r in scene.digits]
        total = np.sum(masks, axis=0)
        assert total.max() <= 1, "masks overlap"
        assert np.array_equal(total.astype(bool), painted), "masks != painted pixels"
        lab = scene.label_map()
        for i, (r, m) in enumerate(zip(scene.digits, masks)):
            assert np.array_equal(lab == i + 1, m)
            # min_gap blank pixels between digits: grown masks stay disjoint from the others
            grown = ndimage.maximum_filter(m, size=2 * CFG.min_gap + 1)
            assert not (grown & (painted & ~m)).any()
            # painted colour is a scaled copy of the palette colour
            px = scene.image[m].astype(float)
            rgb = CFG.colour_rgb(r.colour)
            ink = px.max(1) / rgb.max()
            assert np.abs(px - ink[:, None] * rgb[None]).max() <= 2.0
            assert S.position_of_x(r.centroid[1], CFG.size) == r.position
            assert r.cls == S.sample_class(r.sample_index)


def test_caption_matches_records(dataset):
    for caption, recs in zip(dataset.captions, dataset.records):
        assert [r.position for r in recs] == sorted((r.position for r in recs), key=S.POSITIONS.index)
        assert caption == S.caption_for(recs)
        assert S.parse_caption(caption) == [(r.cls, r.colour, r.position) for r in recs]
        for r in recs:
            assert f"{r.colour} {S.DIGIT_WORDS[r.cls]} {S.POSITION_PHRASES[r.position]}" in caption
    one = np.ones((1, 1), bool)
    recs = [S.DigitRecord(7, "red", "left", 0, 20, (0, 0, 1, 1), one),
            S.DigitRecord(2, "blue", "right", 0, 20, (0, 0, 1, 1), one)]
    assert S.caption_for(recs) == "a red seven on the left and a blue two on the right"


def test_class_prompts():
    assert S.class_prompt(7) == "a seven"
    assert S.class_prompt(8) == "an eight"
    assert S.class_prompt(7, "red") == "a red seven"
    assert S.class_prompt(1, "green", "left") == "a green one on the left"
    assert S.class_prompts()[0] == "a zero" and len(S.class_prompts("blue")) == 10
    assert S.parse_caption("an eight") == [(8, None, None)]
    rng = np.random.default_rng(0)
    sc = S.render_class_prompt_scene(CFG, 9, rng, colour="yellow")
    assert [(r.cls, r.colour, r.position) for r in sc.digits] == [(9, "yellow", "center")]


def test_long_tail_default(dataset):
    freq = S.class_frequencies(CFG)
    assert set(np.flatnonzero(freq <= 0.02)) == set(CFG.rare_classes) == {8, 9}
    assert np.allclose(freq[[8, 9]], CFG.rare_scene_freq)
    big = S.make_dataset(CFG, 4000, seed=3)
    emp = big.class_presence().mean(0)
    assert emp[8] <= 0.02 and emp[9] <= 0.02
    assert np.abs(emp - freq).max() < 0.025


def test_long_tail_configurable():
    cfg = S.WorldConfig(rare_classes=(3,), rare_scene_freq=0.01, head_profile="zipf")
    freq = S.class_frequencies(cfg)
    assert np.isclose(freq[3], 0.01)
    head = [c for c in range(10) if c != 3]
    assert all(freq[a] > freq[b] for a, b in zip(head, head[1:]))  # Zipf: decreasing
    emp = S.make_dataset(cfg, 3000, seed=5).class_presence().mean(0)
    assert emp[3] <= 0.02 and np.abs(emp - freq).max() < 0.03
    w = S.WorldConfig(class_weights=(1,) * 9 + (0,))
    assert S.class_frequencies(w)[9] == 0
    assert not S.make_dataset(w, 300).class_presence()[:, 9].any()


def test_heldout_never_in_training_scenes(dataset):
    train, held = S.train_indices(CFG), S.heldout_indices(CFG)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == S.N_REAL
    assert 380 <= len(held) <= 450  # 3 of 13 blocks
    assert all(len(S.heldout_indices(CFG, c)) >= 30 for c in range(10))
    used = {r.sample_index for recs in dataset.records for r in recs}
    assert used and not used & set(held.tolist())
    # a held-out subject is composed only when asked for explicitly
    s = int(held[0])
    scene = S.render_subject(CFG, s, "green", "right")
    assert [(r.sample_index, r.colour, r.position) for r in scene.digits] == [(s, "green", "right")]
    assert S.is_heldout(CFG, s)


def test_dataset_speed():
    t = time.perf_counter()
    S.make_dataset(CFG, 2000, seed=11)
    assert time.perf_counter() - t < 12.0  # ~20k scenes well under a minute


# ------------------------------------------------------------------------------- judge

def test_judge_on_heldout_real_digits(judge_report):
    assert judge_report["heldout_real_acc"] >= 0.95, judge_report


def test_judge_on_clean_scenes(judge_report):
    r = judge_report
    assert r["scene_class_acc"] >= 0.95, r
    assert r["scene_colour_acc"] >= 0.95, r
    assert r["scene_position_acc"] >= 0.95, r
    assert r["scene_count_acc"] >= 0.95, r


def test_find_digits_masks_match_ground_truth(judge_report):
    assert judge_report["mask_iou_mean"] >= 0.9
    assert judge_report["mask_iou_frac_ge_0.9"] >= 0.95


def test_read_scene_fields(the_judge):
    idx = [int(S.heldout_indices(CFG, c)[0]) for c in (4, 0, 6)]
    scene = S.compose_scene(CFG, [S.DigitSpec(idx[0], "red", "left"),
                                  S.DigitSpec(idx[1], "blue", "center"),
                                  S.DigitSpec(idx[2], "yellow", "right")])
    dets = J.read_scene(scene.image, the_judge, CFG)
    assert [(d.cls, d.colour, d.position) for d in dets] == [(4, "red", "left"), (0, "blue", "center"),
                                                            (6, "yellow", "right")]
    for d, r in zip(dets, scene.digits):
        assert np.array_equal(d.mask, r.mask)
        assert d.bbox == r.bbox and 0 < d.prob <= 1 and np.isclose(d.probs.sum(), 1)
    assert J.check_scene(scene.image, scene.caption, the_judge, CFG)["all_ok"]
    assert not J.check_scene(scene.image, "a red five on the left", the_judge, CFG)["all_ok"]
    assert J.find_digits(np.zeros((64, 64, 3), np.uint8), the_judge, CFG) == []
    # float [0, 1] images read the same
    assert [d.cls for d in J.read_scene(scene.image / 255.0, the_judge, CFG)] == [4, 0, 6]


def test_find_digits_tolerates_noise_and_specks(the_judge):
    rng = np.random.default_rng(2)
    ok = 0
    pools = [S.heldout_indices(CFG, c) for c in range(10)]
    for _ in range(40):
        idx = [int(pools[c][rng.integers(len(pools[c]))]) for c in rng.integers(0, 10, size=2)]
        scene = S.make_scene(rng, CFG, sample_indices=idx)
        img = ndimage.gaussian_filter(scene.image.astype(float), (0.6, 0.6, 0))
        img += rng.normal(0, 8, img.shape)
        img[rng.integers(0, 64, 6), rng.integers(0, 64, 6)] = 255  # isolated specks
        res = J.check_scene(np.clip(img, 0, 255).astype(np.uint8), scene.caption, the_judge, CFG)
        ok += res["all_ok"]
    assert ok >= 34  # >= 85%


# ------------------------------------------------------------------------------- subjects

def test_subject_similarity_validation(the_judge):
    r = J.validate_subject_similarity(CFG, n_subjects=80, judge=the_judge)
    assert r["own_mean"] >= 0.9, r
    assert 0.4 <= r["other_mean"] <= 0.62, r


def test_subject_similarity_inputs(the_judge):
    s = int(S.heldout_indices(CFG, 2)[3])
    grid = S.real_digits()[0][s]
    assert J.subject_similarity(grid, s, CFG, judge=the_judge) >= 0.9  # the raw 8x8 sample
    assert J.subject_similarity(np.zeros((64, 64, 3), np.uint8), s, CFG, judge=the_judge) == 0.0
    scene = S.render_subject(CFG, s, "red", "left", scale=22)
    det = J.find_digits(scene.image, the_judge, CFG)[0]
    a = J.subject_similarity(det, s, CFG, judge=the_judge)
    b = J.subject_similarity(scene.image, s, CFG, judge=the_judge, pool="train")
    assert a >= 0.9 and b >= 0.9

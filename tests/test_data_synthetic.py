"""The synthetic benchmark: determinism, answers re-derived from scene geometry, exact masks.

The checks here use their own geometry (barycentric triangle test, own colour table lookup via the
rendered pixels), not the generator's helpers, so a generator bug cannot hide behind itself.
"""
from __future__ import annotations

import collections
import math
import pickle

import numpy as np
import pytest

from pixfound.data import benchmark_stats, load_benchmark
from pixfound.data.synthetic import COLOURS, TASKS

SEEDS = range(12)


def _own_shape_mask(obj: dict, size) -> np.ndarray:
    """Pixel-centre membership, written independently of pixfound.data.synthetic."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    cx, cy, r = obj["cx"], obj["cy"], obj["r"]
    if obj["shape"] == "circle":
        return np.hypot(xx - cx, yy - cy) <= r
    if obj["shape"] == "square":
        return np.maximum(np.abs(xx - cx), np.abs(yy - cy)) <= r
    # upward equilateral triangle, circumradius 1.25 r: apex above the centre
    big = 1.25 * r
    ax, ay = cx, cy - big
    bx, by = cx + big * math.sqrt(3) / 2, cy + big / 2
    qx, qy = cx - big * math.sqrt(3) / 2, cy + big / 2
    det = (by - qy) * (ax - qx) + (qx - bx) * (ay - qy)
    l1 = ((by - qy) * (xx - qx) + (qx - bx) * (yy - qy)) / det
    l2 = ((qy - ay) * (xx - qx) + (ax - qx) * (yy - qy)) / det
    return (l1 >= -1e-9) & (l2 >= -1e-9) & (1 - l1 - l2 >= -1e-9)


def _matching(objects, shape, colour=None):
    return [o for o in objects if o["shape"] == shape and (colour is None or o["colour"] == colour)]


def _expected_answer(sample) -> str:
    """The option text that the scene geometry makes correct."""
    objects, meta = sample.meta["objects"], sample.meta
    if sample.task in ("left_right", "above_below"):
        (target,), (reference,) = _matching(objects, *meta["target"]), _matching(objects, *meta["reference"])
        if sample.task == "left_right":
            return "Left" if target["cx"] < reference["cx"] else "Right"
        return "Above" if target["cy"] < reference["cy"] else "Below"  # image y grows downwards
    if sample.task == "colour":
        (obj,) = _matching(objects, meta["shape"])
        return obj["colour"].capitalize()
    if sample.task == "count":
        return str(len(_matching(objects, *meta["target"])))
    if sample.task == "presence":
        return "Yes" if _matching(objects, *meta["target"]) else "No"
    if sample.task == "comparison":
        first, second = meta["shapes"]
        more = first if len(_matching(objects, first)) > len(_matching(objects, second)) else second
        return f"{more.capitalize()}s"
    raise AssertionError(f"unexpected task {sample.task}")


def _fingerprint(samples):
    return [(s.id, s.question, s.options, s.answer, s.expression, s.task, s.pair_index, s.meta,
             s.gt_mask.tobytes(), np.asarray(s.load_image()).tobytes()) for s in samples]


def test_defaults():
    samples = load_benchmark("synthetic")
    assert len(samples) == 16 and samples.name == "synthetic" and samples.skipped == []
    assert all(s.image_size == (96, 128) and s.image_path is None for s in samples)
    image = samples[0].load_image()
    assert image.mode == "RGB" and image.size == (128, 96)
    assert samples[0].gt_mask.shape == (96, 128) and samples[0].gt_mask.dtype == bool


def test_deterministic_per_seed_and_prefix_stable():
    first = load_benchmark("synthetic", n=12, seed=3)
    assert _fingerprint(first) == _fingerprint(load_benchmark("synthetic", n=12, seed=3))
    assert _fingerprint(load_benchmark("synthetic", n=6, seed=3)) == _fingerprint(first)[:6]
    other = load_benchmark("synthetic", n=12, seed=4)
    assert [s.meta["objects"] for s in other] != [s.meta["objects"] for s in first]
    assert {s.id for s in other}.isdisjoint({s.id for s in first})


@pytest.mark.parametrize("seed", SEEDS)
def test_answers_follow_from_geometry(seed):
    for sample in load_benchmark("synthetic", n=12, seed=seed):
        assert sample.options[ord(sample.answer) - ord("A")] == _expected_answer(sample), sample.id


@pytest.mark.parametrize("seed", SEEDS)
def test_pairs_share_the_question_with_different_answers(seed):
    samples = load_benchmark("synthetic", n=12, seed=seed)
    assert [s.pair_index for s in samples] == [i // 2 for i in range(12)]
    for first, second in zip(samples[0::2], samples[1::2]):
        assert (first.question, first.options, first.task) == (second.question, second.options, second.task)
        assert {first.answer, second.answer} == {"A", "B"}
    assert [s.task for s in samples[0::2]] == list(TASKS)  # n >= 12 covers every task


@pytest.mark.parametrize("seed", SEEDS)
def test_masks_are_exact_and_painted(seed):
    for sample in load_benchmark("synthetic", n=12, seed=seed, size=(72, 90)):
        size = sample.image_size
        masks = [_own_shape_mask(o, size) for o in sample.meta["objects"]]
        # shapes never overlap, so each painted pixel belongs to exactly one object
        assert (np.sum(masks, axis=0) <= 1).all()
        expected = np.zeros(size, dtype=bool)
        for target in sample.meta["targets"]:
            expected |= _own_shape_mask(target, size)
        np.testing.assert_array_equal(sample.gt_mask, expected, err_msg=sample.id)
        pixels = np.asarray(sample.load_image())
        for obj, mask in zip(sample.meta["objects"], masks):
            assert mask.any() and (pixels[mask] == COLOURS[obj["colour"]]).all()
        background = ~np.any(masks, axis=0)
        assert (pixels[background] == sample.meta["background"]).all()


def test_expressions_absent_objects_and_expressionless_samples():
    samples = load_benchmark("synthetic", n=24, seed=1)
    by_task = collections.defaultdict(list)
    for sample in samples:
        by_task[sample.task].append(sample)
    for sample in by_task["comparison"]:
        assert sample.expression is None and not sample.has_expression and not sample.gt_mask.any()
    absent = [s for s in samples if s.meta["annotated_absent"]]
    assert absent and all(s.task == "presence" and s.has_expression and not s.gt_mask.any() for s in absent)
    for sample in samples:
        if sample.task in ("left_right", "above_below", "presence"):
            shape, colour = sample.meta["target"]
            assert sample.expression == f"the {colour} {shape}"
        if sample.task == "colour":
            (obj,) = _matching(sample.meta["objects"], sample.meta["shape"])
            assert sample.expression == f"the {obj['colour']} {obj['shape']}"


def test_stats_agree_with_the_samples():
    samples = load_benchmark("synthetic", n=24, seed=5)
    stats = benchmark_stats(samples)
    assert stats["num_samples"] == 24 and stats["num_pairs"] == 12
    assert stats["without_expression"] == sum(s.expression is None for s in samples)
    assert stats["empty_masks"] == sum(not s.gt_mask.any() for s in samples)
    assert stats["annotated_absent"] == sum(s.meta["annotated_absent"] for s in samples)
    assert stats["per_task"] == dict(collections.Counter(s.task for s in samples))
    assert 0 < stats["mask_area_fraction"]["min"] <= stats["mask_area_fraction"]["max"] < 1


@pytest.mark.parametrize("options, message", [
    ({"n": 7}, "n must be an even integer"),
    ({"n": 0}, "n must be an even integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"size": (16, 64)}, "at least 32 on each side"),
    ({"size": "big"}, "size must be"),
])
def test_bad_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        load_benchmark("synthetic", **options)


def test_samples_pickle_for_worker_processes():
    samples = load_benchmark("synthetic", n=4, seed=2)
    again = pickle.loads(pickle.dumps(samples))
    assert again.name == "synthetic" and len(again) == 4
    for original, copy in zip(samples, again):
        np.testing.assert_array_equal(original.gt_mask, copy.gt_mask)
        assert original.load_image().tobytes() == copy.load_image().tobytes()


def test_root_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="reads no files"):
        load_benchmark("synthetic", tmp_path)


def test_small_canvas_still_fits():
    samples = load_benchmark("synthetic", n=12, seed=0, size=(32, 32))
    for sample in samples:
        assert sample.options[ord(sample.answer) - ord("A")] == _expected_answer(sample)

"""Metrics on hand-made cases: IoU, mIoU, pair / per-question accuracy, S, failure bins, answer parsing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pixfound.eval import metrics as M

OPTIONS = ["Open", "Closed"]


# --------------------------------------------------------------------------------------------- IoU


def _iou_by_pixel_sets(pred: np.ndarray, gt: np.ndarray) -> float:
    """Independent formula: IoU from sets of foreground coordinates."""
    pred_pixels = set(zip(*np.nonzero(pred)))
    gt_pixels = set(zip(*np.nonzero(gt)))
    union = pred_pixels | gt_pixels
    return 1.0 if not union else len(pred_pixels & gt_pixels) / len(union)


def test_iou_hand_made():
    gt = np.zeros((3, 4), bool)
    gt[0, :2] = True  # 2 pixels
    pred = np.zeros((3, 4), bool)
    pred[0, 1:4] = True  # 3 pixels, 1 shared
    assert M.iou(pred, gt) == pytest.approx(1 / 4)
    assert M.iou(gt, gt) == 1.0
    assert M.iou(~gt, gt) == 0.0


def test_iou_both_empty_is_one_and_configurable():
    empty = np.zeros((5, 7), bool)
    assert M.iou(empty, empty) == 1.0
    assert M.iou(empty, empty, empty=0.0) == 0.0


def test_iou_empty_gt_with_prediction_is_zero():
    gt = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    pred[1, 1] = True
    assert M.iou(pred, gt) == 0.0


def test_iou_accepts_uint8_255_and_torch():
    gt = np.zeros((2, 3), np.uint8)
    gt[0] = 255
    pred = torch.zeros(2, 3, dtype=torch.uint8)
    pred[:, 0] = 1
    # gt = row 0 (3 px), pred = column 0 (2 px), 1 shared -> 1 / 4
    assert M.iou(pred, gt) == pytest.approx(0.25)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (31, 17)])
def test_iou_matches_pixel_set_formula_on_random_masks(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.05, 0.5, 0.95):
        pred = rng.random(shape) < density
        gt = rng.random(shape) < density
        assert M.iou(pred, gt) == pytest.approx(_iou_by_pixel_sets(pred, gt), abs=1e-12)


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        (np.zeros((3, 3), bool), np.zeros((3, 4), bool), "differs"),
        (np.zeros(9, bool), np.zeros(9, bool), "2-D"),
        (np.zeros((0, 3), bool), np.zeros((0, 3), bool), "empty"),
        (np.full((2, 2), np.nan), np.zeros((2, 2), bool), "NaN"),
        (np.array([["a", "b"]]), np.zeros((1, 2), bool), "dtype"),
        (None, np.zeros((2, 2), bool), "None"),
    ],
)
def test_iou_rejects_bad_masks(pred, gt, message):
    with pytest.raises(ValueError, match=message):
        M.iou(pred, gt)


# -------------------------------------------------------------------------------------------- mIoU


def test_mean_iou_leaves_out_samples_without_expression():
    ious = [1.0, 0.5, 0.0, 0.25]
    has_expression = [False, True, False, True]
    assert M.mean_iou(ious, has_expression) == pytest.approx(0.375)
    assert M.mean_iou(ious, [True] * 4) == pytest.approx(1.75 / 4)


def test_mean_iou_all_without_expression_is_undefined():
    with pytest.raises(ValueError, match="undefined"):
        M.mean_iou([0.3, 0.7], [False, False])
    with pytest.raises(ValueError, match="undefined"):
        M.mean_iou([], [])


@pytest.mark.parametrize(
    "ious, flags, message",
    [
        ([0.5, 0.5], [True], "entries"),
        ([0.5, float("nan")], [True, True], "NaN"),
        ([0.5, 1.5], [True, True], r"\[0, 1\]"),
        ([0.5, 0.5], [1, 0], "booleans"),
    ],
)
def test_mean_iou_rejects_bad_input(ious, flags, message):
    with pytest.raises(ValueError, match=message):
        M.mean_iou(ious, flags)


# ---------------------------------------------------------------------------------- pair accuracy


def test_pair_accuracy_positional_pairs():
    # pairs: (T,T) ok, (T,F) no, (F,F) no, (T,T) ok
    correct = [True, True, True, False, False, False, True, True]
    result = M.pair_accuracy(correct)
    assert (result.correct, result.total) == (2, 4)
    assert result.accuracy == pytest.approx(0.5)
    assert result.percent == pytest.approx(50.0)


def test_pair_accuracy_with_shuffled_pair_index_and_sample_index():
    correct = [True, True, True, False, False, False, True, True]
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    shuffled = [correct[i] for i in order]
    by_pair = M.pair_accuracy(shuffled, pair_index=[i // 2 for i in order])
    by_sample = M.pair_accuracy(shuffled, sample_index=order)
    assert by_pair == by_sample == M.pair_accuracy(correct)


def test_pair_accuracy_incomplete_pair_raises_or_is_dropped():
    correct = [True, True, True]
    with pytest.raises(ValueError, match="incomplete"):
        M.pair_accuracy(correct)
    result = M.pair_accuracy(correct, incomplete="drop")
    assert (result.correct, result.total) == (1, 1)
    with pytest.raises(ValueError, match="incomplete"):
        M.pair_accuracy([True, True], sample_index=[0, 3])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pair_index=[0, 0, 0, 1]), "3 members"),
        (dict(sample_index=[0, 1, 1, 2]), "repeats"),
        (dict(pair_index=[0, 0, 1]), "entries"),
        (dict(pair_index=[0, 0, 1, 1], sample_index=[0, 1, 2, 3]), "not both"),
        (dict(incomplete="ignore"), "incomplete"),
    ],
)
def test_pair_accuracy_rejects_bad_pairing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M.pair_accuracy([True, True, False, True], **kwargs)


def test_pair_accuracy_empty_and_non_bool():
    with pytest.raises(ValueError, match="undefined"):
        M.pair_accuracy([])
    with pytest.raises(ValueError, match=r"correct\[1\]"):
        M.pair_accuracy([True, "yes"])


# ------------------------------------------------------------------------------ per-question (CV)


def test_per_question_accuracy_with_task_breakdown():
    correct = [True, False, True, True, False]
    tasks = ["Count", "Count", "Relation", "Count", "Relation"]
    overall, per_task = M.per_question_accuracy(correct, tasks)
    assert (overall.correct, overall.total) == (3, 5)
    assert overall.accuracy == pytest.approx(0.6)
    assert list(per_task) == ["Count", "Relation"]
    assert tuple(per_task["Count"]) == (2, 3, pytest.approx(2 / 3))
    assert tuple(per_task["Relation"]) == (1, 2, pytest.approx(0.5))


def test_per_question_accuracy_without_tasks_and_bad_input():
    overall, per_task = M.per_question_accuracy([True, False])
    assert overall.accuracy == pytest.approx(0.5) and per_task == {}
    with pytest.raises(ValueError, match="entries"):
        M.per_question_accuracy([True, False], ["Count"])
    with pytest.raises(ValueError, match="None"):
        M.per_question_accuracy([True], [None])


# ------------------------------------------------------------------------------------------------ S


@pytest.mark.parametrize("accuracy, miou, expected", [(27.3, 38.0, 31.8), (52.0, 56.1, 54.0)])
def test_combined_score_matches_paper(accuracy, miou, expected):
    assert round(M.combined_score(accuracy, miou), 1) == expected


def test_combined_score_is_unit_free_and_handles_zero():
    assert M.combined_score(0.273, 0.38) == pytest.approx(M.combined_score(27.3, 38.0) / 100)
    assert M.combined_score(0.0, 40.0) == 0.0
    assert M.combined_score(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="accuracy"):
        M.combined_score(-1.0, 10.0)
    with pytest.raises(ValueError, match="miou"):
        M.combined_score(10.0, float("nan"))


def test_s_score_takes_the_better_protocols_and_tolerates_none():
    assert M.s_score(20.0, 27.3, 38.0, 12.0) == pytest.approx(M.combined_score(27.3, 38.0))
    assert M.s_score(None, 52.0, None, 56.1) == pytest.approx(M.combined_score(52.0, 56.1))
    assert M.s_score(None, None, 30.0, 40.0) is None
    assert M.s_score(30.0, 40.0, None, None) is None


# ------------------------------------------------------------------------------------ failure bins


def test_grounding_success_rules():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 px
    pred = np.zeros((4, 4), bool)
    pred[:2, :2] = True
    pred[2, 0] = True  # IoU 4/5 > 0.5
    assert M.grounding_success(pred, gt)
    half = np.zeros((4, 4), bool)
    half[0, :2] = True  # IoU exactly 0.5: not above the threshold
    assert not M.grounding_success(half, gt)
    empty_gt = np.zeros((4, 4), bool)
    small = np.zeros((4, 4), bool)
    small[:1] = True  # 4 / 16 of the image
    assert M.grounding_success(small, empty_gt)
    half_image = np.zeros((4, 4), bool)
    half_image[:2] = True  # exactly half: not under half
    assert not M.grounding_success(half_image, empty_gt)
    assert M.grounding_success(empty_gt, empty_gt)


def test_grounding_success_from_stats_validates():
    assert M.grounding_success_from_stats(0.6, 10, 12, 100)
    assert M.grounding_success_from_stats(0.0, 0, 49, 100)
    assert not M.grounding_success_from_stats(0.0, 0, 50, 100)
    with pytest.raises(ValueError, match="image_area"):
        M.grounding_success_from_stats(0.5, 0, 0, 0)
    with pytest.raises(ValueError, match="areas"):
        M.grounding_success_from_stats(0.5, 10, 200, 100)


def test_failure_bins_each_pair_lands_in_its_bin():
    # pair 0: both ok; pair 1: grounding fails on one sample only; pair 2: VQA fails on one sample
    # only; pair 3: VQA and grounding both fail; pair 4: VQA fails on one, grounding on the other.
    vqa = [True, True, True, True, True, False, False, True, True, False]
    grounded = [True, True, True, False, True, True, False, False, False, True]
    bins = M.failure_bins(vqa, grounded)
    assert bins == {
        "both_succeed": 1,
        "grounding_only_fail": 1,
        "vqa_only_fail": 1,
        "both_fail": 2,
        "incomplete_dropped": 0,
    }
    assert sum(bins[name] for name in M.FAILURE_BINS) == 5


def test_failure_bins_pairing_and_errors():
    vqa = [True, True, False]
    grounded = [True, True, True]
    with pytest.raises(ValueError, match="incomplete"):
        M.failure_bins(vqa, grounded)
    bins = M.failure_bins(vqa, grounded, incomplete="drop")
    assert bins["both_succeed"] == 1 and bins["incomplete_dropped"] == 1
    with pytest.raises(ValueError, match="entries"):
        M.failure_bins([True, True], [True])


# ---------------------------------------------------------------------------------- answer parsing


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("The answer is (b).", "B"),
        ("b", "B"),
        ("A.", "A"),
        ("(a)", "A"),
        ("Answer: a", "A"),
        ("  B,  ", "B"),
        ("Closed.", "B"),
        ("OPEN", "A"),
        ("I think the answer is closed", "B"),
        ("", None),
        ("   ", None),
        (None, None),
        ("The wings are open.", None),
        # Published rule: letter plus text and a colon after "answer is" are not understood.
        ("(a) Open", None),
        ("The answer is: (b)", None),
        ("c", None),
    ],
)
def test_parse_choice_mmvp_rule(reply, expected):
    assert M.parse_choice(reply, OPTIONS) == expected


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("(B) right", "B"),
        ("The answer is (a).", "A"),
        ("b", "B"),
        ("Cats", None),  # first character "c" is not among the two letters
        ("Blue", "B"),   # published first-character rule: any word starting with b reads as "b"
        ("left", None),  # option text is not matched in the CV-Bench rule
        ("", None),
    ],
)
def test_parse_choice_cvbench_rule(reply, expected):
    assert M.parse_choice(reply, ["left", "right"], style="cvbench") == expected


def test_is_correct_accepts_letter_forms_and_rejects_bad_letters():
    assert M.is_correct("The answer is (b).", OPTIONS, "(b)")
    assert M.is_correct("Closed", OPTIONS, "B")
    assert not M.is_correct("Open", OPTIONS, "b")
    assert not M.is_correct("", OPTIONS, "A")
    with pytest.raises(ValueError, match="not one of"):
        M.is_correct("a", OPTIONS, "C")
    with pytest.raises(ValueError, match="style"):
        M.parse_choice("a", OPTIONS, style="gpt")
    with pytest.raises(ValueError, match="options"):
        M.parse_choice("a", "Open Closed")
    with pytest.raises(ValueError, match="reply"):
        M.parse_choice(3, OPTIONS)


@pytest.mark.parametrize(
    "reply, expected",
    [("Yes", True), ("yes.", True), ("No", False), ("NO...", False), (" Yes\n", True),
     ("Yes, it does.", None), ("", None), (None, None)],
)
def test_parse_judge_verdict(reply, expected):
    assert M.parse_judge_verdict(reply) is expected

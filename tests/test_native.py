"""A model's own points and boxes: the published prompts, JSON parsing, rescaling and mask unions."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pixfound.grounding.native import (box_prompt, parse_boxes, parse_points, point_candidates, point_prompt,
                                       union_of_last)

POINTS = '```json\n[\n  {"point_2d": [120, 84], "label": "dog"},\n  {"point_2d": [33, 200]}\n]\n```'
BOXES = '```json\n[{"bbox_2d": [300, 40, 20, 180], "label": "cat"}, {"bbox_2d": [-5, 10, 900, 600]}]\n```'


def test_prompts_are_the_published_text():
    assert point_prompt(" the dog") == "Point to the  the dog, output its coordinates in point-format as JSON"
    assert box_prompt("the cat") == ("Locate the the cat and output all the coordinates in JSON format for a tight "
                                     "bounding box surrounding the object. If the object does not exist in the image "
                                     "dont generate any boxes.")


def test_points_scale_from_the_processor_input_to_the_image():
    # input 280x420 (grid 20x30 of 14 px), image 300x400 (H, W)
    points = parse_points(POINTS, (280, 420), (300, 400))
    assert points.tolist() == [[int(120 / 420 * 400), int(84 / 280 * 300)], [int(33 / 420 * 400), int(200 / 280 * 300)]]
    assert points.dtype == np.int64


def test_boxes_are_ordered_scaled_and_clipped():
    boxes = parse_boxes(BOXES, (280, 420), (300, 400))
    first = [int(20 / 420 * 400), int(40 / 280 * 300), int(300 / 420 * 400), int(180 / 280 * 300)]
    assert boxes.tolist()[0] == first
    assert boxes.tolist()[1] == [0, int(10 / 280 * 300), 399, 299]


@pytest.mark.parametrize("reply", ["I cannot see it.", "```json\nnot json\n```", '```json\n{"point_2d": [1, 2]}\n```',
                                   '```json\n[{"point": [1, 2]}]\n```', '```json\n[{"point_2d": [1]}]\n```', ""])
def test_unreadable_replies_are_no_prediction(reply):
    assert parse_points(reply, (28, 28), (10, 10)) is None
    assert parse_boxes(reply.replace("point_2d", "bbox_2d"), (28, 28), (10, 10)) is None


def test_a_reply_without_a_fence_is_read_whole():
    assert parse_points('[{"point_2d": [14, 14]}]', (28, 28), (10, 10)).tolist() == [[5, 5]]
    assert parse_points("[]", (28, 28), (10, 10)).shape == (0, 2)


def _published_permutations(pred_masks):
    """``retrieve_permutations`` of infer_qwen.py, restated on NumPy."""
    if pred_masks.shape[0] == 1 and pred_masks.shape[1] == 1:
        return pred_masks[0]
    if pred_masks.shape[0] > 10:
        pred_masks = pred_masks[:, :1]
    elif pred_masks.shape[0] > 5:
        pred_masks = pred_masks[:, :2]
    list_ids = [[f"{i}_{j}" for j in range(pred_masks.shape[1])] for i in range(pred_masks.shape[0])]
    out = []
    for pair in itertools.product(*list_ids):
        current = np.zeros(pred_masks.shape[-2:])
        for element in pair:
            inst, mask = element.split("_")
            current += pred_masks[int(inst)][int(mask)]
        out.append(current > 0)
    return np.stack(out)


@pytest.mark.parametrize("points", [1, 2, 3, 6, 11])
def test_point_candidates_are_the_published_unions(points):
    rng = np.random.default_rng(points)
    masks = rng.random((points, 3, 5, 7)) > 0.7
    got = point_candidates(masks)
    expected = _published_permutations(masks.astype(float))
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert len(got) == {1: 3, 2: 9, 3: 27, 6: 64, 11: 1}[points]
    single = point_candidates(np.zeros((1, 1, 5, 7), bool))
    assert single.shape == (1, 5, 7) and not single.any()


def test_union_of_last_masks():
    masks = np.zeros((2, 3, 4, 4), bool)
    masks[0, 2, 0, 0] = masks[1, 2, 3, 3] = masks[0, 0, 1, 1] = True
    union = union_of_last(masks, (4, 4))
    assert union[0, 0] and union[3, 3] and not union[1, 1]
    assert not union_of_last(np.zeros((0, 3, 4, 4), bool), (4, 4)).any()

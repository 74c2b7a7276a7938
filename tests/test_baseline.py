"""The box-prompt simple baseline on hand-made replies (pixfound.grounding.baseline)."""
from __future__ import annotations

import numpy as np
import pytest

from pixfound.grounding.baseline import BOX_PROMPT_TEMPLATE, baseline_mask, box_prompt, boxes_to_pixels, parse_boxes


def _published_parse(reply: str, width: int, height: int) -> list[list[int]]:
    """The published LLaVA script's parser (infer_simple_baseline.py), for replies it can read."""
    lines = reply.split("\n") if "\n" in reply.strip() else [reply.strip()]
    boxes = []
    for line in lines:
        box = [float(a) for a in line.strip()[1:-1].split(", ")][:4]
        boxes.append([int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height)])
    return boxes


def test_box_prompt_is_the_published_question():
    assert box_prompt("red car") == "Output bounding box for the red car."
    assert box_prompt("  dog ") == BOX_PROMPT_TEMPLATE.format(expression="dog")
    with pytest.raises(ValueError, match="expression"):
        box_prompt(" ")


@pytest.mark.parametrize(
    "reply",
    [
        "[0.12, 0.3, 0.56, 0.78]",
        "[0.12, 0.3, 0.56, 0.78]\n[0.0, 0.5, 1.0, 1.0]",
        "[0.12, 0.3, 0.56, 0.78, 0.9]",
        " [0.333, 0.25, 0.667, 0.75] ",
    ],
)
def test_published_format_parses_like_the_published_script(reply):
    height, width = 333, 500
    parsed = parse_boxes(reply)
    assert not parsed.failed and parsed.unparsed_lines == 0
    assert boxes_to_pixels(parsed.boxes, (height, width)).tolist() == _published_parse(reply, width, height)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("(0.1,0.2,0.5,0.6)", [[0.1, 0.2, 0.5, 0.6]]),
        ("[0.1 0.2 0.5 0.6]", [[0.1, 0.2, 0.5, 0.6]]),
        ("The red car is at [0.1, 0.2, 0.5, 0.6].", [[0.1, 0.2, 0.5, 0.6]]),
        ("[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.4, 0.9]", [[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.4, 0.9]]),
        ("0.1, 0.2, 0.5, 0.6", [[0.1, 0.2, 0.5, 0.6]]),
        ("[.1, 0.2, 1, 1.]", [[0.1, 0.2, 1.0, 1.0]]),
        ("[0.5, 0.6, 0.1, 0.2]", [[0.1, 0.2, 0.5, 0.6]]),
        ("first: [0.1, 0.2, 0.5, 0.6]\n\nsecond:\n(0.2, 0.1, 0.3, 0.4)", [[0.1, 0.2, 0.5, 0.6], [0.2, 0.1, 0.3, 0.4]]),
    ],
)
def test_tolerated_formats(reply, expected):
    parsed = parse_boxes(reply)
    np.testing.assert_allclose(parsed.boxes, expected)
    assert not parsed.failed


def test_qwen_corner_pairs_on_a_thousand_scale():
    parsed = parse_boxes("the car(100,200),(500,600)", coord_scale=1000)
    np.testing.assert_allclose(parsed.boxes, [[0.1, 0.2, 0.5, 0.6]])


@pytest.mark.parametrize(
    "reply, unparsed, rejected",
    [
        ("", 0, 0),
        ("   \n  ", 0, 0),
        ("I cannot find a red car in the image.", 1, 0),
        ("[0.1, 0.2]", 1, 0),
        ("[12, 30, 200, 300]", 0, 1),
        ("There are 2 cars.\n[0.1, 0.2, nan, 0.6]", 2, 0),
    ],
)
def test_unparsable_replies_fail_softly(reply, unparsed, rejected):
    parsed = parse_boxes(reply)
    assert parsed.failed and parsed.boxes.shape == (0, 4)
    assert parsed.unparsed_lines == unparsed and parsed.rejected_boxes == rejected


def test_partly_parsable_reply_keeps_its_boxes_and_counts_the_rest():
    parsed = parse_boxes("Sure!\n[0.1, 0.2, 0.5, 0.6]\n[1.5, 0.2, 2.0, 0.6]")
    assert not parsed.failed and parsed.boxes.shape == (1, 4)
    assert (parsed.lines, parsed.unparsed_lines, parsed.rejected_boxes) == (3, 1, 1)


def test_parse_arguments_are_validated():
    with pytest.raises(ValueError, match="reply"):
        parse_boxes(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coord_scale"):
        parse_boxes("[0, 0, 1, 1]", coord_scale=0)


def test_pixel_frames():
    box = np.array([[0.25, 0.25, 0.75, 0.75]])
    # image frame (published): relative to W = 200, H = 100
    assert boxes_to_pixels(box, (100, 200)).tolist() == [[50, 25, 150, 75]]
    # pad frame: relative to the 200x200 square whose rows 50..150 hold the image
    assert boxes_to_pixels(box, (100, 200), frame="pad").tolist() == [[50, 0, 150, 100]]
    # crop frame: relative to the central 100x100 square starting at x = 50
    assert boxes_to_pixels(box, (100, 200), frame="crop").tolist() == [[75, 25, 125, 75]]
    # a box on the padding is clipped to the image
    assert boxes_to_pixels(np.array([[0.0, 0.0, 1.0, 0.1]]), (100, 200), frame="pad").tolist() == [[0, 0, 200, 0]]
    with pytest.raises(ValueError, match="frame"):
        boxes_to_pixels(box, (100, 200), frame="square")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        boxes_to_pixels(np.zeros((1, 3)), (100, 200))


@pytest.fixture(scope="module")
def segmenter():
    pytest.importorskip("segment_anything")
    from pixfound.grounding.sam import tiny_sam

    segmenter = tiny_sam(seed=0)
    segmenter.set_image(np.random.default_rng(0).integers(0, 256, size=(45, 70, 3), dtype=np.uint8))
    return segmenter


@pytest.mark.parametrize("multimask_output", [True, False])
def test_mask_is_the_union_over_lines(segmenter, multimask_output):
    reply = "[0.1, 0.2, 0.5, 0.6]\n[0.4, 0.1, 0.9, 0.8]"
    result = baseline_mask(reply, segmenter, multimask_output=multimask_output)
    assert not result.parse_failed
    assert result.mask.shape == (45, 70) and result.mask.dtype == bool
    expected_boxes = boxes_to_pixels(parse_boxes(reply).boxes, (45, 70))
    assert np.array_equal(result.boxes, expected_boxes)
    masks, scores = segmenter.segment_boxes(expected_boxes, multimask_output=multimask_output)
    assert np.array_equal(result.mask, masks[0].numpy() | masks[1].numpy())
    np.testing.assert_allclose(result.scores, scores.numpy())


def test_unparsable_reply_gives_an_empty_mask(segmenter):
    result = baseline_mask("I don't see any red car.", segmenter)
    assert result.parse_failed and result.unparsed_lines == 1
    assert result.mask.shape == (45, 70) and not result.mask.any()
    assert result.boxes.shape == (0, 4) and result.scores.shape == (0,)

"""A model's own grounding: points or boxes the MLLM writes as text, turned into SAM prompts.

As the published Qwen2.5-VL scripts do it (``pixmmvp/inference/infer_qwen.py`` for points,
``infer_qwen_simplebaseline.py`` for points and boxes):

- the model is asked ``"Point to the {Object}, output its coordinates in point-format as JSON"``
  (:data:`POINT_PROMPT`) or, for boxes, ``"Locate the {Object} and output all the coordinates in
  JSON format for a tight bounding box surrounding the object. If the object does not exist in the
  image dont generate any boxes."`` (:data:`BOX_PROMPT`);
- the reply's first fenced code block is read as JSON, a list of ``{"point_2d": [x, y]}`` or
  ``{"bbox_2d": [x1, y1, x2, y2]}`` in the processor's input pixels; each coordinate is scaled to
  the original image, ``int(v / input_side * image_side)`` (:func:`parse_points`,
  :func:`parse_boxes`; box corners are put in order and clipped to the image);
- a reply that cannot be read is "no prediction" (``None``), never an error;
- points: SAM with 3 masks per point, and every union of one mask per point as a candidate
  (:func:`point_candidates`, the published ``retrieve_permutations``: at most 2 masks per point
  beyond 5 points, 1 beyond 10); the "simple baseline" variant takes each point's last mask and
  their union (:func:`union_of_last`); boxes: one mask per box (the last), and their union.
"""
from __future__ import annotations

import itertools
import json
import re
from typing import Any, Optional, Sequence

import numpy as np

__all__ = [
    "BOX_PROMPT",
    "POINT_PROMPT",
    "box_prompt",
    "first_json_block",
    "parse_boxes",
    "parse_points",
    "point_candidates",
    "point_prompt",
    "union_of_last",
]

POINT_PROMPT = "Point to the {}, output its coordinates in point-format as JSON"
BOX_PROMPT = ("Locate the {} and output all the coordinates in JSON format for a tight bounding box surrounding "
              "the object. If the object does not exist in the image dont generate any boxes.")
# retrieve_permutations: how many of SAM's masks each point keeps, by number of points
_MAX_POINTS_THREE_MASKS = 5
_MAX_POINTS_TWO_MASKS = 10

_FENCE = re.compile(r"```[^\n`]*\n?(.*?)```", re.DOTALL)


def point_prompt(expression: str) -> str:
    """The published point question; ``expression`` as given (the published scripts put the CSV
    cell there, leading space included: ``"Point to the  the dog, ..."``)."""
    return POINT_PROMPT.format(expression)


def box_prompt(expression: str) -> str:
    """The published box question of the Qwen simple baseline."""
    return BOX_PROMPT.format(expression)


def first_json_block(reply: str) -> Any:
    """The JSON in the reply's first fenced code block (as the published markdown parse reads it),
    or the whole reply when it has no fence; None when it is not JSON."""
    match = _FENCE.search(reply or "")
    text = match.group(1) if match else (reply or "")
    try:
        return json.loads(text)
    except ValueError:
        return None


def _entries(reply: str, key: str, size: int) -> Optional[list[list[float]]]:
    data = first_json_block(reply)
    if not isinstance(data, list):  # a lone object is not read either: the published loop expects a list
        return None
    out = []
    for entry in data:
        value = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(value, (list, tuple)) or len(value) < size:
            return None  # the published parse stopped at the first entry it could not read
        try:
            out.append([float(v) for v in value[:size]])
        except (TypeError, ValueError):
            return None
    return out


def parse_points(reply: str, input_hw: tuple[int, int], image_hw: tuple[int, int]) -> Optional[np.ndarray]:
    """Points int64 [N, 2] (x, y) in image pixels from a ``point_2d`` JSON reply, or None.

    ``input_hw`` is the (height, width) the processor fed the model (Qwen: ``image_grid_thw`` x 14),
    ``image_hw`` the original image's.
    """
    entries = _entries(reply, "point_2d", 2)
    if entries is None:
        return None
    (input_h, input_w), (height, width) = input_hw, image_hw
    return np.asarray([[int(x / input_w * width), int(y / input_h * height)] for x, y in entries],
                      dtype=np.int64).reshape(-1, 2)


def parse_boxes(reply: str, input_hw: tuple[int, int], image_hw: tuple[int, int]) -> Optional[np.ndarray]:
    """Boxes int64 [N, 4] (x1, y1, x2, y2) in image pixels from a ``bbox_2d`` JSON reply, or None.

    Corners are put in order, then clipped to the image as published (``check_boundaries``: the far
    corner at most the last pixel).
    """
    entries = _entries(reply, "bbox_2d", 4)
    if entries is None:
        return None
    (input_h, input_w), (height, width) = input_hw, image_hw
    boxes = []
    for x1, y1, x2, y2 in entries:
        ax1, ay1 = int(x1 / input_w * width), int(y1 / input_h * height)
        ax2, ay2 = int(x2 / input_w * width), int(y2 / input_h * height)
        ax1, ax2 = min(ax1, ax2), max(ax1, ax2)
        ay1, ay2 = min(ay1, ay2), max(ay1, ay2)
        boxes.append([max(ax1, 0), max(ay1, 0), min(ax2, width - 1), min(ay2, height - 1)])
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def point_candidates(masks: Any) -> np.ndarray:
    """Every union of one SAM mask per point: bool [C, H, W] from masks [N, K, H, W].

    One point with one mask is that mask. Beyond 5 points each keeps its first 2 masks, beyond 10
    its first one, so the number of unions stays bounded (the published ``retrieve_permutations``).
    Unions are listed in ``itertools.product`` order over the points' mask indices.
    """
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 4:
        raise ValueError(f"masks must be [N, K, H, W], got shape {masks.shape}")
    count = masks.shape[0]
    if count > _MAX_POINTS_TWO_MASKS:
        masks = masks[:, :1]
    elif count > _MAX_POINTS_THREE_MASKS:
        masks = masks[:, :2]
    unions = [np.logical_or.reduce([masks[point, choice] for point, choice in enumerate(combo)])
              for combo in itertools.product(*(range(masks.shape[1]) for _ in range(count)))]
    return np.stack(unions)


def union_of_last(masks: Any, image_hw: Sequence[int]) -> np.ndarray:
    """The union of each prompt's last mask, bool [H, W] (all False without prompts)."""
    masks = np.asarray(masks).astype(bool)
    if masks.size == 0:
        return np.zeros(tuple(image_hw), dtype=bool)
    return masks[:, -1].any(axis=0)

"""The published "simple baseline": ask the MLLM for a box, prompt SAM with it.

1. Prompt: ``"Output bounding box for the {expression}."`` (:func:`box_prompt`; the runner asks the model).
2. Parse the reply (:func:`parse_boxes`). The published LLaVA script splits the reply on newlines,
   reads each line as ``[x1, y1, x2, y2]`` (brackets stripped, split on ``", "``, extra numbers
   after the fourth ignored) and crashes on anything else. Here each line may hold one or more
   boxes, in square or round brackets, with commas and/or spaces (``[0.1, 0.2, 0.5, 0.6]``,
   ``(0.1,0.2,0.5,0.6)``, ``[0.1 0.2 0.5 0.6]``), Qwen2-VL's ``(x1,y1),(x2,y2)``, or a bare line
   of numbers. A bracketed group with more than four numbers gives its first four (as published).
   Lines with no box are counted, never raised.
3. Scale to pixels (:func:`boxes_to_pixels`). The published script multiplies by the original image
   width and height and truncates to int (``frame="image"``). LLaVA-1.5 was trained on boxes
   normalised to its padded square, so ``frame="pad"`` maps from the centred max(H, W) square
   instead; ``frame="crop"`` from the central min(H, W) square. Pixel boxes are clipped to the image.
4. SAM gets every box in one call; one mask per box (the last candidate, as published; see
   ``SamSegmenter.segment_boxes``); the prediction is the union over all boxes.

A reply with no valid box gives an empty mask and ``parse_failed=True``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

import numpy as np

from pixfound.grounding.sam import SamSegmenter

__all__ = [
    "BOX_PROMPT_TEMPLATE",
    "BoxParse",
    "BaselineResult",
    "box_prompt",
    "parse_boxes",
    "boxes_to_pixels",
    "baseline_mask",
]

BOX_PROMPT_TEMPLATE = "Output bounding box for the {expression}."

BoxFrame = Literal["image", "pad", "crop"]

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"(?:\s*,\s*|\s+)"
# Qwen2-VL style: (x1,y1),(x2,y2)
_CORNER_PAIR = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,?\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")
# [x1, y1, x2, y2(, ...)] or (x1, y1, x2, y2(, ...))
_GROUP = re.compile(rf"[\[(]\s*({_NUMBER}(?:{_SEP}{_NUMBER}){{3,}})\s*[\])]")
# a line that is only numbers (a trailing full stop allowed)
_BARE = re.compile(rf"^\s*({_NUMBER}(?:{_SEP}{_NUMBER}){{3,}})\s*\.?\s*$")


def box_prompt(expression: str) -> str:
    """The published question for the simple baseline."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"expression must be a non-empty string, got {expression!r}")
    return BOX_PROMPT_TEMPLATE.format(expression=expression.strip())


@dataclasses.dataclass
class BoxParse:
    """What :func:`parse_boxes` found in a reply."""

    boxes: np.ndarray                # float64 [N, 4] (x1, y1, x2, y2), normalised to 0..1
    lines: int                       # non-blank lines read
    unparsed_lines: int              # non-blank lines without any box
    rejected_boxes: int              # boxes outside 0..1 after scaling

    @property
    def failed(self) -> bool:
        return self.boxes.shape[0] == 0


def _line_boxes(line: str) -> list[list[float]]:
    pairs = list(_CORNER_PAIR.finditer(line))
    if pairs:
        return [[float(g) for g in m.groups()] for m in pairs]
    groups = [m.group(1) for m in _GROUP.finditer(line)]
    if not groups:
        bare = _BARE.match(line)
        groups = [bare.group(1)] if bare else []
    return [[float(v) for v in re.findall(_NUMBER, group)[:4]] for group in groups]


def parse_boxes(reply: str, *, coord_scale: float = 1.0, tolerance: float = 1e-6) -> BoxParse:
    """Normalised boxes in an MLLM reply, line by line (see the module docstring for the formats).

    Coordinates are divided by ``coord_scale`` (1 for LLaVA's 0..1 boxes, 1000 for Qwen2-VL's
    0..1000). Corners given in reverse order are swapped. A box with a coordinate outside
    ``[-tolerance, 1 + tolerance]`` after scaling is rejected (counted), since it is not normalised.
    """
    if not isinstance(reply, str):
        raise ValueError(f"reply must be a str, got {type(reply).__name__}")
    if not coord_scale > 0:
        raise ValueError(f"coord_scale must be positive, got {coord_scale}")
    boxes: list[list[float]] = []
    lines = unparsed = rejected = 0
    for line in reply.splitlines():
        if not line.strip():
            continue
        lines += 1
        found = _line_boxes(line)
        if not found:
            unparsed += 1
        for box in found:
            x1, y1, x2, y2 = (v / coord_scale for v in box)
            if not all(-tolerance <= v <= 1 + tolerance for v in (x1, y1, x2, y2)):
                rejected += 1
                continue
            boxes.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
    array = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
    return BoxParse(boxes=array, lines=lines, unparsed_lines=unparsed, rejected_boxes=rejected)


def boxes_to_pixels(boxes: np.ndarray, image_size: tuple[int, int], *, frame: BoxFrame = "image") -> np.ndarray:
    """Normalised boxes [N, 4] → int64 pixel boxes [N, 4] (x1, y1, x2, y2) in the original image.

    ``frame`` is what the normalised coordinates are relative to: ``image`` (published), ``pad``
    (the centred max(H, W) square) or ``crop`` (the central min(H, W) square). Values are truncated
    to int as in the published script, then clipped to ``[0, W] × [0, H]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got shape {boxes.shape}")
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive (H, W), got {image_size}")
    if frame == "image":
        scale_x, scale_y, off_x, off_y = width, height, 0.0, 0.0
    elif frame == "pad":
        side = max(height, width)
        scale_x = scale_y = side
        off_x, off_y = -((side - width) // 2), -((side - height) // 2)
    elif frame == "crop":
        side = min(height, width)
        scale_x = scale_y = side
        off_x, off_y = (width - side) // 2, (height - side) // 2
    else:
        raise ValueError(f"frame must be 'image', 'pad' or 'crop', got {frame!r}")
    scale = np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float64)
    offset = np.array([off_x, off_y, off_x, off_y], dtype=np.float64)
    pixels = np.trunc(boxes * scale + offset).astype(np.int64)
    pixels[:, [0, 2]] = np.clip(pixels[:, [0, 2]], 0, width)
    pixels[:, [1, 3]] = np.clip(pixels[:, [1, 3]], 0, height)
    return pixels


@dataclasses.dataclass
class BaselineResult:
    """The baseline's prediction for one reply."""

    mask: np.ndarray          # bool [H, W], union over boxes (all False when parsing failed)
    boxes: np.ndarray         # int64 [N, 4] pixel boxes sent to SAM
    scores: np.ndarray        # float32 [N] SAM score of each box's mask
    parse_failed: bool        # no valid box in the reply
    unparsed_lines: int
    rejected_boxes: int


def baseline_mask(reply: str, segmenter: SamSegmenter, *, frame: BoxFrame = "image", coord_scale: float = 1.0,
                  multimask_output: bool = True) -> BaselineResult:
    """Mask for a box reply on the segmenter's current image (``segmenter.set_image`` first).

    ``multimask_output=True`` keeps the last of SAM's three candidates per box, as the published
    LLaVA script does (``SamPredictor.predict`` defaults to three masks); False asks SAM for one.
    """
    height, width = segmenter.image_size
    parsed = parse_boxes(reply, coord_scale=coord_scale)
    if parsed.failed:
        return BaselineResult(mask=np.zeros((height, width), dtype=bool), boxes=np.zeros((0, 4), dtype=np.int64),
                              scores=np.zeros((0,), dtype=np.float32), parse_failed=True,
                              unparsed_lines=parsed.unparsed_lines, rejected_boxes=parsed.rejected_boxes)
    pixel_boxes = boxes_to_pixels(parsed.boxes, (height, width), frame=frame)
    masks, scores = segmenter.segment_boxes(pixel_boxes, multimask_output=multimask_output)
    return BaselineResult(mask=masks.any(dim=0).numpy(), boxes=pixel_boxes, scores=scores.numpy(),
                          parse_failed=False, unparsed_lines=parsed.unparsed_lines,
                          rejected_boxes=parsed.rejected_boxes)

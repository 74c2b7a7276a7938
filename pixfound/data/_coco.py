"""Shared helpers for the benchmark loaders: COCO-style JSON, segmentations, masks and CSV rows.

Every field read from a benchmark file is validated here before use, and every defect becomes a
:class:`~pixfound.data.sample.DataProblem` that names the file and the row. Decoding goes through
pycocotools; nothing is ever ``eval``-ed.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import pathlib
import re
import warnings
from pixfound.errors import MissingFileError
from typing import Any, Optional, Sequence, Union

import numpy as np

from .sample import BadDataError, DataProblem, MissingImageError

logger = logging.getLogger("pixfound.data")

Segmentation = Union[list, dict]  # polygon list [[x0, y0, x1, y1, ...], ...] or RLE dict

# Compressed RLE strings use 6-bit groups offset by 48, i.e. the characters '0' (48) .. 'o' (111).
_RLE_STRING = re.compile(r"[0-o]*")
# Bounds that keep pycocotools' C code away from absurd allocations (and undefined int casts).
MAX_COORDINATE = 1e6
MAX_SIDE = 1 << 16


# ----------------------------------------------------------------------------------------------
# Problem collection: strict raises, lenient records
# ----------------------------------------------------------------------------------------------


class ProblemLog:
    """Collects data problems during one load: raises the first one when ``strict``."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: list[DataProblem] = []

    def report(self, path: Union[str, pathlib.Path], location: str, reason: str,
               sample_id: Optional[str] = None, *, missing_image: bool = False) -> None:
        problem = DataProblem(str(path), location, reason, sample_id)
        if self.strict:
            raise (MissingImageError if missing_image else BadDataError)(problem)
        self.problems.append(problem)

    def log_summary(self, benchmark: str) -> None:
        if self.problems:
            logger.warning("%s: %d data problem(s) skipped (strict=False); first: %s",
                           benchmark, len(self.problems), self.problems[0])


def fail(path: Union[str, pathlib.Path], location: str, reason: str) -> BadDataError:
    """A structural error that no ``strict=False`` can skip (e.g. a missing column)."""
    return BadDataError(DataProblem(str(path), location, reason))


# ----------------------------------------------------------------------------------------------
# CSV / JSON files
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CsvRow:
    line: int                           # physical line number in the file (header is line 1)
    values: Optional[dict[str, str]]    # stripped column name -> raw cell; None if the cell count is wrong
    num_cells: int

    def location(self) -> str:
        return f"line {self.line}"


def require_file(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    return path


def read_csv(path: pathlib.Path, required: Sequence[str]) -> list[CsvRow]:
    """Rows of a CSV file as dicts keyed by stripped header names; checks required columns.

    A missing column cannot be skipped row by row, so it always raises (``BadDataError``). A row
    whose cell count differs from the header's comes back with ``values=None`` for the caller to
    report against its sample.
    """
    require_file(path, "CSV file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise fail(path, "line 1", "empty file, expected a header row") from None
        missing = [name for name in required if name not in header]
        if missing:
            raise fail(path, "line 1", f"missing required column(s) {missing}; found columns {header}")
        rows = []
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue  # blank trailing lines
            values = dict(zip(header, cells)) if len(cells) == len(header) else None
            rows.append(CsvRow(reader.line_num, values, len(cells)))
    return rows


def read_json(path: pathlib.Path) -> Any:
    require_file(path, "annotation file")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise fail(path, f"line {err.lineno}", f"invalid JSON: {err.msg}") from None


def as_int(value: Any) -> Optional[int]:
    """An int from an int or a decimal string (some COCO exporters write ids as strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


# ----------------------------------------------------------------------------------------------
# COCO-style annotation files
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CocoImage:
    id: int
    file_name: str
    position: int                              # index in the JSON "images" list
    declared_size: Optional[tuple[int, int]]   # (H, W) from height/width, or from its RLEs
    segmentations: list[Segmentation] = dataclasses.field(default_factory=list)
    num_polygons: int = 0
    num_rle: int = 0
    annotation_rows: list[int] = dataclasses.field(default_factory=list)  # indices in "annotations"
    # Malformed annotations of this image as (location, reason); the caller reports them against
    # the sample, since a mask missing a part would be silently wrong.
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CocoFile:
    path: pathlib.Path
    images: list[CocoImage]
    by_id: dict[int, CocoImage]


def load_coco(path: pathlib.Path, log: ProblemLog) -> CocoFile:
    """Read and validate a COCO-style file: ``images`` (id, file_name, optional height/width) and
    ``annotations`` (image_id, segmentation). Segmentations are validated, not decoded."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise fail(path, "top level", "expected a JSON object with 'images' and 'annotations' lists")
    images: list[CocoImage] = []
    by_id: dict[int, CocoImage] = {}
    for position, entry in enumerate(data["images"]):
        where = f"images[{position}]"
        if not isinstance(entry, dict):
            raise fail(path, where, f"expected an object, got {type(entry).__name__}")
        image_id = as_int(entry.get("id"))
        file_name = entry.get("file_name")
        if image_id is None:
            raise fail(path, where, f"'id' must be an integer, got {entry.get('id')!r}")
        if not isinstance(file_name, str) or not file_name.strip():
            raise fail(path, where, f"'file_name' must be a non-empty string, got {file_name!r}")
        if image_id in by_id:
            raise fail(path, where, f"duplicate image id {image_id}")
        declared = None
        if entry.get("height") is not None or entry.get("width") is not None:
            height, width = as_int(entry.get("height")), as_int(entry.get("width"))
            if height is None or width is None or not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
                raise fail(path, where, f"'height'/'width' must be positive integers up to {MAX_SIDE}, "
                                        f"got {entry.get('height')!r}/{entry.get('width')!r}")
            declared = (height, width)
        image = CocoImage(image_id, file_name.strip(), position, declared)
        images.append(image)
        by_id[image_id] = image

    for row, ann in enumerate(data["annotations"]):
        where = f"annotations[{row}]"
        if not isinstance(ann, dict):
            log.report(path, where, f"expected an object, got {type(ann).__name__}; annotation ignored")
            continue
        image_id = as_int(ann.get("image_id"))
        if image_id is None or image_id not in by_id:
            log.report(path, where, f"unknown image id {ann.get('image_id')!r} (not in 'images'); "
                                    "annotation ignored")
            continue
        image = by_id[image_id]
        error = check_segmentation(ann.get("segmentation"))
        if error is not None:
            image.errors.append((f"{where} (image_id {image_id}, {image.file_name})", error))
            continue
        seg = ann["segmentation"]
        image.segmentations.append(seg)
        image.annotation_rows.append(row)
        if isinstance(seg, list):
            image.num_polygons += 1
        else:
            image.num_rle += 1
            if image.declared_size is None:
                image.declared_size = (int(seg["size"][0]), int(seg["size"][1]))
    return CocoFile(path, images, by_id)


def check_segmentation(seg: Any) -> Optional[str]:
    """Why ``seg`` is not a usable polygon list or RLE dict, or ``None`` when it is.

    Polygons: a non-empty list of lists of finite numbers, even length, at least 3 points.
    RLE: ``{"size": [h, w], "counts": str | list[int]}`` with positive ints and, for a compressed
    string, only the characters pycocotools writes. Count totals are checked at decode time.
    """
    if isinstance(seg, list):
        if not seg:
            return "empty polygon list"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list):
                return f"polygon {k} must be a list of numbers, got {type(poly).__name__}"
            if len(poly) % 2:
                return f"polygon {k} has an odd number of coordinates ({len(poly)})"
            if len(poly) < 6:
                return f"polygon {k} has {len(poly) // 2} point(s), needs at least 3"
            for value in poly:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    return f"polygon {k} has a non-numeric or non-finite coordinate {value!r}"
                if abs(value) > MAX_COORDINATE:
                    return f"polygon {k} has a coordinate {value!r} beyond ±{MAX_COORDINATE:g}"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in size)):
            return f"RLE 'size' must be [height, width] positive integers up to {MAX_SIDE}, got {size!r}"
        if isinstance(counts, str):
            if not counts or not _RLE_STRING.fullmatch(counts):
                return "RLE 'counts' string is empty or has characters outside the compressed-RLE alphabet"
            return None
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                return "RLE 'counts' list must hold non-negative integers"
            if sum(counts) != size[0] * size[1]:
                return f"RLE 'counts' sum to {sum(counts)}, expected height*width = {size[0] * size[1]}"
            return None
        return f"RLE 'counts' must be a string or a list of integers, got {type(counts).__name__}"
    return f"segmentation must be a polygon list or an RLE dict, got {type(seg).__name__}"


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def rle_string_counts(counts: str) -> np.ndarray:
    """Run lengths (int64) of a compressed RLE string in pycocotools' format.

    Used to validate a string before pycocotools' C decoder sees it: that decoder writes runs
    without bounds checks, so a string whose runs do not add up to h*w must never reach it.
    The format: each value is little-endian 5-bit groups (char - 48), bit 0x20 = more groups
    follow, bit 0x10 of the last group = negative; values after the third are deltas to the
    value two places back.
    """
    codes = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    is_last = (codes & 0x20) == 0
    if not is_last[-1]:
        raise ValueError("compressed RLE string ends in the middle of a run length")
    ends = np.flatnonzero(is_last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 12:  # 60 bits; pycocotools never writes more than 7 groups
        raise ValueError("compressed RLE string holds a run length too large to be real")
    group_index = np.arange(codes.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((codes & 0x1F) << (5 * group_index), starts)
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])  # sign extension
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # runs[3] = v3 + runs[1], runs[5] = v5 + runs[3], ...
    runs[2::2] = np.cumsum(values[2::2])  # runs[4] = v4 + runs[2], ...
    return runs


def _check_rle_total(seg: dict) -> None:
    height, width = seg["size"]
    counts = seg["counts"]
    runs = rle_string_counts(counts) if isinstance(counts, str) else np.asarray(counts, dtype=np.int64)
    if (runs < 0).any():
        raise ValueError("compressed RLE decodes to a negative run length")
    total = int(runs.sum())
    if total != height * width:
        raise ValueError(f"RLE runs sum to {total}, expected height*width = {height * width}")


def _decode_rle(rle: dict) -> np.ndarray:
    """pycocotools decode as a C-contiguous bool array."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        # pycocotools' Cython RLE wrapper predates NumPy 2's __array__(copy=) protocol; harmless.
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=bool)


def _encode_mask(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (H, W), sampling at pixel centres
    (the same grid as PIL's NEAREST and torch's ``nearest-exact``)."""
    src_h, src_w = mask.shape
    dst_h, dst_w = size
    rows = np.minimum(((np.arange(dst_h) + 0.5) * (src_h / dst_h)).astype(np.int64), src_h - 1)
    cols = np.minimum(((np.arange(dst_w) + 0.5) * (src_w / dst_w)).astype(np.int64), src_w - 1)
    return mask[rows[:, None], cols[None, :]]


def segmentation_rle(seg: Segmentation, size: tuple[int, int]) -> dict:
    """One validated segmentation as a pycocotools RLE of ``size`` (H, W).

    Polygons are rasterised at ``size``; an RLE whose own size differs is decoded at its size and
    resized nearest-neighbour to ``size``. Raises ValueError for RLE runs that do not fit.
    """
    from pycocotools import mask as mask_utils

    height, width = size
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    _check_rle_total(seg)
    rle_h, rle_w = seg["size"]
    if isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, rle_h, rle_w)
    else:
        rle = {"size": [rle_h, rle_w], "counts": seg["counts"].encode("ascii")}
    if (rle_h, rle_w) != (height, width):
        rle = _encode_mask(resize_nearest(_decode_rle(rle), (height, width)))
    return rle


def decode_segmentation(seg: Segmentation, size: tuple[int, int]) -> np.ndarray:
    """One validated segmentation as a C-contiguous bool mask of ``size`` (H, W)."""
    return _decode_rle(segmentation_rle(seg, size))


class LazyMask:
    """``mask_loader`` for one sample: the union of its segmentations at the image size.

    The union is formed on the RLEs (pycocotools ``merge``) on the first call and cached in that
    compressed form (a few KB), so masks are never all held in memory and later calls only decode.
    Each call returns a fresh C-contiguous bool array.
    """

    def __init__(self, segmentations: Sequence[Segmentation], size: Optional[tuple[int, int]],
                 where: str, size_error: str = ""):
        self.segmentations = list(segmentations)
        self.size = size
        self.where = where
        self.size_error = size_error
        self._cached_rle: Optional[dict] = None

    def _union_rle(self) -> dict:
        from pycocotools import mask as mask_utils

        if self._cached_rle is None:
            if self.size is None:
                raise ValueError(f"{self.where}: cannot build the mask: {self.size_error or 'image size unknown'}")
            rles = []
            for k, seg in enumerate(self.segmentations):
                try:
                    rles.append(segmentation_rle(seg, self.size))
                except ValueError as err:
                    raise ValueError(f"{self.where}: segmentation {k}: {err}") from None
            # merge needs equal sizes, which segmentation_rle guarantees
            self._cached_rle = mask_utils.merge(rles) if rles else _encode_mask(np.zeros(self.size, dtype=bool))
        return self._cached_rle

    def __call__(self) -> np.ndarray:
        return _decode_rle(self._union_rle())

    def area(self) -> tuple[int, int]:
        """(mask pixels, image pixels) without decoding the mask."""
        from pycocotools import mask as mask_utils

        rle = self._union_rle()
        return int(mask_utils.area(rle)), int(rle["size"][0]) * int(rle["size"][1])


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def probe_image_size(path: pathlib.Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding pixels."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return height, width


def resolve_image(path: pathlib.Path, declared: Optional[tuple[int, int]], meta: dict,
                  require: bool, log: ProblemLog, sample_id: str, where: tuple[str, str]
                  ) -> tuple[bool, Optional[tuple[int, int]]]:
    """Check a sample's image file; return (usable, image size).

    The actual size wins over the declared one; a mismatch is recorded in ``meta``
    (``declared_size``, ``size_mismatch``). A missing image is a data problem when ``require``.
    """
    if not path.is_file():
        meta["image_missing"] = True
        if require:
            log.report(where[0], where[1], f"image file not found: {path}", sample_id, missing_image=True)
            return False, None
        return True, declared
    try:
        actual = probe_image_size(path)
    except Exception as err:  # PIL raises several types for unreadable files
        log.report(where[0], where[1], f"image file {path} cannot be read: {err}", sample_id)
        return False, None
    if declared is not None and declared != actual:
        meta["declared_size"] = declared
        meta["size_mismatch"] = True
    return True, actual


def strip_expression(text: str) -> Optional[str]:
    """A referring expression from a CSV cell: whitespace trimmed, the literal ``None`` → None,
    and doubled quotes un-doubled (PixMMVP writes ``the key ""Z""`` in an unquoted cell)."""
    text = text.strip()
    if not text or text == "None":
        return None
    return text.replace('""', '"')

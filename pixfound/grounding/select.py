"""Mask candidates (3 SAM masks per noun phrase) and the three ways to pick one of them.

- ``oracle``: the candidate with the highest IoU against the ground truth (an upper bound on what
  the attention points can give). Packed IoU from :mod:`pixfound.ops`: the candidate masks of an
  image are bit-packed once by :func:`build_candidates` and each selection packs only the ground
  truth. Empty ground truth → predict empty, as published.
- ``similarity`` (the published "a+s"): the phrase whose vector is closest (cosine) to the
  referring expression's, then that phrase's highest-SAM-score mask; empty below a threshold (0.7).
- ``judge`` (the published "auto"): an MLLM first says whether the expression is in the image at
  all, then picks one of the candidates drawn as red overlays.

Candidates are always in sorted order: phrase index, then mask index. The published judge read
its overlay files in directory order, which is arbitrary (a slip, fixed here); its file names were
``{image}_{phrase:03d}_{mask:03d}.png``, and that sort order is the one used throughout.

On disk a mask is a COCO compressed RLE under the key ``mask_rle``: ``{"size": [H, W], "counts": str}``
(:func:`mask_to_rle`, :func:`rle_to_mask`).
"""
from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from pixfound import ops
from pixfound.errors import JudgeError
from pixfound.grounding.similarity import PhraseVectors, cosine_similarities, normalize_phrase

__all__ = [
    "Candidate",
    "Selection",
    "build_candidates",
    "candidate_ious",
    "oracle_ious_reference",
    "select_oracle",
    "select_similarity",
    "select_judge",
    "printed_score",
    "render_overlay",
    "parse_choice",
    "parse_exists",
    "exists_prompt",
    "choice_prompt",
    "mask_to_rle",
    "masks_to_rle",
    "masks_to_rle_reference",
    "rle_to_mask",
    "SIMILARITY_THRESHOLD",
]

SIMILARITY_THRESHOLD = 0.7
OVERLAY_COLOR = (255, 0, 0)
OVERLAY_ALPHA = 0.5


# --------------------------------------------------------------------------- RLE


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a 2-d mask: ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    mask = _to_numpy(mask, "mask")
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle expects a 2-d mask [H, W], got shape {mask.shape}")
    return masks_to_rle(mask[None])[0]


def _host_masks(masks: Any) -> np.ndarray:
    masks = _to_numpy(masks, "masks")
    if masks.ndim != 3:
        raise ValueError(f"masks_to_rle expects masks [N, H, W], got shape {masks.shape}")
    return masks


def masks_to_rle(masks: Any) -> list[dict]:
    """:func:`mask_to_rle` of each mask of ``masks`` [N, H, W] (any nonzero is inside; NumPy or torch).

    The C++ core reads the row-major masks column by column; :func:`masks_to_rle_reference`
    (pycocotools, after a column-major copy) gives the same strings.
    """
    from pixfound import _C

    masks = _host_masks(masks)
    if masks.dtype == np.bool_:
        masks = masks.view(np.uint8)
    elif masks.dtype != np.uint8:
        masks = masks != 0
        masks = masks.view(np.uint8)
    height, width = int(masks.shape[1]), int(masks.shape[2])
    return [{"size": [height, width], "counts": counts.decode("ascii")}
            for counts in _C.rle_encode(np.ascontiguousarray(masks))]


def masks_to_rle_reference(masks: Any) -> list[dict]:
    """:func:`masks_to_rle` with pycocotools' encoder (the reference)."""
    from pycocotools import mask as coco_mask

    masks = _host_masks(masks)
    if masks.shape[0] == 0:
        return []
    # pycocotools reads [H, W, N] in column-major order: each mask is one contiguous column-major block.
    columns = np.asfortranarray((masks != 0).astype(np.uint8).transpose(1, 2, 0))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
            for r in coco_mask.encode(columns)]


def rle_to_mask(rle: dict) -> np.ndarray:
    """Bool [H, W] mask from :func:`mask_to_rle` output (or any COCO RLE dict)."""
    from pycocotools import mask as coco_mask

    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE must be a dict with 'size' and 'counts', got {rle!r:.120}")
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        height, width = rle["size"]
        rle = coco_mask.frPyObjects(rle, int(height), int(width))
    else:
        rle = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():
        # pycocotools' Cython decode trips NumPy 2's __array__(copy=...) deprecation; harmless here.
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


# --------------------------------------------------------------------------- candidates


def _unpack_row(packed: ops.PackedMasks, row: int) -> np.ndarray:
    # ops packs pixel 64*k + b into bit b of word k; as little-endian bytes that is numpy's "little" bit order.
    words = packed.words[row]
    if sys.byteorder != "little":
        words = words.astype("<u8")
    pixels = packed.height * packed.width
    bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=pixels)
    return bits.reshape(packed.height, packed.width).astype(bool)


@dataclasses.dataclass(frozen=True, eq=False)
class Candidate:
    """One SAM mask for one phrase.

    ``packed``/``row`` locate the mask in the bit-packed masks of its image (shared by all the
    image's candidates, so oracle selection compares them in one call); ``mask`` unpacks it.
    """

    phrase_index: int
    mask_index: int
    points: tuple[tuple[int, int], ...]  # SAM prompt points (x, y), best first
    sam_score: float
    phrase_text: str
    phrase_root: str
    position_pct: float
    packed: ops.PackedMasks = dataclasses.field(repr=False)
    row: int = dataclasses.field(repr=False)

    @property
    def point(self) -> tuple[int, int]:
        """The (first) prompt point (x, y)."""
        return self.points[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the mask."""
        return (self.packed.height, self.packed.width)

    @property
    def area(self) -> int:
        """Number of pixels inside the mask."""
        return int(self.packed.areas[self.row])

    @property
    def mask(self) -> np.ndarray:
        """The mask, bool [H, W] (unpacked on each access)."""
        return _unpack_row(self.packed, self.row)

    def to_record(self, *, include_mask: bool = True) -> dict:
        """JSON-ready dict; the mask as COCO RLE under ``mask_rle``."""
        record = {
            "phrase_index": self.phrase_index,
            "mask_index": self.mask_index,
            "point": list(self.point),
            "points": [list(p) for p in self.points],
            "sam_score": self.sam_score,
            "phrase": self.phrase_text,
            "root": self.phrase_root,
            "position_pct": self.position_pct,
            "area": self.area,
        }
        if include_mask:
            record["mask_rle"] = mask_to_rle(self.mask)
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Candidate":
        """Inverse of :meth:`to_record` (which must have included the mask)."""
        if "mask_rle" not in record:
            raise ValueError(f"candidate record for phrase {record.get('phrase_index')} has no 'mask_rle'")
        mask = rle_to_mask(record["mask_rle"])
        return cls(
            phrase_index=int(record["phrase_index"]),
            mask_index=int(record["mask_index"]),
            points=tuple((int(x), int(y)) for x, y in record.get("points", [record["point"]])),
            sam_score=float(record["sam_score"]),
            phrase_text=str(record.get("phrase", "")),
            phrase_root=str(record.get("root", "")),
            position_pct=float(record.get("position_pct", 0.0)),
            packed=ops.pack_masks(np.ascontiguousarray(mask[None])),
            row=0,
        )


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from exc
    return x


def build_candidates(phrases: Sequence[Any], points: Any, masks: Any, scores: Any) -> list[Candidate]:
    """All SAM candidates of one image, sorted by (phrase index, mask index).

    Args:
        phrases: G phrase objects (``index``, ``text``, ``root``, ``position_pct``), one per row.
        points: int [G, P, 2] (or [G, 2]) SAM prompt points (x, y) per phrase.
        masks: bool/uint8 [G, K, H, W] SAM masks (K = 3 with ``multimask_output=True``).
        scores: float [G, K] SAM scores.

    NumPy arrays or torch tensors. The masks are bit-packed once here and shared by the candidates.
    """
    masks = _to_numpy(masks, "masks")
    scores = _to_numpy(scores, "scores")
    points = _to_numpy(points, "points")
    if masks.ndim != 4:
        raise ValueError(f"masks must be [G, K, H, W] (one row of K SAM masks per phrase), got shape {masks.shape}")
    num_phrases, per_phrase, height, width = masks.shape
    if len(phrases) != num_phrases:
        raise ValueError(f"got {len(phrases)} phrases but masks has {num_phrases} rows (shape {masks.shape})")
    if scores.shape != (num_phrases, per_phrase):
        raise ValueError(f"scores must be [G, K] = [{num_phrases}, {per_phrase}] to match masks {masks.shape}, got {scores.shape}")
    if points.ndim == 2:
        points = points[:, None, :]
    if points.ndim != 3 or points.shape[0] != num_phrases or points.shape[2] != 2 or points.shape[1] < 1:
        raise ValueError(f"points must be [G, P, 2] (x, y) with G = {num_phrases}, P >= 1, got shape {points.shape}")
    if masks.dtype not in (np.bool_, np.uint8):
        raise ValueError(f"masks must be bool or uint8, got dtype {masks.dtype} with shape {masks.shape}")
    phrase_indices = [int(p.index) for p in phrases]
    if len(set(phrase_indices)) != len(phrase_indices):
        raise ValueError(f"phrase indices must be unique, got {phrase_indices}")
    if num_phrases == 0 or per_phrase == 0:
        return []
    if height == 0 or width == 0:
        raise ValueError(f"masks must have a non-empty image size, got shape {masks.shape}")
    packed = ops.pack_masks(np.ascontiguousarray(masks.reshape(num_phrases * per_phrase, height, width)))
    candidates = []
    for g, phrase in enumerate(phrases):
        phrase_points = tuple((int(x), int(y)) for x, y in points[g])
        for k in range(per_phrase):
            candidates.append(
                Candidate(
                    phrase_index=int(phrase.index),
                    mask_index=k,
                    points=phrase_points,
                    sam_score=float(scores[g, k]),
                    phrase_text=str(phrase.text),
                    phrase_root=str(phrase.root),
                    position_pct=float(phrase.position_pct),
                    packed=packed,
                    row=g * per_phrase + k,
                )
            )
    candidates.sort(key=lambda c: (c.phrase_index, c.mask_index))
    return candidates


# --------------------------------------------------------------------------- selections


@dataclasses.dataclass
class Selection:
    """The mask a strategy picked for one sample.

    ``candidate_index`` indexes the sorted candidate list, ``None`` for an empty prediction;
    ``iou`` is the IoU with the ground truth where the strategy knows it (oracle); ``info`` holds
    the strategy's evidence (IoUs, similarities, judge replies, fallbacks).
    """

    strategy: str
    candidate_index: Optional[int]
    mask: np.ndarray  # bool [H, W]
    iou: Optional[float] = None
    info: dict = dataclasses.field(default_factory=dict)
    candidate: Optional[Candidate] = dataclasses.field(default=None, repr=False)
    # No mask at all, as when the published evaluation found no file to score: IoU 0 even where the
    # ground truth is empty (an empty *prediction* would score 1 there).
    missing: bool = False

    @property
    def is_empty_prediction(self) -> bool:
        """True when the strategy chose to predict no object."""
        return self.candidate_index is None

    def to_record(self, *, include_mask: bool = True) -> dict:
        """JSON-ready dict; the mask as COCO RLE under ``mask_rle``."""
        record = {
            "strategy": self.strategy,
            "candidate_index": self.candidate_index,
            "phrase_index": None if self.candidate is None else self.candidate.phrase_index,
            "mask_index": None if self.candidate is None else self.candidate.mask_index,
            "iou": self.iou,
            "missing": self.missing,
            "info": self.info,
        }
        if include_mask:
            record["mask_rle"] = mask_to_rle(self.mask)
        return record


def _common_shape(candidates: Sequence[Candidate]) -> Optional[tuple[int, int]]:
    shapes = {c.shape for c in candidates}
    if len(shapes) > 1:
        raise ValueError(f"candidates of one sample must share one mask size, got sizes {sorted(shapes)}")
    return next(iter(shapes)) if shapes else None


def _empty(strategy: str, shape: tuple[int, int], info: dict, iou: Optional[float] = None) -> Selection:
    return Selection(strategy, None, np.zeros(shape, dtype=bool), iou=iou, info=info)


def _chosen(strategy: str, candidates: Sequence[Candidate], index: int, info: dict, iou: Optional[float] = None) -> Selection:
    candidate = candidates[index]
    return Selection(strategy, index, candidate.mask, iou=iou, info=info, candidate=candidate)


def _as_gt(gt_mask: Any) -> np.ndarray:
    gt = _to_numpy(gt_mask, "gt_mask")
    if gt.ndim != 2:
        raise ValueError(f"gt_mask must be a 2-d mask [H, W], got shape {gt.shape}")
    if gt.dtype != np.bool_:
        gt = gt != 0
    return gt


def oracle_ious_reference(masks: np.ndarray, gt_mask: np.ndarray, *, empty: float = 1.0) -> np.ndarray:
    """Plain NumPy IoU of each dense mask [N, H, W] with ``gt_mask`` [H, W] -> float32 [N] (the reference)."""
    masks = np.asarray(masks).astype(bool, copy=False)
    gt = np.asarray(gt_mask).astype(bool, copy=False)
    if masks.ndim != 3 or masks.shape[1:] != gt.shape:
        raise ValueError(f"masks must be [N, H, W] with (H, W) = gt_mask's {gt.shape}, got {masks.shape}")
    flat = masks.reshape(masks.shape[0], -1)
    gt_flat = gt.reshape(-1)
    inter = np.count_nonzero(flat & gt_flat, axis=1)
    union = np.count_nonzero(flat | gt_flat, axis=1)
    out = np.full(masks.shape[0], empty, dtype=np.float32)
    nonempty = union > 0
    out[nonempty] = (inter[nonempty] / union[nonempty]).astype(np.float32)
    return out


def candidate_ious(candidates: Sequence[Candidate], gt_mask: Any, *, empty: float = 1.0) -> np.ndarray:
    """IoU float32 [N] of each candidate with ``gt_mask``, from the packed masks (one call per image)."""
    gt = _as_gt(gt_mask)
    out = np.zeros(len(candidates), dtype=np.float32)
    if not candidates:
        return out
    shape = _common_shape(candidates)
    if shape != gt.shape:
        raise ValueError(f"gt_mask has shape {gt.shape} but the candidate masks are {shape}")
    gt_packed = ops.pack_masks(np.ascontiguousarray(gt[None]))
    groups: dict[int, tuple[ops.PackedMasks, list[int]]] = {}
    for position, candidate in enumerate(candidates):
        groups.setdefault(id(candidate.packed), (candidate.packed, []))[1].append(position)
    for packed, positions in groups.values():
        rows = np.array([candidates[p].row for p in positions], dtype=np.int64)
        if len(rows) == len(packed) and np.array_equal(rows, np.arange(len(packed))):
            ious = ops.packed_iou(packed, gt_packed, empty=empty)[:, 0]
        else:
            ious = ops.packed_iou(packed.take(rows), gt_packed, empty=empty)[:, 0]
        out[positions] = ious
    return out


def _last_max(values: np.ndarray) -> int:
    return len(values) - 1 - int(np.argmax(values[::-1]))


def _exact_ious(candidates: Sequence[Candidate], positions: Sequence[int], gt: np.ndarray) -> np.ndarray:
    """float64 IoU (intersection / union, as the published ``compute_iou`` divides) of some candidates."""
    out = np.empty(len(positions), dtype=np.float64)
    for row, position in enumerate(positions):
        mask = candidates[position].mask
        union = np.count_nonzero(mask | gt)
        out[row] = 1.0 if union == 0 else np.count_nonzero(mask & gt) / np.float64(union)
    return out


def select_oracle(candidates: Sequence[Candidate], gt_mask: Any, *, ties: str = "first") -> Selection:
    """The candidate with the highest IoU against ``gt_mask``.

    ``ties``: ``"first"`` keeps the first best candidate in candidate order; ``"last"`` the last one,
    as the published evaluation does (it keeps a candidate when ``iou >= best``). The published
    IoU is a float64 division, so with ``"last"`` the candidates within float32 rounding of the best
    are compared again exactly before the tie is decided.

    Empty ground truth → predict empty (IoU 1); no candidates → predict empty.
    ``info["ious"]`` lists every candidate's IoU.
    """
    if ties not in ("first", "last"):
        raise ValueError(f"ties must be 'first' or 'last', got {ties!r}")
    gt = _as_gt(gt_mask)
    gt_empty = not gt.any()
    if candidates:
        shape = _common_shape(candidates)
        if shape != gt.shape:
            raise ValueError(f"gt_mask has shape {gt.shape} but the candidate masks are {shape}")
    if gt_empty:
        return _empty("oracle", gt.shape, {"reason": "empty_ground_truth"}, iou=1.0)
    if not candidates:
        return _empty("oracle", gt.shape, {"reason": "no_candidates"}, iou=0.0)
    ious = candidate_ious(candidates, gt)
    if ties == "first":
        best = int(np.argmax(ious))  # argmax returns the first maximum
        iou = float(ious[best])
    else:
        top = float(ious.max())
        near = [int(i) for i in np.flatnonzero(ious >= top - 1e-6)]  # float32 rounding is far below 1e-6
        exact = _exact_ious(candidates, near, gt)
        best = near[_last_max(exact)]
        iou = float(exact[_last_max(exact)])
    return _chosen("oracle", candidates, best, {"ious": [float(v) for v in ious], "ties": ties}, iou=iou)


def printed_score(value: float) -> float:
    """A similarity as the published meta file stores it (``"%f"``, six decimals) and reads it back."""
    return float("%f" % value)


def select_similarity(
    candidates: Sequence[Candidate],
    phrases: Sequence[Any],
    expression: str,
    vectors: PhraseVectors,
    *,
    threshold: float = SIMILARITY_THRESHOLD,
    image_size: Optional[tuple[int, int]] = None,
    pick: str = "best_sam",
    normalize: Any = normalize_phrase,
) -> Selection:
    """The published "a+s": the phrase most similar to ``expression``, then one of its masks.

    Phrase texts and the expression go through ``normalize`` (lowercase, leading article off)
    before encoding; similarity is the cosine of their vectors. Below ``threshold`` (0.7) the
    prediction is empty. ``pick`` decides the rest:

    - ``"best_sam"``: the best phrase's highest-SAM-score mask; ties to the lower phrase index,
      then the lower mask index.
    - ``"last_file"`` (published): the evaluation walks the mask files ``{image}_{phrase}_{mask}``
      in sorted order and keeps the last one whose phrase score is ``>=`` the best so far, starting
      from 0. So: the last mask (index 2) of the best phrase, ties to the later phrase; scores are
      compared as the meta file prints them (``%f``), in float32 as ``torch.cosine_similarity``
      gives them; a sample whose every phrase scores below 0 (or that has no phrase) has no mask
      to score at all (``Selection.missing``: IoU 0 even against an empty ground truth).

    ``image_size`` (H, W) sizes the empty mask when there are no candidates. ``info`` records the
    backend name, each phrase's similarity and the decision.
    """
    if pick not in ("best_sam", "last_file"):
        raise ValueError(f"pick must be 'best_sam' or 'last_file', got {pick!r}")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"expression must be a non-empty str, got {expression!r}")
    shape = _common_shape(candidates) or (tuple(image_size) if image_size is not None else None)
    if shape is None:
        raise ValueError("select_similarity got no candidates and no image_size (H, W) to size the empty mask")
    if image_size is not None and tuple(image_size) != shape:
        raise ValueError(f"image_size {tuple(image_size)} does not match the candidate masks {shape}")
    info: dict[str, Any] = {"vectors": getattr(vectors, "name", type(vectors).__name__), "threshold": float(threshold),
                            "pick": pick}
    by_index = {int(p.index): p for p in phrases}
    missing = sorted({c.phrase_index for c in candidates} - set(by_index))
    if missing:
        raise ValueError(f"candidates refer to phrase indices {missing} that are not among the given phrases {sorted(by_index)}")
    phrase_indices = sorted({c.phrase_index for c in candidates})
    if not phrase_indices:
        info["reason"] = "no_candidates"
        selection = _empty("similarity", shape, info)
        selection.missing = pick == "last_file"
        return selection
    texts = [normalize(expression)] + [normalize(str(by_index[i].text)) for i in phrase_indices]
    vecs = np.asarray(vectors.encode(texts))
    if vecs.ndim != 2 or vecs.shape[0] != len(texts):
        raise ValueError(f"{info['vectors']}.encode returned shape {vecs.shape} for {len(texts)} texts; expected [N, D]")
    if pick == "last_file":
        import torch

        table = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32))
        sims = [printed_score(float(v)) for v in torch.cosine_similarity(table[1:], table[:1], dim=1)]
        best_score, best = 0.0, None
        for row, score in enumerate(sims):
            if score >= best_score:
                best_score, best = score, row
    else:
        sims = [float(v) for v in cosine_similarities(vecs[0], vecs[1:])]
        best = int(np.argmax(sims))
    info.update(phrase_indices=phrase_indices, similarities=sims)
    if best is None:
        info["reason"] = "no_phrase_scores_at_least_0"
        selection = _empty("similarity", shape, info)
        selection.missing = True
        return selection
    info.update(best_phrase_index=phrase_indices[best], best_similarity=float(sims[best]))
    if sims[best] < threshold:
        info["reason"] = "below_threshold"
        return _empty("similarity", shape, info)
    positions = [i for i, c in enumerate(candidates) if c.phrase_index == phrase_indices[best]]
    if pick == "last_file":
        positions.sort(key=lambda i: candidates[i].mask_index)
        chosen = positions[-1]
    else:
        positions.sort(key=lambda i: (-candidates[i].sam_score, candidates[i].mask_index))
        chosen = positions[0]
    info["reason"] = "selected"
    return _chosen("similarity", candidates, chosen, info)


# --------------------------------------------------------------------------- judge


def exists_prompt(expression: str) -> str:
    """Step 1 of the judge: does the expression occur in the image at all? (The expression as given:
    the published script inserted the CSV cell with its leading space.)"""
    return f"Does this image have {expression}? Answer yes/no only."


def choice_prompt(expression: str, count: int) -> str:
    """Step 2, the published GPT-4o selection question (``infer_pixfoundation_auto_gpt.py``), verbatim."""
    return (
        f"Select the image that has {expression} best highlighted in red color than the others? "
        f"Answer with a number from 1 to {count}. Mention the number only."
    )


_LEADING_YES = re.compile(r"^\W*yes\b", re.IGNORECASE)
_PUBLISHED_YES = re.compile(r"^(yes)\.*$", re.IGNORECASE)
_FIRST_INTEGER = re.compile(r"\d+")
# The published judge sent at most this many overlays per question.
PUBLISHED_MAX_OVERLAYS = 499
JUDGE_RULES = ("pixfound", "published")


def parse_exists(reply: str, *, rules: str = "pixfound") -> bool:
    """Whether the judge said the expression is in the image.

    ``"pixfound"``: the reply starts with the word "yes" ("Yes", "yes.", "Yes, there is…").
    ``"published"``: the whole lowercased reply is "yes" followed by dots only (``^(yes)\\.*$``),
    surrounding white space included.
    """
    if rules == "published":
        return bool(_PUBLISHED_YES.match(reply.lower()))
    return bool(_LEADING_YES.match(reply.strip()))


def parse_choice(reply: str, count: int, *, rules: str = "pixfound") -> tuple[Optional[int], str]:
    """0-based choice from a "number from 1 to count" reply, and how it was read.

    The whole reply as an int (``"int"``), else its first run of digits (``"first_integer"``), as
    published. A number outside 1..count gives ``(None, "out_of_range")`` and a reply without one
    ``(None, "no_integer")``: the caller then takes the first candidate and records why.

    ``rules="published"`` reads the number as the published script indexed its file list: ``n - 1``
    with Python's negative indices (a reply of ``0`` picks the last candidate); only an index the
    list does not have is out of range (the published script stopped there with an IndexError), and
    a reply without any number picks the first candidate, as published (``"default_first"``).
    """
    text = reply.strip()
    try:
        number, method = int(reply if rules == "published" else text), "int"
    except ValueError:
        match = _FIRST_INTEGER.search(text)
        if match is None:
            return (0, "default_first") if rules == "published" else (None, "no_integer")
        number, method = int(match.group(0)), "first_integer"
    index = number - 1
    if rules == "published":
        if not -count <= index < count:
            return None, "out_of_range"
        return index % count, method
    if not 0 <= index < count:
        return None, "out_of_range"
    return index, method


def render_overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with ``mask`` painted red at 50% opacity (the published judge's overlay)."""
    rgb = np.array(image.convert("RGB"))
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask has shape {mask.shape} but the image is {rgb.shape[:2]} (H, W)")
    blended = rgb * (1.0 - OVERLAY_ALPHA) + np.array(OVERLAY_COLOR, dtype=np.float64) * OVERLAY_ALPHA
    rgb[mask] = blended[mask].astype(np.uint8)
    return Image.fromarray(rgb)


def select_judge(candidates: Sequence[Candidate], image: Image.Image, expression: str, judge: Any, *,
                 rules: str = "pixfound") -> Selection:
    """The published "auto" selection with an MLLM ``judge`` (see :mod:`pixfound.eval.judge`).

    1. Ask :func:`exists_prompt` with the image; anything but yes (:func:`parse_exists`) → empty
       prediction.
    2. Otherwise show every candidate as a red overlay, in sorted candidate order, all in one
       request (one message with N images for the openai backend, as published; one numbered
       grid for the hf backend), and ask :func:`choice_prompt`. The reply is read with
       :func:`parse_choice`; when it gives no usable number the first candidate is taken and
       ``info["fallback"]`` says why. With a single candidate no choice is asked.
       ``rules="published"`` shows at most the first 499 overlays, as published.

    No candidates → empty prediction without asking. A judge that fails (HTTP errors after its
    retries, timeouts, a malformed reply) falls back as well: ``info["judge_error"]`` holds the
    error, and the fallback is the empty prediction (step 1) or the first candidate (step 2).
    """
    if rules not in JUDGE_RULES:
        raise ValueError(f"rules must be one of {JUDGE_RULES}, got {rules!r}")
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"expression must be a non-empty str, got {expression!r}")
    shape = (image.height, image.width)
    candidate_shape = _common_shape(candidates)
    if candidate_shape is not None and candidate_shape != shape:
        raise ValueError(f"candidate masks are {candidate_shape} but the image is {shape} (H, W)")
    info: dict[str, Any] = {"judge": getattr(judge, "name", type(judge).__name__), "num_candidates": len(candidates),
                            "rules": rules}
    if not candidates:
        info["reason"] = "no_candidates"
        return _empty("judge", shape, info)
    try:
        exists_reply = judge.ask([image], exists_prompt(expression))
    except JudgeError as error:
        info.update(reason="judge_failed", judge_error=str(error), fallback="empty_prediction")
        return _empty("judge", shape, info)
    info["exists_reply"] = exists_reply
    info["exists"] = parse_exists(exists_reply, rules=rules)
    if not info["exists"]:
        info["reason"] = "judged_absent"
        return _empty("judge", shape, info)
    info["fallback"] = None
    shown = list(candidates[:PUBLISHED_MAX_OVERLAYS]) if rules == "published" else list(candidates)
    info["num_shown"] = len(shown)
    if len(shown) == 1:
        info["reason"] = "single_candidate"
        return _chosen("judge", candidates, 0, info)
    overlays = [render_overlay(image, c.mask) for c in shown]
    try:
        choice_reply = judge.ask(overlays, choice_prompt(expression, len(shown)))
    except JudgeError as error:
        info.update(reason="judge_failed", judge_error=str(error), fallback="judge_failed")
        return _chosen("judge", candidates, 0, info)
    info["choice_reply"] = choice_reply
    index, method = parse_choice(choice_reply, len(shown), rules=rules)
    info["choice_parse"] = method
    if index is None:
        info["fallback"] = method
        index = 0
    info["reason"] = "selected"
    return _chosen("judge", candidates, index, info)

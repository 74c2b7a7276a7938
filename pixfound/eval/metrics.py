"""Scores of the PixFoundation study: IoU, mIoU, accuracies, the combined score S and failure bins.

Everything here is plain NumPy/Python and is the reference the fast paths are checked against
(the batched, bit-packed IoU lives in :func:`pixfound.ops.mask_iou`).

Units. IoUs and accuracies are fractions in [0, 1]. :func:`combined_score` is a harmonic mean and
therefore unit-free: give it accuracy and mIoU in the same unit (the paper's tables use percent).

Pairs. MMVP-style benchmarks come in pairs (samples 2k and 2k+1, i.e. ``pair_index == k``). A pair
counts as answered correctly only when both of its questions are, and as grounded only when both of
its masks succeed (see :func:`grounding_success`). Every pair function takes the same pairing
arguments (see :func:`pair_positions`); an incomplete pair raises ``ValueError`` unless
``incomplete="drop"`` is given, in which case it is left out (:func:`failure_bins` reports how many
samples were dropped).

Answer parsing follows the published protocol-2 scripts (``extract_mcq_answer`` in PixFoundation's
``pixmmvp/eval/protocol2_accuracy.py`` and ``pixcvbench/eval/protocol2_accuracy_ade.py``) step for step,
so that accuracies stay comparable with the paper; see :func:`parse_choice`.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any, Literal, NamedTuple, Optional

import numpy as np

__all__ = [
    "AccuracyCount",
    "FAILURE_BINS",
    "combined_score",
    "failure_bins",
    "grounding_success",
    "grounding_success_from_stats",
    "iou",
    "is_correct",
    "mean_iou",
    "normalize_letter",
    "option_letters",
    "pair_accuracy",
    "pair_positions",
    "parse_choice",
    "parse_judge_verdict",
    "per_question_accuracy",
    "s_score",
]

# Order and meaning as in the published eval_accandiou.py histogram (bins 0..3).
FAILURE_BINS: tuple[str, ...] = ("grounding_only_fail", "vqa_only_fail", "both_fail", "both_succeed")

ParseStyle = Literal["mmvp", "cvbench"]
Incomplete = Literal["raise", "drop"]


class AccuracyCount(NamedTuple):
    """``correct`` out of ``total`` units (questions or pairs); ``accuracy`` is the fraction."""

    correct: int
    total: int
    accuracy: float

    @property
    def percent(self) -> float:
        return 100.0 * self.accuracy


def _accuracy_count(correct: int, total: int, what: str) -> AccuracyCount:
    if total <= 0:
        raise ValueError(f"{what}: no units to score (total = 0); accuracy is undefined")
    return AccuracyCount(int(correct), int(total), correct / total)


# --------------------------------------------------------------------------------------------- IoU


def _as_mask(mask: Any, name: str) -> np.ndarray:
    """A 2-D boolean mask from bool/integer/float array-likes (NumPy, CPU torch, nested lists)."""
    if mask is None:
        raise ValueError(f"{name} is None; pass an all-False mask for 'no prediction'")
    if hasattr(mask, "detach"):  # torch tensor: no torch import needed here
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask [H, W], got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name} is empty, shape {tuple(array.shape)}")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or numeric, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    # Published masks are stored as 0/255 PNGs and 0/1 arrays alike: anything non-zero is foreground.
    return array != 0


def iou(pred: Any, gt: Any, *, empty: float = 1.0) -> float:
    """Intersection over union of two masks of the same [H, W] shape.

    When both masks are empty the IoU is ``empty`` (1.0 in the published ``compute_iou``: predicting
    nothing for an absent object is right). Non-bool masks count every non-zero pixel as foreground.
    """
    pred_mask = _as_mask(pred, "pred")
    gt_mask = _as_mask(gt, "gt")
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"pred shape {pred_mask.shape} differs from gt shape {gt_mask.shape}")
    union = int(np.count_nonzero(pred_mask | gt_mask))
    if union == 0:
        return float(empty)
    return int(np.count_nonzero(pred_mask & gt_mask)) / union


def mean_iou(ious: Sequence[float], has_expression: Sequence[bool]) -> float:
    """Mean of ``ious`` over the samples that have a referring expression.

    This is the published ``--remove_none_flag``: PixMMVP's 14 images whose expression is ``None``
    are left out. Raises ``ValueError`` when no sample has an expression (mIoU is then undefined),
    when the lengths differ, or when an IoU is NaN or outside [0, 1].
    """
    values = np.asarray(ious, dtype=np.float64).reshape(-1)
    flags = np.asarray(has_expression)
    if flags.ndim != 1 or values.shape[0] != flags.shape[0]:
        raise ValueError(
            f"ious has {values.shape[0]} entries but has_expression has shape {tuple(flags.shape)}"
        )
    if flags.size and flags.dtype != np.bool_:
        raise ValueError(f"has_expression must hold booleans, got dtype {flags.dtype}")
    if np.isnan(values).any():
        raise ValueError(f"ious contains NaN at positions {np.flatnonzero(np.isnan(values))[:10].tolist()}")
    outside = np.flatnonzero((values < 0.0) | (values > 1.0))
    if outside.size:
        raise ValueError(f"ious must lie in [0, 1]; positions {outside[:10].tolist()} do not")
    kept = values[flags.astype(bool)]
    if kept.size == 0:
        raise ValueError(
            f"mIoU is undefined: none of the {values.shape[0]} samples has a referring expression"
        )
    return float(kept.mean())


# ----------------------------------------------------------------------------------------- grounding


def grounding_success_from_stats(
    iou_value: float,
    gt_area: int,
    pred_area: int,
    image_area: int,
    *,
    iou_threshold: float = 0.5,
    max_empty_area: float = 0.5,
) -> bool:
    """Whether one sample's grounding succeeded, from counts (for records that store no masks).

    With an object in the ground truth: ``IoU > iou_threshold``. With an empty ground truth (the
    object is absent): the predicted area is under ``max_empty_area`` of the image.
    """
    if image_area <= 0:
        raise ValueError(f"image_area must be positive, got {image_area}")
    if not 0 <= gt_area <= image_area or not 0 <= pred_area <= image_area:
        raise ValueError(
            f"areas must lie in [0, image_area={image_area}]; got gt_area={gt_area}, pred_area={pred_area}"
        )
    if gt_area > 0:
        if not 0.0 <= iou_value <= 1.0:
            raise ValueError(f"iou_value must lie in [0, 1], got {iou_value}")
        return bool(iou_value > iou_threshold)
    return bool(pred_area / image_area < max_empty_area)


def grounding_success(
    pred: Any, gt: Any, *, iou_threshold: float = 0.5, max_empty_area: float = 0.5
) -> bool:
    """Whether one sample's grounding succeeded (see :func:`grounding_success_from_stats`)."""
    pred_mask = _as_mask(pred, "pred")
    gt_mask = _as_mask(gt, "gt")
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"pred shape {pred_mask.shape} differs from gt shape {gt_mask.shape}")
    return grounding_success_from_stats(
        iou(pred_mask, gt_mask),
        int(np.count_nonzero(gt_mask)),
        int(np.count_nonzero(pred_mask)),
        gt_mask.size,
        iou_threshold=iou_threshold,
        max_empty_area=max_empty_area,
    )


# ---------------------------------------------------------------------------------------------- pairs


def pair_positions(
    n: int,
    *,
    pair_index: Optional[Sequence[int]] = None,
    sample_index: Optional[Sequence[int]] = None,
    incomplete: Incomplete = "raise",
) -> tuple[list[tuple[int, int]], int]:
    """Group ``n`` per-sample records into MMVP pairs; return (pairs of positions, dropped count).

    - ``pair_index``: the pair each record belongs to (``Sample.pair_index``); order does not matter.
    - ``sample_index``: each record's position in the benchmark; the pair is ``sample_index // 2``.
    - neither: records are in benchmark order and pairs are positions (2k, 2k+1).

    A pair with one member is incomplete: ``incomplete="raise"`` (default) raises ``ValueError``
    naming it, ``"drop"`` leaves its member out and counts it in the returned ``dropped``. A pair
    with more than two members is always an error.
    """
    if incomplete not in ("raise", "drop"):
        raise ValueError(f"incomplete must be 'raise' or 'drop', got {incomplete!r}")
    if pair_index is not None and sample_index is not None:
        raise ValueError("give pair_index or sample_index, not both")
    if sample_index is not None:
        samples = [int(s) for s in sample_index]
        if len(samples) != n:
            raise ValueError(f"sample_index has {len(samples)} entries for {n} records")
        duplicates = sorted(s for s, count in Counter(samples).items() if count > 1)
        if duplicates:
            raise ValueError(f"sample_index repeats samples {duplicates[:10]}")
        if any(s < 0 for s in samples):
            raise ValueError("sample_index must be non-negative")
        keys: list[Hashable] = [s // 2 for s in samples]
        order = samples
    elif pair_index is not None:
        keys = list(pair_index)
        if len(keys) != n:
            raise ValueError(f"pair_index has {len(keys)} entries for {n} records")
        if any(k is None for k in keys):
            raise ValueError(f"pair_index is None at positions {[i for i, k in enumerate(keys) if k is None][:10]}")
        order = list(range(n))
    else:
        keys = [i // 2 for i in range(n)]
        order = list(range(n))

    members: dict[Hashable, list[int]] = {}
    for position, key in enumerate(keys):
        members.setdefault(key, []).append(position)
    pairs: list[tuple[int, int]] = []
    dropped = 0
    for key, positions in members.items():
        if len(positions) > 2:
            raise ValueError(f"pair {key!r} has {len(positions)} members (positions {positions[:10]}); pairs have 2")
        if len(positions) == 1:
            if incomplete == "raise":
                raise ValueError(
                    f"pair {key!r} is incomplete: only the record at position {positions[0]} is present "
                    "(pass incomplete='drop' to leave such pairs out)"
                )
            dropped += 1
            continue
        first, second = sorted(positions, key=lambda p: order[p])
        pairs.append((first, second))
    return pairs, dropped


def _flags(values: Sequence[Any], name: str) -> list[bool]:
    flags = []
    for position, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or value in (0, 1):
            flags.append(bool(value))
        else:
            raise ValueError(f"{name}[{position}] must be a bool (or 0/1), got {value!r}")
    return flags


def pair_accuracy(
    correct: Sequence[bool],
    *,
    pair_index: Optional[Sequence[int]] = None,
    sample_index: Optional[Sequence[int]] = None,
    incomplete: Incomplete = "raise",
) -> AccuracyCount:
    """MMVP accuracy: the fraction of pairs whose two questions are both answered correctly.

    ``correct`` holds one flag per sample; pairing as in :func:`pair_positions`. With
    ``incomplete="drop"`` the unmatched samples are left out of both numerator and denominator.
    """
    flags = _flags(correct, "correct")
    pairs, _ = pair_positions(len(flags), pair_index=pair_index, sample_index=sample_index, incomplete=incomplete)
    hits = sum(1 for a, b in pairs if flags[a] and flags[b])
    return _accuracy_count(hits, len(pairs), "pair_accuracy")


def per_question_accuracy(
    correct: Sequence[bool], tasks: Optional[Sequence[str]] = None
) -> tuple[AccuracyCount, dict[str, AccuracyCount]]:
    """CV-Bench accuracy: per question overall, plus a per-task breakdown.

    Returns ``(overall, {task: AccuracyCount})``; overall pools all questions (as the published
    script does), it is not the mean of the task accuracies. Tasks are listed in first-seen order.
    """
    flags = _flags(correct, "correct")
    overall = _accuracy_count(sum(flags), len(flags), "per_question_accuracy")
    per_task: dict[str, AccuracyCount] = {}
    if tasks is not None:
        labels = list(tasks)
        if len(labels) != len(flags):
            raise ValueError(f"tasks has {len(labels)} entries for {len(flags)} answers")
        counts: dict[str, list[int]] = {}
        for label, flag in zip(labels, flags):
            if label is None:
                raise ValueError("tasks contains None; give every question a task label")
            tally = counts.setdefault(str(label), [0, 0])
            tally[0] += int(flag)
            tally[1] += 1
        per_task = {label: _accuracy_count(hit, total, f"task {label!r}") for label, (hit, total) in counts.items()}
    return overall, per_task


def failure_bins(
    vqa_correct: Sequence[bool],
    grounded: Sequence[bool],
    *,
    pair_index: Optional[Sequence[int]] = None,
    sample_index: Optional[Sequence[int]] = None,
    incomplete: Incomplete = "raise",
) -> dict[str, int]:
    """Pair-level failure analysis: how many pairs fail at grounding only, VQA only, both, or neither.

    A pair's VQA succeeds when both of its answers are correct; its grounding succeeds when both of
    its samples pass :func:`grounding_success`. Keys are :data:`FAILURE_BINS` in that order, plus
    ``"incomplete_dropped"`` (samples left out with ``incomplete="drop"``).
    """
    vqa = _flags(vqa_correct, "vqa_correct")
    ground = _flags(grounded, "grounded")
    if len(vqa) != len(ground):
        raise ValueError(f"vqa_correct has {len(vqa)} entries but grounded has {len(ground)}")
    pairs, dropped = pair_positions(len(vqa), pair_index=pair_index, sample_index=sample_index, incomplete=incomplete)
    bins = dict.fromkeys(FAILURE_BINS, 0)
    for a, b in pairs:
        vqa_ok = vqa[a] and vqa[b]
        ground_ok = ground[a] and ground[b]
        if vqa_ok and ground_ok:
            bins["both_succeed"] += 1
        elif vqa_ok:
            bins["grounding_only_fail"] += 1
        elif ground_ok:
            bins["vqa_only_fail"] += 1
        else:
            bins["both_fail"] += 1
    bins["incomplete_dropped"] = dropped
    return bins


# -------------------------------------------------------------------------------------------- score S


def _check_score(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite, non-negative number, got {value}")
    return value


def combined_score(accuracy: float, miou: float) -> float:
    """S: the harmonic mean of accuracy and mIoU (both in the same unit; the paper uses percent).

    ``combined_score(27.3, 38.0)`` is 31.8 to one decimal. S is 0 when either input is 0.
    """
    a = _check_score(accuracy, "accuracy")
    m = _check_score(miou, "miou")
    if a + m == 0.0:
        return 0.0
    return 2.0 * a * m / (a + m)


def s_score(
    acc_p1: Optional[float],
    acc_p2: Optional[float],
    miou_p1: Optional[float],
    miou_p3: Optional[float],
) -> Optional[float]:
    """S of the better-of protocol values: harmonic mean of max(A1, A2) and max(M1, M3).

    ``None`` marks a protocol that was not run and is ignored; returns ``None`` when no accuracy or
    no mIoU is available.
    """
    accuracies = [_check_score(v, name) for v, name in ((acc_p1, "acc_p1"), (acc_p2, "acc_p2")) if v is not None]
    mious = [_check_score(v, name) for v, name in ((miou_p1, "miou_p1"), (miou_p3, "miou_p3")) if v is not None]
    if not accuracies or not mious:
        return None
    return combined_score(max(accuracies), max(mious))


# ------------------------------------------------------------------------------------ answer parsing

# Tried in this order; each one found cuts the text to what follows its last occurrence.
_ANSWER_KEYWORDS = ("answer is", "answer is:", "answer:")


def option_letters(options: Sequence[str]) -> list[str]:
    """The letters of the options in order (``["A", "B", ...]``), after checking ``options``."""
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise ValueError(f"options must be a list of option texts, got {type(options).__name__}")
    if not 1 <= len(options) <= 26:
        raise ValueError(f"options must hold 1 to 26 texts, got {len(options)}")
    for position, option in enumerate(options):
        if not isinstance(option, str):
            raise ValueError(f"options[{position}] must be a str, got {type(option).__name__}")
    return list(string.ascii_uppercase[: len(options)])


def normalize_letter(answer: str, options: Sequence[str]) -> str:
    """The answer letter in upper case: accepts ``"B"``, ``"b"``, ``"(b)"``, ``"(B)"``."""
    letters = option_letters(options)
    if not isinstance(answer, str):
        raise ValueError(f"answer letter must be a str, got {type(answer).__name__}")
    letter = answer.strip().strip("()").strip().upper()
    if letter not in letters:
        raise ValueError(f"answer letter {answer!r} is not one of {letters} for {len(options)} options")
    return letter


def _cut_after_answer_keyword(text: str) -> str:
    for keyword in _ANSWER_KEYWORDS:
        if keyword in text:
            text = text.split(keyword)[-1]
    return text


def parse_choice(reply: Optional[str], options: Sequence[str], *, style: ParseStyle = "mmvp") -> Optional[str]:
    """The option letter (``"A"``, ``"B"``, ...) a free-text reply chooses, or ``None``.

    ``style="mmvp"`` (PixMMVP, the default), the published rule step by step:
      1. lower-case and trim the reply;
      2. keep what follows the last "answer is" / "answer is:" / "answer:" (checked in that order);
      3. trim white space, then ``rstrip(".:,")``, ``lstrip("(")``, ``rstrip(")")`` in that order
         (so ``"(b)."`` becomes ``"b"``; inner or leading punctuation such as ``": (b"`` stays);
      4. the result must equal an option letter or an option's full text (case-insensitive).
    So "The answer is (b)." gives "B", "Closed." gives the letter of option "Closed", while
    "(a) Open" gives ``None`` (the published rule does not accept letter plus text).

    ``style="cvbench"`` (PixCV-Bench, ``protocol2_accuracy_ade.py``): steps 1-2, strip only trailing
    ``.`` before the brackets, then keep the first character when more than one is left; only a letter
    matches, never the option text.
    """
    letters = option_letters(options)
    if style not in ("mmvp", "cvbench"):
        raise ValueError(f"style must be 'mmvp' or 'cvbench', got {style!r}")
    if reply is None:
        return None
    if not isinstance(reply, str):
        raise ValueError(f"reply must be a str or None, got {type(reply).__name__}")
    text = _cut_after_answer_keyword(reply.lower().strip()).strip()
    lowered_letters = [letter.lower() for letter in letters]
    if style == "mmvp":
        text = text.rstrip(".:,").lstrip("(").rstrip(")")
        if text in lowered_letters:
            return letters[lowered_letters.index(text)]
        for letter, option in zip(letters, options):
            if text == option.lower().strip():
                return letter
        return None
    text = text.rstrip(".").lstrip("(").rstrip(")")
    if len(text) > 1:
        text = text[0]
    if text in lowered_letters:
        return letters[lowered_letters.index(text)]
    return None


def is_correct(
    reply: Optional[str], options: Sequence[str], answer_letter: str, *, style: ParseStyle = "mmvp"
) -> bool:
    """Whether the reply chooses the correct option (:func:`parse_choice`); an unparsable reply is wrong."""
    correct_letter = normalize_letter(answer_letter, options)
    return parse_choice(reply, options, style=style) == correct_letter


_YES_NO = re.compile(r"^(yes|no)\.*$", re.IGNORECASE)


def parse_judge_verdict(reply: Optional[str], *, rules: str = "pixfound") -> Optional[bool]:
    """The protocol-1 grader's verdict: True for yes, False for no, None when unclear.

    Both rules match ``^(yes|no)\\.*$`` case-insensitively, as published, and an unclear verdict
    counts as wrong. ``"pixfound"`` trims surrounding white space first and takes any number of
    trailing dots; ``"published"`` reads the reply as it came and counts only "yes" and "yes."
    (the published scorer compared the lowercased reply with exactly those two).
    """
    if reply is None:
        return None
    if not isinstance(reply, str):
        raise ValueError(f"judge reply must be a str or None, got {type(reply).__name__}")
    if rules == "published":
        if _YES_NO.match(reply) is None:
            return None
        return reply.lower() in ("yes", "yes.")
    match = _YES_NO.match(reply.strip())
    if match is None:
        return None
    return match.group(1).lower() == "yes"

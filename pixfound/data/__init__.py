"""Benchmarks: PixMMVP, PixCV-Bench and a procedural synthetic one, all as lists of :class:`Sample`.

>>> samples = load_benchmark("synthetic", n=4, seed=0)
>>> len(samples), samples[0].benchmark
(4, 'synthetic')
"""
from __future__ import annotations

import collections
import inspect
import pathlib
from pixfound.errors import UserError
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .pixcvbench import load_pixcvbench
from .pixmmvp import load_pixmmvp
from .sample import BadDataError, BenchmarkSamples, DataProblem, MissingImageError, Sample
from .synthetic import load_synthetic

__all__ = [
    "BENCHMARKS", "BadDataError", "BenchmarkSamples", "DataProblem", "MissingImageError", "Sample",
    "benchmark_stats", "load_benchmark", "load_pixcvbench", "load_pixmmvp", "load_synthetic",
]

BENCHMARKS: dict[str, Callable[..., BenchmarkSamples]] = {
    "pixmmvp": load_pixmmvp,
    "pixcvbench": load_pixcvbench,
    "synthetic": load_synthetic,
}


def load_benchmark(name: str, root: Optional[Union[str, pathlib.Path]] = None, **options: Any
                   ) -> BenchmarkSamples:
    """Load a benchmark by name: ``pixmmvp``, ``pixcvbench`` (both need ``root``) or ``synthetic``.

    ``options`` go to the loader (:func:`load_pixmmvp`, :func:`load_pixcvbench`,
    :func:`load_synthetic`), e.g. ``strict=False`` or ``n=16, seed=0, size=(96, 128)``.
    Returns a :class:`BenchmarkSamples` (a list of :class:`Sample` with ``skipped`` problems).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")
    loader = BENCHMARKS[key]
    accepted = [p.name for p in inspect.signature(loader).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"benchmark {key!r} does not take option(s) {unknown}; it takes {accepted}")
    if key != "synthetic" and root is None:
        raise UserError(f"benchmark {key!r} needs a data root: the folder with its files (--data-root DIR)")
    return loader(root, **options)


def _summary(values: Sequence[float]) -> Optional[dict[str, float]]:
    if not len(values):
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "mean": float(array.mean()), "median": float(np.median(array)),
            "max": float(array.max())}


def _mask_area(sample: Sample) -> tuple[int, int]:
    """(mask pixels, image pixels); loaders that keep RLEs answer without decoding the mask."""
    area = getattr(sample.mask_loader, "area", None)
    if callable(area):
        return area()
    mask = sample.gt_mask
    return int(np.count_nonzero(mask)), int(mask.size)


def benchmark_stats(samples: Sequence[Sample], *, decode_masks: bool = True) -> dict:
    """Counts and mask statistics of a benchmark (what ``pixfound data`` prints).

    Keys: ``benchmark``, ``num_samples``, ``num_pairs``, ``with_expression``,
    ``without_expression``, ``annotated_absent`` (expression given, no annotation), ``per_task``,
    ``skipped`` (problems of a non-strict load) and, with ``decode_masks``, ``empty_masks``,
    ``mask_unavailable`` (masks that could not be built, e.g. image missing and no declared size),
    ``mask_area_pixels`` and ``mask_area_fraction`` (min/mean/median/max over non-empty masks).
    """
    names = sorted({s.benchmark for s in samples})
    with_expression = sum(s.has_expression for s in samples)
    stats: dict[str, Any] = {
        "benchmark": names[0] if len(names) == 1 else names,
        "num_samples": len(samples),
        "num_pairs": len({s.pair_index for s in samples if s.pair_index is not None}),
        "with_expression": with_expression,
        "without_expression": len(samples) - with_expression,
        "annotated_absent": sum(bool(s.meta.get("annotated_absent")) for s in samples),
        "per_task": dict(sorted(collections.Counter(s.task or "(none)" for s in samples).items())),
        "skipped": len(getattr(samples, "skipped", [])),
    }
    if decode_masks:
        areas, fractions, empty, unavailable = [], [], 0, 0
        for sample in samples:
            try:
                area, pixels = _mask_area(sample)
            except (ValueError, OSError):
                unavailable += 1
                continue
            if area == 0:
                empty += 1
            else:
                areas.append(area)
                fractions.append(area / pixels)
        stats.update(empty_masks=empty, mask_unavailable=unavailable,
                     mask_area_pixels=_summary(areas), mask_area_fraction=_summary(fractions))
    return stats

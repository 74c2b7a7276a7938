"""COCO RLE of candidate masks: the C++ encoder against its reference (pycocotools, ``masks_to_rle_reference``).

40 masks of 480 × 640 (the candidates of 13 phrases and a ground truth, say), row-major bool arrays
as SAM returns them.

Run: python -m pytest benchmarks/test_rle_bench.py --benchmark-group-by=group
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pixfound.grounding.select import masks_to_rle, masks_to_rle_reference

MASKS, HEIGHT, WIDTH = 40, 480, 640
GROUP = f"RLE of {MASKS} masks {WIDTH} x {HEIGHT}"
VARIANTS = {"cpp": "fast", "pycocotools reference": "reference"}


@pytest.fixture(scope="module")
def masks() -> np.ndarray:
    coarse = torch.from_numpy(np.random.default_rng(0).random((MASKS, 1, 12, 16)))
    return (torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear")[:, 0] > 0.6).numpy()


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rle(benchmark, record_ratio, masks, variant):
    encode = masks_to_rle if variant == "cpp" else masks_to_rle_reference
    encoded = benchmark(encode, masks)
    record_ratio(variant, VARIANTS[variant])
    assert encoded == masks_to_rle_reference(masks)

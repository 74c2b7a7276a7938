"""Mask IoU: the C++ core against its NumPy reference (``pixfound.ops.mask_iou_reference``) and pycocotools.

300 candidate masks against one ground truth at 1024 × 1024, as the oracle selection scores them.

Run: python -m pytest benchmarks/test_mask_iou_bench.py --benchmark-group-by=group
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from pixfound import ops

CANDIDATES, SIDE = 300, 1024
GROUP = f"mask IoU, {CANDIDATES} candidates x 1 at {SIDE} x {SIDE}"
# variant -> role
VARIANTS = {"cpp": "fast", "cpp, masks packed beforehand": "fast", "numpy reference": "reference",
            "pycocotools": "other"}


@pytest.fixture(scope="module")
def candidates_and_truth() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Thresholded smooth noise: blobs, closer to SAM's masks than salt-and-pepper noise.
    coarse = torch.from_numpy(rng.random((CANDIDATES + 1, 1, 16, 16)))
    masks = (torch.nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear")[:, 0] > 0.6).numpy()
    return masks[:CANDIDATES], masks[CANDIDATES:]


def pycocotools_iou(candidates: np.ndarray, truth: np.ndarray) -> np.ndarray:
    # The masks arrive dense, so the RLE encoding is part of pycocotools' cost.
    encoded = coco_mask.encode(np.asfortranarray(candidates.transpose(1, 2, 0).astype(np.uint8)))
    encoded_truth = coco_mask.encode(np.asfortranarray(truth.transpose(1, 2, 0).astype(np.uint8)))
    return np.asarray(coco_mask.iou(encoded, encoded_truth, [0]))


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mask_iou(benchmark, record_ratio, candidates_and_truth, variant):
    candidates, truth = candidates_and_truth
    expected = ops.mask_iou_reference(candidates, truth)
    if variant == "cpp":
        result = benchmark(ops.mask_iou, candidates, truth)
    elif variant == "cpp, masks packed beforehand":
        packed, packed_truth = ops.pack_masks(candidates), ops.pack_masks(truth)
        result = benchmark(ops.packed_iou, packed, packed_truth)
    elif variant == "numpy reference":
        result = benchmark.pedantic(ops.mask_iou_reference, args=(candidates, truth), rounds=3, iterations=1)
    else:
        result = benchmark(pycocotools_iou, candidates, truth)
    record_ratio(variant, VARIANTS[variant])
    np.testing.assert_allclose(np.asarray(result).reshape(expected.shape), expected, atol=1e-6)

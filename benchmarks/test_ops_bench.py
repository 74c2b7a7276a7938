"""C++ mask IoU and peak finding against NumPy, pycocotools and torch.

Run: pytest benchmarks/test_ops_bench.py --benchmark-group-by=group
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from pixfound import ops

N_CANDIDATES, SIDE = 300, 1024


@pytest.fixture(scope="module")
def candidates_and_gt():
    rng = np.random.default_rng(0)
    # Blob-like masks (thresholded smooth noise), closer to SAM output than salt-and-pepper noise.
    small = rng.random((N_CANDIDATES + 1, 16, 16))
    blobs = torch.nn.functional.interpolate(torch.from_numpy(small)[:, None], size=(SIDE, SIDE), mode="bilinear")
    masks = (blobs[:, 0] > 0.6).numpy()
    return masks[:N_CANDIDATES], masks[N_CANDIDATES:]


def numpy_iou(cands: np.ndarray, gt: np.ndarray) -> np.ndarray:
    return ops.mask_iou_reference(cands, gt)


def pycocotools_iou(cands: np.ndarray, gt: np.ndarray) -> np.ndarray:
    # RLE encoding is part of the cost: the candidates arrive as dense masks.
    rle_c = coco_mask.encode(np.asfortranarray(cands.transpose(1, 2, 0).astype(np.uint8)))
    rle_g = coco_mask.encode(np.asfortranarray(gt.transpose(1, 2, 0).astype(np.uint8)))
    return np.asarray(coco_mask.iou(rle_c, rle_g, [0]))


@pytest.mark.benchmark(group="mask_iou 300x1 @1024x1024")
@pytest.mark.parametrize("impl", ["cpp", "cpp_prepacked", "numpy", "pycocotools"])
def test_mask_iou(benchmark, candidates_and_gt, impl):
    cands, gt = candidates_and_gt
    expected = numpy_iou(cands, gt)
    if impl == "cpp":
        result = benchmark(ops.mask_iou, cands, gt)
    elif impl == "cpp_prepacked":
        packed_c, packed_g = ops.pack_masks(cands), ops.pack_masks(gt)
        result = benchmark(ops.packed_iou, packed_c, packed_g)
    elif impl == "numpy":
        result = benchmark.pedantic(numpy_iou, args=(cands, gt), rounds=3, iterations=1)
    else:
        result = benchmark(pycocotools_iou, cands, gt)
    np.testing.assert_allclose(np.asarray(result).reshape(expected.shape), expected, atol=1e-6)


@pytest.mark.benchmark(group="topk_peaks 32x1024x768 k=5")
@pytest.mark.parametrize("impl", ["cpp", "torch_topk", "torch_reference"])
def test_topk_peaks(benchmark, impl):
    maps = torch.randn(32, 1024, 768)
    expected = torch.topk(maps.reshape(32, -1), 5, dim=1).indices
    if impl == "cpp":
        peaks = benchmark(ops.topk_peaks, maps, 5)
        got = peaks[..., 1] * 768 + peaks[..., 0]
    elif impl == "torch_topk":
        got = benchmark(lambda: torch.topk(maps.reshape(32, -1), 5, dim=1).indices)
    else:
        peaks = benchmark(ops.topk_peaks_reference, maps, 5)
        got = peaks[..., 1] * 768 + peaks[..., 0]
    torch.testing.assert_close(got, expected)

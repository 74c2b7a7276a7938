"""The C++ core (through pixfound.ops) against NumPy, pycocotools, torch and skimage references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from pixfound import _C, ops

SIZES = [(1, 1), (7, 13), (8, 8), (1, 65), (33, 2), (480, 640)]


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    density = rng.uniform(0.05, 0.95, size=(n, 1, 1))
    masks = rng.random((n, h, w)) < density
    masks[0] = False  # always include an empty and a full mask
    if n > 1:
        masks[1] = True
    return masks


def coco_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    rle_a = coco_mask.encode(np.asfortranarray(a.transpose(1, 2, 0).astype(np.uint8)))
    rle_b = coco_mask.encode(np.asfortranarray(b.transpose(1, 2, 0).astype(np.uint8)))
    return np.asarray(coco_mask.iou(rle_a, rle_b, [0] * len(rle_b)), dtype=np.float64).reshape(len(a), len(b))


@pytest.mark.parametrize("h,w", SIZES)
def test_mask_iou_matches_numpy_and_pycocotools(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    n, m = (3, 2) if h * w > 10_000 else (6, 5)
    a, b = random_masks(rng, n, h, w), random_masks(rng, m, h, w)
    got = ops.mask_iou(a, b)
    assert got.dtype == np.float32 and got.shape == (n, m)
    np.testing.assert_allclose(got, ops.mask_iou_reference(a, b), rtol=0, atol=1e-6)
    # pycocotools gives 0 where both masks are empty; the published convention (and ours) is 1.
    expected = coco_iou(a, b)
    both_empty = (a.sum((1, 2))[:, None] == 0) & (b.sum((1, 2))[None, :] == 0)
    expected[both_empty] = 1.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_mask_iou_empty_convention_and_uint8_and_torch():
    empty = np.zeros((1, 5, 5), dtype=bool)
    assert ops.mask_iou(empty, empty)[0, 0] == 1.0
    assert ops.mask_iou(empty, empty, empty=0.0)[0, 0] == 0.0
    full = np.ones((1, 5, 5), dtype=np.uint8) * 255  # any nonzero byte is inside
    assert ops.mask_iou(full, full)[0, 0] == 1.0
    assert ops.mask_iou(empty, full)[0, 0] == 0.0
    rng = np.random.default_rng(0)
    a, b = random_masks(rng, 4, 9, 31), random_masks(rng, 3, 9, 31)
    got = ops.mask_iou(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ops.mask_iou_reference(a, b), atol=1e-6)


def test_packed_masks_reused_for_many_comparisons():
    rng = np.random.default_rng(1)
    cands = random_masks(rng, 300, 23, 41)
    gt = random_masks(rng, 2, 23, 41)[[0, 1]]
    packed = ops.pack_masks(cands)
    assert packed.shape == (300, 23, 41)
    np.testing.assert_array_equal(packed.areas, cands.sum((1, 2)))
    iou = ops.packed_iou(packed, ops.pack_masks(gt))
    np.testing.assert_allclose(iou, ops.mask_iou_reference(cands, gt), atol=1e-6)
    sub = packed.take([5, 7])
    np.testing.assert_allclose(ops.packed_iou(sub, sub), ops.mask_iou_reference(cands[[5, 7]], cands[[5, 7]]), atol=1e-6)


@pytest.mark.parametrize(
    "a,b,message",
    [
        (np.zeros((2, 4), bool), np.zeros((1, 4, 4), bool), r"a must be a 3-d mask array \[N, H, W\], got shape \(2, 4\)"),
        (np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4), bool), "a must be bool or uint8, got dtype float32"),
        (np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool), "same H, W"),
        (np.zeros((1, 8, 8), bool), np.zeros((1, 4, 16), bool), "same H, W"),
        (np.zeros((0, 4, 4), bool), np.zeros((1, 4, 4), bool), "must not be empty"),
        (np.zeros((1, 0, 4), bool), np.zeros((1, 0, 4), bool), "must not be empty"),
        (np.zeros((2, 4, 4), bool)[:, :, ::2], np.zeros((1, 4, 2), bool), "C-contiguous"),
        ([[[1]]], np.zeros((1, 1, 1), bool), "NumPy array or a torch tensor"),
    ],
)
def test_mask_iou_bad_input_is_a_clear_value_error(a, b, message):
    with pytest.raises(ValueError, match=message):
        ops.mask_iou(a, b)


def test_core_rejects_bad_input_directly():
    with pytest.raises(ValueError, match="masks must be bool or uint8"):
        _C.pack_masks(np.zeros((1, 3, 3), dtype=np.int32))
    words, areas, _, _ = _C.pack_masks(np.zeros((2, 3, 3), dtype=np.uint8))
    other, other_areas, _, _ = _C.pack_masks(np.zeros((2, 30, 30), dtype=np.uint8))
    with pytest.raises(ValueError, match="same mask size"):
        _C.packed_iou(words, areas, other, other_areas)
    with pytest.raises(ValueError, match="one entry per packed mask"):
        _C.packed_iou(words, areas[:1], words, areas)


# ---------------------------------------------------------------------------------------------
# topk_peaks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g,h,w", [(1, 1, 1), (3, 7, 13), (5, 24, 24), (2, 480, 640)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_peaks_matches_torch_argmax_and_topk(g, h, w, dtype):
    torch.manual_seed(g * h * w)
    maps = torch.randn(g, h, w, dtype=dtype)
    peaks = ops.topk_peaks(maps, 1)
    flat = maps.reshape(g, -1).argmax(dim=1)
    assert peaks.shape == (g, 1, 2) and peaks.dtype == torch.int64
    torch.testing.assert_close(peaks[:, 0, 0], flat % w)
    torch.testing.assert_close(peaks[:, 0, 1], flat // w)
    k = min(5, h * w)
    peaks = ops.topk_peaks(maps, k)
    top = torch.topk(maps.reshape(g, -1), k, dim=1).indices  # distinct random values: no ties
    torch.testing.assert_close(peaks[..., 1] * w + peaks[..., 0], top)
    np.testing.assert_array_equal(ops.topk_peaks(maps.numpy(), k), peaks.numpy())


def test_topk_peaks_ties_go_to_lowest_flat_index():
    maps = torch.zeros(3, 6, 7)
    maps[1, 2, 3] = maps[1, 4, 1] = maps[1, 0, 6] = 5.0  # three tied maxima
    maps[2] = torch.randint(0, 3, (6, 7)).float()  # many ties at every level
    peaks = ops.topk_peaks(maps, 1)
    flat = maps.reshape(3, -1).argmax(dim=1)
    torch.testing.assert_close(peaks[:, 0, 1] * 7 + peaks[:, 0, 0], flat)
    assert peaks[1, 0].tolist() == [6, 0]  # (x, y) of flat index 6, the first of the tie set
    for k in (2, 9, 42):
        got = ops.topk_peaks(maps, k)
        torch.testing.assert_close(got, ops.topk_peaks_reference(maps, k))
    assert ops.topk_peaks(maps, 42)[0, :, 1].mul(7).add(ops.topk_peaks(maps, 42)[0, :, 0]).tolist() == list(range(42))


def test_topk_peaks_half_precision_and_bad_input():
    maps = torch.randn(2, 5, 9).bfloat16()
    torch.testing.assert_close(ops.topk_peaks(maps, 3), ops.topk_peaks_reference(maps.float(), 3))
    with pytest.raises(ValueError, match="NaN"):
        bad = torch.zeros(2, 3, 3)
        bad[1, 1, 1] = float("nan")
        ops.topk_peaks(bad)
    with pytest.raises(ValueError, match=r"maps must be a 3-d array \[G, H, W\]"):
        ops.topk_peaks(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="k must be between 1 and H\\*W = 9"):
        ops.topk_peaks(torch.zeros(1, 3, 3), 10)
    with pytest.raises(ValueError, match="must not be empty"):
        ops.topk_peaks(torch.zeros(0, 3, 3))
    with pytest.raises(ValueError, match="must be float32 or float64"):
        ops.topk_peaks(np.zeros((1, 3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.topk_peaks(np.zeros((1, 3, 6), dtype=np.float32)[:, :, ::2])


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threaded_calls_give_the_single_thread_bits(threads):
    """Calls large enough to split over threads (csrc/parallel.hpp) equal the one-thread result and
    the references, whatever the thread count; a NaN in any map is still found."""
    rng = np.random.default_rng(threads)
    masks = random_masks(rng, 16, 512, 512)  # 4 MiB: up to 4 threads for packing
    one = _C.pack_masks(masks, num_threads=1)
    many = _C.pack_masks(masks, num_threads=threads)
    for a, b in zip(one[:2], many[:2]):
        assert np.array_equal(a, b)
    words, areas = one[0], one[1]
    iou_one = _C.packed_iou(words, areas, words, areas, 1.0, num_threads=1)
    iou_many = _C.packed_iou(words, areas, words, areas, 1.0, num_threads=threads)
    assert iou_one.tobytes() == iou_many.tobytes()
    np.testing.assert_allclose(iou_many, ops.mask_iou_reference(masks, masks), rtol=0, atol=1e-6)
    maps = rng.standard_normal((16, 256, 256)).astype(np.float32)  # 2^20 values: up to 4 threads
    peaks = _C.topk_peaks(maps, 3, num_threads=threads)
    assert np.array_equal(peaks, _C.topk_peaks(maps, 3, num_threads=1))
    assert np.array_equal(peaks, ops.topk_peaks_reference(maps, 3))
    maps[11, 7, 9] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _C.topk_peaks(maps, 1, num_threads=threads)


# ---------------------------------------------------------------------------------------------
# local_peaks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 24), (37, 53), (5, 3)])
@pytest.mark.parametrize("min_distance", [1, 2, 5])
@pytest.mark.parametrize("exclude_border", [True, False, 1])
def test_local_peaks_matches_skimage(shape, min_distance, exclude_border):
    peak_local_max = pytest.importorskip("skimage.feature").peak_local_max
    rng = np.random.default_rng(shape[0] * 7 + min_distance)
    # A smooth-ish map with distinct values, so the order of equal peaks never matters.
    img = rng.random(shape).astype(np.float64)
    for num_peaks in (None, 3):
        expected = peak_local_max(img, min_distance=min_distance, exclude_border=exclude_border,
                                  num_peaks=np.inf if num_peaks is None else num_peaks)
        got = ops.local_peaks(img, min_distance, exclude_border=exclude_border, num_peaks=num_peaks)
        np.testing.assert_array_equal(got[:, ::-1], expected)  # skimage gives (row, col)


def test_local_peaks_thresholds_and_plateaus():
    peak_local_max = pytest.importorskip("skimage.feature").peak_local_max
    img = np.zeros((20, 20), np.float32)
    img[3, 4] = 1.0
    img[12, 15] = 0.5
    img[15:17, 5:7] = 0.8  # a plateau: its pixels are all maxima of their window
    for kwargs in ({}, {"threshold_abs": 0.6}, {"threshold_rel": 0.7}):
        expected = peak_local_max(img, min_distance=2, **kwargs)
        np.testing.assert_array_equal(ops.local_peaks(img, 2, **kwargs)[:, ::-1], expected)
    assert ops.local_peaks(np.ones((4, 4), np.float32)).shape == (0, 2)  # nothing above the minimum
    assert ops.local_peaks(torch.from_numpy(img), 2).dtype == torch.int64


def test_local_peaks_bad_input():
    with pytest.raises(ValueError, match=r"map must be a 2-d array \[H, W\], got shape \(1, 3, 3\)"):
        ops.local_peaks(np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="min_distance must be >= 1"):
        ops.local_peaks(np.zeros((3, 3)), 0)
    with pytest.raises(ValueError, match="NaN"):
        ops.local_peaks(np.full((3, 3), np.nan))

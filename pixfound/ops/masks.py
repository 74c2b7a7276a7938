"""Mask IoU (bit-packed) and peaks of maps, on the host in the C++ core (``pixfound._C``).
The C++ core runs on at most ``torch.get_num_threads()`` threads of its own (no OpenMP runtime).

Each fast path has its plain NumPy/torch reference beside it; the tests compare the two.
Convention: NumPy in → NumPy out; torch in → torch out.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
import torch

from pixfound import _C

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "PackedMasks",
    "pack_masks",
    "packed_iou",
    "mask_iou",
    "mask_iou_reference",
    "topk_peaks",
    "topk_peaks_reference",
    "local_peaks",
]


def _host_array(x: ArrayLike, name: str) -> tuple[np.ndarray, bool]:
    """A NumPy view of ``x`` (CPU torch tensors are viewed, not copied) and whether it was torch."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            x = x.cpu()  # masks and peaks are computed on the host; one explicit transfer
        return x.detach().numpy(), True
    if isinstance(x, np.ndarray):
        return x, False
    raise ValueError(f"{name} must be a NumPy array or a torch tensor, got {type(x).__name__}")


def _mask_view(x: ArrayLike, name: str) -> tuple[np.ndarray, bool]:
    arr, was_torch = _host_array(x, name)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-d mask array [N, H, W], got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)  # same bytes; the core reads nonzero as inside
    elif arr.dtype != np.uint8:
        raise ValueError(f"{name} must be bool or uint8, got dtype {arr.dtype} with shape {tuple(arr.shape)}")
    return arr, was_torch


# ---------------------------------------------------------------------------------------------
# Mask IoU
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedMasks:
    """Masks packed 64 pixels to a word, with their areas; pack once, compare many times."""

    words: np.ndarray  # uint64 [N, ceil(H*W/64)]
    areas: np.ndarray  # int64 [N]
    height: int
    width: int

    def __len__(self) -> int:
        return int(self.words.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.height, self.width)

    def take(self, index: Union[Sequence[int], np.ndarray]) -> "PackedMasks":
        index = np.asarray(index, dtype=np.int64)
        return PackedMasks(np.ascontiguousarray(self.words[index]), np.ascontiguousarray(self.areas[index]),
                           self.height, self.width)


def pack_masks(masks: ArrayLike) -> PackedMasks:
    """Bit-pack bool/uint8 masks [N, H, W] (nonzero = inside)."""
    arr, _ = _mask_view(masks, "masks")
    words, areas, height, width = _C.pack_masks(arr, num_threads=torch.get_num_threads())
    return PackedMasks(words, areas, int(height), int(width))


def packed_iou(a: PackedMasks, b: PackedMasks, *, empty: float = 1.0) -> np.ndarray:
    """IoU float32 [N, M] between packed mask sets; a pair empty on both sides gets ``empty``."""
    if (a.height, a.width) != (b.height, b.width):
        raise ValueError(f"a and b must have the same H, W: a is {a.shape}, b is {b.shape}")
    return _C.packed_iou(a.words, a.areas, b.words, b.areas, float(empty), num_threads=torch.get_num_threads())


def mask_iou(a: ArrayLike, b: ArrayLike, *, empty: float = 1.0) -> ArrayLike:
    """IoU float32 [N, M] between masks ``a`` [N, H, W] and ``b`` [M, H, W].

    A pair that is empty on both sides gets ``empty`` (the published convention is 1.0).
    """
    a_arr, was_torch = _mask_view(a, "a")
    b_arr, _ = _mask_view(b, "b")
    if a_arr.shape[1:] != b_arr.shape[1:]:
        raise ValueError(f"a and b must have the same H, W: a has shape {tuple(a_arr.shape)}, "
                         f"b has shape {tuple(b_arr.shape)}")
    out = packed_iou(pack_masks(a_arr), pack_masks(b_arr), empty=empty)
    return torch.from_numpy(out) if was_torch else out


def mask_iou_reference(a: ArrayLike, b: ArrayLike, *, empty: float = 1.0) -> np.ndarray:
    """Plain NumPy IoU [N, M], the reference for :func:`mask_iou`."""
    a_arr = np.asarray(a.cpu().numpy() if isinstance(a, torch.Tensor) else a).astype(bool)
    b_arr = np.asarray(b.cpu().numpy() if isinstance(b, torch.Tensor) else b).astype(bool)
    out = np.empty((a_arr.shape[0], b_arr.shape[0]), dtype=np.float32)
    for j, gt in enumerate(b_arr):
        inter = np.logical_and(a_arr, gt).sum(axis=(1, 2))
        union = np.logical_or(a_arr, gt).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = np.where(union == 0, empty, inter / np.maximum(union, 1))
    return out


# ---------------------------------------------------------------------------------------------
# Peaks
# ---------------------------------------------------------------------------------------------


def topk_peaks(maps: ArrayLike, k: int = 1) -> ArrayLike:
    """Top-k locations (x, y) per map of ``maps`` [G, H, W] → int64 [G, k, 2], best first.

    Ties go to the lowest flat index, as ``torch.argmax`` does. NaN raises ValueError.
    CUDA tensors stay on the device (torch path); host data runs in the C++ core.
    """
    if isinstance(maps, torch.Tensor) and maps.device.type != "cpu":
        return topk_peaks_reference(maps, k)
    if isinstance(maps, torch.Tensor) and maps.is_floating_point() and maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()  # fp16/bf16 maps: NumPy has no bfloat16, the core reads float32/float64
    arr, was_torch = _host_array(maps, "maps")
    if np.issubdtype(arr.dtype, np.floating) and arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    out = _C.topk_peaks(arr, int(k), num_threads=torch.get_num_threads())
    return torch.from_numpy(out) if was_torch else out


def topk_peaks_reference(maps: ArrayLike, k: int = 1) -> ArrayLike:
    """Reference top-k with argmax tie semantics: a stable descending sort of the flat map."""
    was_torch = isinstance(maps, torch.Tensor)
    t = maps if was_torch else torch.from_numpy(np.asarray(maps))
    if t.ndim != 3 or t.numel() == 0:
        raise ValueError(f"maps must be a non-empty [G, H, W] array, got shape {tuple(t.shape)}")
    if not 1 <= k <= t.shape[1] * t.shape[2]:
        raise ValueError(f"k must be between 1 and H*W = {t.shape[1] * t.shape[2]}, got {k}")
    if torch.isnan(t).any():
        raise ValueError(f"maps contains NaN (shape {tuple(t.shape)})")
    width = t.shape[2]
    flat = t.reshape(t.shape[0], -1).float()
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    out = torch.stack([order % width, order // width], dim=-1).to(torch.int64)
    return out if was_torch else out.numpy()


def local_peaks(
    map: ArrayLike,
    min_distance: int = 1,
    *,
    threshold_abs: Optional[float] = None,
    threshold_rel: Optional[float] = None,
    exclude_border: Union[bool, int] = True,
    num_peaks: Optional[int] = None,
) -> ArrayLike:
    """Local maxima (x, y) of a float map [H, W] → int64 [P, 2], strongest first.

    Same meaning as ``skimage.feature.peak_local_max`` with a square footprint: a peak equals the
    maximum of its (2·min_distance+1)² neighbourhood, is above the threshold (default: the map's
    minimum), is not within the excluded border, and is at least ``min_distance`` (Chebyshev) away
    from every stronger peak kept. Note skimage returns (row, col); this returns (x, y).
    """
    arr, was_torch = _host_array(map, "map")
    if arr.ndim != 2:
        raise ValueError(f"map must be a 2-d array [H, W], got shape {tuple(arr.shape)}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    if arr.size == 0:
        raise ValueError(f"map must not be empty, got shape {tuple(arr.shape)}")
    min_distance = int(min_distance)
    if min_distance < 1:
        raise ValueError(f"min_distance must be >= 1, got {min_distance}")
    if exclude_border is True:
        border = min_distance
    elif exclude_border is False:
        border = 0
    else:
        border = int(exclude_border)
    threshold = float(arr.min()) if threshold_abs is None else float(threshold_abs)
    if threshold_rel is not None:
        threshold = max(threshold, float(threshold_rel) * float(arr.max()))
    limit = -1 if num_peaks is None else int(num_peaks)
    out = _C.local_peaks(arr, min_distance, threshold, border, limit)
    return torch.from_numpy(out) if was_torch else out

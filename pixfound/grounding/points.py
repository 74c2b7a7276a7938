"""Point prompts from phrase maps: bicubic upsample to the image frame, then the peak(s).

The token grid covers a different part of the image depending on how the processor fit it
(``ImageGeometry.fit``):

- ``pad``: the image was centre-padded to an S×S square (S = max(H, W)) → upsample to S×S and
  centre-crop H×W (``ops.upsample_peaks(aspect="pad")``, the published recipe);
- ``resize``: the grid covers the whole image → upsample straight to H×W (``aspect="original"``);
- ``crop``: the grid covers the central s×s square (s = min(H, W)) → upsample to s×s, then shift
  by the crop offset ``((W - s) // 2, (H - s) // 2)``.

Points are ``(x, y)`` in original-image pixels, int64. A missing point (fewer local maxima than
asked for) is ``(-1, -1)``; :class:`pixfound.grounding.sam.SamSegmenter` skips such points.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from pixfound import ops
from pixfound.models.base import ImageGeometry

__all__ = ["MISSING_POINT", "upsample_frame", "default_min_distance", "phrase_points", "upsample_phrase_maps"]

MISSING_POINT = (-1, -1)


def upsample_frame(geometry: ImageGeometry) -> tuple[tuple[int, int], str, tuple[int, int]]:
    """``(size, aspect, (x_offset, y_offset))`` for ``ops.upsample_peaks`` under a fit mode."""
    height, width = int(geometry.image_h), int(geometry.image_w)
    if height < 1 or width < 1:
        raise ValueError(f"geometry image size must be positive, got {height}x{width}")
    if geometry.fit == "pad":
        return (height, width), "pad", (0, 0)
    if geometry.fit == "resize":
        return (height, width), "original", (0, 0)
    if geometry.fit == "crop":
        side = min(height, width)
        return (side, side), "original", ((width - side) // 2, (height - side) // 2)
    raise ValueError(f"geometry.fit must be 'pad', 'crop' or 'resize', got {geometry.fit!r}")


def default_min_distance(geometry: ImageGeometry) -> int:
    """One grid cell in upsampled pixels: local maxima closer than that are the same blob."""
    height, width = int(geometry.image_h), int(geometry.image_w)
    if geometry.fit == "pad":
        full_h = full_w = max(height, width)
    elif geometry.fit == "crop":
        full_h = full_w = min(height, width)
    else:
        full_h, full_w = height, width
    return max(1, int(round(max(full_h / geometry.grid_h, full_w / geometry.grid_w))))


def _check_maps(maps: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        raise ValueError("phrase_maps must be a torch tensor [G, h, w], got "
                         f"{tuple(maps.shape) if hasattr(maps, 'shape') else type(maps).__name__}")
    if tuple(maps.shape[1:]) != (geometry.grid_h, geometry.grid_w):
        raise ValueError(f"phrase_maps of shape {tuple(maps.shape)} do not match the geometry's "
                         f"{geometry.grid_h}x{geometry.grid_w} grid")
    if not maps.is_floating_point():
        raise ValueError(f"phrase_maps must be floating point, got {maps.dtype}")
    return maps


def phrase_points(
    phrase_maps: torch.Tensor,
    geometry: ImageGeometry,
    *,
    point_rank: int = 1,
    num_points: int = 1,
    min_distance: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Point prompts int64 [G, P, 2] (x, y) in original-image pixels, one row per phrase map.

    - ``num_points == 1`` (P = 1): the ``point_rank``-th highest location of the upsampled map, as
      published (top-k, then the k-th; rank 1 is the argmax). Ties go to the lowest flat index.
    - ``num_points = N > 1`` (P = N): the N strongest distinct local maxima of the upsampled map
      (``ops.local_peaks``, peaks at least ``min_distance`` pixels apart, default one grid cell,
      the image border included), strongest first, padded with ``(-1, -1)`` when the map has
      fewer. A flat map gives its argmax as the single point. Cannot be combined with
      ``point_rank > 1``.

    ``backend`` goes to ``ops.upsample_peaks``: one of ``ops.KERNEL_BACKENDS`` (``"auto"``: the C++
    core for CPU maps, the fused Triton kernel for CUDA maps).
    """
    maps = _check_maps(phrase_maps, geometry)
    if int(point_rank) != point_rank or point_rank < 1:
        raise ValueError(f"point_rank must be an integer >= 1, got {point_rank!r}")
    if int(num_points) != num_points or num_points < 1:
        raise ValueError(f"num_points must be an integer >= 1, got {num_points!r}")
    if point_rank > 1 and num_points > 1:
        raise ValueError(f"point_rank ({point_rank}) and num_points ({num_points}) cannot both be above 1")
    size, aspect, (x_offset, y_offset) = upsample_frame(geometry)
    if point_rank > size[0] * size[1]:
        raise ValueError(f"point_rank {point_rank} exceeds the {size[0]}x{size[1]} upsampled map")
    num_phrases = maps.shape[0]
    out = torch.full((num_phrases, int(num_points), 2), -1, dtype=torch.int64)
    if num_phrases == 0:
        return out
    offset = torch.tensor([x_offset, y_offset], dtype=torch.int64)

    if num_points == 1:
        peaks = ops.upsample_peaks(maps, size, aspect=aspect, k=int(point_rank), backend=backend)
        out[:, 0] = peaks[:, point_rank - 1].to("cpu", torch.int64) + offset
        return out

    distance = default_min_distance(geometry) if min_distance is None else int(min_distance)
    if distance < 1:
        raise ValueError(f"min_distance must be >= 1, got {min_distance}")
    argmax, upsampled = ops.upsample_peaks(maps, size, aspect=aspect, k=1, return_maps=True, backend=backend)
    upsampled = upsampled.detach().float().cpu()
    for g in range(num_phrases):
        peaks = ops.local_peaks(upsampled[g], distance, exclude_border=False, num_peaks=int(num_points))
        peaks = torch.as_tensor(np.asarray(peaks), dtype=torch.int64).reshape(-1, 2)
        if peaks.shape[0] == 0:
            peaks = argmax[g, :1].to("cpu", torch.int64)
        out[g, : peaks.shape[0]] = peaks + offset
    return out


def upsample_phrase_maps(phrase_maps: torch.Tensor, geometry: ImageGeometry, *, backend: str = "auto") -> torch.Tensor:
    """Upsampled phrase maps float32 [G, H, W] in the original image frame (for overlays).

    In ``crop`` mode the grid only covers the central square; pixels outside it are NaN.
    """
    maps = _check_maps(phrase_maps, geometry)
    size, aspect, (x_offset, y_offset) = upsample_frame(geometry)
    height, width = int(geometry.image_h), int(geometry.image_w)
    if maps.shape[0] == 0:
        return torch.zeros((0, height, width), dtype=torch.float32)
    _, upsampled = ops.upsample_peaks(maps, size, aspect=aspect, k=1, return_maps=True, backend=backend)
    upsampled = upsampled.detach().float().cpu()
    if geometry.fit != "crop":
        return upsampled
    canvas = torch.full((maps.shape[0], height, width), math.nan, dtype=torch.float32)
    canvas[:, y_offset:y_offset + size[0], x_offset:x_offset + size[1]] = upsampled
    return canvas

"""pixfound's ops: the C++ core and the Triton kernels behind one dispatch point each.

* ``pixfound::image_attention`` (:mod:`pixfound.ops.attention`): the capture, the attention of
  query rows to the image keys, averaged over heads and summed over layers; its checks and torch
  reference in :mod:`pixfound.ops.attention_checks` and :mod:`pixfound.ops.attention_reference`.
* ``pixfound::upsample_peaks`` (:mod:`pixfound.ops.upsample`): fused bicubic upsample + top-k peak.
* Mask IoU, top-k and local peaks (:mod:`pixfound.ops.masks`), in the C++ core.

The two custom ops are registered with ``torch.library``: the C++ core as their CPU kernel, Triton
(``pixfound.triton_kernels``) as their CUDA kernel, and fake kernels for ``torch.compile``. Which
implementation runs is decided in one place, :func:`resolve_kernel_backend`, over the choices
:data:`KERNEL_BACKENDS`. Every fast path keeps its plain reference beside it, and the tests and
benchmarks compare against that reference.
"""
from __future__ import annotations

from pixfound.ops import attention  # noqa: F401 - registers pixfound::image_attention with torch
from pixfound.ops.backends import KERNEL_BACKEND_HELP, KERNEL_BACKENDS, resolve_kernel_backend
from pixfound.ops.masks import (
    PackedMasks,
    local_peaks,
    mask_iou,
    mask_iou_reference,
    pack_masks,
    packed_iou,
    topk_peaks,
    topk_peaks_reference,
)
from pixfound.ops.upsample import upsample_peaks, upsample_peaks_reference, upsample_reference

__all__ = [
    "KERNEL_BACKENDS",
    "KERNEL_BACKEND_HELP",
    "PackedMasks",
    "local_peaks",
    "mask_iou",
    "mask_iou_reference",
    "pack_masks",
    "packed_iou",
    "resolve_kernel_backend",
    "topk_peaks",
    "topk_peaks_reference",
    "upsample_peaks",
    "upsample_peaks_reference",
    "upsample_reference",
]

"""The capture op ``pixfound::image_attention``: head-mean softmax attention of query rows to the image keys.

For each sample ``b``, query row ``r`` and layer ``l`` (one query, key and scale per layer,
the indices shared by all):

    mean over the Hq query heads h of  softmax(q_l[b, h, r] . k_l[b, h // (Hq / Hkv)] * scale_l)[image keys of b]

summed over the layers. The softmax runs over the row's valid keys ``[key_start[b], key_end[b, r])``
(left padding before, causality after) minus an optional gap ``[gap_start[b], gap_end[b])`` (the
padding between a shared image prefix and each prompt's own text); only the image keys
``[image_start[b], image_start[b] + image_len[b])`` are kept, with the denominator of the whole
row (no renormalisation over the image keys, so a row sums to at most 1 per layer).

The op is registered with ``torch.library``:

* CPU kernel: the C++ core (``pixfound._C.image_attention_layers``, float32; other dtypes are
  upcast, which is exact), reading NumPy views of the tensors without copies;
* CUDA kernel: the Triton kernels of :mod:`pixfound.triton_kernels.image_attention`;
* fake: the result's shape, so ``torch.compile`` and CUDA graphs can trace through it.

:func:`image_attention` checks the arguments and runs the backend that
:func:`pixfound.ops.backends.resolve_kernel_backend` names; the torch reference is
:mod:`pixfound.ops.attention_reference`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from pixfound.ops.attention_checks import CheckedIndex, check_inputs
from pixfound.ops.attention_reference import reference_math
from pixfound.ops.backends import resolve_kernel_backend

__all__ = ["image_attention"]


def _host_rows(t: torch.Tensor) -> np.ndarray:
    """q or k as a NumPy view for the C++ core, which takes any strides with a contiguous last dimension.

    A key cache's views of a buffer with spare room pass without a copy.
    """
    t = t.detach().float()
    return (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()).numpy()


def _host_index(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().to(torch.int64).contiguous().numpy()


@torch.library.custom_op("pixfound::image_attention", mutates_args=(), device_types="cpu")
def image_attention_op(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    scales: list[float],
    image_start: torch.Tensor,
    image_len: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    gap_start: Optional[torch.Tensor],
    gap_end: Optional[torch.Tensor],
    num_image_keys: int,
) -> torch.Tensor:
    """CPU kernel: the C++ core, all layers in one call, added in layer order into float32 ``[B, R, N]``.

    The C++ side checks every dtype and shape and clamps every index; large calls run on at most
    ``torch.get_num_threads()`` threads of the core, and the result does not depend on their number.
    """
    from pixfound import _C

    batch, _, rows, _ = queries[0].shape
    out = torch.zeros(batch, rows, num_image_keys, dtype=torch.float32)
    _C.image_attention_layers([_host_rows(q) for q in queries], [_host_rows(k) for k in keys],
                              [float(s) for s in scales], _host_index(image_start), _host_index(image_len),
                              _host_index(key_start), _host_index(key_end), num_image_keys,
                              _host_index(gap_start), _host_index(gap_end), out=out.numpy(),
                              num_threads=torch.get_num_threads())
    return out


@image_attention_op.register_kernel("cuda")
def _image_attention_cuda(queries, keys, scales, image_start, image_len, key_start, key_end, gap_start, gap_end,
                          num_image_keys):
    from pixfound.triton_kernels.image_attention import image_attention_triton

    return image_attention_triton(queries, keys, scales, image_start=image_start, image_len=image_len,
                                  key_start=key_start, key_end=key_end, gap_start=gap_start, gap_end=gap_end,
                                  num_image_keys=num_image_keys)


@image_attention_op.register_fake
def _image_attention_fake(queries, keys, scales, image_start, image_len, key_start, key_end, gap_start, gap_end,
                          num_image_keys):
    batch, _, rows, _ = queries[0].shape
    return queries[0].new_empty((batch, rows, num_image_keys), dtype=torch.float32)


def image_attention(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    image_start: torch.Tensor,
    image_len: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    gap_start: torch.Tensor | None = None,
    gap_end: torch.Tensor | None = None,
    num_image_keys: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """The capture op for one or more layers: float32 ``[B, R, N]``, the layers' head means summed.

    Args:
        queries: per layer ``[B, Hq, R, D]`` query rows (float32, float16 or bfloat16; any strides).
        keys: per layer ``[B, Hkv, L, D]`` keys, dtype and device of the queries; ``Hq % Hkv == 0``
            and query head ``h`` reads kv head ``h // (Hq // Hkv)`` (grouped-query attention).
        scales: per layer, the softmax scale applied to ``q . k``.
        image_start, image_len, key_start: int ``[B]``: first image key, number of image keys, first
            valid key (keys before it are left padding). On the CPU or the queries' device.
        key_end: int ``[B, R]``, exclusive end of each row's valid keys (``position + 1``).
        gap_start, gap_end: int ``[B]`` each, or both ``None`` (no gap): keys
            ``gap_start[b] <= j < gap_end[b]`` are left out of the valid keys (probability 0, no
            share of the denominator, also inside the image span). ``gap_end <= gap_start`` is empty.
        num_image_keys: width ``N`` of the result; ``None`` means ``max(image_len)`` (a host copy).
        backend: ``auto``, ``cpp``, ``triton`` or ``reference`` (see
            :func:`pixfound.ops.backends.resolve_kernel_backend`).
        validate: check the index values (one copy of the indices to the host, which synchronises
            a GPU). The capture passes ``validate=False`` with ``num_image_keys``: then nothing waits
            for the GPU, and the kernels clamp every read into the keys.

    Returns:
        float32 ``[B, R, N]``: entry ``[b, r, j]`` sums over the layers the mean over the query heads
        of the probability of image key ``image_start[b] + j``; 0 for ``j >= image_len[b]`` and for
        image keys outside the row's valid keys.

    Raises:
        ValueError: a bad shape, dtype, device, scale or index value, naming the argument.
        pixfound.errors.UserError: a backend that cannot run on these tensors.
    """
    index = check_inputs(queries, keys, scales, image_start=image_start, image_len=image_len, key_start=key_start,
                         key_end=key_end, gap_start=gap_start, gap_end=gap_end, validate=validate,
                         num_image_keys=num_image_keys)
    chosen = resolve_kernel_backend(backend, queries[0].device)
    if chosen == "reference":
        return _reference_layers(queries, keys, scales, index)
    if chosen == "triton" and queries[0].device.type == "cpu":  # Triton's interpreter (tests, development)
        from pixfound.triton_kernels.image_attention import image_attention_triton

        return image_attention_triton(list(queries), list(keys), [float(s) for s in scales],
                                      image_start=index.image_start, image_len=index.image_len,
                                      key_start=index.key_start, key_end=index.key_end, gap_start=index.gap_start,
                                      gap_end=index.gap_end, num_image_keys=index.num_image_keys)
    return torch.ops.pixfound.image_attention(list(queries), list(keys), [float(s) for s in scales], index.image_start,
                                              index.image_len, index.key_start, index.key_end, index.gap_start,
                                              index.gap_end, index.num_image_keys)


def _reference_layers(queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], scales: Sequence[float],
                      index: CheckedIndex) -> torch.Tensor:
    out = reference_math(queries[0], keys[0], index, float(scales[0]))
    for q, k, scale in zip(queries[1:], keys[1:], scales[1:]):
        out += reference_math(q, k, index, float(scale))
    return out

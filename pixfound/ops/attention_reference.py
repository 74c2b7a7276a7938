"""The plain torch reference of the capture op (:mod:`pixfound.ops.attention`).

Upcast, score every key, softmax over the row's valid keys, keep the image keys, mean over heads.
It holds the ``[B, Hq, R, L]`` probabilities, so it is meant for tests, benchmarks and
``--kernel-backend reference``; the C++ and Triton kernels are compared against it.
"""
from __future__ import annotations

import torch

from pixfound.ops.attention_checks import CheckedIndex, check_inputs

__all__ = ["image_attention_reference", "reference_math"]


def image_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    image_start: torch.Tensor,
    image_len: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float,
    validate: bool = True,
    num_image_keys: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    gap_start: torch.Tensor | None = None,
    gap_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer of :func:`pixfound.ops.attention.image_attention`, in plain torch.

    Same arguments and result for one query ``q`` ``[B, Hq, R, D]``, key ``k`` ``[B, Hkv, L, D]``
    and ``scale``. ``compute_dtype`` is the precision of the scores, softmax and head mean (float32
    by default; tests also use float64 as the exact answer and the input dtype as a same-precision
    baseline). The result is float32, or float64 when ``compute_dtype`` is float64.
    """
    index = check_inputs([q], [k], [scale], image_start=image_start, image_len=image_len, key_start=key_start,
                         key_end=key_end, gap_start=gap_start, gap_end=gap_end, validate=validate,
                         num_image_keys=num_image_keys)
    return reference_math(q, k, index, float(scale), compute_dtype)


def reference_math(
    q: torch.Tensor, k: torch.Tensor, index: CheckedIndex, scale: float, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The reference computation on checked arguments (callers check once, not per layer)."""
    batch, heads_q, rows, _ = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    width = index.num_image_keys
    out_dtype = torch.promote_types(compute_dtype, torch.float32)
    if batch == 0 or width == 0 or num_keys == 0:
        return torch.zeros(batch, rows, width, dtype=out_dtype, device=q.device)

    # Query head h uses kv head h // group: fold each group's heads into the row axis so that one
    # matmul per kv head serves them all, without copying K once per query head.
    group = heads_q // heads_kv
    grouped_q = q.to(compute_dtype).reshape(batch, heads_kv, group * rows, q.shape[-1])
    scores = torch.matmul(grouped_q, k.to(compute_dtype).transpose(-1, -2)) * scale  # [B, Hkv, G*R, L]
    scores = scores.reshape(batch, heads_q, rows, num_keys)
    positions = torch.arange(num_keys, device=q.device)
    valid = (positions >= index.key_start[:, None, None]) & (positions < index.key_end[:, :, None])  # [B, R, L]
    if index.gap_start is not None and index.gap_end is not None:
        in_gap = (positions >= index.gap_start[:, None, None]) & (positions < index.gap_end[:, None, None])
        valid &= ~in_gap
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    # A row without valid keys is all NaN after softmax; it contributes 0.
    probs = torch.softmax(scores, dim=-1).masked_fill(~valid[:, None], 0.0)

    offsets = torch.arange(width, device=q.device)
    key_index = index.image_start[:, None] + offsets  # [B, N]
    in_span = (offsets < index.image_len[:, None]) & (key_index >= 0) & (key_index < num_keys)
    gathered = probs.gather(-1, key_index.clamp(0, num_keys - 1)[:, None, None, :].expand(-1, heads_q, rows, -1))
    gathered = gathered.masked_fill(~in_span[:, None, None, :], 0.0)
    return gathered.mean(dim=1).to(out_dtype)

"""Argument checks of the capture op (:mod:`pixfound.ops.attention`), shared with its torch reference.

Shapes, dtypes and devices are checked on the host for free. Index *values* (spans inside the
keys, ``key_end >= key_start``, ...) need the indices on the host: one copy, which synchronises a
GPU; the capture skips it (``validate=False``) and the kernels clamp every read instead.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["CheckedIndex", "check_inputs"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CheckedIndex:
    """The op's index tensors as int64 on the queries' device, and the width of the result."""

    image_start: torch.Tensor  # [B]
    image_len: torch.Tensor  # [B]
    key_start: torch.Tensor  # [B]
    key_end: torch.Tensor  # [B, R]
    num_image_keys: int  # N
    gap_start: torch.Tensor | None = None  # [B], or None (no gap) together with gap_end
    gap_end: torch.Tensor | None = None  # [B]


def _check_layer(q: object, k: object, scale: object) -> tuple[torch.Tensor, torch.Tensor]:
    for name, tensor in (("q", q), ("k", k)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, Hq, R, D] (4 dims), got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must have shape [B, Hkv, L, D] (4 dims), got shape {tuple(k.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    batch, heads_q, _, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {batch} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if k.shape[3] != head_dim:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {head_dim} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    heads_kv = k.shape[1]
    if heads_q == 0 or heads_kv == 0 or head_dim == 0:
        raise ValueError(f"q and k need at least one head and head dim >= 1, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if heads_q % heads_kv != 0:
        raise ValueError(
            f"the query heads ({heads_q}) must be a multiple of the kv heads ({heads_kv}) for grouped-query "
            f"attention (q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    return q, k


def _check_index(name: str, value: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor of shape {shape}, got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise ValueError(f"{name} must have an integer dtype (int64), got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.device.type != "cpu" and value.device != device:
        raise ValueError(f"{name} is on {value.device} but q and k are on {device}; use the same device or the CPU")
    return value.to(device=device, dtype=torch.int64, non_blocking=True)


def check_inputs(
    queries: Sequence[object],
    keys: Sequence[object],
    scales: Sequence[object],
    *,
    image_start: object,
    image_len: object,
    key_start: object,
    key_end: object,
    gap_start: object = None,
    gap_end: object = None,
    validate: bool = True,
    num_image_keys: int | None = None,
) -> CheckedIndex:
    """Check one query ``[B, Hq, R, D]``, key ``[B, Hkv, L, D]`` and scale per layer, and the shared indices.

    Every layer must have the batch, rows and device of the first. With ``validate`` the index
    values are checked against the fewest keys of any layer (one device->host copy). Raises
    ValueError naming the argument.
    """
    if not all(isinstance(layers, (list, tuple)) for layers in (queries, keys, scales)):
        raise ValueError("queries, keys and scales must be lists (one entry per layer)")
    if not queries or len(queries) != len(keys) or len(keys) != len(scales):
        raise ValueError(f"queries, keys and scales must be non-empty and of one length, got {len(queries)}, "
                         f"{len(keys)} and {len(scales)}")
    layers = [_check_layer(q, k, scale) for q, k, scale in zip(queries, keys, scales)]
    q0 = layers[0][0]
    batch, _, rows, _ = q0.shape
    for index, (q, _) in enumerate(layers[1:], start=1):
        if q.shape[0] != batch or q.shape[2] != rows or q.device != q0.device:
            raise ValueError(f"layer {index} has q of shape {tuple(q.shape)} on {q.device}, layer 0 "
                             f"{tuple(q0.shape)} on {q0.device}: every layer needs the same batch, rows and device")
    num_keys = min(k.shape[2] for _, k in layers)
    device = q0.device

    image_start_t = _check_index("image_start", image_start, (batch,), device)
    image_len_t = _check_index("image_len", image_len, (batch,), device)
    key_start_t = _check_index("key_start", key_start, (batch,), device)
    key_end_t = _check_index("key_end", key_end, (batch, rows), device)
    if (gap_start is None) != (gap_end is None):
        given, missing = ("gap_start", "gap_end") if gap_end is None else ("gap_end", "gap_start")
        raise ValueError(
            f"gap_start and gap_end must be given together (or both None for no gap): got {given} but {missing} is None"
        )
    has_gap = gap_start is not None
    gap_start_t = _check_index("gap_start", gap_start, (batch,), device) if has_gap else None
    gap_end_t = _check_index("gap_end", gap_end, (batch,), device) if has_gap else None

    if num_image_keys is not None:
        if isinstance(num_image_keys, bool) or not isinstance(num_image_keys, numbers.Integral) or num_image_keys < 0:
            raise ValueError(f"num_image_keys must be a non-negative int or None, got {num_image_keys!r}")
        num_image_keys = int(num_image_keys)

    if validate:
        # One copy to the host for every value check (and for N when it is not given).
        gaps = [gap_start_t, gap_end_t] if gap_start_t is not None and gap_end_t is not None else []
        host = torch.cat([image_start_t, image_len_t, key_start_t, *gaps, key_end_t.reshape(-1)]).cpu()
        starts, lengths, firsts = host[:batch], host[batch : 2 * batch], host[2 * batch : 3 * batch]
        ends = host[(3 + len(gaps)) * batch :].reshape(batch, rows)
        _check_values(starts, lengths, firsts, ends, num_keys, num_image_keys)
        if gaps:
            _check_gap_values(host[3 * batch : 4 * batch], host[4 * batch : 5 * batch], num_keys)
        if num_image_keys is None:
            num_image_keys = int(lengths.max()) if batch else 0
    elif num_image_keys is None:
        num_image_keys = int(image_len_t.max()) if batch else 0  # the one sync of an unvalidated call
        if num_image_keys < 0:
            raise ValueError(f"image_len must be >= 0, got max(image_len) = {num_image_keys}")
    return CheckedIndex(image_start_t, image_len_t, key_start_t, key_end_t, num_image_keys, gap_start_t, gap_end_t)


def _first_bad(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def _check_values(
    starts: torch.Tensor,
    lengths: torch.Tensor,
    firsts: torch.Tensor,
    ends: torch.Tensor,
    num_keys: int,
    num_image_keys: int | None,
) -> None:
    if (bad := lengths < 0).any():
        b = _first_bad(bad)
        raise ValueError(f"image_len must be >= 0, got image_len[{b}] = {int(lengths[b])}")
    if (bad := starts < 0).any():
        b = _first_bad(bad)
        raise ValueError(f"image_start must be >= 0, got image_start[{b}] = {int(starts[b])}")
    if (bad := starts + lengths > num_keys).any():
        b = _first_bad(bad)
        raise ValueError(
            f"the image span of sample {b} ends beyond the keys: image_start[{b}] + image_len[{b}] = "
            f"{int(starts[b])} + {int(lengths[b])} > L = {num_keys} (k has {num_keys} keys)"
        )
    if (bad := (firsts < 0) | (firsts > num_keys)).any():
        b = _first_bad(bad)
        raise ValueError(f"key_start must lie in [0, L = {num_keys}], got key_start[{b}] = {int(firsts[b])}")
    if (bad := ends < firsts[:, None]).any():
        b = _first_bad(bad.any(dim=1))
        raise ValueError(
            f"key_end must be >= key_start, got key_end[{b}] = {ends[b].tolist()} < key_start[{b}] = {int(firsts[b])}"
        )
    if (bad := ends > num_keys).any():
        b = _first_bad(bad.any(dim=1))
        raise ValueError(f"key_end must be <= L = {num_keys} (the keys in k), got key_end[{b}] = {ends[b].tolist()}")
    if num_image_keys is not None and lengths.numel() and int(lengths.max()) > num_image_keys:
        b = int(lengths.argmax())
        raise ValueError(
            f"num_image_keys = {num_image_keys} is smaller than image_len[{b}] = {int(lengths[b])}; "
            "pass at least max(image_len) or None"
        )


def _check_gap_values(gap_starts: torch.Tensor, gap_ends: torch.Tensor, num_keys: int) -> None:
    if (bad := gap_starts < 0).any():
        b = _first_bad(bad)
        raise ValueError(f"gap_start must be >= 0, got gap_start[{b}] = {int(gap_starts[b])}")
    if (bad := gap_ends < gap_starts).any():
        b = _first_bad(bad)
        raise ValueError(
            f"gap_end must be >= gap_start (equal for no gap), got gap_end[{b}] = {int(gap_ends[b])} < "
            f"gap_start[{b}] = {int(gap_starts[b])}"
        )
    if (bad := gap_ends > num_keys).any():
        b = _first_bad(bad)
        raise ValueError(f"gap_end must be <= L = {num_keys} (the keys in k), got gap_end[{b}] = {int(gap_ends[b])}")

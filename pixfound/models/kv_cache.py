"""A key/value cache reserved once per generation, instead of transformers' concatenating one.

``DynamicCache`` appends each step's keys and values with ``torch.cat``: every decode step copies
the whole cache of every layer. On a CPU that copy costs more than the step's attention (medium
model, batch 8: 0.9 ms per tensor against 1.0 ms for SDPA), and on a GPU it briefly holds two
copies of a layer. :class:`PreallocatedLayer` writes the new entries into a buffer sized for the
prompt plus the new tokens, and hands out views of its filled part. The values are the same as
the concatenated ones, bit for bit; only their storage differs (the views are strided over
the buffer's spare room, which SDPA, the capture kernels and the torch reference all accept).
Because earlier keys stay in place, the capture can also compute windows of steps at once
(:mod:`pixfound.attention.probe`).

Built with :func:`preallocated_cache`; ``generate(kv_cache="dynamic")`` keeps transformers' own.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["KV_CACHES", "PreallocatedLayer", "preallocated_cache"]

#: ``generate``'s ``kv_cache`` choices: this module's preallocated cache, or transformers' DynamicCache.
KV_CACHES = ("preallocated", "dynamic")


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers with room for ``capacity`` positions.

    Outgrowing the buffers (a longer generation than reserved) moves them to at least 1.5x the
    size. Operations of ``DynamicLayer`` that replace ``keys``/``values`` with new tensors (batch
    selection or repetition; crop keeps a view) are picked up at the next update.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._key_buffer: Optional[torch.Tensor] = None
        self._value_buffer: Optional[torch.Tensor] = None
        # The views the last update handed out: while keys/values are still these very objects,
        # the next update skips _holds_views' checks of the buffers (a per-layer, per-step cost).
        self._handed: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _filled(self) -> int:
        keys = getattr(self, "keys", None)
        return 0 if keys is None or keys.dim() != 4 else int(keys.shape[-2])

    def _holds_views(self) -> bool:
        """Whether keys/values are still the leading part of the buffers (nothing replaced them)."""
        if self._key_buffer is None or self._filled() == 0:
            return False
        return all(
            t.data_ptr() == b.data_ptr() and t.shape[:2] == b.shape[:2] and t.stride() == b.stride()
            for t, b in ((self.keys, self._key_buffer), (self.values, self._value_buffer))
        )

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int, views_untouched: bool) -> bool:
        """Whether the new states go into the current buffers (``views_untouched``: keys/values are known views of them)."""
        buffer, values = self._key_buffer, self._value_buffer
        if not views_untouched and (buffer is None or (self._filled() > 0 and not self._holds_views())):
            return False
        return (
            needed <= buffer.shape[-2]
            and self._same_layout(buffer, key_states)
            and self._same_layout(values, value_states)
        )

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        """New buffers for at least ``needed`` positions, holding the entries filled so far."""
        filled = self._filled()
        previous = 0 if self._key_buffer is None else self._key_buffer.shape[-2]
        size = max(self.capacity, needed, (previous * 3) // 2)
        batch, heads, _, key_dim = key_states.shape
        key_buffer = key_states.new_empty((batch, heads, size, key_dim))
        value_buffer = value_states.new_empty((batch, value_states.shape[1], size, value_states.shape[-1]))
        if filled:
            key_buffer[:, :, :filled].copy_(self.keys)
            value_buffer[:, :, :filled].copy_(self.values)
        self._key_buffer, self._value_buffer = key_buffer, value_buffer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        handed = self._handed
        # Nothing replaced the views handed out last time: they are the buffers' leading part.
        untouched = handed is not None and self.keys is handed[0] and self.values is handed[1]
        filled = handed[0].shape[-2] if untouched else self._filled()
        new = key_states.shape[-2]
        needed = filled + new
        if not self._fits(key_states, value_states, needed, untouched):
            self._reserve(key_states, value_states, needed)
        # narrow, not [:, :, a:b]: the same views for less host time (this runs per layer and step)
        self._key_buffer.narrow(2, filled, new).copy_(key_states)
        self._value_buffer.narrow(2, filled, new).copy_(value_states)
        self.keys = self._key_buffer.narrow(2, 0, needed)
        self.values = self._value_buffer.narrow(2, 0, needed)
        self._handed = (self.keys, self.values)
        return self.keys, self.values

    @staticmethod
    def _same_layout(buffer: torch.Tensor, states: torch.Tensor) -> bool:
        """Whether ``states`` can be written into ``buffer`` as they are (no broadcast, cast or device copy)."""
        return (
            buffer.shape[:2] == states.shape[:2]
            and buffer.shape[-1] == states.shape[-1]
            and buffer.dtype == states.dtype
            and buffer.device == states.device
        )

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None
        self._handed = None

def preallocated_cache(
    num_layers: int, capacity: int, prefill: Optional[Iterable[tuple[torch.Tensor, torch.Tensor]]] = None
) -> DynamicCache:
    """A ``DynamicCache`` of ``num_layers`` :class:`PreallocatedLayer` with room for ``capacity`` positions.

    ``prefill``: optional per-layer (keys, values) ``[B, Hkv, L, D]`` to start from (a shared image
    prefix). ``capacity`` should cover the prompt plus the new tokens; a longer run still works.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(capacity) for _ in range(num_layers)]
    cache.layer_class_to_replicate = None
    if prefill is not None:
        entries = list(prefill)
        if len(entries) != num_layers:
            raise ValueError(f"prefill has {len(entries)} layers, the cache {num_layers}")
        for layer, (keys, values) in zip(cache.layers, entries):
            layer.update(keys, values)
    return cache

"""Per-token image attention of a generating MLLM: fused capture and the published reference.

For every generated token the probe records one vector over the image keys: the softmax
attention of that token's query to the image tokens, averaged over all heads and all layers,
with the denominator of the FULL key row (no renormalisation over the image keys).

Step ``i`` of ``generate`` (one forward pass) gives the map of generated token ``i``:

* step 0 (prefill) reads the prompt's second-to-last query row, as the published PixFoundation
  code does (``first_token_row="second_to_last"``); ``"last"`` reads the last row instead;
* every later step reads its single query row.

Two capture modes compute the same numbers:

* **reference** (:func:`reference_step_maps`): eager attention with ``output_attentions=True``;
  the recipe of ``pixmmvp/inference/infer_pixfoundation.py`` in MSiam/PixFoundation: take the
  row, slice the image keys, mean over layers and heads. It keeps every ``[B, H, Q, K]``
  attention matrix of the run, so its memory grows with batch x heads x sequence².
* **fused** (:class:`ImageAttentionCapture`): a custom attention function registered with
  transformers' ``AttentionInterface`` under ``"pixfound_fused"`` returns SDPA's output
  unchanged and keeps only the query row whose map is needed. The image attention of those rows
  (:mod:`pixfound._kernels.image_attention`: Triton on the GPU, the C++ core on the CPU, the
  torch reference) is computed for a window of steps and all layers in one call, the head mean
  summed into fp32 ``[B, steps, N]``; with the torch backend, per layer as it runs. Nothing of
  size heads x seq² is kept, and no layer synchronises the GPU with the host.

:func:`token_maps` turns either mode's ``[B, steps, N]`` result into per-sample ``[T, h, w]``
maps (shared post-processing).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pixfound.ops.attention import image_attention
from pixfound.ops.backends import KERNEL_BACKENDS, resolve_kernel_backend

__all__ = [
    "FUSED_ATTENTION",
    "ImageAttentionCapture",
    "fused_attention_forward",
    "reference_step_maps",
    "register_fused_attention",
    "text_attention_implementation",
    "token_maps",
]

FUSED_ATTENTION = "pixfound_fused"
_FIRST_TOKEN_ROWS = ("second_to_last", "last")
# The deferred capture computes a window of generation steps in one call (each step is one query
# row of it). Bounds: steps per window, and on the GPU the Triton launch's scratch memory (the
# row-block kernel's per-layer sums: layers x batch x image keys floats per step).
MAX_WINDOW_STEPS = 32
TRITON_WINDOW_BYTES = 256 * 2**20


class _PendingStep:
    """A deferred generation step: its query row per layer (in layer order) and its key_end ``[B, 1]``."""

    __slots__ = ("key_end", "queries")

    def __init__(self, key_end: Any) -> None:
        self.key_end = key_end
        self.queries: list[torch.Tensor] = []


def _extends(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether ``new`` holds ``old``'s keys at the same addresses, plus possibly more positions.

    True for a preallocated cache's growing views and for a static cache's buffer, so the keys of
    earlier steps are still there, unchanged (caches only append). A concatenating cache makes a
    new tensor every step: False.
    """
    return (
        new.data_ptr() == old.data_ptr()
        and new.stride() == old.stride()
        and new.shape[:2] == old.shape[:2]
        and new.shape[3] == old.shape[3]
        and new.shape[2] >= old.shape[2]
        and new.dtype == old.dtype
    )

_registered = False
_register_lock = threading.Lock()
# The capture currently recording (captures do not nest; generate is not re-entrant either).
_active_capture: Optional["ImageAttentionCapture"] = None


def register_fused_attention() -> str:
    """Register the fused attention function and its mask function with transformers (idempotent).

    The mask function must be registered under the same name: for an attention implementation
    that ``AttentionMaskInterface`` does not know, transformers builds no mask at all and the
    causal/padding mask is silently dropped (``masking_utils._preprocess_mask_arguments``).
    The fused function calls SDPA, so it takes SDPA's mask (``masking_utils.sdpa_mask``).
    """
    global _registered
    with _register_lock:
        if not _registered:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(FUSED_ATTENTION, fused_attention_forward)
            AttentionMaskInterface.register(FUSED_ATTENTION, sdpa_mask)
            _registered = True
    return FUSED_ATTENTION


def fused_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA attention (output unchanged) that also feeds the active :class:`ImageAttentionCapture`."""
    capture = _active_capture
    if capture is not None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        capture._add_layer(query, key, attention_mask, float(scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def text_attention_implementation(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Run the model's text decoder with ``implementation`` inside the block; the vision tower keeps its own.

    Both capture modes change only the language model's attention, so the image features (and
    hence the maps) do not depend on the mode.
    """
    config = model.config
    text_config = config.get_text_config()
    previous_text = text_config._attn_implementation
    previous_top = config._attn_implementation
    has_sub_configs = text_config is not config
    if previous_text == implementation and previous_top == implementation:
        yield
        return

    def apply(top: str, text: str) -> None:
        if has_sub_configs:
            request: dict[str, Any] = {"": top, "text_config": text}
            vision = getattr(config, "vision_config", None)
            if vision is not None:
                request["vision_config"] = vision._attn_implementation
            model.set_attn_implementation(request)
        else:
            model.set_attn_implementation(text)

    apply(implementation, implementation)
    try:
        yield
    finally:
        apply(previous_top, previous_text)


def _as_index(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Per-sample integer values as a host int64 vector (spans are checked on the host, once)."""
    return torch.as_tensor(values, dtype=torch.int64).flatten().cpu()


def _check_spans(image_start: torch.Tensor, image_len: torch.Tensor, seq_len: Optional[int]) -> None:
    if image_start.shape != image_len.shape:
        raise ValueError(
            f"image_start and image_len must have one entry per sample, got {tuple(image_start.shape)} "
            f"and {tuple(image_len.shape)}"
        )
    for b, (start, length) in enumerate(zip(image_start.tolist(), image_len.tolist())):
        if length <= 0:
            raise ValueError(f"sample {b} has no image tokens (image_len[{b}] = {length})")
        if start < 0:
            raise ValueError(f"image_start[{b}] must be >= 0, got {start}")
        if seq_len is not None and start + length > seq_len:
            raise ValueError(
                f"the image span of sample {b} ends beyond the sequence: image_start[{b}] + image_len[{b}] = "
                f"{start} + {length} > {seq_len} tokens"
            )


def _query_row(first_token_row: str, step: int, q_len: int) -> int:
    """Index of the query row (within this forward's rows) whose map this step records."""
    if step > 0:
        return q_len - 1
    if first_token_row == "last":
        return q_len - 1
    if q_len < 2:
        raise ValueError(
            f"first_token_row='second_to_last' needs a prompt of at least 2 tokens, the prefill has {q_len}"
        )
    return q_len - 2


class _InLayerTimer:
    """Time spent in the capture's own work inside the attention layers.

    On the host a perf_counter pair per layer; on CUDA an event pair per layer, read once at the
    end (reading them earlier would synchronise every layer).
    """

    def __init__(self) -> None:
        self.host_seconds = 0.0
        self._events: list[tuple[Any, Any]] = []

    def start(self, device: torch.device) -> Any:
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin
        return time.perf_counter()

    def stop(self, begin: Any) -> None:
        if isinstance(begin, float):
            self.host_seconds += time.perf_counter() - begin
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((begin, end))

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self.host_seconds += sum(b.elapsed_time(e) for b, e in self._events) / 1000.0
            self._events.clear()
        return self.host_seconds


class ImageAttentionCapture:
    """Context manager that records fused image-attention maps while ``model.generate`` runs.

    Inside the block the text decoder runs the ``"pixfound_fused"`` attention (vision tower
    unchanged). After the block, :meth:`step_maps` returns float32 ``[B, steps, N]``: per sample
    and generation step the attention to the image keys, averaged over heads and layers
    (``N = max(image_len)``, zero beyond a sample's own ``image_len``). The model, the
    registries' state and the hooks are restored on exit, also after an exception.

    Args:
        model: the Hugging Face model that will ``generate``.
        image_start: per sample, the position of its first image key in the padded input.
        image_len: per sample, the number of image keys (contiguous from ``image_start``).
        first_token_row: ``"second_to_last"`` (published) or ``"last"`` prefill row for step 0.
        backend: ``image_attention`` backend, ``"auto" | "triton" | "torch"``.
        decoder: the text decoder whose forward marks a generation step (default
            ``model.get_decoder()``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        image_start: Sequence[int] | torch.Tensor,
        image_len: Sequence[int] | torch.Tensor,
        first_token_row: str = "second_to_last",
        backend: str = "auto",
        decoder: Optional[torch.nn.Module] = None,
    ) -> None:
        if first_token_row not in _FIRST_TOKEN_ROWS:
            raise ValueError(f"first_token_row must be one of {_FIRST_TOKEN_ROWS}, got {first_token_row!r}")
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
        self.model = model
        self.decoder = decoder if decoder is not None else model.get_decoder()
        text_config = model.config.get_text_config()
        self.num_layers = int(text_config.num_hidden_layers)
        layer_types = getattr(text_config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            # The key range is derived once per step from the full-attention mask.
            raise ValueError(
                f"the probe supports full-attention text layers only, got layer types {sorted(set(layer_types))}"
            )
        self.first_token_row = first_token_row
        self.backend = backend
        self._image_start_host = _as_index(image_start)
        self._image_len_host = _as_index(image_len)
        _check_spans(self._image_start_host, self._image_len_host, None)
        self.batch_size = int(self._image_start_host.numel())
        self.num_image_keys = int(self._image_len_host.max())
        self._reset()

    def _reset(self) -> None:
        self._steps: list[torch.Tensor] = []
        self._layer_counts: list[int] = []
        self._step = -1
        self._step_sum: Optional[torch.Tensor] = None
        self._step_layers = 0
        self._row_cache: Optional[tuple] = None
        self._previous_ranges: Optional[tuple] = None  # (kv_len, mask is None, key_start, gap_start, gap_end)
        self._deferred: Optional[bool] = None  # C++ or Triton: one call per window of steps, all layers
        self._window: list[_PendingStep] = []  # deferred steps, oldest first; the last may be the running one
        self._window_ranges: Optional[tuple] = None  # (key_start, gap_start, gap_end) the window's steps share
        self._window_limit = MAX_WINDOW_STEPS
        self._layer_keys: list[torch.Tensor] = []  # per layer, the newest keys (they hold every window step's)
        self._layer_scales: list[float] = []
        self._gaps: Optional[torch.Tensor] = None  # device flag: a valid-key row was not one contiguous range
        self._image_start: Optional[torch.Tensor] = None
        self._image_len: Optional[torch.Tensor] = None
        self._hook = None
        self._attn_context = None
        self._result: Optional[torch.Tensor] = None
        self._timer = _InLayerTimer()

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "ImageAttentionCapture":
        global _active_capture
        if _active_capture is not None:
            raise RuntimeError("another ImageAttentionCapture is already recording; captures do not nest")
        register_fused_attention()
        self._reset()
        self._hook = self.decoder.register_forward_pre_hook(self._on_step)
        self._attn_context = text_attention_implementation(self.model, FUSED_ATTENTION)
        try:
            self._attn_context.__enter__()
        except BaseException:
            self._hook.remove()
            raise
        _active_capture = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _active_capture
        _active_capture = None
        try:
            if self._hook is not None:
                self._hook.remove()
            if self._attn_context is not None:
                self._attn_context.__exit__(exc_type, exc, tb)
        finally:
            self._hook = None
            self._attn_context = None
            self._close_step()
            if exc_type is None:
                self._flush_window(len(self._window))
            self._window = []
            self._layer_keys = []
            self._row_cache = None
        if exc_type is None and self._steps:
            self._result = self._finish()

    # -- recording ------------------------------------------------------------------------------
    def _on_step(self, module: torch.nn.Module, args: tuple) -> None:
        self._close_step()
        self._step += 1
        self._step_layers = 0
        self._step_sum = None
        self._row_cache = None

    def _close_step(self) -> None:
        """End the running step: store its sum (per-layer path); deferred steps wait in the window."""
        if self._step >= 0 and self._step_sum is not None:
            self._steps.append(self._step_sum[:, 0])
            self._layer_counts.append(self._step_layers)
            self._step_sum = None

    def _rows_and_ranges(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> tuple[int, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Query row, key_start [B], key_end [B, 1] and the padding gap [B] of this step; computed at its first layer.

        The valid keys of a row are ``[key_start, key_end)`` minus at most one run of padding
        ``[gap_start, gap_end)``: left padding gives no gap, a shared image prefix followed by each
        prompt's own (left padded) text gives one.
        """
        if self._row_cache is not None:
            return self._row_cache
        batch, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        device = query.device
        if self._step < 0:
            raise RuntimeError("the fused attention ran outside a decoder forward; is `decoder` the text model?")
        if batch != self.batch_size:
            raise ValueError(
                f"the capture was set up for {self.batch_size} samples but the model runs a batch of {batch} "
                "(beam search and num_return_sequences > 1 are not supported)"
            )
        if self._image_start is None:
            self._check_prompt_length(kv_len if self._step == 0 else None)
            self._image_start = self._image_start_host.to(device)
            self._image_len = self._image_len_host.to(device)
            self._gaps = torch.zeros((), dtype=torch.bool, device=device)
        row = _query_row(self.first_token_row, self._step, q_len)
        previous = self._previous_ranges
        if q_len == 1 and previous is not None and previous[0] == kv_len - 1 and previous[1] == (attention_mask is None):
            # A decode step only appends one valid key (generate extends the 2D mask with ones): the
            # first valid key and the padding gap stay those of the step before; the row ends at kv_len.
            _, _, key_start, gap_start, gap_end = previous
            key_end = torch.full((batch, 1), kv_len, dtype=torch.int64, device=device)
            self._previous_ranges = (kv_len, attention_mask is None, key_start, gap_start, gap_end)
            self._row_cache = (row, key_start, key_end, gap_start, gap_end)
            return self._row_cache
        gap_start = gap_end = None
        if attention_mask is None:
            # transformers skipped the mask (no padding), and sdpa_attention_forward runs SDPA with
            # is_causal=True for several query rows, which aligns the causal mask top-left: row r sees
            # keys [0, r], also when the keys are a longer preallocated (static) cache. One row sees all keys.
            key_start = torch.zeros(batch, dtype=torch.int64, device=device)
            key_end = torch.full((batch, 1), row + 1 if q_len > 1 else kv_len, dtype=torch.int64, device=device)
        else:
            if attention_mask.dim() != 4:
                raise ValueError(f"expected a 4D attention mask, got shape {tuple(attention_mask.shape)}")
            mask_row = attention_mask[:, 0, row, :kv_len]
            valid = mask_row if mask_row.dtype == torch.bool else mask_row > torch.finfo(mask_row.dtype).min / 2
            valid = valid.expand(batch, kv_len)
            as_int = valid.to(torch.int32)
            key_start = as_int.argmax(dim=-1).to(torch.int64)
            key_end = (kv_len - as_int.flip(-1).argmax(dim=-1)).to(torch.int64)
            positions = torch.arange(kv_len, device=device)
            inside = (positions >= key_start[:, None]) & (positions < key_end[:, None])
            hole = inside & ~valid
            has_hole = hole.any(dim=-1)
            # First padded key inside the range, then the first valid key after it (all on the device).
            gap_start = torch.where(has_hole, hole.to(torch.int32).argmax(dim=-1).to(torch.int64), key_start)
            after_gap = valid & (positions >= gap_start[:, None])
            gap_end = torch.where(has_hole, after_gap.to(torch.int32).argmax(dim=-1).to(torch.int64), key_start)
            # The kernel excludes one gap per row; remember (on the device) if a row had more.
            self._gaps |= (as_int.sum(-1) != key_end - key_start - (gap_end - gap_start)).any()
            key_end = key_end[:, None]
        self._previous_ranges = (kv_len, attention_mask is None, key_start, gap_start, gap_end)
        self._row_cache = (row, key_start, key_end, gap_start, gap_end)
        return self._row_cache

    def _check_prompt_length(self, prompt_len: Optional[int]) -> None:
        if prompt_len is not None:
            _check_spans(self._image_start_host, self._image_len_host, prompt_len)

    def _add_layer(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor], scaling: float
    ) -> None:
        if self._deferred is None:
            chosen = resolve_kernel_backend(self.backend, query.device)
            self._deferred = chosen in ("cpp", "triton")
            if chosen == "triton":
                per_step = self.num_layers * self.batch_size * self.num_image_keys * 4
                self._window_limit = max(1, min(MAX_WINDOW_STEPS, TRITON_WINDOW_BYTES // max(1, per_step)))
        row, key_start, key_end, gap_start, gap_end = self._rows_and_ranges(query, key, attention_mask)
        if self._deferred:
            self._defer_layer(query, key, scaling, row, (key_start, gap_start, gap_end), key_end)
            return
        began = self._timer.start(query.device)
        probs = image_attention(
            [query[:, :, row : row + 1]],
            [key],
            [scaling],
            image_start=self._image_start,
            image_len=self._image_len,
            key_start=key_start,
            key_end=key_end,
            gap_start=gap_start,
            gap_end=gap_end,
            backend=self.backend,
            validate=False,  # spans were checked on the host once; no per-layer sync
            num_image_keys=self.num_image_keys,
        )
        if self._step_sum is None:
            self._step_sum = probs.clone()
        else:
            self._step_sum.add_(probs)
        self._step_layers += 1
        self._timer.stop(began)

    def _defer_layer(
        self, query: torch.Tensor, key: torch.Tensor, scale: float, row: int, ranges: tuple, key_end: Any
    ) -> None:
        """Keep this layer's query row for the window; the math runs in :meth:`_flush_window`.

        The host work around a per-layer or per-step call (checks, a launch, small sums) costs more
        than the math of a decode step, so a window of steps runs as one C++ call or one Triton
        launch (every layer; one query row per step). It is sound because a step's keys stay in
        the cache, unchanged, while later steps append theirs: the newest keys of a layer serve all
        its window steps, each row reading only its own valid range. A cache that makes new tensors
        every step (transformers' DynamicCache) closes the window each step instead, so old keys
        are never held.
        """
        layer = self._step_layers
        if layer == 0:
            window = self._window
            if window and (len(window) >= self._window_limit or any(
                    a is not b for a, b in zip(ranges, self._window_ranges))):
                self._flush_window(len(window))
            self._window.append(_PendingStep(key_end))
            self._window_ranges = ranges
        if layer < len(self._layer_keys):
            if not _extends(key, self._layer_keys[layer]) and len(self._window) > 1:
                self._flush_window(len(self._window) - 1)  # the earlier steps need this layer's old keys
            self._layer_keys[layer] = key
            self._layer_scales[layer] = scale
        else:
            self._layer_keys.append(key)
            self._layer_scales.append(scale)
        # A decode step's query is a fresh [B, H, 1, D] tensor: kept as it is. A prefill's row is copied
        # so that its whole query is not held.
        query_row = query if query.shape[2] == 1 else query[:, :, row : row + 1].contiguous()
        self._window[-1].queries.append(query_row)
        self._step_layers += 1

    def _flush_window(self, count: int) -> None:
        """Compute the oldest ``count`` deferred steps, all layers in one call, into :attr:`_steps`."""
        steps, self._window = self._window[:count], self._window[count:]
        if len({len(step.queries) for step in steps}) > 1:
            # Steps that ran different numbers of layers (an error _finish reports) cannot share a call.
            for step in steps:
                self._compute_steps([step])
        elif steps:
            self._compute_steps(steps)

    def _compute_steps(self, steps: list[_PendingStep]) -> None:
        """One C++ call or Triton launch for ``steps`` (one query row each, every layer they ran)."""
        layers = len(steps[0].queries)
        device = steps[0].queries[0].device
        began = self._timer.start(device)
        key_start, gap_start, gap_end = self._window_ranges
        if len(steps) == 1:
            queries = steps[0].queries
            key_end = steps[0].key_end
        else:
            queries = [torch.cat([step.queries[i] for step in steps], dim=2) for i in range(layers)]
            key_end = torch.cat([step.key_end for step in steps], dim=1)
        keys, scales = self._layer_keys[:layers], self._layer_scales[:layers]
        out = image_attention(queries, keys, scales, image_start=self._image_start, image_len=self._image_len,
                              key_start=key_start, key_end=key_end, gap_start=gap_start, gap_end=gap_end,
                              num_image_keys=self.num_image_keys, backend=self.backend, validate=False)
        for index in range(len(steps)):
            self._steps.append(out[:, index])
            self._layer_counts.append(layers)
        self._timer.stop(began)

    def capture_seconds(self) -> float:
        """Seconds the capture itself spent inside the attention layers (the kernel and its bookkeeping)."""
        return self._timer.seconds()

    def _finish(self) -> torch.Tensor:
        wrong = [(i, n) for i, n in enumerate(self._layer_counts) if n != self.num_layers]
        if wrong:
            step, count = wrong[0]
            raise RuntimeError(
                f"generation step {step} ran the fused attention in {count} layers, but the text model has "
                f"{self.num_layers}; the maps would not average over all layers"
            )
        if self._gaps is not None and bool(self._gaps):  # the one host sync of the capture
            raise ValueError(
                "a query row's valid keys had padding in more than one place; the probe supports left "
                "padding plus at most one padding run (after a shared image prefix)"
            )
        stacked = torch.stack(self._steps, dim=1)  # [B, steps, N]
        return (stacked / self.num_layers).float().cpu()

    def step_maps(self) -> torch.Tensor:
        """float32 ``[B, steps, N]`` on CPU: per step, image attention averaged over heads and layers."""
        if self._result is not None:
            return self._result
        if self._hook is None and not self._steps and self._step < 0:
            raise RuntimeError(
                "the capture recorded nothing: the text decoder never ran inside the block "
                "(call generate or forward inside `with ImageAttentionCapture(...)`)"
            )
        raise RuntimeError("step_maps() is available after the capture block finished without error")


def reference_step_maps(
    attentions: Sequence[Sequence[torch.Tensor]],
    *,
    image_start: Sequence[int] | torch.Tensor,
    image_len: Sequence[int] | torch.Tensor,
    first_token_row: str = "second_to_last",
) -> torch.Tensor:
    """The published recipe on ``generate(..., output_attentions=True)`` attentions.

    Args:
        attentions: per generation step, per layer, eager attention probabilities
            ``[B, H, Q, K]`` (``GenerateOutput.attentions``).
        image_start, image_len: per sample, the image span in the padded input.
        first_token_row: prefill row of step 0, ``"second_to_last"`` (published) or ``"last"``.

    Returns:
        float32 ``[B, steps, N]`` on CPU, ``N = max(image_len)``, zero beyond each sample's span:
        the row's probabilities at the image keys, averaged over layers and heads (in fp32).
    """
    if first_token_row not in _FIRST_TOKEN_ROWS:
        raise ValueError(f"first_token_row must be one of {_FIRST_TOKEN_ROWS}, got {first_token_row!r}")
    if len(attentions) == 0:
        raise ValueError("attentions is empty: generate returned no attention (was output_attentions=True?)")
    starts = _as_index(image_start)
    lengths = _as_index(image_len)
    first_layers = attentions[0]
    if first_layers is None or len(first_layers) == 0 or first_layers[0] is None:
        raise ValueError("generate returned no attention weights; the text model must run eager attention")
    batch, _, q_len, kv_len = first_layers[0].shape
    _check_spans(starts, lengths, kv_len)
    if starts.numel() != batch:
        raise ValueError(f"image spans for {starts.numel()} samples, but the attentions hold a batch of {batch}")
    width = int(lengths.max())
    device = first_layers[0].device
    offsets = torch.arange(width, device=device)
    key_index = starts.to(device)[:, None] + offsets  # [B, N]
    in_span = offsets < lengths.to(device)[:, None]

    steps = []
    for step, layers in enumerate(attentions):
        rows = []
        for layer in layers:  # [B, H, Q, K]
            row = _query_row(first_token_row, step, layer.shape[2])
            rows.append(layer[:, :, row, :].float())
        stacked = torch.stack(rows, dim=1)  # [B, layers, H, K]
        index = key_index.clamp(max=stacked.shape[-1] - 1)[:, None, None, :].expand(-1, *stacked.shape[1:3], -1)
        image = stacked.gather(-1, index)  # [B, layers, H, N]
        per_step = image.mean(dim=(1, 2)).masked_fill(~in_span, 0.0)
        steps.append(per_step)
    return torch.stack(steps, dim=1).cpu()


def token_maps(
    step_maps: torch.Tensor,
    layouts: Sequence[Any],
    generated: torch.Tensor,
    stop_ids: set[int],
) -> list[tuple[torch.Tensor, dict]]:
    """Per-sample token maps from ``[B, steps, N]`` step maps (shared by both capture modes).

    Args:
        step_maps: float32 ``[B, steps, N]``.
        layouts: per sample, an object with ``grid_index`` (offsets into the image span for each
            flat grid cell), ``geometry`` (``grid_h``, ``grid_w``) and ``extra`` (further grids).
        generated: int ``[B, steps]`` generated ids.
        stop_ids: EOS and padding ids; a sample's maps end before the first of them.

    Returns:
        Per sample ``(maps, stop_map, extra)``: maps float32 ``[T, grid_h, grid_w]`` on CPU, ``T`` =
        tokens before the first stop id; ``stop_map`` ``[grid_h, grid_w]`` is the map of the step that
        emitted that stop id (None when there is none); ``extra`` maps each extra grid's name to
        ``(maps, geometry)``.
    """
    from pixfound.models.base import first_stop_index

    if step_maps.dim() != 3:
        raise ValueError(f"step_maps must be [B, steps, N], got shape {tuple(step_maps.shape)}")
    batch, steps, width = step_maps.shape
    if generated.shape != (batch, steps):
        raise ValueError(
            f"generated ids {tuple(generated.shape)} do not match the step maps {tuple(step_maps.shape)}: "
            "one map per generated token is expected"
        )
    if len(layouts) != batch:
        raise ValueError(f"got {len(layouts)} layouts for a batch of {batch}")
    step_maps = step_maps.float().cpu()
    results = []
    for b, layout in enumerate(layouts):
        count = first_stop_index(generated[b].tolist(), stop_ids)

        def grid(index: torch.Tensor, geometry: Any, stop: int) -> torch.Tensor:
            if int(index.max()) >= width:
                raise ValueError(f"sample {b}: grid index {int(index.max())} beyond the {width} recorded image keys")
            return step_maps[b, :stop][:, index].reshape(stop, geometry.grid_h, geometry.grid_w).contiguous()

        maps = grid(layout.grid_index, layout.geometry, count)
        stop_map = grid(layout.grid_index, layout.geometry, count + 1)[count].clone() if count < steps else None
        extra = {name: (grid(index, geometry, count), geometry) for name, (index, geometry) in layout.extra.items()}
        results.append((maps, stop_map, extra))
    return results

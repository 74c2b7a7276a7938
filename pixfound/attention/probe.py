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
  unchanged. While a capture records, each attention module of the text decoder carries it
  (``module.pixfound_capture``); the function hands the capture the layer's query and keys.
  The capture is two parts: a :class:`KeyRangeTracker` (which query row, and which keys that
  row may see) and a :class:`StepMapSink`, which turns the query rows into maps with the capture
  op ``pixfound::image_attention`` (:mod:`pixfound.ops.attention`: the C++ core on the CPU,
  Triton on CUDA, or the torch reference). Nothing of size heads x seq² is kept, and no layer
  synchronises the GPU with the host.

:func:`token_maps` turns either mode's ``[B, steps, N]`` result into per-sample ``[T, h, w]``
maps (shared post-processing).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pixfound.ops.attention import image_attention
from pixfound.ops.backends import KERNEL_BACKENDS, resolve_kernel_backend

__all__ = [
    "FIRST_TOKEN_ROWS",
    "FUSED_ATTENTION",
    "ImageAttentionCapture",
    "KeyRangeTracker",
    "KeyRanges",
    "StepMapSink",
    "fused_attention_forward",
    "reference_step_maps",
    "register_fused_attention",
    "text_attention_implementation",
    "token_maps",
]

FUSED_ATTENTION = "pixfound_fused"
#: ``first_token_row`` choices: which prefill query row gives the first generated token's map.
FIRST_TOKEN_ROWS = ("second_to_last", "last")
# The attribute that ties an attention module of the text decoder to the capture recording it.
CAPTURE_ATTRIBUTE = "pixfound_capture"
# The sink computes a window of generation steps in one op call (each step is one query row of it).
# Bounds: steps per window, and on the GPU the Triton launch's scratch memory (the row-block
# kernel's per-layer sums: layers x batch x image keys floats per step).
MAX_WINDOW_STEPS = 32
TRITON_WINDOW_BYTES = 256 * 2**20

_registered = False
_register_lock = threading.Lock()


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
    """SDPA attention (output unchanged) that also feeds the capture attached to ``module``, if any."""
    attached = getattr(module, CAPTURE_ATTRIBUTE, None)
    if attached is not None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        capture, layer = attached
        capture.record_layer(layer, query, key, attention_mask, float(scaling))
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


def _check_first_token_row(first_token_row: str) -> None:
    if first_token_row not in FIRST_TOKEN_ROWS:
        raise ValueError(f"first_token_row must be one of {FIRST_TOKEN_ROWS}, got {first_token_row!r}")


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
    if step > 0 or first_token_row == "last":
        return q_len - 1
    if q_len < 2:
        raise ValueError(
            f"first_token_row='second_to_last' needs a prompt of at least 2 tokens, the prefill has {q_len}"
        )
    return q_len - 2


# ------------------------------------------------------------------------------------------------
# Which query row, and which keys it sees
# ------------------------------------------------------------------------------------------------
class KeyRanges(NamedTuple):
    """One generation step's query row and the keys it may see (every layer of the step shares them)."""

    row: int  # the query row, within this forward's rows, whose map the step records
    key_start: torch.Tensor  # int64 [B]: first valid key (left padding before it)
    key_end: torch.Tensor  # int64 [B, 1]: exclusive end of the row's valid keys
    gap_start: Optional[torch.Tensor]  # int64 [B]: one padding run inside the valid keys, or None
    gap_end: Optional[torch.Tensor]


class KeyRangeTracker:
    """Per generation step, the query row that gives the map and the key range of that row.

    The valid keys of a row are ``[key_start, key_end)`` minus at most one run of padding
    ``[gap_start, gap_end)``: left padding gives no gap, a shared image prefix followed by each
    prompt's own (left padded) text gives one. They are read from the attention mask at a step's
    first layer (on the device, no host sync); a decode step that only appended one key reuses the
    previous step's start and gap. Whether some row had padding in more than one place is kept on
    the device and checked once, by :meth:`check_gaps`.
    """

    def __init__(self, batch_size: int, first_token_row: str) -> None:
        _check_first_token_row(first_token_row)
        self.batch_size = batch_size
        self.first_token_row = first_token_row
        self.step = -1
        self._current: Optional[KeyRanges] = None
        self._previous: Optional[tuple[int, bool, KeyRanges]] = None  # (kv_len, mask is None, ranges)
        self._gaps: Optional[torch.Tensor] = None

    def begin_step(self) -> None:
        self.step += 1
        self._current = None

    def ranges(self, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> KeyRanges:
        """This step's :class:`KeyRanges`, computed at its first layer."""
        if self._current is None:
            self._current = self._compute(query, key, attention_mask)
            self._previous = (key.shape[2], attention_mask is None, self._current)
        return self._current

    def _compute(self, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> KeyRanges:
        batch, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        device = query.device
        if batch != self.batch_size:
            raise ValueError(
                f"the capture was set up for {self.batch_size} samples but the model runs a batch of {batch} "
                "(beam search and num_return_sequences > 1 are not supported)"
            )
        if self._gaps is None:
            self._gaps = torch.zeros((), dtype=torch.bool, device=device)
        row = _query_row(self.first_token_row, self.step, q_len)
        previous = self._previous
        appended_one_key = previous is not None and previous[0] == kv_len - 1
        if q_len == 1 and appended_one_key and previous[1] == (attention_mask is None):
            # A decode step only appends one valid key (generate extends the 2D mask with ones): the
            # first valid key and the padding gap stay those of the step before; the row ends at kv_len.
            before = previous[2]
            key_end = torch.full((batch, 1), kv_len, dtype=torch.int64, device=device)
            return KeyRanges(row, before.key_start, key_end, before.gap_start, before.gap_end)
        if attention_mask is None:
            # transformers skipped the mask (no padding), and sdpa_attention_forward runs SDPA with
            # is_causal=True for several query rows, which aligns the causal mask top-left: row r sees
            # keys [0, r], also when the keys are a longer preallocated (static) cache. One row sees all keys.
            key_start = torch.zeros(batch, dtype=torch.int64, device=device)
            key_end = torch.full((batch, 1), row + 1 if q_len > 1 else kv_len, dtype=torch.int64, device=device)
            return KeyRanges(row, key_start, key_end, None, None)
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
        # The op excludes one gap per row; remember (on the device) if a row had more.
        self._gaps = self._gaps | (as_int.sum(-1) != key_end - key_start - (gap_end - gap_start)).any()
        return KeyRanges(row, key_start, key_end[:, None], gap_start, gap_end)

    def check_gaps(self) -> None:
        """Raise if a row's valid keys had padding in more than one place (the one host sync of a capture)."""
        if self._gaps is not None and bool(self._gaps):
            raise ValueError(
                "a query row's valid keys had padding in more than one place; the probe supports left "
                "padding plus at most one padding run (after a shared image prefix)"
            )


# ------------------------------------------------------------------------------------------------
# From query rows to step maps
# ------------------------------------------------------------------------------------------------
# compute(queries, keys, scales, key_start, key_end, gap_start, gap_end) -> float32 [B, R, N], the
# capture op for the layers given, summed over them.
ComputeLayers = Callable[..., torch.Tensor]


class _PendingStep:
    """A deferred generation step: its layers, their query rows (in call order) and its key_end ``[B, 1]``."""

    __slots__ = ("key_end", "layers", "queries", "step")

    def __init__(self, step: int, key_end: torch.Tensor) -> None:
        self.step = step
        self.key_end = key_end
        self.layers: list[int] = []
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


class _InLayerTimer:
    """Time spent in the capture's op calls.

    On the host a perf_counter pair per call; on CUDA an event pair per call, read once at the
    end (reading them earlier would synchronise the GPU).
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


class StepMapSink:
    """Sums each generation step's per-layer image attention into one ``[B, N]`` map per step.

    The host work around an op call (checks, a launch, small sums) costs more than the math of a
    decode step, so in eager mode the sink keeps the query rows of a window of up to
    ``window_steps`` steps and computes them in one call, every layer at once. That is sound
    because a step's keys stay in the cache, unchanged, while later steps append theirs: the
    newest keys of a layer serve all its window steps, each row reading only its own valid range.
    A cache that makes new tensors every step (transformers' DynamicCache) closes the window each
    step instead, so old keys are never held.

    Inside a ``torch.compile``d graph nothing can be kept for a later call: each layer runs the op
    at once (and CUDA graphs take away the launch cost the window saves in eager mode).
    """

    def __init__(self, compute: ComputeLayers, *, window_steps: int) -> None:
        self.compute = compute
        self.window_steps = max(1, int(window_steps))
        self.timer = _InLayerTimer()
        self._sums: list[Optional[torch.Tensor]] = []  # per step, float32 [B, N] summed over the layers so far
        self.layer_counts: list[int] = []  # per step, the layers that ran it
        self._window: list[_PendingStep] = []  # deferred steps, oldest first
        self._window_ranges: Optional[tuple] = None  # (key_start, gap_start, gap_end) the window's steps share
        self._layer_keys: dict[int, torch.Tensor] = {}  # per layer, the newest keys (they hold every window step's)
        self._layer_scales: dict[int, float] = {}

    def add(self, step: int, layer: int, query_row: torch.Tensor, key: torch.Tensor, scale: float,
            ranges: KeyRanges) -> None:
        """Take layer ``layer``'s query row ``[B, H, 1, D]`` and keys for step ``step``."""
        while len(self.layer_counts) <= step:
            self._sums.append(None)
            self.layer_counts.append(0)
        self.layer_counts[step] += 1
        if torch.compiler.is_compiling():
            probs = self.compute([query_row], [key], [scale], ranges.key_start, ranges.key_end, ranges.gap_start,
                                 ranges.gap_end)
            self._accumulate(step, probs[:, 0])
            return
        shared = (ranges.key_start, ranges.gap_start, ranges.gap_end)
        window = self._window
        if not window or window[-1].step != step:
            if window and (len(window) >= self.window_steps or any(
                    a is not b for a, b in zip(shared, self._window_ranges))):
                self.flush()
            self._window.append(_PendingStep(step, ranges.key_end))
            self._window_ranges = shared
        old = self._layer_keys.get(layer)
        if old is not None and len(self._window) > 1 and not _extends(key, old):
            self.flush(len(self._window) - 1)  # the earlier steps need this layer's old keys
        self._layer_keys[layer] = key
        self._layer_scales[layer] = scale
        self._window[-1].layers.append(layer)
        self._window[-1].queries.append(query_row)

    def flush(self, count: Optional[int] = None) -> None:
        """Compute the oldest ``count`` deferred steps (all of them by default)."""
        count = len(self._window) if count is None else count
        steps, self._window = self._window[:count], self._window[count:]
        while steps:
            # Steps that ran different layers (an error the capture reports) cannot share a call.
            group = [steps[0]]
            while len(group) < len(steps) and steps[len(group)].layers == group[0].layers:
                group.append(steps[len(group)])
            self._compute_group(group)
            steps = steps[len(group):]

    def _compute_group(self, steps: list[_PendingStep]) -> None:
        layers = steps[0].layers
        device = steps[0].queries[0].device
        began = self.timer.start(device)
        key_start, gap_start, gap_end = self._window_ranges
        if len(steps) == 1:
            queries, key_end = steps[0].queries, steps[0].key_end
        else:
            queries = [torch.cat([step.queries[i] for step in steps], dim=2) for i in range(len(layers))]
            key_end = torch.cat([step.key_end for step in steps], dim=1)
        probs = self.compute(queries, [self._layer_keys[i] for i in layers], [self._layer_scales[i] for i in layers],
                             key_start, key_end, gap_start, gap_end)
        for index, step in enumerate(steps):
            self._accumulate(step.step, probs[:, index])
        self.timer.stop(began)

    def _accumulate(self, step: int, probs: torch.Tensor) -> None:
        total = self._sums[step]
        self._sums[step] = probs if total is None else total + probs

    def release(self) -> None:
        """Drop what the sink holds of the model (query rows, keys); the sums stay."""
        self._window = []
        self._layer_keys = {}
        self._layer_scales = {}

    def step_sums(self) -> list[torch.Tensor]:
        """Per step, float32 ``[B, N]`` summed over its layers."""
        return [total for total in self._sums if total is not None]


# ------------------------------------------------------------------------------------------------
# The capture
# ------------------------------------------------------------------------------------------------
class ImageAttentionCapture:
    """Context manager that records fused image-attention maps while ``model.generate`` runs.

    Inside the block the text decoder runs the ``"pixfound_fused"`` attention (vision tower
    unchanged) and each of its attention modules carries this capture. After the block,
    :meth:`step_maps` returns float32 ``[B, steps, N]``: per sample and generation step the
    attention to the image keys, averaged over heads and layers (``N = max(image_len)``, zero
    beyond a sample's own ``image_len``). The model is restored on exit, also after an exception.

    Args:
        model: the Hugging Face model that will ``generate``.
        image_start: per sample, the position of its first image key in the padded input.
        image_len: per sample, the number of image keys (contiguous from ``image_start``).
        first_token_row: ``"second_to_last"`` (published) or ``"last"`` prefill row for step 0.
        backend: the capture op's kernel backend, one of :data:`pixfound.ops.KERNEL_BACKENDS`.
        decoder: the text decoder (default ``model.get_decoder()``); its ``layers[i].self_attn``
            are the attention modules that feed the capture.
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
        _check_first_token_row(first_token_row)
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
        self.model = model
        decoder = decoder if decoder is not None else model.get_decoder()
        self.attention_modules = _attention_modules(decoder)
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
        image_start, image_len = _as_index(image_start), _as_index(image_len)
        _check_spans(image_start, image_len, None)
        self.batch_size = int(image_start.numel())
        self.num_image_keys = int(image_len.max())
        # Where each image span ends, as Python ints: checked against the prompt without touching a tensor.
        self._span_ends = (image_start + image_len).tolist()
        device = next(decoder.parameters()).device
        self._image_start = image_start.to(device)
        self._image_len = image_len.to(device)
        self._device = device
        self._recording = False
        self._reset()

    def _reset(self) -> None:
        self.tracker = KeyRangeTracker(self.batch_size, self.first_token_row)
        backend = resolve_kernel_backend(self.backend, self._device)
        window = MAX_WINDOW_STEPS
        if backend == "triton":
            per_step = self.num_layers * self.batch_size * self.num_image_keys * 4
            window = max(1, min(MAX_WINDOW_STEPS, TRITON_WINDOW_BYTES // max(1, per_step)))
        self.sink = StepMapSink(self._op(backend), window_steps=window)
        self._attn_context = None
        self._result: Optional[torch.Tensor] = None

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "ImageAttentionCapture":
        if any(getattr(module, CAPTURE_ATTRIBUTE, None) is not None for module in self.attention_modules):
            raise RuntimeError("another ImageAttentionCapture is already recording; captures do not nest")
        register_fused_attention()
        self._reset()
        self._attn_context = text_attention_implementation(self.model, FUSED_ATTENTION)
        self._attn_context.__enter__()
        for layer, module in enumerate(self.attention_modules):
            setattr(module, CAPTURE_ATTRIBUTE, (self, layer))
        self._recording = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            for module in self.attention_modules:
                if getattr(module, CAPTURE_ATTRIBUTE, (None,))[0] is self:
                    delattr(module, CAPTURE_ATTRIBUTE)
            if self._attn_context is not None:
                self._attn_context.__exit__(exc_type, exc, tb)
        finally:
            self._recording = False
            self._attn_context = None
            try:
                if exc_type is None:
                    self.sink.flush()
            finally:
                self.sink.release()
        if exc_type is None and self.sink.layer_counts:
            self._result = self._finish()

    # -- recording ------------------------------------------------------------------------------
    def record_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], scale: float) -> None:
        """One attention layer's query ``[B, Hq, Q, D]`` and keys ``[B, Hkv, L, D]`` (from the attention function)."""
        if layer == 0:
            self.tracker.begin_step()
            if self.tracker.step == 0:
                self._check_prompt_length(key.shape[2])
        ranges = self.tracker.ranges(query, key, attention_mask)
        # A decode step's query is a fresh [B, H, 1, D] tensor: kept as it is. A prefill's row is copied
        # so that the sink does not hold its whole query.
        query_row = query if query.shape[2] == 1 else query[:, :, ranges.row : ranges.row + 1].contiguous()
        self.sink.add(self.tracker.step, layer, query_row, key, scale, ranges)

    def _check_prompt_length(self, prompt_len: int) -> None:
        for b, end in enumerate(self._span_ends):
            if end > prompt_len:
                raise ValueError(f"the image span of sample {b} ends beyond the sequence: it ends at {end}, the "
                                 f"prompt holds {prompt_len} tokens")

    def _op(self, backend: str) -> ComputeLayers:
        def compute(queries, keys, scales, key_start, key_end, gap_start, gap_end) -> torch.Tensor:
            return image_attention(queries, keys, scales, image_start=self._image_start, image_len=self._image_len,
                                   key_start=key_start, key_end=key_end, gap_start=gap_start, gap_end=gap_end,
                                   num_image_keys=self.num_image_keys, backend=backend,
                                   validate=False)  # spans were checked on the host once; no per-call sync

        return compute

    def capture_seconds(self) -> float:
        """Seconds the capture spent in its op calls (the kernels and the bookkeeping around them)."""
        return self.sink.timer.seconds()

    def _finish(self) -> torch.Tensor:
        wrong = [(i, n) for i, n in enumerate(self.sink.layer_counts) if n != self.num_layers]
        if wrong:
            step, count = wrong[0]
            raise RuntimeError(
                f"generation step {step} ran the fused attention in {count} layers, but the text model has "
                f"{self.num_layers}; the maps would not average over all layers"
            )
        self.tracker.check_gaps()
        stacked = torch.stack(self.sink.step_sums(), dim=1)  # [B, steps, N]
        return (stacked / self.num_layers).float().cpu()

    def step_maps(self) -> torch.Tensor:
        """float32 ``[B, steps, N]`` on CPU: per step, image attention averaged over heads and layers."""
        if self._result is not None:
            return self._result
        if not self._recording and not self.sink.layer_counts:
            raise RuntimeError(
                "the capture recorded nothing: the text decoder never ran inside the block "
                "(call generate or forward inside `with ImageAttentionCapture(...)`)"
            )
        raise RuntimeError("step_maps() is available after the capture block finished without error")


def _attention_modules(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of each decoder layer, in layer order."""
    layers = getattr(decoder, "layers", None)
    modules = [getattr(layer, "self_attn", None) for layer in (layers or [])]
    if not modules or any(module is None for module in modules):
        raise ValueError(f"{type(decoder).__name__} has no layers[i].self_attn; pass the text decoder as `decoder`")
    return modules


# ------------------------------------------------------------------------------------------------
# The published recipe, and the maps per token
# ------------------------------------------------------------------------------------------------
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
    _check_first_token_row(first_token_row)
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
    token_counts: Sequence[int],
) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Per-sample token maps from ``[B, steps, N]`` step maps (shared by both capture modes).

    Args:
        step_maps: float32 ``[B, steps, N]``.
        layouts: per sample, an object with ``grid_index`` (offsets into the image span for each
            flat grid cell) and ``geometry`` (``grid_h``, ``grid_w``).
        token_counts: per sample, the tokens generated before the stop token (EOS or padding).

    Returns:
        Per sample ``(maps, stop_map)``: maps float32 ``[T, grid_h, grid_w]`` on CPU for the
        ``T = token_counts[b]`` tokens; ``stop_map`` ``[grid_h, grid_w]`` is the map of the step that
        emitted the stop token (None when the sample ran out of steps first).
    """
    if step_maps.dim() != 3:
        raise ValueError(f"step_maps must be [B, steps, N], got shape {tuple(step_maps.shape)}")
    batch, steps, width = step_maps.shape
    if len(layouts) != batch or len(token_counts) != batch:
        raise ValueError(f"got {len(layouts)} layouts and {len(token_counts)} token counts for a batch of {batch}")
    step_maps = step_maps.float().cpu()
    results = []
    for b, (layout, count) in enumerate(zip(layouts, token_counts)):
        if not 0 <= count <= steps:
            raise ValueError(f"sample {b}: {count} tokens, but {steps} steps were recorded (one map per token)")
        index, geometry = layout.grid_index, layout.geometry
        if int(index.max()) >= width:
            raise ValueError(f"sample {b}: grid index {int(index.max())} beyond the {width} recorded image keys")
        cells = step_maps[b][:, index].reshape(steps, geometry.grid_h, geometry.grid_w)
        stop_map = cells[count].clone() if count < steps else None
        results.append((cells[:count].contiguous(), stop_map))
    return results

"""The adapter protocol every MLLM family implements, and what generation returns.

An adapter wraps one Hugging Face vision-language model with its processor. It

* builds batched inputs from (image, user prompt) pairs with the model's own processor and
  chat template, padded on the LEFT so that every sample's last prompt token sits in the same
  column (the probe reads the last query rows of the prefill);
* finds, per sample, where the image tokens sit in the padded sequence and which grid cell
  (row, col) each of them covers (:class:`ImageTokenLayout`), and how that grid maps back to
  the pixels of the original image (:class:`ImageGeometry`);
* generates, optionally recording one image-attention map per generated token through
  :mod:`pixfound.attention.probe` (``capture="fused"`` or ``"reference"``).
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import time
from typing import Any, Iterator, Literal, NamedTuple, Optional, Sequence

import torch

# How the processor fit the original image into the token grid; decides the grid → pixel mapping.
#   pad:    centred pad to a max(H, W) square, then resize  → upsample to S×S, centre-crop to H×W
#   crop:   resize the short side, centre-crop a square    → grid covers the central min(H, W) square
#   resize: stretch/resize the whole image (native aspect) → upsample straight to H×W
FitMode = Literal["pad", "crop", "resize"]
CaptureMode = Literal["fused", "reference"]
#: ``generate``'s ``capture`` choices: the fused capture, the published eager recipe, or no maps.
CAPTURE_MODES = ("fused", "reference", None)
FirstTokenRow = Literal["second_to_last", "last"]

_FIT_MODES = ("pad", "crop", "resize")


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    grid_h: int
    grid_w: int
    image_h: int
    image_w: int
    fit: FitMode
    # The fit that the published script's upsampling assumes, where it differs from ``fit``. The
    # published Cambrian script upsamples its un-padded grid as if it covered the padded square
    # ("pad"), although it covers the image ("resize"); None where the published script agrees.
    published_fit: Optional[FitMode] = None

    def __post_init__(self) -> None:
        for name in ("fit", "published_fit"):
            value = getattr(self, name)
            if value not in _FIT_MODES and not (name == "published_fit" and value is None):
                raise ValueError(f"ImageGeometry.{name} must be one of {_FIT_MODES}, got {value!r}")
        for name in ("grid_h", "grid_w", "image_h", "image_w"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageGeometry.{name} must be a positive int, got {value!r}")

    def grid_to_image(self, gy: float, gx: float) -> tuple[float, float]:
        """Map continuous grid coordinates to original-image pixel coordinates ``(y, x)``.

        Grid coordinates run from 0 to ``grid_h`` / ``grid_w`` over the processed image, so the
        centre of cell ``(i, j)`` is ``(i + 0.5, j + 0.5)``. The result may fall outside the
        image for ``fit="pad"`` (cells on the padding border).
        """
        if self.fit == "resize":
            return gy * self.image_h / self.grid_h, gx * self.image_w / self.grid_w
        if self.fit == "pad":
            side = max(self.image_h, self.image_w)
            # Same split as the processors' pad-to-square: the smaller half goes top/left.
            top, left = (side - self.image_h) // 2, (side - self.image_w) // 2
            return gy * side / self.grid_h - top, gx * side / self.grid_w - left
        side = min(self.image_h, self.image_w)  # crop: the grid covers the central square
        return gy * side / self.grid_h + (self.image_h - side) / 2, gx * side / self.grid_w + (self.image_w - side) / 2

    def cell_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Pixel box ``(x0, y0, x1, y1)`` in the original image covered by grid cell ``(row, col)``."""
        if not (0 <= row < self.grid_h and 0 <= col < self.grid_w):
            raise ValueError(f"cell ({row}, {col}) is outside the {self.grid_h}x{self.grid_w} grid")
        y0, x0 = self.grid_to_image(row, col)
        y1, x1 = self.grid_to_image(row + 1, col + 1)
        return x0, y0, x1, y1


@dataclasses.dataclass
class Generation:
    sample_id: str
    prompt: str
    text: str
    token_ids: list[int]                  # generated ids, without padding and without the final EOS
    maps: Optional[torch.Tensor]          # float32 [T, grid_h, grid_w] on CPU, T == len(token_ids); None without capture
    geometry: ImageGeometry
    timings: dict = dataclasses.field(default_factory=dict)
    # The map of the step that emitted the stop token (EOS), float32 [grid_h, grid_w]; None when the
    # answer ran into max_new_tokens or without capture. The published recipe counts it in the mean map.
    stop_map: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class NativeReply:
    """A model's own answer to a grounding prompt (``adapter.native_chat``), and the frame its
    coordinates are written in.

    ``frame_hw`` is the (height, width) that the model's coordinates refer to: a coordinate ``x``
    maps to ``x / frame_w * image_w`` pixels of the original image.
    """

    text: str
    frame_hw: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class ImageTokenLayout:
    """Where one sample's image tokens sit in the padded input, and which grid cell each covers.

    ``span_start``/``span_len`` delimit the contiguous run of positions that holds the image
    (for LLaVA-NeXT it also holds the row-newline tokens). ``grid_index[c]`` is the offset inside
    that span of the token for flat grid cell ``c`` (row-major over ``grid_h x grid_w``).
    """

    span_start: int
    span_len: int
    grid_index: torch.Tensor      # int64 [grid_h * grid_w], offsets into the span
    geometry: ImageGeometry

    def __post_init__(self) -> None:
        cells = self.geometry.grid_h * self.geometry.grid_w
        if self.grid_index.shape != (cells,):
            raise ValueError(
                f"grid_index must have shape ({cells},) for a {self.geometry.grid_h}x{self.geometry.grid_w} grid, "
                f"got {tuple(self.grid_index.shape)}"
            )
        if cells and (int(self.grid_index.min()) < 0 or int(self.grid_index.max()) >= self.span_len):
            raise ValueError(f"grid_index points outside the image span of {self.span_len} tokens")


@dataclasses.dataclass
class PreparedBatch:
    """Processor output on the model's device, plus the image-token layout of every sample."""

    inputs: dict[str, Any]
    layouts: list[ImageTokenLayout]
    prompt_texts: list[str]

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


@dataclasses.dataclass
class ImagePrefix:
    """Key/value cache of one image's shared prompt prefix: every token up to its last image token.

    All protocols of an image start with the same tokens (system prompt, ``USER:``, the image);
    :meth:`VisionLanguageAdapter.encode_image_prefixes` runs them once per image, and
    ``generate(..., prefixes=...)`` then prefills only each prompt's own text after them.
    """

    sample_id: str
    token_ids: tuple[int, ...]          # the prefix tokens, image tokens included
    image_start: int                    # position of the first image token in the prefix
    keys: tuple[torch.Tensor, ...]      # per text layer [Hkv, P, D]
    values: tuple[torch.Tensor, ...]    # per text layer [Hkv, P, D]

    @property
    def length(self) -> int:
        return len(self.token_ids)


def image_token_span(input_ids: torch.Tensor, image_token_id: int, *, row: int = 0) -> tuple[int, int]:
    """Start and length of the single contiguous run of ``image_token_id`` in ``input_ids[row]``.

    Raises ValueError when the row holds no image token or several separate runs of them.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if not 0 <= row < input_ids.shape[0]:
        raise ValueError(f"row {row} is outside input_ids of shape {tuple(input_ids.shape)}")
    positions = (input_ids[row] == image_token_id).nonzero().flatten()
    if positions.numel() == 0:
        raise ValueError(
            f"row {row} of input_ids (length {input_ids.shape[1]}) holds no image token (id {image_token_id}); "
            "the prompt must contain exactly one image"
        )
    start, stop = int(positions[0]), int(positions[-1]) + 1
    if stop - start != positions.numel():
        raise ValueError(
            f"row {row} of input_ids holds {positions.numel()} image tokens (id {image_token_id}) spread over "
            f"positions {start}..{stop - 1}, not one contiguous run; the prompt must contain exactly one image"
        )
    return start, stop - start


def first_stop_index(token_ids: Sequence[int], stop_ids: set[int]) -> int:
    """Number of tokens before the first EOS/padding token (all of them when there is none)."""
    for index, token in enumerate(token_ids):
        if token in stop_ids:
            return index
    return len(token_ids)


@contextlib.contextmanager
def generation_sdpa_backends(device: torch.device, cudnn_attention: bool = False) -> Iterator[None]:
    """While generating on CUDA: SDPA without its cuDNN backend, unless ``cudnn_attention``.

    cuDNN builds an attention plan for every new (batch, key length) shape, and decoding meets a
    new key length at every step of every new prompt length. On an H100 (torch 2.11) the first
    decode-step call at a new shape took 47 ms, a repeat 0.25 ms, and flash / memory-efficient
    attention 0.23 ms either way (benchmarks/RESULTS.md, 2026-11-26 GPU run).
    """
    if device.type != "cuda" or cudnn_attention:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) ``[B, Hkv, L, D]`` of a transformers cache (layered or legacy layout)."""
    if cache is None:
        raise RuntimeError("the model returned no key/value cache (use_cache=True was ignored)")
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


class _ChunkRun(NamedTuple):
    """What one chunk's ``generate`` gave, before the results are assembled."""

    sequences: torch.Tensor  # [B, prompt + steps]
    step_maps: Optional[torch.Tensor]  # float32 [B, steps, N] on the CPU, None without capture
    generated_at: Optional[float]  # perf_counter when generate returned (the maps were read after it)
    capture_in_layers: float  # seconds the fused capture spent inside generate


def _check_generate_arguments(samples: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int,
                              capture: Optional[str], batch_size: int, first_token_row: str,
                              prefixes: Optional[Sequence[Any]], sample_seeds: Optional[Sequence[int]],
                              kv_cache: str) -> None:
    """``generate``'s own arguments, checked before any image is loaded (the capture checks its backend)."""
    from pixfound.attention.probe import FIRST_TOKEN_ROWS
    from pixfound.models.kv_cache import KV_CACHES

    if len(samples) != len(prompts):
        raise ValueError(f"got {len(samples)} samples but {len(prompts)} prompts")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
    if first_token_row not in FIRST_TOKEN_ROWS:
        raise ValueError(f"first_token_row must be one of {FIRST_TOKEN_ROWS}, got {first_token_row!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if prefixes is not None and len(prefixes) != len(samples):
        raise ValueError(f"got {len(prefixes)} image prefixes for {len(samples)} samples")
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if sample_seeds is not None and len(sample_seeds) != len(samples):
        raise ValueError(f"got {len(sample_seeds)} sample seeds for {len(samples)} samples")


class VisionLanguageAdapter(abc.ABC):
    """Base class of the per-family adapters; see the module docstring for the protocol.

    Subclasses set ``family`` and implement :meth:`format_prompt`, :meth:`_encode` and
    :meth:`_layout`. Public attributes: ``model``, ``processor``, ``tokenizer``, ``family``,
    ``name``, ``device``, ``dtype``.
    """

    family: str = ""
    # Whether generate(..., prefixes=...) can reuse a per-image prefix cache. Needs plain 1D
    # positions counted from the attention mask (Qwen2-VL's 3D rope positions do not fit).
    shares_image_prefix: bool = True
    # Whether the model writes its own points and boxes (``native_chat``; ``--grounding points|boxes``).
    writes_coordinates: bool = False

    def __init__(self, model: torch.nn.Module, processor: Any, *, name: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        if self.tokenizer.padding_side != "left":
            self.tokenizer.padding_side = "left"  # the probe and batching rely on left padding
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of {name} has no pad token; batched generation needs one")

    # -- properties -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def decoder(self) -> torch.nn.Module:
        """The text decoder (the module whose attention layers the probe reads)."""
        return self.model.get_decoder()

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def stop_token_ids(self) -> set[int]:
        """EOS ids of the generation config plus the pad id: a token map ends before any of them."""
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        ids.add(int(self.tokenizer.pad_token_id))
        return {int(i) for i in ids}

    # -- family-specific parts ------------------------------------------------------------------
    @abc.abstractmethod
    def format_prompt(self, prompt: str, *, with_image: bool = True) -> str:
        """The chat-templated text of one user turn (image first, then ``prompt``), ready to generate."""

    @abc.abstractmethod
    def _encode(self, images: Optional[list], texts: list[str]) -> dict[str, Any]:
        """Run the processor on templated texts (and images), left padded, returning tensors."""

    @abc.abstractmethod
    def _layout(self, inputs: dict[str, Any], row: int, image_size: tuple[int, int]) -> ImageTokenLayout:
        """Image-token layout of sample ``row``; ``image_size`` is the original (H, W)."""

    # -- shared machinery -----------------------------------------------------------------------
    def prepare(self, images: Sequence[Any], prompts: Sequence[str]) -> PreparedBatch:
        """Batched, left-padded model inputs for (image, user prompt) pairs, and their layouts."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            raise ValueError("prepare needs at least one (image, prompt) pair")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{index}] must be a str, got {type(prompt).__name__}")
        texts = [self.format_prompt(p) for p in prompts]
        inputs = self._encode(list(images), texts)
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None:
            # Left padding: every row's last column is a real token.
            if not bool(attention_mask[:, -1].all()):
                raise ValueError("the processor padded on the right; the adapter needs left padding")
        layouts = []
        for row, image in enumerate(images):
            layout = self._layout(inputs, row, (image.height, image.width))
            if layout.span_start + layout.span_len > input_ids.shape[1]:
                raise ValueError(
                    f"the image span of sample {row} ({layout.span_start}+{layout.span_len}) ends beyond the "
                    f"sequence of {input_ids.shape[1]} tokens"
                )
            layouts.append(layout)
        return PreparedBatch(inputs=self._on_device(inputs), layouts=layouts, prompt_texts=texts)

    def _on_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Processor outputs on the model's device; floating pixel values (one tensor, or one per vision
        tower) in the model's dtype."""
        device, dtype = self.device, self.dtype

        def move(value: Any, is_pixels: bool) -> Any:
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                return value.to(dtype) if is_pixels and value.is_floating_point() else value
            if is_pixels and isinstance(value, (list, tuple)):
                return type(value)(move(v, True) for v in value)
            return value

        return {k: move(v, k == "pixel_values") for k, v in inputs.items()}

    # -- shared image prefix ----------------------------------------------------------------------
    def encode_image_prefixes(self, samples: Sequence[Any]) -> list[ImagePrefix]:
        """Run each sample's prompt prefix (system prompt + image, no user text) once; return its cache.

        Pass the result to ``generate(..., prefixes=...)`` for any number of prompts about the same
        images: each then prefills only its own text. The prefix keys depend only on the prefix
        tokens and their positions, so the answers equal the unshared run's up to float rounding
        (different matrix shapes); they are not bit-identical.
        """
        if not self.shares_image_prefix:
            raise ValueError(f"the {self.family} adapter cannot share image prefixes (its positions are not 1D)")
        if not samples:
            return []
        images = [s.load_image() for s in samples]
        batch = self.prepare(images, [""] * len(images))
        input_ids = batch.inputs["input_ids"]
        mask = batch.inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        ends = [layout.span_start + layout.span_len for layout in batch.layouts]
        width = max(ends)
        inputs = dict(batch.inputs)
        inputs["input_ids"] = input_ids[:, :width]
        inputs["attention_mask"] = mask[:, :width]
        # Positions counted over real tokens only, as generate counts them: the keys must not depend on padding.
        position_ids = (mask[:, :width].long().cumsum(-1) - 1).clamp(min=0)
        forward_args = _forward_parameters(self.model)
        if "logits_to_keep" in forward_args:
            inputs["logits_to_keep"] = 1  # the logits of the prefix are not needed
        with torch.inference_mode(), self.text_attention("sdpa"):
            output = self.model(**inputs, position_ids=position_ids, use_cache=True)
        layers = _cache_tensors(output.get("cache", None) or output.get("past_key_values", None))
        if len(layers) != self.num_layers:
            raise RuntimeError(f"the prefix cache has {len(layers)} layers, the text model {self.num_layers}")
        prefixes = []
        for row, (sample, layout) in enumerate(zip(samples, batch.layouts)):
            first = int(mask[row].to(torch.int32).argmax())
            end = ends[row]
            prefixes.append(
                ImagePrefix(
                    sample_id=str(sample.id),
                    token_ids=tuple(input_ids[row, first:end].tolist()),
                    image_start=layout.span_start - first,
                    keys=tuple(k[row, :, first:end].clone() for k, _ in layers),
                    values=tuple(v[row, :, first:end].clone() for _, v in layers),
                )
            )
        return prefixes

    @property
    def _cache_argument(self) -> str:
        """The name under which the model's forward (and generate) takes a key/value cache."""
        return "cache" if "cache" in _forward_parameters(self.model) else "past_key_values"

    def _prefixed_batch(
        self,
        batch: PreparedBatch,
        samples: Sequence[Any],
        prefixes: Sequence[ImagePrefix],
        kv_cache: str = "dynamic",
        max_new_tokens: int = 0,
    ) -> Optional[PreparedBatch]:
        """``batch`` rebuilt as [shared prefix][padding][own text] with the prefixes' cache, or None.

        None (the caller prefills everything) when the prefixes differ in length within the batch or
        a prompt does not start with its image's prefix tokens.
        """
        if len(prefixes) != len(samples):
            raise ValueError(f"got {len(prefixes)} image prefixes for {len(samples)} samples")
        for sample, prefix in zip(samples, prefixes):
            if prefix.sample_id != str(sample.id):
                raise ValueError(f"the image prefix of sample {prefix.sample_id!r} was given for sample {sample.id!r}")
        lengths = {prefix.length for prefix in prefixes}
        if len(lengths) != 1:
            return None
        shared = lengths.pop()
        input_ids = batch.inputs["input_ids"]
        mask = batch.inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        own_texts = []
        for row, (prefix, layout) in enumerate(zip(prefixes, batch.layouts)):
            first = int(mask[row].to(torch.int32).argmax())
            tokens = input_ids[row, first:]
            # At least two own tokens: the probe reads the prefill's second-to-last query row.
            if tokens.numel() < shared + 2 or tuple(tokens[:shared].tolist()) != prefix.token_ids:
                return None
            if layout.span_start - first != prefix.image_start:
                return None
            own_texts.append(tokens[shared:])
        width = max(t.numel() for t in own_texts)
        pad_id = int(self.tokenizer.pad_token_id)
        new_ids = torch.full((len(prefixes), shared + width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        new_mask = torch.zeros_like(new_ids)
        prefix_ids = torch.tensor(prefixes[0].token_ids, dtype=input_ids.dtype, device=input_ids.device)
        for row, own in enumerate(own_texts):
            new_ids[row, :shared] = prefix_ids
            new_mask[row, :shared] = 1
            new_ids[row, shared + width - own.numel():] = own
            new_mask[row, shared + width - own.numel():] = 1
        prefill = [
            (torch.stack([p.keys[layer] for p in prefixes]).to(self.device),
             torch.stack([p.values[layer] for p in prefixes]).to(self.device))
            for layer in range(len(prefixes[0].keys))
        ]
        if kv_cache == "preallocated":
            from pixfound.models.kv_cache import preallocated_cache

            cache = preallocated_cache(len(prefill), shared + width + max_new_tokens, prefill)
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
            for layer, (keys, values) in enumerate(prefill):
                cache.update(keys, values, layer)
        inputs = {"input_ids": new_ids, "attention_mask": new_mask, self._cache_argument: cache}
        layouts = [dataclasses.replace(layout, span_start=prefix.image_start)
                   for layout, prefix in zip(batch.layouts, prefixes)]
        return PreparedBatch(inputs=inputs, layouts=layouts, prompt_texts=batch.prompt_texts)

    def _generation_kwargs(
        self, max_new_tokens: int, do_sample: bool, temperature: float, top_p: Optional[float]
    ) -> dict:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=bool(do_sample),
            pad_token_id=int(self.tokenizer.pad_token_id),
            use_cache=True,
        )
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
            kwargs["temperature"] = float(temperature)
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        else:
            # Greedy: neutralise sampling knobs a checkpoint's generation_config may carry.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _decoding_kwargs(self, max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float],
                         seeds: Optional[Sequence[int]]) -> dict:
        """``generate`` kwargs: greedy, or (with per-row ``seeds``) greedy over a last logits processor that
        samples each row from its own seed."""
        kwargs = self._generation_kwargs(max_new_tokens, False, temperature, top_p)
        if seeds is not None:
            from transformers import LogitsProcessorList

            from pixfound.models.sampling import RowSampler

            sampler = RowSampler(seeds, temperature=temperature, top_k=top_k, top_p=top_p)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        return kwargs

    @contextlib.contextmanager
    def text_attention(self, implementation: str) -> Iterator[None]:
        """Temporarily run the text decoder with ``implementation`` (vision tower untouched)."""
        from pixfound.attention.probe import text_attention_implementation

        with text_attention_implementation(self.model, implementation):
            yield

    def generate(
        self,
        samples: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        capture: Optional[CaptureMode] = "fused",
        batch_size: int = 8,
        first_token_row: FirstTokenRow = "second_to_last",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        sample_seeds: Optional[Sequence[int]] = None,
        backend: str = "auto",
        prefixes: Optional[Sequence[ImagePrefix]] = None,
        cudnn_attention: bool = False,
        kv_cache: str = "preallocated",
    ) -> list[Generation]:
        """Answer each (sample image, prompt) and record one image map per generated token.

        Args:
            samples: objects with ``.id`` and ``.load_image()`` (``pixfound.data.Sample``).
            prompts: the user texts, one per sample.
            max_new_tokens: generation budget per sample.
            capture: ``"fused"`` (SDPA + the capture op), ``"reference"`` (eager attention with
                ``output_attentions``, the published recipe) or ``None`` (no maps).
            batch_size: samples per ``generate`` call (left padded).
            first_token_row: which prefill query row gives the first token's map:
                ``"second_to_last"`` (published) or ``"last"``.
            do_sample, temperature, top_k, top_p: sampling; greedy by default. Each sample is drawn
                from a generator of its own (:class:`pixfound.models.sampling.RowSampler`), so its
                answer does not depend on the batch it is in.
            seed: the run seed; without ``sample_seeds`` a sample's seed is ``row_seed(seed, id)``.
            sample_seeds: one sampling seed per sample (e.g. from the sample id and the protocol).
            backend: the capture op's kernels for ``capture="fused"``, one of
                :data:`pixfound.ops.KERNEL_BACKENDS`.
            prefixes: optional, one :class:`ImagePrefix` per sample (:meth:`encode_image_prefixes`):
                prefill only each prompt's own text after its image's cached prefix. A batch whose
                prompts do not start with their prefix, or whose prefixes differ in length, is
                prefilled in full instead (``timings["prefix_shared"]`` says which happened).
            cudnn_attention: on CUDA, let SDPA use cuDNN (off: see :func:`generation_sdpa_backends`).
            kv_cache: ``"preallocated"`` (keys and values written into buffers reserved for the prompt
                and the new tokens: no per-step concatenation, same values) or ``"dynamic"``
                (transformers' ``DynamicCache``, what the published recipe runs).

        Returns:
            One :class:`Generation` per sample, in input order.
        """
        _check_generate_arguments(samples, prompts, max_new_tokens=max_new_tokens, capture=capture,
                                  batch_size=batch_size, first_token_row=first_token_row, prefixes=prefixes,
                                  sample_seeds=sample_seeds, kv_cache=kv_cache)
        if do_sample and sample_seeds is None:
            from pixfound.models.sampling import row_seed

            sample_seeds = [row_seed(0 if seed is None else seed, s.id) for s in samples]
        results: list[Generation] = []
        for begin in range(0, len(samples), batch_size):
            rows = slice(begin, begin + batch_size)
            chunk, chunk_prompts = list(samples[rows]), list(prompts[rows])
            chunk_prefixes = None if prefixes is None else prefixes[rows]
            batch, prefix_shared = self._prepare_chunk(chunk, chunk_prompts, chunk_prefixes, kv_cache=kv_cache,
                                                       max_new_tokens=max_new_tokens)
            decoding = self._decoding_kwargs(max_new_tokens, temperature, top_k, top_p,
                                             sample_seeds[rows] if do_sample else None)
            started = time.perf_counter()
            with torch.inference_mode(), generation_sdpa_backends(self.device, cudnn_attention):
                if capture == "fused":
                    run = self._generate_fused(batch, decoding, first_token_row=first_token_row, backend=backend)
                elif capture == "reference":
                    run = self._generate_reference(batch, decoding, first_token_row=first_token_row)
                else:
                    run = self._generate_plain(batch, decoding)
            results.extend(self._assemble(chunk, chunk_prompts, batch, run, started=started, capture=capture,
                                          prefix_shared=prefix_shared))
        return results

    def _prepare_chunk(self, samples: list[Any], prompts: list[str], prefixes: Optional[Sequence[ImagePrefix]], *,
                       kv_cache: str, max_new_tokens: int) -> tuple[PreparedBatch, bool]:
        """The model inputs of one chunk, with its key/value cache; and whether it reuses the image prefixes."""
        batch = self.prepare([s.load_image() for s in samples], prompts)
        if prefixes is not None:
            prefixed = self._prefixed_batch(batch, samples, prefixes, kv_cache, max_new_tokens)
            if prefixed is not None:
                return prefixed, True
        if kv_cache == "preallocated":
            from pixfound.models.kv_cache import preallocated_cache

            cache = preallocated_cache(self.num_layers, batch.prompt_len + max_new_tokens)
            batch = dataclasses.replace(batch, inputs={**batch.inputs, self._cache_argument: cache})
        return batch, False

    def _generate_fused(self, batch: PreparedBatch, decoding: dict, *, first_token_row: str, backend: str
                        ) -> _ChunkRun:
        """``generate`` with the fused capture: SDPA, and the capture op on the image keys of every layer."""
        from pixfound.attention.probe import ImageAttentionCapture

        with ImageAttentionCapture(self.model, image_start=[l.span_start for l in batch.layouts],
                                   image_len=[l.span_len for l in batch.layouts], first_token_row=first_token_row,
                                   backend=backend, decoder=self.decoder) as recorder:
            sequences = self.model.generate(**batch.inputs, **decoding)
            # The steps computed during generate; the last window is computed on exit, which counts in the
            # time after generate.
            in_layers = recorder.capture_seconds()
            generated_at = time.perf_counter()
        return _ChunkRun(sequences, recorder.step_maps(), generated_at, in_layers)

    def _generate_reference(self, batch: PreparedBatch, decoding: dict, *, first_token_row: str) -> _ChunkRun:
        """``generate`` with eager attention and ``output_attentions``, read as the published recipe does."""
        from pixfound.attention.probe import reference_step_maps

        with self.text_attention("eager"):
            out = self.model.generate(**batch.inputs, **decoding, output_attentions=True,
                                      return_dict_in_generate=True)
        generated_at = time.perf_counter()
        step_maps = reference_step_maps(out.attentions, image_start=[l.span_start for l in batch.layouts],
                                        image_len=[l.span_len for l in batch.layouts], first_token_row=first_token_row)
        return _ChunkRun(out.sequences, step_maps, generated_at, 0.0)

    def _generate_plain(self, batch: PreparedBatch, decoding: dict) -> _ChunkRun:
        """``generate`` with SDPA and no maps."""
        with self.text_attention("sdpa"):
            sequences = self.model.generate(**batch.inputs, **decoding)
        return _ChunkRun(sequences, None, None, 0.0)

    def _assemble(self, samples: list[Any], prompts: list[str], batch: PreparedBatch, run: _ChunkRun, *,
                  started: float, capture: Optional[str], prefix_shared: bool) -> list[Generation]:
        """One :class:`Generation` per sample of a chunk: its tokens before the stop token, their maps, timings."""
        from pixfound.attention.probe import token_maps

        stop_ids = self.stop_token_ids
        generated = run.sequences[:, batch.prompt_len :].cpu()
        token_ids = [row[: first_stop_index(row, stop_ids)] for row in generated.tolist()]
        maps = (token_maps(run.step_maps, batch.layouts, [len(ids) for ids in token_ids])
                if run.step_maps is not None else [(None, None)] * len(samples))
        finished = time.perf_counter()
        elapsed = finished - started
        # Fused: the capture's op calls during generate plus gathering the maps after it. Reference: only the
        # gathering (its cost inside generate is eager attention with output_attentions, not separable).
        capture_s = run.capture_in_layers + (0.0 if run.generated_at is None else finished - run.generated_at)
        timings = {
            "generate_s": elapsed / len(samples),  # per-sample share, capture included
            "capture_s": capture_s / len(samples) if capture else None,
            "batch_generate_s": elapsed,
            "batch_size": len(samples),
            "batch_steps": generated.shape[1],
            "capture": capture,
            "prefix_shared": prefix_shared,
        }
        return [
            Generation(
                sample_id=str(sample.id),
                prompt=prompt,
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                maps=sample_maps,
                geometry=layout.geometry,
                timings=dict(timings),
                stop_map=stop_map,
            )
            for sample, prompt, ids, (sample_maps, stop_map), layout
            in zip(samples, prompts, token_ids, maps, batch.layouts)
        ]

    def chat(
        self,
        image: Optional[Any],
        prompt: str,
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> str:
        """One plain chat turn (``PIL.Image`` or ``None``, then text) without capture; returns the answer.

        Greedy by default; the judge's ``hf`` backend calls ``chat(image, prompt, max_new_tokens)``.
        """
        return self.chat_batch([image], [prompt], max_new_tokens=max_new_tokens, do_sample=do_sample,
                               temperature=temperature)[0]

    def chat_batch(
        self,
        images: Sequence[Optional[Any]],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> list[str]:
        """Plain chat turns for several (image or None, prompt) pairs; all with or all without images."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        with_image = [im is not None for im in images]
        if any(with_image) and not all(with_image):
            raise ValueError("chat_batch needs either an image for every prompt or for none")
        has_images = bool(with_image) and with_image[0]
        texts = [self.format_prompt(p, with_image=has_images) for p in prompts]
        inputs = self._encode(list(images) if has_images else None, texts)
        kwargs = self._generation_kwargs(max_new_tokens, do_sample, temperature, None)
        return self._answers(inputs, kwargs)

    def _answers(self, inputs: dict[str, Any], generation_kwargs: dict, *,
                 clean_up_tokenization_spaces: Optional[bool] = None) -> list[str]:
        """Generate (SDPA, no capture) from processor outputs; each row's text up to its stop token."""
        inputs = self._on_device(inputs)
        with torch.inference_mode(), self.text_attention("sdpa"):
            sequences = self.model.generate(**inputs, **generation_kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        stop_ids = self.stop_token_ids
        decode_options = {} if clean_up_tokenization_spaces is None else {
            "clean_up_tokenization_spaces": clean_up_tokenization_spaces}
        return [self.tokenizer.decode(row[: first_stop_index(row, stop_ids)], skip_special_tokens=True,
                                      **decode_options)
                for row in sequences[:, prompt_len:].cpu().tolist()]

    def native_chat(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int,
                    batch_size: int = 8) -> list["NativeReply"]:
        """One greedy chat turn per (PIL image, prompt) in the layout of the published grounding scripts,
        with the frame the reply's coordinates refer to. Only families that write coordinates have it."""
        from pixfound.errors import UserError

        raise UserError(f"{self.name} ({self.family}) has no native grounding: it does not write coordinates; "
                        "use a Qwen2.5-VL or Qwen3-VL model")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, device={self.device}, "
            f"dtype={self.dtype})"
        )

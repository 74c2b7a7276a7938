"""Adapters for llava-hf LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT.

LLaVA-1.5 image geometry
------------------------
The llava-hf checkpoints ship a ``CLIPImageProcessor`` config: resize the short side to 336,
then centre-CROP 336x336, so the sides of a non-square image never reach the model. The
published LLaVA-1.5 (and the PixFoundation scripts, ``image_aspect_ratio="pad"``) instead pads
the image to a square with the CLIP mean colour (``expand2square``) and resizes that.
transformers' ``LlavaImageProcessor`` implements the same padding (``do_pad=True``:
``pad_to_square`` with background ``int(mean * 255)``, the smaller half of the border on the
top/left, exactly as ``expand2square``). :class:`LlavaAdapter` therefore switches the
processor to ``LlavaImageProcessor(do_pad=True)`` with the checkpoint's sizes and statistics
(``pad_to_square=True``, the default), and its geometry is ``fit="pad"``: the 24x24 grid covers
the padded ``max(H, W)`` square. With ``pad_to_square=False`` the checkpoint's crop is kept and
the geometry is ``fit="crop"``.

LLaVA-NeXT image geometry
-------------------------
The image tokens of one image are the base view (the whole image squashed to 336x336, 24x24
tokens) followed by the "anyres" grid: the image resized with its aspect ratio into the best
grid pinpoint, tiled, encoded, and un-padded back to the image's aspect ratio, giving an
``H' x W'`` grid where every row ends with one ``image_newline`` token. :class:`LlavaNextAdapter`
drops the newline tokens: ``Generation.maps`` is the ``H' x W'`` anyres grid (``fit="resize"``,
it covers the whole image). The base view's tokens count in each token's softmax like every key,
but get no map of their own.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from pixfound.models.base import ImageGeometry, ImageTokenLayout, VisionLanguageAdapter, image_token_span

# The system prompt of LLaVA-1.5's "llava_v1" conversation template (Vicuna v1).
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

_COPIED_PROCESSOR_FIELDS = (
    "size",
    "crop_size",
    "resample",
    "image_mean",
    "image_std",
    "do_resize",
    "do_center_crop",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
)


def _plain(value: Any) -> Any:
    """SizeDict / dict-like processor fields as plain dicts without None entries."""
    if value is None or isinstance(value, (int, float, bool, str, list, tuple)):
        return value
    try:
        items = dict(value)
    except (TypeError, ValueError):
        keys = ("height", "width", "shortest_edge", "longest_edge")
        items = {k: getattr(value, k) for k in keys if hasattr(value, k)}
    return {k: v for k, v in items.items() if v is not None}


def configure_llava_image_processor(processor: Any, *, pad_to_square: bool) -> str:
    """Make ``processor`` pad to a square (the published LLaVA-1.5) or keep its own fit; return the fit mode."""
    image_processor = processor.image_processor
    if pad_to_square:
        if hasattr(image_processor, "pad_to_square") and hasattr(image_processor, "do_pad"):
            image_processor.do_pad = True
        else:
            from transformers.models.llava.image_processing_llava import LlavaImageProcessor

            fields = {}
            for name in _COPIED_PROCESSOR_FIELDS:
                value = getattr(image_processor, name, None)
                if value is not None:
                    fields[name] = _plain(value)
            processor.image_processor = LlavaImageProcessor(**fields, do_pad=True)
        return "pad"
    if getattr(image_processor, "do_center_crop", False):
        return "crop"
    return "resize"


class LlavaAdapter(VisionLanguageAdapter):
    """llava-hf LLaVA-1.5: ``image_size / patch_size`` squared image tokens (24x24 = 576) in one run.

    Args:
        model: a ``LlavaForConditionalGeneration``.
        processor: its ``LlavaProcessor``.
        name: display name (checkpoint id).
        system_prompt: text before ``USER:``; the Vicuna v1 prompt of the published LLaVA-1.5 by
            default, ``None`` for none.
        pad_to_square: pad images to a square like the published LLaVA (see the module doc).
    """

    family = "llava"

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        name: str,
        system_prompt: Optional[str] = VICUNA_SYSTEM_PROMPT,
        pad_to_square: bool = True,
    ) -> None:
        super().__init__(model, processor, name=name)
        self.system_prompt = system_prompt
        self.fit = configure_llava_image_processor(processor, pad_to_square=pad_to_square)
        self.image_token_id = int(model.config.image_token_id)
        vision = model.config.vision_config
        self.grid_side = int(vision.image_size) // int(vision.patch_size)

    def _messages(self, prompt: str, with_image: bool) -> list[dict]:
        content: list[dict] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": content})
        return messages

    def format_prompt(self, prompt: str, *, with_image: bool = True) -> str:
        return self.processor.apply_chat_template(
            self._messages(prompt, with_image), add_generation_prompt=True, tokenize=False
        )

    def _encode(self, images: Optional[list], texts: list[str]) -> dict[str, Any]:
        return dict(self.processor(text=texts, images=images, return_tensors="pt", padding=True))

    def _layout(self, inputs: dict[str, Any], row: int, image_size: tuple[int, int]) -> ImageTokenLayout:
        start, length = image_token_span(inputs["input_ids"], self.image_token_id, row=row)
        side = self.grid_side
        if length != side * side:
            raise ValueError(
                f"sample {row} has {length} image tokens, but the {side}x{side} grid of the vision tower needs "
                f"{side * side}"
            )
        geometry = ImageGeometry(side, side, int(image_size[0]), int(image_size[1]), self.fit)
        return ImageTokenLayout(start, length, torch.arange(length), geometry)


def anyres_grid_shape(
    image_size: tuple[int, int], grid_pinpoints: list, tile_size: int, patch_size: int
) -> tuple[int, int]:
    """(rows, cols) of LLaVA-NeXT's un-padded anyres token grid for an (H, W) image (newlines excluded).

    Same arithmetic as transformers' ``get_anyres_image_grid_shape`` + ``unpad_image``.
    """
    from transformers.image_processing_utils import select_best_resolution

    height, width = image_size
    best_h, best_w = select_best_resolution([height, width], grid_pinpoints)
    side = tile_size // patch_size
    rows, cols = (best_h // tile_size) * side, (best_w // tile_size) * side
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols


class LlavaNextAdapter(LlavaAdapter):
    """llava-hf LLaVA-NeXT: base 24x24 view + anyres grid with row newlines (dropped from the maps).

    ``Generation.maps`` is the anyres grid.
    The chat template is the checkpoint's own; ``system_prompt`` defaults to none.
    """

    family = "llava_next"

    def __init__(
        self, model: torch.nn.Module, processor: Any, *, name: str, system_prompt: Optional[str] = None
    ) -> None:
        VisionLanguageAdapter.__init__(self, model, processor, name=name)
        self.system_prompt = system_prompt
        self.fit = "resize"
        self.image_token_id = int(model.config.image_token_id)
        vision = model.config.vision_config
        self.tile_size = int(vision.image_size)
        self.patch_size = int(vision.patch_size)
        self.grid_side = self.tile_size // self.patch_size
        self.grid_pinpoints = [list(p) for p in model.config.image_grid_pinpoints]

    def _layout(self, inputs: dict[str, Any], row: int, image_size: tuple[int, int]) -> ImageTokenLayout:
        start, length = image_token_span(inputs["input_ids"], self.image_token_id, row=row)
        height, width = int(image_size[0]), int(image_size[1])
        base = self.grid_side * self.grid_side
        rows, cols = anyres_grid_shape((height, width), self.grid_pinpoints, self.tile_size, self.patch_size)
        expected = base + rows * (cols + 1)
        if length != expected:
            raise ValueError(
                f"sample {row} has {length} image tokens, but a {height}x{width} image needs {expected} "
                f"({self.grid_side}x{self.grid_side} base + {rows}x({cols}+1 newline) anyres)"
            )
        r = torch.arange(rows)[:, None]
        c = torch.arange(cols)[None, :]
        anyres_index = (base + r * (cols + 1) + c).flatten()  # skips each row's trailing newline
        return ImageTokenLayout(start, length, anyres_index, ImageGeometry(rows, cols, height, width, "resize"))

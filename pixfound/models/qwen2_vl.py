"""Adapter for Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VL...``).

Image geometry: the processor resizes the image with its aspect ratio (``smart_resize``: both
sides rounded to multiples of ``patch_size * merge_size`` = 28 px, pixel count clamped to
``[min_pixels, max_pixels]``) and never pads or crops. ``image_grid_thw = (1, gh, gw)`` counts
14-px patches; the vision merger fuses 2x2 patches, so the language model sees
``gh/2 x gw/2`` ``<|image_pad|>`` tokens in row-major order, each covering 28x28 px of the
resized image. The grid covers the whole image: ``fit="resize"``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from pixfound.models.base import ImageGeometry, ImageTokenLayout, VisionLanguageAdapter, image_token_span


class Qwen2VLAdapter(VisionLanguageAdapter):
    """Qwen2-VL / Qwen2.5-VL; the checkpoint's chat template (with its default system prompt)."""

    family = "qwen2_vl"
    shares_image_prefix = False  # 3D rope positions are computed at the prefill from the whole prompt

    def __init__(self, model: torch.nn.Module, processor: Any, *, name: str) -> None:
        super().__init__(model, processor, name=name)
        self.image_token_id = int(model.config.image_token_id)
        self.merge_size = int(model.config.vision_config.spatial_merge_size)

    def format_prompt(self, prompt: str, *, with_image: bool = True) -> str:
        content: list[dict] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def _encode(self, images: Optional[list], texts: list[str]) -> dict[str, Any]:
        return dict(self.processor(text=texts, images=images, return_tensors="pt", padding=True))

    def _layout(self, inputs: dict[str, Any], row: int, image_size: tuple[int, int]) -> ImageTokenLayout:
        start, length = image_token_span(inputs["input_ids"], self.image_token_id, row=row)
        grid_thw = inputs.get("image_grid_thw")
        if grid_thw is None or row >= grid_thw.shape[0]:
            raise ValueError(f"the processor returned no image_grid_thw for sample {row}")
        frames, patches_h, patches_w = (int(v) for v in grid_thw[row])
        grid_h, grid_w = patches_h // self.merge_size, patches_w // self.merge_size
        if frames != 1 or grid_h * grid_w != length:
            raise ValueError(
                f"sample {row}: image_grid_thw {(frames, patches_h, patches_w)} gives {frames * grid_h * grid_w} "
                f"merged tokens, but the prompt holds {length} image tokens"
            )
        geometry = ImageGeometry(grid_h, grid_w, int(image_size[0]), int(image_size[1]), "resize")
        return ImageTokenLayout(start, length, torch.arange(length), geometry)

"""Adapters for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VL...``, ``Qwen3VLForConditionalGeneration``).

Image geometry: the processor resizes the image with its aspect ratio (``smart_resize``: both
sides rounded to multiples of ``patch_size * merge_size`` px, pixel count clamped to
``[min_pixels, max_pixels]``) and never pads or crops. ``image_grid_thw = (1, gh, gw)`` counts
patches (14 px for Qwen2/2.5-VL, 16 px for Qwen3-VL); the vision merger fuses 2x2 patches, so the
language model sees ``gh/2 x gw/2`` ``<|image_pad|>`` tokens in row-major order, each covering
28x28 (Qwen3-VL: 32x32) px of the resized image. The grid covers the whole image: ``fit="resize"``.

Qwen3-VL adds two things that leave the image-token layout as it is: DeepStack adds vision
features to the hidden states of the image positions in the first decoder layers (the same key
positions), and timestamps are text tokens of videos only.

Native grounding (:meth:`Qwen2VLAdapter.native_chat`) follows the published Qwen scripts
(``pixmmvp/inference/infer_qwen.py`` and ``infer_qwen_simplebaseline.py`` of PixFoundation): the
system message "You are a helpful assistant", then the user turn with the text BEFORE the image.
Qwen2.5-VL writes coordinates in pixels of the processor's input (``image_grid_thw[1:] x`` the
patch size, 14); Qwen3-VL writes them normalised to 0..1000 of the image (Qwen's Qwen3-VL 2D
grounding cookbook: "relative coordinates ranging from 0 to 1000").
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from pixfound.models.base import (
    ImageGeometry,
    ImageTokenLayout,
    NativeReply,
    VisionLanguageAdapter,
    image_token_span,
)

#: The system message of the published Qwen grounding scripts (no final full stop).
NATIVE_SYSTEM_PROMPT = "You are a helpful assistant"
#: The frame Qwen3-VL's grounding coordinates are written in: 0..1000 on both axes of the image.
QWEN3_COORDINATE_FRAME = (1000, 1000)


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

    # -- native grounding -------------------------------------------------------------------------
    def native_prompt(self, prompt: str) -> str:
        """The chat text of one native grounding turn: the published system message, then the user's
        text before the image (``{"image": path}`` in the published messages renders as this image entry)."""
        messages = [
            {"role": "system", "content": NATIVE_SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]},
        ]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    def writes_coordinates(self) -> bool:  # type: ignore[override]
        """Qwen2.5-VL and Qwen3-VL write points and boxes as the published JSON; Qwen2-VL does not."""
        return self.model.config.model_type in ("qwen2_5_vl", "qwen3_vl")

    def coordinate_frame(self, grid_thw: Sequence[int]) -> tuple[int, int]:
        """(height, width) of the frame the model writes coordinates in, for an image of ``grid_thw``."""
        if self.model.config.model_type != "qwen2_5_vl":
            from pixfound.errors import UserError

            raise UserError(f"{self.name} ({self.model.config.model_type}) has no native grounding in the published "
                            "JSON format; use a Qwen2.5-VL or Qwen3-VL model")
        # Pixels of the processor's input: patches x patch size (the published scripts write x 14, the
        # Qwen2.5-VL patch size).
        patch = int(self.processor.image_processor.patch_size)
        return int(grid_thw[1]) * patch, int(grid_thw[2]) * patch

    def native_chat(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int,
                    batch_size: int = 8) -> list[NativeReply]:
        """One greedy turn per (PIL image, prompt), batched with left padding; see the module doc."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if images:
            self.coordinate_frame((1, 1, 1))  # a family without native grounding says so before any work
        kwargs = self._generation_kwargs(max_new_tokens, False, 1.0, None)
        replies: list[NativeReply] = []
        for begin in range(0, len(images), batch_size):
            chunk_images = list(images[begin : begin + batch_size])
            texts = [self.native_prompt(p) for p in prompts[begin : begin + batch_size]]
            inputs = self._encode(chunk_images, texts)
            # As the published scripts decode: special tokens skipped, tokenization spaces cleaned up.
            answers = self._answers(inputs, kwargs, clean_up_tokenization_spaces=True)
            frames = [self.coordinate_frame(inputs["image_grid_thw"][row].tolist()) for row in range(len(answers))]
            replies.extend(NativeReply(text, frame) for text, frame in zip(answers, frames))
        return replies


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: the Qwen2-VL token layout (16 px patches merged 2x2), coordinates on 0..1000."""

    family = "qwen3_vl"

    def coordinate_frame(self, grid_thw: Sequence[int]) -> tuple[int, int]:
        return QWEN3_COORDINATE_FRAME

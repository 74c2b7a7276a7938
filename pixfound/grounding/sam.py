"""Segment Anything on point and box prompts, one image embedding per image.

:class:`SamSegmenter` wraps ``segment_anything.SamPredictor`` (it keeps the predictor and its
``ResizeLongestSide`` transform): set an image once (or set an embedding computed in a batch with
:meth:`SamSegmenter.embed_images`), then prompt it. All phrase points of an image go to SAM in one
``predict_torch``-style call with ``multimask_output=True``: three candidate masks per phrase, as
published.

Speed (same numbers as ``SamPredictor.predict_torch``, which stays the reference: see
:meth:`SamSegmenter.decode_reference`): the prompt encoder and mask decoder run once for all
prompts of an image, and the low-resolution logits are upscaled to the image a few prompts at a
time in channels-last layout. On the CPU that is about 4x faster than upscaling all masks in one
call (the intermediate ``img_size``² map of one prompt stays in cache), and bilinear
interpolation gives bitwise the same values in either memory layout.

``dtype="bfloat16"`` (or ``"float16"`` on a GPU) runs the image encoder and mask decoder under
``torch.autocast``; the weights stay float32 and the upscaling and the threshold run in float32.

:func:`load_sam` loads an official checkpoint (``vit_h``/``vit_l``/``vit_b``); :func:`tiny_sam` builds
a small random SAM from ``segment_anything.modeling`` parts for tests and offline runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pixfound.errors import MissingFileError, UserError
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SAM_DTYPES",
    "SAM_MODEL_TYPES",
    "ImageEmbedding",
    "SamSegmenter",
    "load_sam",
    "tiny_sam",
    "build_tiny_sam_model",
]

# Patch-embedding width of each official image encoder: tells which model a checkpoint holds.
SAM_MODEL_TYPES = {"vit_h": 1280, "vit_l": 1024, "vit_b": 768}
_CHECKPOINT_NAMES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"}
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
# Precisions the image encoder and mask decoder can run in (autocast; weights stay float32).
SAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompts whose masks are upscaled together on the CPU (cache-sized pieces; see the module doc).
_CPU_UPSCALE_PROMPTS = 1

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclasses.dataclass
class ImageEmbedding:
    """SAM's image-encoder output for one image, with the sizes the predictor needs."""

    features: torch.Tensor           # [1, C, h, w] on the model's device
    original_size: tuple[int, int]   # (H, W) of the image
    input_size: tuple[int, int]      # (H', W') after ResizeLongestSide, before padding


def _as_image(image: Any, name: str = "image") -> np.ndarray:
    """An RGB uint8 array [H, W, 3] from a NumPy array or a PIL image."""
    if not isinstance(image, np.ndarray) and hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        if isinstance(image, np.ndarray):
            desc = f"shape {tuple(image.shape)}, dtype {image.dtype}"
        else:
            desc = type(image).__name__
        raise ValueError(f"{name} must be an RGB uint8 array [H, W, 3] or a PIL image, got {desc}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(image.shape)}")
    return image


class SamSegmenter:
    """SAM with a predictor-style API: set one image, then prompt it with batched points or boxes.

    ``encoder_batch_size`` images go through the image encoder together in :meth:`embed_images`.
    ``prompt_batch_size=None`` sends all prompts of an image in a single decoder call; a number
    splits them into chunks of that size (to bound the memory of the full-size masks).
    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``) is the autocast precision of the
    encoder and decoder. Outputs are CPU tensors (masks and logits float32/bool).
    """

    def __init__(self, model: Any, *, model_type: str = "custom", checkpoint: Optional[str] = None,
                 encoder_batch_size: int = 4, prompt_batch_size: Optional[int] = None,
                 dtype: Union[str, torch.dtype] = "float32") -> None:
        from segment_anything import SamPredictor

        if encoder_batch_size < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {encoder_batch_size}")
        if prompt_batch_size is not None and prompt_batch_size < 1:
            raise ValueError(f"prompt_batch_size must be >= 1 or None, got {prompt_batch_size}")
        self.model = model.eval()
        self.predictor = SamPredictor(self.model)
        self.model_type = model_type
        self.checkpoint = checkpoint
        self.encoder_batch_size = int(encoder_batch_size)
        self.prompt_batch_size = prompt_batch_size
        self.dtype_name = _dtype_name(dtype)
        if self.dtype_name == "float16" and self.device.type == "cpu":
            raise UserError("dtype float16 needs a CUDA device for SAM; use bfloat16 on the CPU")

    # -- images ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image currently set."""
        self._require_image()
        return tuple(self.predictor.original_size)

    def describe(self) -> dict:
        """What to record with results: model type, checkpoint path (and the precision when not float32)."""
        info = {"model_type": self.model_type, "checkpoint": self.checkpoint,
                "img_size": int(self.model.image_encoder.img_size)}
        if self.dtype_name != "float32":
            info["dtype"] = self.dtype_name
        return info

    def _autocast(self) -> Any:
        """Autocast to the segmenter's precision (a no-op context for float32)."""
        if self.dtype_name == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=SAM_DTYPES[self.dtype_name])

    def _transform_image(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resized (long side = encoder size), normalised and padded input [3, S, S]; and its unpadded size."""
        resized = self.predictor.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
        return self.model.preprocess(tensor[None].float())[0], tuple(resized.shape[:2])

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any]) -> list[ImageEmbedding]:
        """Run the image encoder on ``images`` (RGB uint8 [H, W, 3] or PIL), ``encoder_batch_size`` at a time."""
        arrays = [_as_image(image, f"images[{i}]") for i, image in enumerate(images)]
        embeddings: list[ImageEmbedding] = []
        for first in range(0, len(arrays), self.encoder_batch_size):
            chunk = arrays[first:first + self.encoder_batch_size]
            inputs, input_sizes = zip(*(self._transform_image(image) for image in chunk))
            with self._autocast():
                features = self.model.image_encoder(torch.stack(inputs))
            for i, image in enumerate(chunk):
                embeddings.append(ImageEmbedding(features[i:i + 1].clone(), tuple(image.shape[:2]), input_sizes[i]))
        return embeddings

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make a precomputed image embedding the current image (what ``SamPredictor.set_image`` stores)."""
        self.predictor.reset_image()
        self.predictor.features = embedding.features.to(self.device)
        self.predictor.original_size = tuple(embedding.original_size)
        self.predictor.input_size = tuple(embedding.input_size)
        self.predictor.is_image_set = True

    def set_image(self, image: Any) -> None:
        """Encode one image (RGB uint8 [H, W, 3] or PIL) and make it current."""
        self.set_embedding(self.embed_images([image])[0])

    def _require_image(self) -> None:
        if not self.predictor.is_image_set:
            raise RuntimeError("no image is set: call set_image() or set_embedding() first")

    # -- prompts --------------------------------------------------------------------------------

    def _decode(self, points: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                boxes: Optional[torch.Tensor], multimask_output: bool, return_logits: bool,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        count = (points if points is not None else boxes).shape[0]
        step = self.prompt_batch_size or max(count, 1)
        masks, scores = [], []
        for first in range(0, count, step):
            part = slice(first, first + step)
            chunk_masks, chunk_scores = self._predict(
                points[part] if points is not None else None,
                labels[part] if labels is not None else None,
                boxes[part] if boxes is not None else None,
                multimask_output=multimask_output,
                return_logits=return_logits,
            )
            masks.append(chunk_masks)
            scores.append(chunk_scores)
        return torch.cat(masks), torch.cat(scores)

    def _predict(self, points: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                 boxes: Optional[torch.Tensor], *, multimask_output: bool, return_logits: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``SamPredictor.predict_torch`` (prompt encoder, mask decoder, upscale, threshold), upscaling in pieces."""
        model = self.model
        with self._autocast():
            sparse, dense = model.prompt_encoder(points=None if points is None else (points, labels), boxes=boxes,
                                                 masks=None)
            low_res, scores = model.mask_decoder(
                image_embeddings=self.predictor.features,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        low_res = low_res.float()
        step = _CPU_UPSCALE_PROMPTS if low_res.device.type == "cpu" else max(1, low_res.shape[0])
        pieces = []
        for first in range(0, low_res.shape[0], step):
            logits = self._upscale(low_res[first:first + step])
            pieces.append((logits if return_logits else logits > model.mask_threshold).contiguous().cpu())
        return torch.cat(pieces), scores.float().cpu()

    def _upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        """``Sam.postprocess_masks`` (bilinear to the encoder size, crop the padding, bilinear to the image)."""
        side = int(self.model.image_encoder.img_size)
        input_h, input_w = self.predictor.input_size
        logits = F.interpolate(low_res.contiguous(memory_format=torch.channels_last), (side, side),
                               mode="bilinear", align_corners=False)
        logits = logits[..., :input_h, :input_w]
        return F.interpolate(logits, tuple(self.predictor.original_size), mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def decode_reference(self, points: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                         boxes: Optional[torch.Tensor] = None, *, multimask_output: bool = True,
                         return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain ``SamPredictor.predict_torch`` call on prompts already in SAM's input frame (the reference)."""
        self._require_image()
        with self._autocast():
            masks, scores, _ = self.predictor.predict_torch(points, labels, boxes, multimask_output=multimask_output,
                                                             return_logits=return_logits)
        return (masks.float() if return_logits else masks).cpu(), scores.float().cpu()

    def prompt_coords(self, points: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated point prompts [G, P, 2] (x, y) in image pixels → SAM-frame coords float [G, P, 2] and labels.

        ``(-1, -1)`` marks a missing point (label -1, which SAM ignores); every row needs one valid point.
        """
        self._require_image()
        height, width = self.predictor.original_size
        coords = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points)
        if coords.ndim != 3 or coords.shape[2] != 2:
            raise ValueError(f"points must be [G, P, 2] (x, y), got shape {tuple(coords.shape)}")
        if coords.is_floating_point():
            raise ValueError(f"points must be integer pixel coordinates, got dtype {coords.dtype}")
        coords = coords.to("cpu", torch.int64)
        missing = (coords == -1).all(dim=2)
        inside = (coords[..., 0] >= 0) & (coords[..., 0] < width) & (coords[..., 1] >= 0) & (coords[..., 1] < height)
        bad = ~(missing | inside)
        if bad.any():
            g, p = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"points[{g}, {p}] = {coords[g, p].tolist()} is outside the {width}x{height} image "
                             "(use (-1, -1) for a missing point)")
        empty_rows = missing.all(dim=1)
        if empty_rows.any():
            raise ValueError(f"points row {int(empty_rows.nonzero()[0])} has no valid point")
        labels = torch.where(missing, -1, 1).to(self.device, torch.int)
        scaled = self.predictor.transform.apply_coords_torch(coords.float().to(self.device), (height, width))
        return scaled, labels

    @torch.inference_mode()
    def segment_points(self, points: ArrayLike, *, return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Three candidate masks per phrase from its point prompt(s).

        ``points``: int [G, P, 2] (x, y) in pixels of the current image; the P points of a phrase are
        all foreground clicks of one prompt, and ``(-1, -1)`` marks a missing point. Returns masks
        bool [G, 3, H, W] (float logits with ``return_logits``) and SAM scores float32 [G, 3].
        """
        self._require_image()
        height, width = self.predictor.original_size
        scaled, labels = self.prompt_coords(points)
        if scaled.shape[0] == 0:
            dtype = torch.float32 if return_logits else torch.bool
            return torch.zeros((0, 3, height, width), dtype=dtype), torch.zeros((0, 3), dtype=torch.float32)
        return self._decode(scaled, labels, None, multimask_output=True, return_logits=return_logits)

    @torch.inference_mode()
    def segment_boxes(self, boxes: ArrayLike, *, multimask_output: bool = False,
                      return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per box prompt: ``boxes`` float [N, 4] (x1, y1, x2, y2) in pixels of the current image.

        Returns masks bool [N, H, W] and scores float32 [N]. With ``multimask_output=True`` SAM
        predicts three candidates per box and the last one is kept (the published LLaVA baseline
        does that through ``SamPredictor.predict``'s default); otherwise the single mask.
        """
        self._require_image()
        height, width = self.predictor.original_size
        if not isinstance(boxes, torch.Tensor):
            boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32))
        box_tensor = boxes
        if box_tensor.ndim != 2 or box_tensor.shape[1] != 4:
            raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2), got shape {tuple(box_tensor.shape)}")
        box_tensor = box_tensor.to("cpu", torch.float32)
        if not torch.isfinite(box_tensor).all():
            raise ValueError(f"boxes must be finite, got {box_tensor.tolist()}")
        if box_tensor.shape[0] == 0:
            dtype = torch.float32 if return_logits else torch.bool
            return torch.zeros((0, height, width), dtype=dtype), torch.zeros((0,), dtype=torch.float32)
        scaled = self.predictor.transform.apply_boxes_torch(box_tensor.to(self.device), (height, width))
        masks, scores = self._decode(None, None, scaled, multimask_output=multimask_output,
                                     return_logits=return_logits)
        return masks[:, -1], scores[:, -1]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """``"bfloat16"`` for ``"bfloat16"``/``"bf16"``/``torch.bfloat16`` (also float32, float16)."""
    if isinstance(dtype, torch.dtype):
        for name, value in SAM_DTYPES.items():
            if value == dtype:
                return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower()) if isinstance(dtype, str) else None
    if name not in SAM_DTYPES:
        raise ValueError(f"SAM dtype must be one of {sorted(SAM_DTYPES)}, got {dtype!r}")
    return name


def _default_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_sam(model_type: str = "vit_h", checkpoint: Optional[Union[str, os.PathLike]] = None, *,
             device: Optional[Union[str, torch.device]] = None, **segmenter_options: Any) -> SamSegmenter:
    """A :class:`SamSegmenter` with official SAM weights.

    ``checkpoint`` is the ``.pth`` state dict of ``model_type`` (e.g. ``sam_vit_h_4b8939.pth``).
    A missing file raises FileNotFoundError; an unreadable file, or weights of another model type,
    raise ValueError; both name the path and the expected model type.
    """
    from segment_anything import sam_model_registry

    if model_type not in SAM_MODEL_TYPES:
        raise UserError(f"model_type must be one of {sorted(SAM_MODEL_TYPES)}, got {model_type!r}")
    expected = f"the {model_type} SAM checkpoint (officially {_CHECKPOINT_NAMES[model_type]})"
    if checkpoint is None:
        raise UserError(f"load_sam needs checkpoint=PATH to {expected}; tiny_sam() builds a random test model")
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise MissingFileError(f"SAM checkpoint not found: {path!r} (expected {expected})")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated download, a non-torch file, a pickle with code in it
        raise UserError(f"SAM checkpoint {path!r} could not be read as {expected}: "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get(_PATCH_KEY), torch.Tensor):
        raise UserError(f"SAM checkpoint {path!r} is not a SAM state dict (no {_PATCH_KEY!r}); expected {expected}")
    width = int(state_dict[_PATCH_KEY].shape[0])
    if width != SAM_MODEL_TYPES[model_type]:
        found = [name for name, dim in SAM_MODEL_TYPES.items() if dim == width]
        raise ValueError(f"SAM checkpoint {path!r} holds a {found[0] if found else f'width-{width}'} image encoder, "
                         f"but model_type is {model_type!r}; expected {expected}")
    model = sam_model_registry[model_type]()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"SAM checkpoint {path!r} does not fit {model_type}: {err}") from err
    return SamSegmenter(model.to(_default_device(device)).eval(), model_type=model_type, checkpoint=path,
                        **segmenter_options)


@functools.lru_cache(maxsize=None)
def _tiny_state(seed: int) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_tiny_sam_model().state_dict()


def build_tiny_sam_model() -> Any:
    """A ~0.1M-parameter SAM (256-pixel input, 2-block ViT, width 32) with fresh random weights."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img_size, patch, width = 256, 16, 32
    grid = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch, embed_dim=width, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=width, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=8),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=64, num_heads=2),
            transformer_dim=width, iou_head_depth=2, iou_head_hidden_dim=32,
        ),
    ).eval()


def tiny_sam(seed: int = 0, device: Optional[Union[str, torch.device]] = "cpu",
             **segmenter_options: Any) -> SamSegmenter:
    """A :class:`SamSegmenter` around a tiny random SAM; the same seed gives the same weights."""
    model = build_tiny_sam_model()
    model.load_state_dict(_tiny_state(int(seed)))
    return SamSegmenter(model.to(_default_device(device)).eval(), model_type="tiny", checkpoint=None,
                        **segmenter_options)

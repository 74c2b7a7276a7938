"""MLLM adapters: load a checkpoint (or build a tiny random one) and get a family adapter.

``load_model(name_or_path)`` accepts a local checkpoint directory, a Hugging Face hub id that
is in the local hub cache (or downloadable when online), or one of the tiny names of
:data:`TINY_MODELS`. The family comes from the checkpoint's ``config.model_type``.
"""
from __future__ import annotations

import os
import pathlib
from pixfound.errors import MissingFileError, UserError
from typing import Any, Optional, Union

import torch

from pixfound.models.base import (
    Generation,
    ImageGeometry,
    ImageTokenLayout,
    PreparedBatch,
    VisionLanguageAdapter,
    image_token_span,
)

__all__ = [
    "FAMILIES",
    "KNOWN_CHECKPOINTS",
    "Generation",
    "ImageGeometry",
    "ImageTokenLayout",
    "PreparedBatch",
    "TINY_MODELS",
    "VisionLanguageAdapter",
    "image_token_span",
    "load_model",
    "tiny_model",
]

# config.model_type -> (adapter family, transformers model class name)
FAMILIES: dict[str, tuple[str, str]] = {
    "llava": ("llava", "LlavaForConditionalGeneration"),
    "llava_next": ("llava_next", "LlavaNextForConditionalGeneration"),
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
    # Not a transformers class: pixfound.models.cambrian builds it from the published architecture.
    "cambrian_llama": ("cambrian", "CambrianForCausalLM"),
}
# name accepted by load_model -> tiny family
TINY_MODELS: dict[str, str] = {
    "tiny-llava": "llava",
    "tiny-llava-next": "llava_next",
    "tiny-qwen2-vl": "qwen2_vl",
    "tiny-qwen2.5-vl": "qwen2_5_vl",
    "tiny-qwen3-vl": "qwen3_vl",
    "tiny-cambrian": "cambrian_llama",
}
# Checkpoints the adapters were written for (named in error messages).
KNOWN_CHECKPOINTS = (
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/llava-1.5-13b-hf",
    "llava-hf/llava-v1.6-vicuna-7b-hf",
    "Qwen/Qwen2-VL-7B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen/Qwen3-VL-8B-Instruct",
    "nyu-visionx/cambrian-8b",
)


def _adapter_class(family: str) -> type:
    if family == "llava":
        from pixfound.models.llava import LlavaAdapter

        return LlavaAdapter
    if family == "llava_next":
        from pixfound.models.llava import LlavaNextAdapter

        return LlavaNextAdapter
    if family == "qwen2_vl":
        from pixfound.models.qwen2_vl import Qwen2VLAdapter

        return Qwen2VLAdapter
    if family == "qwen3_vl":
        from pixfound.models.qwen2_vl import Qwen3VLAdapter

        return Qwen3VLAdapter
    if family == "cambrian":
        from pixfound.models.cambrian import CambrianAdapter

        return CambrianAdapter
    supported = sorted({f for f, _ in FAMILIES.values()})
    raise UserError(f"no adapter for model family {family!r}; supported: {supported}")


def tiny_model(family: str, seed: int = 0) -> VisionLanguageAdapter:
    """A tiny random-weight model of ``family`` ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
    "cambrian"; or a name of :data:`TINY_MODELS`), fp32 on CPU.

    Deterministic for a given ``seed``; built in code, nothing is downloaded.
    """
    from pixfound.models.tiny import TINY_BUILDERS

    key = TINY_MODELS.get(family, family).replace("-", "_").replace(".", "_")
    if key not in TINY_BUILDERS:
        raise UserError(f"no tiny model for family {family!r}; choose one of {sorted(TINY_BUILDERS)}")
    return TINY_BUILDERS[key](seed)


def _default_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "0").lower() in ("1", "true", "yes") for name in flags)


def _hub_host() -> str:
    import urllib.parse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return urllib.parse.urlsplit(endpoint).hostname or "huggingface.co"


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def _resolve(name_or_path: str) -> tuple[str, Any, bool]:
    """(where to load from, its config, local_files_only) with clear errors when it cannot be found."""
    from transformers import AutoConfig

    from pixfound.models.cambrian import register_with_transformers

    register_with_transformers()  # AutoConfig reads the model types that pixfound builds itself

    if _looks_like_path(name_or_path):
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_dir():
            raise MissingFileError(f"model directory not found: {path}")
        if not (path / "config.json").is_file():
            raise MissingFileError(f"{path} holds no config.json; is it a Hugging Face checkpoint directory?")
        return str(path), AutoConfig.from_pretrained(str(path)), True
    try:
        return name_or_path, AutoConfig.from_pretrained(name_or_path, local_files_only=True), True
    except (OSError, ValueError) as cached_error:
        hint = (
            f"Download it first, with network access: `hf download {name_or_path}`, or pass a local "
            f"checkpoint directory. Supported checkpoints include "
            + ", ".join(KNOWN_CHECKPOINTS)
            + "; offline tiny models: " + ", ".join(TINY_MODELS) + "."
        )
        if _offline():
            raise MissingFileError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and the hub is offline "
                f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set). {hint}"
            ) from cached_error
        host = _hub_host()
        if not _reachable(host):
            # Without this check transformers retries for about half a minute before giving up.
            raise MissingFileError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and {host} cannot be reached. {hint}"
            ) from cached_error
        try:
            return name_or_path, AutoConfig.from_pretrained(name_or_path), False
        except (OSError, ValueError) as hub_error:
            raise MissingFileError(
                f"could not find or download model {name_or_path!r} ({hub_error}). {hint}"
            ) from hub_error


def load_model(
    name_or_path: str,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    **adapter_options: Any,
) -> VisionLanguageAdapter:
    """Load a checkpoint (local path, hub id, or tiny name) and wrap it in its family adapter.

    Args:
        name_or_path: checkpoint directory, hub id (e.g. ``llava-hf/llava-1.5-7b-hf``,
            ``Qwen/Qwen2-VL-7B-Instruct``), or ``tiny-llava`` / ``tiny-llava-next`` / ``tiny-qwen2-vl``.
        device: default CUDA when available, else CPU.
        dtype: default bfloat16 on CUDA, float32 on CPU.
        adapter_options: passed to the adapter (e.g. ``system_prompt``, ``pad_to_square`` for LLaVA);
            for Cambrian, ``tower_paths`` maps a tower (``siglip``, ``clip``, ``dinov2``, ``convnext``, or its
            published name) to the folder of its released weights (default: the Hugging Face cache).

    Raises:
        FileNotFoundError: the checkpoint is neither local nor in the cache (and cannot be downloaded).
        ValueError: the checkpoint's ``model_type`` has no adapter.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a non-empty str, got {name_or_path!r}")
    target = _default_device(device)
    if name_or_path.startswith("tiny-") and name_or_path not in TINY_MODELS:
        raise UserError(f"unknown tiny model {name_or_path!r}; choose one of {', '.join(TINY_MODELS)}")
    if name_or_path in TINY_MODELS:
        adapter = tiny_model(TINY_MODELS[name_or_path])
        adapter.model.to(device=target, dtype=dtype or torch.float32)
        return adapter
    where, config, local_only = _resolve(name_or_path)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"no adapter for model type {model_type!r} (from {name_or_path!r}); supported model types: "
            f"{sorted(FAMILIES)}"
        )
    family, class_name = FAMILIES[model_type]
    import transformers

    if dtype is None:
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    if family == "cambrian":
        from pixfound.models.cambrian import load_cambrian

        model, processor = load_cambrian(where, dtype=dtype, local_only=local_only,
                                         tower_paths=adapter_options.pop("tower_paths", None))
    else:
        model_class = getattr(transformers, class_name)
        model = model_class.from_pretrained(where, dtype=dtype, attn_implementation="sdpa",
                                            local_files_only=local_only)
        processor = transformers.AutoProcessor.from_pretrained(where, local_files_only=local_only)
    model.to(target)
    return _adapter_class(family)(model, processor, name=name_or_path, **adapter_options)

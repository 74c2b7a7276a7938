"""Per-token image attention of a generating MLLM (fused capture and the published reference)."""
from __future__ import annotations

from pixfound.attention.probe import (
    FUSED_ATTENTION,
    ImageAttentionCapture,
    fused_attention_forward,
    reference_step_maps,
    register_fused_attention,
    text_attention_implementation,
    token_maps,
)

__all__ = [
    "FUSED_ATTENTION",
    "ImageAttentionCapture",
    "fused_attention_forward",
    "reference_step_maps",
    "register_fused_attention",
    "text_attention_implementation",
    "token_maps",
]

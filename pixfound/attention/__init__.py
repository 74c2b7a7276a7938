"""Per-token image attention of a generating MLLM (fused capture and the published reference)."""
from __future__ import annotations

from pixfound.attention.probe import (
    FIRST_TOKEN_ROWS,
    FUSED_ATTENTION,
    ImageAttentionCapture,
    KeyRanges,
    KeyRangeTracker,
    StepMapSink,
    fused_attention_forward,
    reference_step_maps,
    register_fused_attention,
    text_attention_implementation,
    token_maps,
)

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

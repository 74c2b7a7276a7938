"""From attention maps to masks.

- :mod:`.phrases`: noun phrases of the answer, their tokens, one map per phrase;
- :mod:`.points`: upsample each phrase map to the image and take its peak(s) as point prompts;
- :mod:`.sam`: Segment Anything, one embedding per image, all points in one batched prompt;
- :mod:`.select`, :mod:`.similarity`: choosing one mask among the candidates;
- :mod:`.baseline`: the box-prompt simple baseline.

Names are imported lazily (spaCy, segment-anything and the compiled core load on first use).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Phrase": "phrases",
    "load_spacy": "phrases",
    "spacy_pipeline_info": "phrases",
    "token_char_spans": "phrases",
    "extract_phrases": "phrases",
    "assign_tokens": "phrases",
    "phrase_maps": "phrases",
    "phrases_from_generation": "phrases",
    "phrase_points": "points",
    "upsample_phrase_maps": "points",
    "SamSegmenter": "sam",
    "ImageEmbedding": "sam",
    "load_sam": "sam",
    "tiny_sam": "sam",
    "box_prompt": "baseline",
    "parse_boxes": "baseline",
    "baseline_mask": "baseline",
    "BaselineResult": "baseline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

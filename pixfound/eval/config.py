"""The settings of one evaluation run: :class:`EvalConfig`, their parsing and validation, in one place.

The command line builds its ``eval`` flags from these fields (:mod:`pixfound.cli`), so a setting's
name, default, choices and help live only here.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from pixfound.models.base import KV_CACHES

__all__ = [
    "ANSWER_PROTOCOLS",
    "EvalConfig",
    "GROUNDING_PROTOCOLS",
    "IDENTITY_EXEMPT",
    "KERNEL_BACKENDS",
    "PROTOCOLS",
    "STRATEGIES",
    "parse_protocols",
    "parse_selects",
    "parse_shard",
]

PROTOCOLS = (1, 2, 3)
STRATEGIES = ("oracle", "similarity", "judge")
GROUNDING_PROTOCOLS = (1, 3)
ANSWER_PROTOCOLS = (1, 2)

# Settings that do not change any record: a resumed run may change them.
# Backends of the capture kernel; "cpp" (float32 CPU only) leaves the upsample+peak op on torch.
KERNEL_BACKENDS = ("auto", "triton", "cpp", "torch")

IDENTITY_EXEMPT = frozenset(
    # kv_cache only changes where the keys are stored: the same answers, maps equal up to float rounding.
    # overlap only changes which thread runs the grounding stage: the same records.
    {"output", "resume", "batch_size", "sam_batch_size", "limit", "shard", "progress", "judge_base_url", "kv_cache",
     "overlap"}
)



# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalConfig:
    """Every setting of one evaluation run (what ``pixfound eval`` flags resolve to).

    ``device``/``dtype`` ``"auto"`` resolve to CUDA + float16 when a GPU is visible, else CPU +
    float32 (:meth:`resolved`). ``selects`` lists mask-selection strategies; ``judge`` is
    ``"none"``, ``"openai:MODEL"`` or ``"hf:MODEL"``. Templates are 1-based indices into the
    published lists (or ``None`` for the default prompts).
    """

    model: str = "tiny-llava"
    benchmark: str = "synthetic"
    data_root: Optional[str] = None
    strict: bool = False
    synthetic_n: int = 16
    synthetic_seed: int = 0
    limit: Optional[int] = None
    protocols: tuple[int, ...] = PROTOCOLS
    capture: str = "fused"
    selects: tuple[str, ...] = ("oracle", "similarity")
    judge: str = "none"
    judge_base_url: Optional[str] = None
    sam_model: str = "tiny"
    sam_checkpoint: Optional[str] = None
    sam_seed: int = 0
    sam_batch_size: int = 1
    sam_dtype: str = "float32"  # autocast precision of the SAM encoder and decoder: float32, bfloat16, float16
    spacy_pipeline: Optional[str] = None
    phrase_vectors: str = "auto"
    batch_size: int = 4
    max_new_tokens: int = 32
    seed: int = 0
    do_sample: bool = False
    temperature: float = 0.2
    first_token_row: str = "second_to_last"
    point_rank: int = 1
    num_points: int = 1
    kernel_backend: str = "auto"
    share_image_prefix: bool = False  # prefill system prompt + image once per image for all protocols
    cudnn_attention: bool = False  # on CUDA, let SDPA use cuDNN while generating (a plan per new shape)
    kv_cache: str = "preallocated"  # key/value storage while generating: preallocated or dynamic (same values)
    overlap: bool = False  # ground one batch in a second thread while the next generates (same records)
    vqa_template: Optional[int] = None
    grounding_template: Optional[Union[int, str]] = None  # index, or a custom phrasing with one {}
    device: str = "auto"
    dtype: str = "auto"
    save_candidates: bool = True
    output: Optional[str] = None
    resume: bool = False
    shard: Optional[tuple[int, int]] = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.protocols = tuple(self.protocols)
        self.selects = tuple(self.selects)
        if self.shard is not None:
            self.shard = tuple(self.shard)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        if not self.protocols or any(p not in PROTOCOLS for p in self.protocols):
            raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols}")
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"protocols repeat a value: {self.protocols}")
        if any(s not in STRATEGIES for s in self.selects):
            raise ValueError(f"--select values must be among {STRATEGIES}, got {self.selects}")
        if "judge" in self.selects and self.judge.strip().lower() in ("", "none"):
            raise ValueError("--select judge needs a judge: pass --judge openai:MODEL or --judge hf:MODEL")
        if self.sam_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"sam_dtype must be 'float32', 'bfloat16' or 'float16', got {self.sam_dtype!r}")
        if self.capture not in ("fused", "reference"):
            raise ValueError(f"capture must be 'fused' or 'reference', got {self.capture!r}")
        for name in ("batch_size", "max_new_tokens", "sam_batch_size", "synthetic_n", "point_rank", "num_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive integer, got {self.limit!r}")
        if self.first_token_row not in ("second_to_last", "last"):
            raise ValueError(f"first_token_row must be 'second_to_last' or 'last', got {self.first_token_row!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be true or false, got {self.overlap!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.vqa_template is not None and (isinstance(self.vqa_template, bool) or not isinstance(self.vqa_template, int)):
            raise ValueError(f"vqa_template must be a 1-based template index, got {self.vqa_template!r}")
        if self.grounding_template is not None and not isinstance(self.grounding_template, (int, str)):
            raise ValueError(f"grounding_template must be an index or a phrasing with one {{}}, got {self.grounding_template!r}")
        if self.shard is not None:
            index, count = self.shard
            if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
                raise ValueError(f"shard must be I/N with 0 <= I < N, got {self.shard}")

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (tuples become lists)."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "EvalConfig":
        """Inverse of :meth:`to_dict` (unknown keys are an error naming them)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        values = dict(data)
        for key in ("protocols", "selects", "shard"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def identity(self) -> dict:
        """The settings a resumed run must share with the original (see :data:`IDENTITY_EXEMPT`)."""
        return {k: v for k, v in self.to_dict().items() if k not in IDENTITY_EXEMPT}

    def resolved(self) -> "EvalConfig":
        """A copy with ``device``/``dtype`` ``"auto"`` replaced by what will actually be used."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16, bfloat16 or auto, got {self.dtype!r}")
        return dataclasses.replace(self, device=device, dtype=dtype)

    @property
    def parse_style(self) -> str:
        """Answer-parsing rule of the benchmark: CV-Bench's or MMVP's."""
        return "cvbench" if self.benchmark == "pixcvbench" else "mmvp"

    @property
    def uses_random_weights(self) -> bool:
        return self.model.startswith("tiny-") or self.sam_model == "tiny"


def parse_protocols(text: Union[str, Sequence[int]]) -> tuple[int, ...]:
    """``"1,2,3"`` → ``(1, 2, 3)``; a clear ValueError for anything but 1, 2 and 3."""
    if isinstance(text, str):
        pieces = [p.strip() for p in text.split(",") if p.strip()]
    else:
        pieces = list(text)
    if not pieces:
        raise ValueError(f"--protocol needs at least one of 1, 2, 3 (comma separated), got {text!r}")
    values = []
    for piece in pieces:
        try:
            value = int(piece)
        except (TypeError, ValueError):
            raise ValueError(f"--protocol value {piece!r} is not one of 1, 2, 3 (comma separated, e.g. 1,2,3)") from None
        if value not in PROTOCOLS:
            raise ValueError(f"--protocol value {value} is not one of 1, 2, 3")
        if value in values:
            raise ValueError(f"--protocol lists {value} twice in {text!r}")
        values.append(value)
    return tuple(sorted(values))


def parse_selects(text: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"oracle,similarity"`` → ``("oracle", "similarity")``, in the canonical strategy order."""
    pieces = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not pieces:
        raise ValueError(f"--select needs at least one of {', '.join(STRATEGIES)}, got {text!r}")
    unknown = [p for p in pieces if p not in STRATEGIES]
    if unknown:
        raise ValueError(f"--select values {unknown} are unknown; choose among {', '.join(STRATEGIES)}")
    return tuple(s for s in STRATEGIES if s in pieces)


def parse_shard(text: str) -> tuple[int, int]:
    """``"0/4"`` → ``(0, 4)``: job ``I`` (0-based) of ``N``."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except (AttributeError, ValueError):
        raise ValueError(f"--shard must be I/N (e.g. 0/4, I counted from 0), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return index, count

"""End to end: the published recipe vs pixfound ``--reference`` vs ``--fused``, and plain generation.

The same samples (the synthetic benchmark at a chosen image size) and the same random-weight
model go through four pipelines:

* ``published``: the published PixFoundation recipe, one image at a time: batch-1 ``generate``
  with eager attention and ``output_attentions`` (the reference capture), phrases, one
  ``F.interpolate`` (bicubic) + crop + ``argmax`` per phrase, ``SamPredictor.set_image`` per
  (image, protocol) and one ``SamPredictor.predict`` per phrase point, every candidate mask
  written as a PNG file (the published selection step reads them back), oracle IoU in NumPy
  (:func:`pixfound.grounding.select.oracle_ious_reference`), similarity with one uncached
  phrase-vector call per answer;
* ``reference`` / ``fused``: pixfound's :class:`pixfound.eval.pipeline.GroundingPipeline` run by
  :func:`pixfound.eval.runner.compute_records` (batches, JSONL records on disk), with
  ``--reference`` or ``--fused`` capture;
* ``plain``: ``adapter.generate`` with SDPA and no capture, the same prompts and batches: the
  limit for the generate stage.

:func:`measure` runs each pipeline in a fresh subprocess (peak host memory, ``VmHWM``, only grows
within a process; ``torch.cuda.max_memory_allocated`` on a GPU), best of ``rounds`` interleaved
rounds for the wall time, and returns one row per pipeline: images/s, the stage breakdown
(generate, capture, phrases, upsample+peak, SAM encoder, SAM decoder, selection, I/O, other),
peak memory, optionally the largest batch that fits, and the checks that the fused run's answers
and masks equal the reference run's. :func:`format_table` prints them.

The ``capture`` stage is the part of capture that runs after ``generate`` returns (gathering the
maps); the part inside the attention layers cannot be separated from ``generate`` without
synchronising, so the capture overhead is reported as the generate stage of ``fused`` over that
of ``plain``, measured side by side.

Command line (prints the table; ``--json`` keeps every number)::

    python benchmarks/pipeline_bench.py --size tiny
    python benchmarks/pipeline_bench.py --size medium --image-hw 480x640 --rounds 1

Importing this module is cheap (no torch, transformers or SAM until a function needs them);
``benchmarks/gpu_bench.py`` imports it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PIPELINES = ("published", "reference", "fused", "plain")
# Table columns (seconds summed over the run) in pipeline order.
STAGES = ("generate", "capture", "phrases", "upsample_peak", "sam_encoder", "sam_decoder", "selection", "io", "other")
STAGE_TITLES = {"generate": "generate", "capture": "capture", "phrases": "phrases", "upsample_peak": "upsample+peak",
                "sam_encoder": "SAM enc", "sam_decoder": "SAM dec", "selection": "selection", "io": "I/O",
                "other": "other"}
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A random LLaVA-1.5 text model size (``pixfound.models.tiny.build_random_llava``)."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: Optional[int]
    image_size: int  # vision input side; (image_size // patch_size)² image tokens
    patch_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


MODEL_SIZES = {
    # pixfound.models.tiny.tiny_llava: what `pixfound eval` runs offline by default (25 image tokens)
    "tiny": ModelSize("tiny", layers=3, heads=4, kv_heads=2, hidden=64, intermediate=None, image_size=40,
                      patch_size=8),
    # issue 3's CPU setting: 8 layers x 8 heads x 512 hidden, LLaVA-1.5's 576 image tokens
    "medium": ModelSize("medium", layers=8, heads=8, kv_heads=8, hidden=512, intermediate=2048, image_size=336,
                        patch_size=14),
    # LLaVA-1.5-7B's text model (the vision tower of build_random_llava stays small); ~28 GB in fp32 while built
    "llava-1.5-7b": ModelSize("llava-1.5-7b", layers=32, heads=32, kv_heads=32, hidden=4096, intermediate=11008,
                              image_size=336, patch_size=14),
}
SAM_KINDS = ("tiny", "vit_b", "vit_l", "vit_h")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Everything that defines one end-to-end measurement (JSON-serialisable)."""

    size: str = "tiny"
    samples: int = 8                      # synthetic samples (even); all protocols run on each
    batch_size: int = 8                   # pixfound and plain generation (the published recipe is batch 1)
    max_new_tokens: int = 32
    protocols: tuple[int, ...] = (1, 3)   # the grounding protocols
    selects: tuple[str, ...] = ("oracle", "similarity")
    image_hw: tuple[int, int] = (96, 128)  # synthetic image (H, W); the CLI default is 96x128
    sam: str = "tiny"                     # tiny, or vit_b / vit_l / vit_h with random weights
    sam_dtype: str = "float32"            # autocast precision of the SAM encoder and decoder (pixfound runs)
    sam_batch_size: Optional[int] = None  # images per SAM encoder call (pixfound runs); None = batch_size
    device: str = "cpu"
    dtype: str = "float32"                # model weights; float16/bfloat16 on a GPU
    threads: int = 1                      # torch CPU threads (1: repeatable on a shared machine)
    seed: int = 0
    phrase_vectors: str = "auto"
    share_image_prefix: bool = False      # pixfound and plain: prefix (system prompt + image) once per image
    kv_cache: str = "preallocated"        # pixfound and plain (the published recipe: transformers' dynamic cache)
    overlap: bool = False                 # pixfound: ground each batch in a second thread beside the next generate

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocols", tuple(int(p) for p in self.protocols))
        object.__setattr__(self, "selects", tuple(self.selects))
        object.__setattr__(self, "image_hw", tuple(int(v) for v in self.image_hw))
        if self.size not in MODEL_SIZES:
            raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {self.size!r}")
        if self.sam not in SAM_KINDS:
            raise ValueError(f"sam must be one of {SAM_KINDS}, got {self.sam!r}")
        if self.samples < 2 or self.samples % 2:
            raise ValueError(f"samples must be an even number >= 2 (synthetic pairs), got {self.samples}")
        for name in ("batch_size", "max_new_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.protocols or any(p not in (1, 2, 3) for p in self.protocols):
            raise ValueError(f"protocols must be among 1, 2, 3, got {self.protocols}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchSettings":
        return cls(**data)

    @property
    def kernel_backend(self) -> str:
        # On the CPU the C++ capture path runs (what `pixfound eval` picks there), torch for non-fp32:
        # Triton's interpreter, which benchmark sessions enable, is a test tool, not a speed path.
        if self.device.startswith("cuda"):
            return "auto"
        return "cpp" if self.dtype == "float32" else "torch"


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def build_adapter(size: str | ModelSize, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> Any:
    """A random-weight LLaVA-1.5 adapter of ``size`` (a :data:`MODEL_SIZES` key or a :class:`ModelSize`)."""
    import torch

    from pixfound.eval.pipeline import torch_dtype
    from pixfound.models.tiny import build_random_llava

    spec = MODEL_SIZES[size] if isinstance(size, str) else size
    adapter = build_random_llava(
        seed, text_layers=spec.layers, hidden_size=spec.hidden, num_heads=spec.heads, num_kv_heads=spec.kv_heads,
        intermediate_size=spec.intermediate, image_size=spec.image_size, patch_size=spec.patch_size,
        name=f"random-llava-{spec.name}",
    )
    adapter.model.to(device=torch.device(device), dtype=torch_dtype(dtype))
    return adapter


def build_segmenter(kind: str = "tiny", *, device: str = "cpu", seed: int = 0, dtype: str = "float32",
                    encoder_batch_size: int = 8) -> Any:
    """A SAM segmenter with random weights: ``tiny`` (pixfound's test SAM) or an official architecture.

    ``vit_b`` / ``vit_l`` / ``vit_h`` are built from segment-anything's configs with
    ``checkpoint=None`` (default initialisation, seeded), so they cost what the real model costs
    but their masks mean nothing.
    """
    import torch

    from pixfound.grounding.sam import SamSegmenter, tiny_sam

    if kind == "tiny":
        return tiny_sam(seed, device=device, encoder_batch_size=encoder_batch_size, dtype=dtype)
    if kind not in SAM_KINDS:
        raise ValueError(f"kind must be one of {SAM_KINDS}, got {kind!r}")
    from segment_anything import sam_model_registry

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = sam_model_registry[kind](checkpoint=None)
    return SamSegmenter(model.to(device).eval(), model_type=f"{kind}-random", checkpoint=None,
                        encoder_batch_size=encoder_batch_size, dtype=dtype)


def make_samples(count: int, image_hw: Sequence[int] = (96, 128), seed: int = 0) -> list:
    """The first ``count`` samples of the synthetic benchmark at ``image_hw`` (H, W)."""
    from pixfound.data import load_benchmark

    return list(load_benchmark("synthetic", n=int(count), seed=seed, size=tuple(image_hw)))


@dataclasses.dataclass
class Components:
    """What every pipeline shares: model adapter, SAM, spaCy and the raw phrase-vector backend."""

    adapter: Any
    segmenter: Any
    nlp: Any
    vectors: Any = None


def build_components(settings: BenchSettings) -> Components:
    """Build the model, SAM, spaCy and phrase vectors that ``settings`` names."""
    from pixfound.grounding.phrases import load_spacy

    adapter = build_adapter(settings.size, device=settings.device, dtype=settings.dtype, seed=settings.seed)
    segmenter = build_segmenter(settings.sam, device=settings.device, seed=settings.seed,
                                encoder_batch_size=settings.sam_batch_size or settings.batch_size)
    nlp = load_spacy()
    vectors = None
    if "similarity" in settings.selects:
        from pixfound.grounding.similarity import load_phrase_vectors

        vectors = load_phrase_vectors(settings.phrase_vectors, nlp=nlp, device="cpu")
    return Components(adapter, segmenter, nlp, vectors)


# ------------------------------------------------------------------------------------------------
# one run of each pipeline
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    """One pipeline's pass over the samples: wall time, stage totals (s) and a signature per record."""

    pipeline: str
    batch_size: int
    images: int
    wall_s: float
    stages: dict
    records: list  # per (sample, protocol): key, answer, token_ids, points, candidates (RLE), selections

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return dict(pipeline=self.pipeline, batch_size=self.batch_size, images=self.images, wall_s=self.wall_s,
                    images_per_s=self.images_per_s, stages=self.stages, records=self.records)


def _sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _grounding_protocols(sample: Any, protocols: Sequence[int]) -> list[int]:
    from pixfound.eval.records import applicable_protocols

    return applicable_protocols(sample, protocols)


def published_point(phrase_map: Any, geometry: Any) -> tuple[int, int]:
    """The published point of one phrase map: bicubic ``F.interpolate`` to the fit frame, crop, ``argmax``."""
    import torch.nn.functional as F

    from pixfound.grounding.points import upsample_frame

    (height, width), aspect, (x_offset, y_offset) = upsample_frame(geometry)
    frame = max(height, width) if aspect == "pad" else None
    size = (frame, frame) if frame is not None else (height, width)
    up = F.interpolate(phrase_map.float()[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
    if frame is not None:
        top, left = (frame - height) // 2, (frame - width) // 2
        up = up[top:top + height, left:left + width]
    flat = int(up.reshape(-1).argmax())
    return flat % width + x_offset, flat // width + y_offset


def run_published_recipe(samples: Sequence[Any], adapter: Any, segmenter: Any, *, nlp: Any, vectors: Any = None,
                         protocols: Sequence[int] = (1, 3), selects: Sequence[str] = ("oracle", "similarity"),
                         max_new_tokens: int = 32, mask_dir: Optional[str | os.PathLike] = None) -> RunResult:
    """The published recipe, one (image, protocol) at a time (see the module docstring).

    ``segmenter`` is a :class:`pixfound.grounding.sam.SamSegmenter`; only its model is used, through a
    plain ``SamPredictor`` in float32. Candidate PNGs go to ``mask_dir`` (a temporary folder by default).
    """
    from PIL import Image
    from segment_anything import SamPredictor

    from pixfound.eval import metrics
    from pixfound.eval.prompts import build_prompt
    from pixfound.eval.records import record_key
    from pixfound.grounding.phrases import phrases_from_generation
    from pixfound.grounding.select import SIMILARITY_THRESHOLD, mask_to_rle, oracle_ious_reference
    from pixfound.grounding.similarity import cosine_similarities, normalize_phrase

    if "similarity" in selects and vectors is None:
        raise ValueError("selection 'similarity' needs phrase vectors")
    predictor = SamPredictor(segmenter.model)
    device = adapter.device
    stages = dict.fromkeys(STAGES, 0.0)
    records = []
    with contextlib.ExitStack() as stack:
        folder = pathlib.Path(mask_dir) if mask_dir is not None else pathlib.Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="pixfound-published-")))
        folder.mkdir(parents=True, exist_ok=True)
        _sync(device)
        wall_started = time.perf_counter()
        for protocol in protocols:
            for sample in samples:
                if protocol not in _grounding_protocols(sample, protocols):
                    continue
                started = time.perf_counter()
                image = sample.load_image()
                gt = np.asarray(sample.gt_mask, dtype=bool)
                stages["io"] += time.perf_counter() - started

                started = time.perf_counter()
                (generation,) = adapter.generate([sample], [build_prompt(sample, protocol)],
                                                 max_new_tokens=max_new_tokens, capture="reference", batch_size=1,
                                                 kv_cache="dynamic")
                _sync(device)
                stages["generate"] += time.perf_counter() - started
                stages["capture"] += generation.timings.get("capture_s") or 0.0

                started = time.perf_counter()
                phrases, maps = phrases_from_generation(generation, adapter.tokenizer, nlp)
                stages["phrases"] += time.perf_counter() - started

                started = time.perf_counter()
                points = [published_point(maps[g], generation.geometry) for g in range(len(phrases))]
                stages["upsample_peak"] += time.perf_counter() - started

                started = time.perf_counter()
                candidates, scores = [], []
                if phrases:
                    predictor.set_image(np.asarray(image))
                    _sync(device)
                    stages["sam_encoder"] += time.perf_counter() - started
                    started = time.perf_counter()
                    for x, y in points:
                        masks, mask_scores, _ = predictor.predict(point_coords=np.array([[x, y]], dtype=np.float64),
                                                                  point_labels=np.array([1]), multimask_output=True)
                        candidates.extend(masks)
                        scores.append(mask_scores)
                    stages["sam_decoder"] += time.perf_counter() - started
                else:
                    stages["sam_encoder"] += time.perf_counter() - started

                started = time.perf_counter()
                for g in range(len(phrases)):
                    for k in range(3):
                        Image.fromarray(candidates[3 * g + k].astype(np.uint8) * 255).save(
                            folder / f"{sample.id}_p{protocol}_{g:03d}_{k:03d}.png")
                stages["io"] += time.perf_counter() - started

                started = time.perf_counter()
                empty = np.zeros(gt.shape, dtype=bool)
                chosen: dict[str, np.ndarray] = {}
                if "oracle" in selects:
                    if not gt.any() or not candidates:
                        chosen["oracle"] = empty
                    else:
                        ious = oracle_ious_reference(np.stack(candidates), gt)
                        chosen["oracle"] = candidates[int(np.argmax(ious))]
                if "similarity" in selects:
                    if sample.expression is None or not phrases:
                        chosen["similarity"] = empty
                    else:
                        texts = [normalize_phrase(sample.expression)] + [normalize_phrase(p.text) for p in phrases]
                        vecs = np.asarray(vectors.encode(texts))
                        sims = cosine_similarities(vecs[0], vecs[1:])
                        best = int(np.argmax(sims))
                        if sims[best] < SIMILARITY_THRESHOLD:
                            chosen["similarity"] = empty
                        else:
                            order = sorted(range(3), key=lambda k: (-float(scores[best][k]), k))
                            chosen["similarity"] = candidates[3 * best + order[0]]
                selections = {s: {"mask_rle": None, "iou": metrics.iou(m, gt)} for s, m in chosen.items()}
                stages["selection"] += time.perf_counter() - started

                started = time.perf_counter()
                for strategy, mask in chosen.items():
                    selections[strategy]["mask_rle"] = mask_to_rle(mask)
                records.append(dict(key=record_key(sample.id, protocol), has_expression=sample.expression is not None,
                                    answer=generation.text, token_ids=list(generation.token_ids),
                                    points=[[[int(x), int(y)]] for x, y in points], candidates=None,
                                    selections=selections))
                stages["io"] += time.perf_counter() - started
        _sync(device)
        wall = time.perf_counter() - wall_started
    stages["other"] = max(0.0, wall - sum(v for k, v in stages.items() if k not in ("other", "capture")))
    return RunResult("published", 1, len(samples), wall, stages, records)


def run_pixfound(samples: Sequence[Any], adapter: Any, segmenter: Any, mode: str = "fused", batch_size: int = 8, *,
                 nlp: Any, vectors: Any = None, protocols: Sequence[int] = (1, 3),
                 selects: Sequence[str] = ("oracle", "similarity"), max_new_tokens: int = 32,
                 kernel_backend: Optional[str] = None, sam_dtype: str = "float32",
                 sam_batch_size: Optional[int] = None, output_dir: Optional[str | os.PathLike] = None,
                 share_image_prefix: bool = False, kv_cache: str = "preallocated",
                 overlap: bool = False) -> RunResult:
    """pixfound's :class:`GroundingPipeline` with ``--fused`` or ``--reference`` capture, records written as JSONL.

    ``vectors`` is the raw phrase-vector backend; the run wraps it in a fresh per-text cache, so
    no run profits from another's. ``segmenter`` is used as given, except that its encoder batch
    and precision are set to ``sam_batch_size`` (default ``batch_size``) and ``sam_dtype``.
    """
    from pixfound.eval.pipeline import GroundingPipeline
    from pixfound.eval.config import EvalConfig
    from pixfound.eval.records import RecordWriter
    from pixfound.eval.runner import compute_records
    from pixfound.grounding.sam import _dtype_name
    from pixfound.grounding.similarity import CachedPhraseVectors

    if mode not in ("fused", "reference"):
        raise ValueError(f"mode must be 'fused' or 'reference', got {mode!r}")
    device = str(adapter.device)
    config = EvalConfig(
        model=getattr(adapter, "name", "random-llava"), capture=mode, selects=tuple(selects),
        protocols=tuple(sorted(protocols)), batch_size=batch_size, max_new_tokens=max_new_tokens,
        sam_batch_size=sam_batch_size or batch_size, device=device.split(":")[0],
        dtype=str(adapter.dtype).replace("torch.", ""),
        kernel_backend=kernel_backend or ("auto" if device.startswith("cuda") else "reference"),
        progress=False, sam_dtype=sam_dtype, share_image_prefix=share_image_prefix, kv_cache=kv_cache,
        overlap=overlap,
    )
    cached = CachedPhraseVectors(vectors) if vectors is not None else None
    pipeline = GroundingPipeline(adapter, segmenter, nlp, config=config, vectors=cached)
    with contextlib.ExitStack() as stack:
        saved = (segmenter.encoder_batch_size, segmenter.dtype_name)
        stack.callback(lambda: setattr(segmenter, "encoder_batch_size", saved[0]))
        stack.callback(lambda: setattr(segmenter, "dtype_name", saved[1]))
        segmenter.encoder_batch_size = config.sam_batch_size
        segmenter.dtype_name = _dtype_name(sam_dtype)
        folder = pathlib.Path(output_dir) if output_dir is not None else pathlib.Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="pixfound-run-")))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"samples-{mode}.jsonl"
        path.unlink(missing_ok=True)
        _sync(adapter.device)
        started = time.perf_counter()
        with RecordWriter(path) as writer:
            compute_records(list(samples), config.protocols, set(), pipeline, writer, batch_size=batch_size,
                            progress=False, overlap=overlap)
            write_s = writer.write_seconds
        _sync(adapter.device)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    stages = dict.fromkeys(STAGES, 0.0)
    for record in records:
        for stage in STAGES:
            stages[stage] += float((record.get("timings") or {}).get(f"{stage}_s") or 0.0)
    stages["io"] += write_s
    stages["other"] = max(0.0, wall - sum(v for k, v in stages.items() if k not in ("other", "capture")))
    return RunResult(mode, batch_size, len(samples), wall, stages, [_signature(r) for r in records])


def _signature(record: dict) -> dict:
    """What the equality checks compare: answer, token ids, points, candidate and selected masks (RLE)."""
    grounding = record.get("grounding") or {}
    return dict(
        key=record["key"], has_expression=record.get("has_expression"), answer=record.get("answer"),
        token_ids=record.get("token_ids"), points=grounding.get("points"),
        candidates=[c.get("mask_rle") for c in grounding.get("candidates", [])],
        selections={s: {"mask_rle": v.get("mask_rle"), "iou": v.get("iou")}
                    for s, v in (grounding.get("selections") or {}).items()},
    )


def run_plain_generation(samples: Sequence[Any], adapter: Any, *, batch_size: int = 8,
                         protocols: Sequence[int] = (1, 3), max_new_tokens: int = 32,
                         share_image_prefix: bool = False, kv_cache: str = "preallocated") -> RunResult:
    """SDPA ``generate`` with no capture on the same prompts and batches: the limit of the generate stage.

    With ``share_image_prefix`` each batch's image prefixes are encoded once (counted as generate
    time) and reused by every protocol, as the pipeline does with ``--share-image-prefix``.
    """
    from pixfound.eval.prompts import build_prompt

    stages = dict.fromkeys(STAGES, 0.0)
    records = []
    _sync(adapter.device)
    wall_started = time.perf_counter()
    for begin in range(0, len(samples), batch_size):
        batch = list(samples[begin:begin + batch_size])
        prefixes = {}
        if share_image_prefix:
            started = time.perf_counter()
            prefixes = {p.sample_id: p for p in adapter.encode_image_prefixes(batch)}
            stages["generate"] += time.perf_counter() - started
        for protocol in sorted(protocols):
            todo = [s for s in batch if protocol in _grounding_protocols(s, protocols)]
            if not todo:
                continue
            started = time.perf_counter()
            generations = adapter.generate(todo, [build_prompt(s, protocol) for s in todo],
                                           max_new_tokens=max_new_tokens, capture=None, batch_size=len(todo),
                                           prefixes=[prefixes[str(s.id)] for s in todo] if prefixes else None,
                                           kv_cache=kv_cache)
            _sync(adapter.device)
            stages["generate"] += time.perf_counter() - started
            for sample, generation in zip(todo, generations):
                records.append(dict(key=f"{sample.id}#p{protocol}", answer=generation.text,
                                    token_ids=list(generation.token_ids)))
    wall = time.perf_counter() - wall_started
    stages["other"] = max(0.0, wall - stages["generate"])
    return RunResult("plain", batch_size, len(samples), wall, stages, records)


def run_pipeline(name: str, settings: BenchSettings, components: Components, samples: Sequence[Any],
                 *, batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None) -> RunResult:
    """Run pipeline ``name`` (one of :data:`PIPELINES`) on ``samples`` with ``settings``."""
    tokens = max_new_tokens or settings.max_new_tokens
    batch = batch_size or settings.batch_size
    if name == "published":
        return run_published_recipe(samples, components.adapter, components.segmenter, nlp=components.nlp,
                                    vectors=components.vectors, protocols=settings.protocols,
                                    selects=settings.selects, max_new_tokens=tokens)
    if name in ("fused", "reference"):
        return run_pixfound(samples, components.adapter, components.segmenter, name, batch, nlp=components.nlp,
                            vectors=components.vectors, protocols=settings.protocols, selects=settings.selects,
                            max_new_tokens=tokens, kernel_backend=settings.kernel_backend,
                            sam_dtype=settings.sam_dtype, sam_batch_size=settings.sam_batch_size,
                            share_image_prefix=settings.share_image_prefix, kv_cache=settings.kv_cache,
                            overlap=settings.overlap)
    if name == "plain":
        return run_plain_generation(samples, components.adapter, batch_size=batch, protocols=settings.protocols,
                                    max_new_tokens=tokens, share_image_prefix=settings.share_image_prefix,
                                    kv_cache=settings.kv_cache)
    raise ValueError(f"pipeline must be one of {PIPELINES}, got {name!r}")


# ------------------------------------------------------------------------------------------------
# memory and largest batch
# ------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``/proc/self/clear_refs``); False where not allowed."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set (VmHWM) in bytes, None where /proc is missing."""
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def current_rss_bytes() -> Optional[int]:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def find_max_batch(try_batch: Callable[[int], Any], *, start: int = 1, cap: int = 256) -> dict:
    """The largest batch in [start, cap] for which ``try_batch(batch)`` runs without running out of memory.

    Doubles from ``start`` until a failure or ``cap``, then bisects between the last success and
    the first failure. Returns ``{"max_batch", "first_failure", "tried"}`` (``max_batch`` 0 when
    even ``start`` fails; ``first_failure`` None when ``cap`` fits). Other errors propagate.
    """
    import gc

    import torch

    if start < 1 or cap < start:
        raise ValueError(f"need 1 <= start <= cap, got start={start}, cap={cap}")
    tried: dict[int, bool] = {}

    def fits(batch: int) -> bool:
        try:
            try_batch(batch)
            ok = True
        except Exception as error:  # only out-of-memory counts as "does not fit"
            if not _is_out_of_memory(error):
                raise
            ok = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tried[batch] = ok
        return ok

    good, bad, batch = 0, None, start
    while batch <= cap:
        if fits(batch):
            good = batch
            batch = cap if batch < cap and batch * 2 > cap else batch * 2
            if good == cap:
                break
        else:
            bad = batch
            break
    while bad is not None and good and bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return dict(max_batch=good, first_failure=bad, tried=dict(sorted(tried.items())))


# ------------------------------------------------------------------------------------------------
# measurement (one subprocess per pipeline and round)
# ------------------------------------------------------------------------------------------------
# (adapter, batch, new tokens, protocols, shared prefix) whose attention shapes this process has run.
_SDPA_SHAPES_SEEN: set[tuple] = set()


def measure_in_process(settings: BenchSettings, pipeline: str, *, components: Optional[Components] = None,
                       max_batch_cap: Optional[int] = None, warmup: bool = True) -> dict:
    """One timed run of ``pipeline`` in this process, with its memory peak; returns a row for :func:`format_table`.

    Peak host memory is VmHWM reset just before the timed run (the model and inputs are already
    resident, so it includes them); on CUDA also ``torch.cuda.max_memory_allocated``.
    ``max_batch_cap`` also searches the largest batch that fits (pixfound and plain pipelines).
    """
    import torch

    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    components = components or build_components(settings)
    samples = make_samples(settings.samples, settings.image_hw, settings.seed)
    cuda = settings.device.startswith("cuda")
    if warmup:  # lazy imports, first-call costs, allocator growth: not part of the figure
        shapes = (id(components.adapter), settings.batch_size, settings.max_new_tokens, tuple(settings.protocols),
                  settings.share_image_prefix)
        if cuda and shapes not in _SDPA_SHAPES_SEEN:
            # cuDNN's SDPA (when allowed) builds a plan for every new (batch, key length) shape, 47 ms
            # each on an H100: one plain generation of a whole batch pays them outside every figure.
            run_pipeline("plain", settings, components, samples[: settings.batch_size])
            _SDPA_SHAPES_SEEN.add(shapes)
        run_pipeline(pipeline, settings, components, samples[:2], batch_size=min(2, settings.batch_size),
                     max_new_tokens=2)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    exact = reset_peak_rss()
    rss_before = current_rss_bytes()
    result = run_pipeline(pipeline, settings, components, samples)
    row = result.to_dict()
    row.update(
        size=settings.size, device=settings.device, threads=settings.threads if not cuda else None,
        settings=settings.to_dict(), rss_before_bytes=rss_before, peak_rss_bytes=peak_rss_bytes(),
        rss_measure="VmHWM after clear_refs reset" if exact else "VmHWM (whole process)",
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        quality=quality(result.records),
    )
    if max_batch_cap and pipeline != "published":
        def try_batch(batch: int) -> None:
            run_pipeline(pipeline, settings, components, make_samples(batch + batch % 2, settings.image_hw,
                                                                      settings.seed)[:batch], batch_size=batch)

        row["max_batch"] = find_max_batch(try_batch, start=settings.batch_size, cap=max_batch_cap)
    return row


def quality(records: Sequence[dict]) -> dict:
    """Mean IoU per selection strategy over the records with a referring expression (a smoke figure here)."""
    ious: dict[str, list[float]] = {}
    for record in records:
        if not record.get("has_expression"):
            continue
        for strategy, selection in (record.get("selections") or {}).items():
            if selection.get("iou") is not None:
                ious.setdefault(strategy, []).append(float(selection["iou"]))
    return {s: float(np.mean(v)) for s, v in ious.items() if v}


def _worker_env(settings: BenchSettings) -> dict:
    env = dict(os.environ)
    if not settings.device.startswith("cuda"):
        env.pop("TRITON_INTERPRET", None)  # timing runs use the torch/C++ paths on the CPU
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    # glibc's default allocator: a low MALLOC_MMAP_THRESHOLD_ (as test_capture_bench's memory workers use)
    # makes every large tensor a fresh mmap with page faults, which slows the allocation-heavy eager
    # paths by up to 2x here and would flatter the fused pipeline's speed.
    return env


def measure_subprocess(settings: BenchSettings, pipeline: str, *, max_batch_cap: Optional[int] = None,
                       timeout_s: float = 3600) -> dict:
    """:func:`measure_in_process` in a fresh Python process (its memory peak is its own)."""
    with tempfile.TemporaryDirectory(prefix="pixfound-bench-") as folder:
        result_path = pathlib.Path(folder) / "row.json"
        job = dict(settings=settings.to_dict(), pipeline=pipeline, max_batch_cap=max_batch_cap,
                   result=str(result_path))
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", json.dumps(job)]
        done = subprocess.run(command, capture_output=True, text=True, env=_worker_env(settings), timeout=timeout_s)
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"benchmark worker for {pipeline!r} failed (exit {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        return json.loads(result_path.read_text(encoding="utf-8"))


def measure(settings: BenchSettings, pipelines: Sequence[str] = PIPELINES, *, rounds: int = 1, isolate: bool = True,
            components: Optional[Components] = None, max_batch_cap: Optional[int] = None,
            log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """One row per pipeline: best-of-``rounds`` wall time (rounds interleaved across pipelines), the peak
    memory (the largest over the rounds), stage totals of the best round, and the comparisons
    added by :func:`compare` (speed-up over ``published``, capture overhead over ``plain``, equality
    of ``fused`` with ``reference``).

    ``isolate=True`` runs every (pipeline, round) in a fresh subprocess; ``isolate=False`` runs in
    this process, with ``components`` if given (memory peaks then include earlier runs).
    ``max_batch_cap`` searches the largest batch up to that cap in the first round.
    """
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise ValueError(f"unknown pipelines {unknown}; choose among {PIPELINES}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not isolate and components is None:
        components = build_components(settings)
    best: dict[str, dict] = {}
    for round_index in range(rounds):
        for name in pipelines:
            cap = max_batch_cap if round_index == 0 else None
            started = time.perf_counter()
            if isolate:
                row = measure_subprocess(settings, name, max_batch_cap=cap)
            else:
                row = measure_in_process(settings, name, components=components, max_batch_cap=cap)
            if log is not None:
                log(f"round {round_index + 1}/{rounds} {name}: {row['images_per_s']:.3f} images/s "
                    f"({time.perf_counter() - started:.0f} s with start-up)")
            previous = best.get(name)
            if previous is None or row["wall_s"] < previous["wall_s"]:
                if previous is not None:
                    row["peak_rss_bytes"] = _max_or_none(row.get("peak_rss_bytes"), previous.get("peak_rss_bytes"))
                    row["peak_gpu_bytes"] = _max_or_none(row.get("peak_gpu_bytes"), previous.get("peak_gpu_bytes"))
                    row.setdefault("max_batch", previous.get("max_batch"))
                best[name] = row
            else:
                previous["peak_rss_bytes"] = _max_or_none(row.get("peak_rss_bytes"), previous.get("peak_rss_bytes"))
                previous["peak_gpu_bytes"] = _max_or_none(row.get("peak_gpu_bytes"), previous.get("peak_gpu_bytes"))
            best[name]["rounds"] = round_index + 1
    rows = [best[name] for name in pipelines]
    compare(rows)
    return rows


def _max_or_none(a: Optional[float], b: Optional[float]) -> Optional[float]:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


def generate_split(settings: BenchSettings, *, adapter: Any = None, protocol: int = 3,
                   modes: Sequence[tuple[Optional[str], int]] = (("reference", 1), (None, 1), (None, 8), ("fused", 8)),
                   ) -> list[dict]:
    """Seconds per image of ``generate`` with 1 new token (the prefill) and with ``max_new_tokens``,
    for (capture, batch) pairs: where the generate stage goes, and how much batching can win.

    ``samples`` images (a multiple of every batch), one prompt per image (``protocol``), in this process.
    """
    import torch

    from pixfound.eval.prompts import build_prompt

    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    adapter = adapter or build_adapter(settings.size, device=settings.device, dtype=settings.dtype, seed=settings.seed)
    samples = make_samples(settings.samples, settings.image_hw, settings.seed)
    prompts = [build_prompt(s, protocol) for s in samples]

    def per_image(capture: Optional[str], batch: int, tokens: int, count: int) -> float:
        _sync(adapter.device)
        started = time.perf_counter()
        for begin in range(0, count, batch):
            adapter.generate(samples[begin:begin + batch], prompts[begin:begin + batch], max_new_tokens=tokens,
                             capture=capture, batch_size=batch, backend=settings.kernel_backend)
        _sync(adapter.device)
        return (time.perf_counter() - started) / count

    per_image("reference", 1, 2, 1)  # warm-up
    rows = []
    for capture, batch in modes:
        count = max(batch, min(len(samples), 2 * batch)) if batch == 1 else batch
        if count > len(samples):
            raise ValueError(f"batch {batch} needs at least {batch} samples, settings have {len(samples)}")
        prefill = per_image(capture, batch, 1, count)
        full = per_image(capture, batch, settings.max_new_tokens, count)
        rows.append(dict(capture=capture or "none", batch=batch, images=count, prefill_s_per_image=prefill,
                         generate_s_per_image=full, new_tokens=settings.max_new_tokens))
    return rows


def measure_sam_stage(segmenter: Any, *, images: int = 8, phrases: int = 10, image_hw: Sequence[int] = (480, 640),
                      encoder_batches: Sequence[int] = (1, 8), repeats: int = 2, seed: int = 0) -> dict:
    """The SAM stage alone, best of ``repeats``: encoder seconds per image at each encoder batch size,
    and the decoder per image for ``phrases`` point prompts, published (one ``SamPredictor.predict``
    per phrase) against pixfound (:meth:`SamSegmenter.segment_points`, all phrases at once).

    Also checks that the batched encoder gives the one-by-one embeddings (max abs difference).
    """
    import torch
    from segment_anything import SamPredictor

    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in image_hw)
    pictures = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(images)]
    points = [np.stack([rng.integers(0, width, phrases), rng.integers(0, height, phrases)], -1) for _ in range(images)]
    device = segmenter.device
    saved = segmenter.encoder_batch_size
    out: dict[str, Any] = dict(images=images, phrases=phrases, image_hw=[height, width], device=str(device),
                               model_type=segmenter.model_type, dtype=segmenter.dtype_name)
    embeddings: dict[int, list] = {}
    try:
        for batch in encoder_batches:
            segmenter.encoder_batch_size = int(batch)
            best = float("inf")
            for _ in range(repeats):
                _sync(device)
                started = time.perf_counter()
                embeddings[batch] = segmenter.embed_images(pictures)
                _sync(device)
                best = min(best, time.perf_counter() - started)
            out[f"encoder_s_per_image_batch_{batch}"] = best / images
    finally:
        segmenter.encoder_batch_size = saved
    first, last = embeddings[encoder_batches[0]], embeddings[encoder_batches[-1]]
    out["encoder_batched_max_abs_diff"] = max(float((a.features.float() - b.features.float()).abs().max())
                                              for a, b in zip(first, last))
    predictor = SamPredictor(segmenter.model)
    published, batched = float("inf"), float("inf")
    for _ in range(repeats):
        elapsed = 0.0
        for embedding, clicks in zip(first, points):
            segmenter.set_embedding(embedding)  # the predictor of the published path shares the same state
            predictor.features, predictor.is_image_set = segmenter.predictor.features, True
            predictor.original_size, predictor.input_size = embedding.original_size, embedding.input_size
            _sync(device)
            started = time.perf_counter()
            for x, y in clicks:
                predictor.predict(point_coords=np.array([[x, y]], dtype=np.float64), point_labels=np.array([1]),
                                  multimask_output=True)
            _sync(device)
            elapsed += time.perf_counter() - started
        published = min(published, elapsed)
        elapsed = 0.0
        for embedding, clicks in zip(first, points):
            segmenter.set_embedding(embedding)
            _sync(device)
            started = time.perf_counter()
            with torch.inference_mode():
                segmenter.segment_points(clicks[:, None, :])
            _sync(device)
            elapsed += time.perf_counter() - started
        batched = min(batched, elapsed)
    out["decoder_s_per_image_published"] = published / images
    out["decoder_s_per_image_pixfound"] = batched / images
    out["decoder_speedup"] = published / batched if batched > 0 else None
    return out


def sam_precision_effect(settings: BenchSettings, *, dtype: str = "bfloat16",
                         components: Optional[Components] = None) -> dict:
    """The fused pipeline with SAM in float32 and in ``dtype`` on the same samples (in this process).

    Returns per precision the SAM stage seconds and the mean IoU per selection strategy, and the
    :func:`agreement` of the two runs' masks. With random SAM weights (the tiny SAM, or an
    official architecture without its checkpoint) the IoUs are a smoke figure, not a quality
    measurement.
    """
    import torch

    if settings.device == "cpu":
        torch.set_num_threads(settings.threads)
    components = components or build_components(settings)
    samples = make_samples(settings.samples, settings.image_hw, settings.seed)
    out: dict[str, Any] = dict(settings=settings.to_dict(), dtype=dtype)
    runs = {}
    for precision in ("float32", dtype):
        run_pipeline("fused", dataclasses.replace(settings, sam_dtype=precision), components, samples[:2],
                     batch_size=min(2, settings.batch_size), max_new_tokens=2)  # warm-up
        result = run_pipeline("fused", dataclasses.replace(settings, sam_dtype=precision), components, samples)
        runs[precision] = result
        out[precision] = dict(sam_encoder_s=result.stages["sam_encoder"], sam_decoder_s=result.stages["sam_decoder"],
                              mean_iou=quality(result.records), wall_s=result.wall_s)
    out["agreement"] = agreement(runs[dtype].records, runs["float32"].records)
    return out


def overlap_effect(settings: BenchSettings, *, rounds: int = 3, components: Optional[Components] = None) -> dict:
    """The fused pipeline with and without ``--overlap``, rounds interleaved in this process (best wall kept).

    Returns per setting the best wall seconds and that run's stages, and whether the records of
    every round pair were identical.
    """
    components = components or build_components(settings)
    runs: dict[bool, list] = {False: [], True: []}
    for round_index in range(rounds):
        for overlap in ((False, True) if round_index % 2 == 0 else (True, False)):
            runs[overlap].append(measure_in_process(dataclasses.replace(settings, overlap=overlap), "fused",
                                                    components=components, warmup=round_index == 0))
    best = {overlap: min(rows, key=lambda row: row["wall_s"]) for overlap, rows in runs.items()}
    return dict(
        settings=settings.to_dict(), rounds=rounds,
        sequential=dict(wall_s=best[False]["wall_s"], stages=best[False]["stages"]),
        overlapped=dict(wall_s=best[True]["wall_s"], stages=best[True]["stages"]),
        speedup=best[False]["wall_s"] / best[True]["wall_s"],
        records_equal=sum(a["records"] == b["records"] for a, b in zip(runs[False], runs[True])),
    )


def format_sam_precision(effect: dict) -> str:
    """A Markdown table of :func:`sam_precision_effect`."""
    dtype = effect["dtype"]
    strategies = sorted(set(effect["float32"]["mean_iou"]) | set(effect[dtype]["mean_iou"]))
    header = ["SAM precision", "SAM enc s", "SAM dec s"] + [f"mean IoU {s}" for s in strategies]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for precision in ("float32", dtype):
        row = effect[precision]
        lines.append("| " + " | ".join([precision, f"{row['sam_encoder_s']:.3f}", f"{row['sam_decoder_s']:.3f}"] +
                                       [_cell(row["mean_iou"].get(s), "{:.4f}") for s in strategies]) + " |")
    a = effect["agreement"]
    lines.append(f"\n- {dtype} vs float32: candidate masks identical in {a['candidate_masks_equal']}/{a['grounded']} "
                 f"records, selected masks in {a['selected_masks_equal']}/{a['grounded']}, mean IoU between the "
                 f"selected masks {_cell(a['selected_masks_mean_iou'], '{:.4f}')} (random SAM weights: a smoke figure)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# comparisons and the table
# ------------------------------------------------------------------------------------------------
def _rle_iou(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    from pixfound.eval import metrics
    from pixfound.grounding.select import rle_to_mask

    if a is None or b is None:
        return None
    return float(metrics.iou(rle_to_mask(a), rle_to_mask(b)))


def agreement(left: Sequence[dict], right: Sequence[dict]) -> dict:
    """How far two runs' records agree, matched by key: counts of equal answers, token ids, points,
    candidate masks and selected masks, and the mean IoU between the selected masks."""
    by_key = {r["key"]: r for r in right}
    common = [(a, by_key[a["key"]]) for a in left if a["key"] in by_key]
    out: dict[str, Any] = dict(records=len(common), missing=len(left) + len(right) - 2 * len(common))
    out["answers_equal"] = sum(a["answer"] == b["answer"] and a["token_ids"] == b["token_ids"] for a, b in common)
    grounded = [(a, b) for a, b in common if a.get("points") is not None and b.get("points") is not None]
    out["grounded"] = len(grounded)
    out["points_equal"] = sum(a["points"] == b["points"] for a, b in grounded)
    with_candidates = [(a, b) for a, b in grounded if a.get("candidates") is not None and b.get("candidates") is not None]
    out["candidate_masks_equal"] = (sum(a["candidates"] == b["candidates"] for a, b in with_candidates)
                                    if with_candidates else None)
    selections_equal, ious = 0, []
    for a, b in grounded:
        sa, sb = a.get("selections") or {}, b.get("selections") or {}
        if set(sa) != set(sb):
            continue
        selections_equal += all(sa[s]["mask_rle"] == sb[s]["mask_rle"] for s in sa)
        for strategy in sa:
            value = _rle_iou(sa[strategy]["mask_rle"], sb[strategy]["mask_rle"])
            if value is not None:
                ious.append(value)
    out["selected_masks_equal"] = selections_equal
    out["selected_masks_mean_iou"] = float(np.mean(ious)) if ious else None
    out["identical"] = (out["missing"] == 0 and out["answers_equal"] == len(common)
                        and out["points_equal"] == len(grounded) and selections_equal == len(grounded)
                        and out["candidate_masks_equal"] in (None, len(with_candidates)))
    return out


def compare(rows: list[dict]) -> list[dict]:
    """Add the cross-pipeline figures to ``rows`` in place (and return them):

    ``speedup_vs_published`` (images/s ratio), ``generate_vs_plain`` (generate-stage time over
    plain generation's), ``fused_vs_reference`` and ``vs_published`` (:func:`agreement`).
    """
    by_name = {row["pipeline"]: row for row in rows}
    published, plain, reference = by_name.get("published"), by_name.get("plain"), by_name.get("reference")
    for row in rows:
        if published is not None:
            row["speedup_vs_published"] = row["images_per_s"] / published["images_per_s"]
        if plain is not None and plain["stages"]["generate"] > 0 and row["pipeline"] != "published":
            row["generate_vs_plain"] = row["stages"]["generate"] / plain["stages"]["generate"]
        if row["pipeline"] in ("fused", "reference") and published is not None:
            row["vs_published"] = agreement(row["records"], published["records"])
    if "fused" in by_name and reference is not None:
        by_name["fused"]["fused_vs_reference"] = agreement(by_name["fused"]["records"], reference["records"])
    return rows


def _cell(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`measure` rows and the headline ratios under it."""
    header = (["size", "pipeline", "batch", "images", "images/s", "x published"] +
              [f"{STAGE_TITLES[s]} s" for s in STAGES] +
              ["generate / plain", "peak RSS MiB", "peak GPU MiB", "max batch"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        max_batch = row.get("max_batch")
        if isinstance(max_batch, dict):
            max_batch = f"{max_batch['max_batch']}" + (f" (fails at {max_batch['first_failure']})"
                                                        if max_batch.get("first_failure") else " (cap)")
        cells = [row.get("size", "?"), row["pipeline"], str(row["batch_size"]), str(row["images"]),
                 _cell(row["images_per_s"], "{:.3f}"), _cell(row.get("speedup_vs_published"))]
        cells += [_cell(row["stages"].get(s), "{:.3f}") for s in STAGES]
        cells += [_cell(row.get("generate_vs_plain"), "{:.3f}"),
                  _cell(None if row.get("peak_rss_bytes") is None else row["peak_rss_bytes"] / MIB, "{:.0f}"),
                  _cell(None if row.get("peak_gpu_bytes") is None else row["peak_gpu_bytes"] / MIB, "{:.0f}"),
                  "–" if max_batch is None else str(max_batch)]
        lines.append("| " + " | ".join(cells) + " |")
    by_name = {row["pipeline"]: row for row in rows}
    notes = []
    fused = by_name.get("fused")
    if fused is not None and "speedup_vs_published" in fused:
        notes.append(f"fused end to end: {fused['speedup_vs_published']:.2f}x the published recipe's images/s")
    if fused is not None and "generate_vs_plain" in fused:
        notes.append(f"capture overhead (fused generate stage over plain generation): "
                     f"{100 * (fused['generate_vs_plain'] - 1):+.1f}%")
    if fused is not None and "fused_vs_reference" in fused:
        a = fused["fused_vs_reference"]
        notes.append(f"fused vs reference: {'identical' if a['identical'] else 'DIFFERENT'} "
                     f"(answers {a['answers_equal']}/{a['records']}, points {a['points_equal']}/{a['grounded']}, "
                     f"candidate masks {a['candidate_masks_equal']}/{a['grounded']}, "
                     f"selected masks {a['selected_masks_equal']}/{a['grounded']})")
    if fused is not None and "vs_published" in fused:
        a = fused["vs_published"]
        notes.append(f"fused vs published recipe: answers {a['answers_equal']}/{a['records']}, points "
                     f"{a['points_equal']}/{a['grounded']}, selected masks {a['selected_masks_equal']}/{a['grounded']} "
                     f"identical (mean IoU between them {_cell(a['selected_masks_mean_iou'], '{:.4f}')})")
    for row in rows:
        if row.get("quality"):
            notes.append(f"{row['pipeline']}: mean IoU " + ", ".join(f"{s} {v:.4f}" for s, v in row["quality"].items())
                         + " (random weights: a smoke figure)")
    if rows:
        first = rows[0]
        notes.append(f"stages are seconds summed over the run; 'other' is wall time outside them; capture = map "
                     f"gathering after generate; peak RSS: {first.get('rss_measure', '?')}, model included")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _parse_hw(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 480x640, got {text!r}") from None
    return height, width


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--protocols", default="1,3")
    parser.add_argument("--image-hw", type=_parse_hw, default=(96, 128), help="synthetic image size HxW")
    parser.add_argument("--sam", choices=SAM_KINDS, default="tiny")
    parser.add_argument("--sam-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("PIXFOUND_BENCH_THREADS", "1")))
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--share-image-prefix", action="store_true",
                        help="pixfound and plain runs: prefill system prompt + image once per image (all protocols)")
    parser.add_argument("--kv-cache", choices=("preallocated", "dynamic"), default="preallocated",
                        help="pixfound and plain runs' key/value cache (the published recipe keeps transformers' dynamic one)")
    parser.add_argument("--overlap", action="store_true",
                        help="pixfound runs: ground each batch in a second thread while the next one generates")
    parser.add_argument("--overlap-ab", action="store_true",
                        help="instead of the pipelines: fused with and without --overlap, rounds interleaved")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-cap", type=int, default=None, help="also search the largest batch up to this")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (memory peaks then mix)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write every row (records included) here")
    parser.add_argument("--sam-precision", choices=("bfloat16", "float16"), default=None,
                        help="instead of the pipelines: fused with SAM in float32 vs this precision (mIoU effect)")
    parser.add_argument("--generate-split", action="store_true",
                        help="instead of the pipelines: generate seconds per image, prefill vs full, per mode")
    parser.add_argument("--sam-stage", action="store_true",
                        help="instead of the pipelines: the SAM encoder (batch 1 vs --batch-size) and decoder alone")
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        row = measure_in_process(BenchSettings.from_dict(job["settings"]), job["pipeline"],
                                 max_batch_cap=job.get("max_batch_cap"))
        pathlib.Path(job["result"]).write_text(json.dumps(row), encoding="utf-8")
        return 0
    settings = BenchSettings(
        size=args.size, samples=args.samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        protocols=tuple(int(p) for p in args.protocols.split(",")), image_hw=args.image_hw, sam=args.sam,
        sam_dtype=args.sam_dtype, device=args.device, dtype=args.dtype, threads=args.threads,
        share_image_prefix=args.share_image_prefix, kv_cache=args.kv_cache, overlap=args.overlap,
    )
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    print(f"settings: {settings.to_dict()}", flush=True)
    if args.generate_split:
        split = generate_split(settings, modes=(("reference", 1), (None, 1), (None, settings.batch_size),
                                                ("fused", settings.batch_size)))
        print("| capture | batch | prefill s / image | generate s / image |\n|---|---|---|---|")
        for row in split:
            print(f"| {row['capture']} | {row['batch']} | {row['prefill_s_per_image']:.3f} "
                  f"| {row['generate_s_per_image']:.3f} |")
        if args.json is not None:
            args.json.write_text(json.dumps(split, indent=1), encoding="utf-8")
        return 0
    if args.sam_stage:
        import torch

        torch.set_num_threads(settings.threads)
        segmenter = build_segmenter(settings.sam, device=settings.device, seed=settings.seed, dtype=settings.sam_dtype)
        stage = measure_sam_stage(segmenter, images=settings.samples, image_hw=settings.image_hw,
                                  encoder_batches=(1, settings.batch_size))
        print(json.dumps(stage, indent=1))
        if args.json is not None:
            args.json.write_text(json.dumps(stage, indent=1), encoding="utf-8")
        return 0
    if args.overlap_ab:
        effect = overlap_effect(settings, rounds=args.rounds)
        print(f"| sequential wall s | overlapped wall s | speed-up | records equal |\n|---|---|---|---|\n"
              f"| {effect['sequential']['wall_s']:.2f} | {effect['overlapped']['wall_s']:.2f} | "
              f"{effect['speedup']:.3f}x | {effect['records_equal']}/{effect['rounds']} rounds |")
        if args.json is not None:
            args.json.write_text(json.dumps(effect, indent=1), encoding="utf-8")
        return 0
    if args.sam_precision:
        effect = sam_precision_effect(settings, dtype=args.sam_precision)
        print(format_sam_precision(effect))
        if args.json is not None:
            args.json.write_text(json.dumps(effect, indent=1), encoding="utf-8")
        return 0
    rows = measure(settings, pipelines, rounds=args.rounds, isolate=not args.in_process,
                   max_batch_cap=args.max_batch_cap, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

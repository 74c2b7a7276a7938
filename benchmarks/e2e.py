"""End to end: the published recipe against pixfound's pipeline (``--reference`` and ``--fused``) and plain generation.

The same synthetic samples and the same random-weight models go through each pipeline:

* ``published``: the published PixFoundation recipe, one image at a time: batch-1 ``generate``
  with eager attention and ``output_attentions`` and transformers' own cache, phrases, the
  reference upsample + peak per phrase (``pixfound.ops.upsample_peaks_reference``: bicubic
  ``F.interpolate``, crop, argmax), ``SamPredictor.set_image`` per (image, protocol) and one
  ``SamPredictor.predict`` per phrase, every candidate mask written as a PNG file, the oracle's
  IoU in NumPy, one uncached phrase-vector call per answer;
* ``reference`` / ``fused``: pixfound's ``GroundingPipeline`` run by ``compute_records`` in
  batches, records written as JSONL, with the reference or the fused capture;
* ``plain``: ``adapter.generate`` without capture on the same prompts and batches: the limit of
  the generate stage. Every pipeline loads each image once, as I/O, so generate times the model;
* ``fused+sam-bf16`` and ``fused+overlap``: the fused pipeline with SAM under bf16 autocast, or
  grounding each batch in a second thread beside the next ``generate``.

It prints one row per pipeline: images/s and its ratio to the published recipe, the seconds of
each stage (generate, capture, phrases, upsample + peak, SAM encoder, SAM decoder, selection,
I/O, other), generate over plain generation's generate, and peak memory; and it checks that the
fused and reference pipelines give the same records (answers, points, candidate and selected
masks). Rounds interleave the pipelines; the best round counts.

    python benchmarks/e2e.py --size tiny
    python benchmarks/e2e.py --size medium --image-hw 480x640 --share-image-prefix --rounds 3

It imports the installed ``pixfound``. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU;
on the CPU the peak resident set of the run, which with ``--isolate`` (each pipeline and round in
a fresh process) is the run's own, and otherwise includes what earlier runs left resident.
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

from _helpers import LLAVA_SIZES, MIB, PeakMemory, build_llava, cell, markdown_table, synchronize, synthetic_samples

PIPELINES = ("published", "reference", "fused", "plain")
# The fused pipeline with one setting changed: label -> Settings fields.
FUSED_VARIANTS = {"fused+sam-bf16": dict(sam_dtype="bfloat16"), "fused+overlap": dict(overlap=True)}
STAGES = ("generate", "capture", "phrases", "upsample_peak", "sam_encoder", "sam_decoder", "selection", "io", "other")
STAGE_TITLES = dict(generate="generate", capture="capture", phrases="phrases", upsample_peak="upsample+peak",
                    sam_encoder="SAM enc", sam_decoder="SAM dec", selection="selection", io="I/O", other="other")
SAM_KINDS = ("tiny", "vit_b", "vit_l", "vit_h")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One end-to-end measurement (JSON-serialisable)."""

    size: str = "tiny"                    # a key of _helpers.LLAVA_SIZES
    samples: int = 8                      # synthetic samples; every grounding protocol runs on each
    batch_size: int = 8                   # pixfound and plain generation; the published recipe is batch 1
    max_new_tokens: int = 32
    protocols: tuple[int, ...] = (1, 3)
    selects: tuple[str, ...] = ("oracle", "similarity")
    image_hw: tuple[int, int] = (96, 128)
    sam: str = "tiny"                     # tiny, or vit_b / vit_l / vit_h with random weights
    sam_dtype: str = "float32"            # pixfound runs; the published recipe stays float32
    sam_batch_size: Optional[int] = None  # images per SAM encoder call in pixfound runs (None: batch_size)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1                      # torch CPU threads: one gives repeatable numbers on a shared machine
    seed: int = 0
    share_image_prefix: bool = False      # pixfound and plain: prefill system prompt + image once per image
    kv_cache: str = "preallocated"        # pixfound and plain
    overlap: bool = False                 # pixfound: ground each batch beside the next generate

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocols", tuple(int(p) for p in self.protocols))
        object.__setattr__(self, "selects", tuple(self.selects))
        object.__setattr__(self, "image_hw", tuple(int(v) for v in self.image_hw))
        if self.size not in LLAVA_SIZES:
            raise ValueError(f"size must be one of {sorted(LLAVA_SIZES)}, got {self.size!r}")
        if self.sam not in SAM_KINDS:
            raise ValueError(f"sam must be one of {SAM_KINDS}, got {self.sam!r}")
        for name in ("samples", "batch_size", "max_new_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.protocols or any(p not in (1, 2, 3) for p in self.protocols):
            raise ValueError(f"protocols must be among 1, 2, 3, got {self.protocols}")


def settings_for(label: str, settings: Settings) -> Settings:
    """The settings of pipeline ``label``: a fused variant changes one field."""
    return dataclasses.replace(settings, **FUSED_VARIANTS.get(label, {}))


def base_pipeline(label: str) -> str:
    if label in FUSED_VARIANTS:
        return "fused"
    if label not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES + tuple(FUSED_VARIANTS)}, got {label!r}")
    return label


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Components:
    """What every pipeline shares: model adapter, SAM, spaCy and the raw phrase-vector backend."""

    adapter: Any
    segmenter: Any
    nlp: Any
    vectors: Any = None


def build_segmenter(kind: str, *, device: str = "cpu", seed: int = 0, encoder_batch_size: int = 8) -> Any:
    """``tiny`` (pixfound's test SAM) or an official SAM architecture with random weights (its real cost)."""
    import torch

    from pixfound.grounding.sam import SamSegmenter, tiny_sam

    if kind == "tiny":
        return tiny_sam(seed, device=device, encoder_batch_size=encoder_batch_size)
    from segment_anything import sam_model_registry

    with torch.random.fork_rng(devices=[]), torch.device(device):  # initialised where it runs
        torch.manual_seed(seed)
        model = sam_model_registry[kind](checkpoint=None)
    return SamSegmenter(model.eval(), model_type=f"{kind}-random", checkpoint=None,
                        encoder_batch_size=encoder_batch_size)


def build_components(settings: Settings, adapter: Any = None) -> Components:
    """The model (``adapter`` if given), SAM, spaCy and phrase vectors that ``settings`` names."""
    from pixfound.grounding.phrases import load_spacy

    adapter = adapter or build_llava(settings.size, device=settings.device, dtype=settings.dtype, seed=settings.seed)
    segmenter = build_segmenter(settings.sam, device=settings.device, seed=settings.seed,
                                encoder_batch_size=settings.sam_batch_size or settings.batch_size)
    nlp = load_spacy()
    vectors = None
    if "similarity" in settings.selects:
        from pixfound.grounding.similarity import load_phrase_vectors

        vectors = load_phrase_vectors("auto", nlp=nlp, device="cpu")
    return Components(adapter, segmenter, nlp, vectors)


# ------------------------------------------------------------------------------------------------
# one pass of each pipeline
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """One pipeline's pass over the samples: wall time, seconds per stage, and what the records say."""

    pipeline: str
    batch_size: int
    images: int
    wall_s: float
    stages: dict
    records: list  # per (sample, protocol): key, answer, token ids, points, candidate and selected masks

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s


class LoadedSample:
    """What ``adapter.generate`` needs of a sample, its image loaded once (and timed as I/O), as the
    pixfound pipeline does it: the generate stage then times the model alone in every pipeline."""

    def __init__(self, sample: Any) -> None:
        self.id = sample.id
        self.image = sample.load_image()

    def load_image(self) -> Any:
        return self.image


class StageClock:
    """Seconds per stage: ``with clock("phrases"): ...``."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str, synchronize_device: bool = False):
        started = time.perf_counter()
        yield
        if synchronize_device:
            synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - started

    def finish(self, wall_s: float) -> dict:
        # capture runs inside generate: not part of the sum
        counted = sum(v for k, v in self.seconds.items() if k not in ("other", "capture"))
        self.seconds["other"] = max(0.0, wall_s - counted)
        return self.seconds


def run_published(samples: Sequence[Any], settings: Settings, components: Components) -> Run:
    """The published recipe, one (image, protocol) at a time (see the module docstring)."""
    from PIL import Image
    from segment_anything import SamPredictor

    from pixfound.eval import metrics
    from pixfound.eval.prompts import build_prompt
    from pixfound.eval.records import applicable_protocols, record_key
    from pixfound.grounding.phrases import phrases_from_generation
    from pixfound.grounding.points import upsample_frame
    from pixfound.grounding.select import SIMILARITY_THRESHOLD, mask_to_rle, oracle_ious_reference
    from pixfound.grounding.similarity import cosine_similarities, normalize_phrase
    from pixfound.ops import upsample_peaks_reference

    adapter, nlp, vectors = components.adapter, components.nlp, components.vectors
    predictor = SamPredictor(components.segmenter.model)
    clock = StageClock(adapter.device)
    records = []
    with tempfile.TemporaryDirectory(prefix="pixfound-published-") as folder:
        synchronize(adapter.device)
        started = time.perf_counter()
        for protocol in settings.protocols:
            for sample in samples:
                if protocol not in applicable_protocols(sample, settings.protocols):
                    continue
                with clock("io"):
                    loaded = LoadedSample(sample)
                    truth = np.asarray(sample.gt_mask, dtype=bool)
                with clock("generate", synchronize_device=True):
                    (generation,) = adapter.generate([loaded], [build_prompt(sample, protocol)],
                                                     max_new_tokens=settings.max_new_tokens, capture="reference",
                                                     batch_size=1, kv_cache="dynamic")
                clock.seconds["capture"] += generation.timings.get("capture_s") or 0.0
                with clock("phrases"):
                    phrases, maps = phrases_from_generation(generation, adapter.tokenizer, nlp)
                with clock("upsample_peak"):
                    (height, width), aspect, (x_offset, y_offset) = upsample_frame(generation.geometry)
                    points = []
                    for index in range(len(phrases)):  # one map at a time, as published
                        x, y = upsample_peaks_reference(maps[index:index + 1], (height, width), aspect=aspect)[0, 0]
                        points.append((int(x) + x_offset, int(y) + y_offset))
                candidates, scores = [], []
                if phrases:
                    with clock("sam_encoder", synchronize_device=True):
                        predictor.set_image(np.asarray(loaded.image))
                    with clock("sam_decoder", synchronize_device=True):
                        for x, y in points:
                            masks, mask_scores, _ = predictor.predict(
                                point_coords=np.array([[x, y]], dtype=np.float64), point_labels=np.array([1]),
                                multimask_output=True)
                            candidates.extend(masks)
                            scores.append(mask_scores)
                with clock("io"):
                    for index, mask in enumerate(candidates):
                        Image.fromarray(mask.astype(np.uint8) * 255).save(
                            pathlib.Path(folder) / f"{sample.id}_p{protocol}_{index:03d}.png")
                with clock("selection"):
                    empty = np.zeros(truth.shape, dtype=bool)
                    chosen: dict[str, np.ndarray] = {}
                    if "oracle" in settings.selects:
                        chosen["oracle"] = empty
                        if truth.any() and candidates:
                            chosen["oracle"] = candidates[int(np.argmax(oracle_ious_reference(np.stack(candidates),
                                                                                              truth)))]
                    if "similarity" in settings.selects:
                        chosen["similarity"] = empty
                        if sample.expression is not None and phrases:
                            texts = [normalize_phrase(sample.expression)] + [normalize_phrase(p.text) for p in phrases]
                            encoded = np.asarray(vectors.encode(texts))
                            similarities = cosine_similarities(encoded[0], encoded[1:])
                            best = int(np.argmax(similarities))
                            if similarities[best] >= SIMILARITY_THRESHOLD:
                                order = sorted(range(3), key=lambda k: (-float(scores[best][k]), k))
                                chosen["similarity"] = candidates[3 * best + order[0]]
                    ious = {strategy: metrics.iou(mask, truth) for strategy, mask in chosen.items()}
                with clock("io"):
                    records.append(dict(
                        key=record_key(sample.id, protocol), answer=generation.text,
                        token_ids=list(generation.token_ids), points=[[[x, y]] for x, y in points], candidates=None,
                        selections={s: dict(mask_rle=mask_to_rle(m), iou=ious[s]) for s, m in chosen.items()}))
        synchronize(adapter.device)
        wall = time.perf_counter() - started
    return Run("published", 1, len(samples), wall, clock.finish(wall), records)


def run_pixfound(samples: Sequence[Any], settings: Settings, components: Components, capture: str) -> Run:
    """pixfound's ``GroundingPipeline`` through ``compute_records``, with the ``fused`` or ``reference`` capture."""
    from pixfound.eval.config import EvalConfig
    from pixfound.eval.pipeline import GroundingPipeline
    from pixfound.eval.records import RecordWriter
    from pixfound.eval.runner import compute_records
    from pixfound.grounding.sam import SamSegmenter
    from pixfound.grounding.similarity import CachedPhraseVectors

    adapter, segmenter = components.adapter, components.segmenter
    config = EvalConfig(
        model=adapter.name, capture=capture, selects=settings.selects, protocols=tuple(sorted(settings.protocols)),
        batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
        sam_batch_size=settings.sam_batch_size or settings.batch_size, device=str(adapter.device).split(":")[0],
        dtype=settings.dtype, progress=False, sam_dtype=settings.sam_dtype,
        share_image_prefix=settings.share_image_prefix, kv_cache=settings.kv_cache, overlap=settings.overlap,
    )
    # SAM's encoder batch and precision follow the settings; its weights are shared with the other runs.
    sam = SamSegmenter(segmenter.model, model_type=segmenter.model_type, checkpoint=None,
                       encoder_batch_size=config.sam_batch_size, dtype=settings.sam_dtype)
    # A fresh phrase-vector cache: no run profits from another's.
    vectors = CachedPhraseVectors(components.vectors) if components.vectors is not None else None
    pipeline = GroundingPipeline(adapter, sam, components.nlp, config=config, vectors=vectors)
    with tempfile.TemporaryDirectory(prefix="pixfound-run-") as folder:
        path = pathlib.Path(folder) / "samples.jsonl"
        synchronize(adapter.device)
        started = time.perf_counter()
        with RecordWriter(path) as writer:
            compute_records(list(samples), config.protocols, set(), pipeline, writer, batch_size=settings.batch_size,
                            progress=False, overlap=settings.overlap)
        synchronize(adapter.device)
        wall = time.perf_counter() - started
        written = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    clock = StageClock(adapter.device)
    for record in written:
        for stage in STAGES:
            clock.seconds[stage] += float((record.get("timings") or {}).get(f"{stage}_s") or 0.0)
    clock.seconds["io"] += writer.write_seconds
    return Run(capture, settings.batch_size, len(samples), wall, clock.finish(wall), [_signature(r) for r in written])


def _signature(record: dict) -> dict:
    """What the equality checks compare: answer, token ids, points, candidate and selected masks (RLE)."""
    grounding = record.get("grounding") or {}
    return dict(key=record["key"], answer=record.get("answer"), token_ids=record.get("token_ids"),
                points=grounding.get("points"), candidates=[c.get("mask_rle") for c in grounding.get("candidates", [])],
                selections={s: dict(mask_rle=v.get("mask_rle"), iou=v.get("iou"))
                            for s, v in (grounding.get("selections") or {}).items()})


def run_plain(samples: Sequence[Any], settings: Settings, components: Components) -> Run:
    """``generate`` without capture, on the pixfound pipeline's prompts and batches (prefixes shared alike)."""
    from pixfound.eval.prompts import build_prompt
    from pixfound.eval.records import applicable_protocols, record_key

    adapter = components.adapter
    clock = StageClock(adapter.device)
    records = []
    synchronize(adapter.device)
    started = time.perf_counter()
    for begin in range(0, len(samples), settings.batch_size):
        batch = list(samples[begin:begin + settings.batch_size])
        with clock("io"):
            loaded = {str(s.id): LoadedSample(s) for s in batch}
        prefixes = {}
        if settings.share_image_prefix:
            with clock("generate"):
                prefixes = {prefix.sample_id: prefix for prefix in adapter.encode_image_prefixes(list(loaded.values()))}
        for protocol in sorted(settings.protocols):
            todo = [s for s in batch if protocol in applicable_protocols(s, settings.protocols)]
            if not todo:
                continue
            prompts = [build_prompt(s, protocol) for s in todo]
            with clock("generate", synchronize_device=True):
                generations = adapter.generate([loaded[str(s.id)] for s in todo], prompts,
                                               max_new_tokens=settings.max_new_tokens, capture=None,
                                               batch_size=len(todo), kv_cache=settings.kv_cache,
                                               prefixes=[prefixes[str(s.id)] for s in todo] if prefixes else None)
            records += [dict(key=record_key(s.id, protocol), answer=g.text, token_ids=list(g.token_ids))
                        for s, g in zip(todo, generations)]
    wall = time.perf_counter() - started
    return Run("plain", settings.batch_size, len(samples), wall, clock.finish(wall), records)


def run_pipeline(label: str, settings: Settings, components: Components, samples: Sequence[Any]) -> Run:
    settings = settings_for(label, settings)
    name = base_pipeline(label)
    if name == "published":
        run = run_published(samples, settings, components)
    elif name == "plain":
        run = run_plain(samples, settings, components)
    else:
        run = run_pixfound(samples, settings, components, name)
    run.pipeline = label
    return run


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------
def measure_once(label: str, settings: Settings, components: Components, samples: Sequence[Any]) -> dict:
    """A warm-up on two samples, then one timed pass with its peak memory: one row of the table."""
    import torch

    warmup = dataclasses.replace(settings, batch_size=min(2, settings.batch_size),
                                 max_new_tokens=min(settings.max_new_tokens, 17))  # meets the kernels' variants
    run_pipeline(label, warmup, components, samples[:2])
    with PeakMemory(settings.device) as memory:
        run = run_pipeline(label, settings, components, samples)
    return dict(pipeline=label, batch_size=run.batch_size, images=run.images, wall_s=run.wall_s,
                images_per_s=run.images_per_s, stages=run.stages, records=run.records, peak_bytes=memory.peak_bytes,
                peak_measure=memory.measure, settings=dataclasses.asdict(settings_for(label, settings)),
                threads=torch.get_num_threads())


def measure_in_subprocess(label: str, settings: Settings, published_samples: Optional[int] = None) -> dict:
    """:func:`measure_once` in a fresh Python process: its peak memory is its own."""
    with tempfile.TemporaryDirectory(prefix="pixfound-e2e-") as folder:
        result = pathlib.Path(folder) / "row.json"
        job = json.dumps(dict(label=label, settings=dataclasses.asdict(settings), published_samples=published_samples,
                              result=str(result)))
        done = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", job],
                              capture_output=True, text=True)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"the run of {label!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(result.read_text(encoding="utf-8"))


def samples_for(label: str, settings: Settings, published_samples: Optional[int]) -> list:
    count = published_samples if label == "published" and published_samples else settings.samples
    return synthetic_samples(count, settings.image_hw, settings.seed)


def measure(settings: Settings, pipelines: Sequence[str] = PIPELINES, *, rounds: int = 1,
            components: Optional[Components] = None, isolate: bool = False, published_samples: Optional[int] = None,
            log: Callable[[str], None] = lambda line: None) -> list[dict]:
    """One row per pipeline, best of ``rounds`` interleaved rounds (peak memory: the largest of them),
    with the comparisons of :func:`compare` added.

    ``published_samples`` runs the (batch-1, slow) published recipe on fewer samples; images/s stays comparable.
    """
    for label in pipelines:
        base_pipeline(label)
    if not isolate and components is None:
        components = build_components(settings)
    best: dict[str, dict] = {}
    for round_index in range(rounds):
        for label in pipelines:
            if isolate:
                row = measure_in_subprocess(label, settings, published_samples)
            else:
                row = measure_once(label, settings, components, samples_for(label, settings, published_samples))
            log(f"round {round_index + 1}/{rounds} {label}: {row['images_per_s']:.3f} images/s")
            previous = best.get(label)
            peaks = [r["peak_bytes"] for r in (row, previous) if r is not None and r["peak_bytes"] is not None]
            if previous is None or row["wall_s"] < previous["wall_s"]:
                best[label] = row
            best[label]["peak_bytes"] = max(peaks) if peaks else None
            best[label]["rounds"] = round_index + 1
    return compare([best[label] for label in pipelines])


def agreement(left: Sequence[dict], right: Sequence[dict]) -> dict:
    """How far two runs' records agree, matched by key: counts of equal answers, points, candidate
    and selected masks, and the mean IoU between the selected masks."""
    from pixfound.eval import metrics
    from pixfound.grounding.select import rle_to_mask

    by_key = {r["key"]: r for r in right}
    common = [(a, by_key[a["key"]]) for a in left if a["key"] in by_key]
    grounded = [(a, b) for a, b in common if a.get("points") is not None and b.get("points") is not None]
    with_candidates = [(a, b) for a, b in grounded
                       if a.get("candidates") is not None and b.get("candidates") is not None]
    selections_equal, ious = 0, []
    for a, b in grounded:
        if set(a["selections"]) != set(b["selections"]):
            continue
        masks = [(a["selections"][s]["mask_rle"], b["selections"][s]["mask_rle"]) for s in a["selections"]]
        selections_equal += all(left_mask == right_mask for left_mask, right_mask in masks)
        ious += [float(metrics.iou(rle_to_mask(left_mask), rle_to_mask(right_mask))) for left_mask, right_mask in masks]
    out: dict[str, Any] = dict(
        records=len(common), missing=len(left) + len(right) - 2 * len(common),
        answers_equal=sum(a["answer"] == b["answer"] and a["token_ids"] == b["token_ids"] for a, b in common),
        grounded=len(grounded), points_equal=sum(a["points"] == b["points"] for a, b in grounded),
        candidate_masks_equal=(sum(a["candidates"] == b["candidates"] for a, b in with_candidates)
                               if with_candidates else None),
        selected_masks_equal=selections_equal, selected_masks_mean_iou=float(np.mean(ious)) if ious else None,
    )
    out["identical"] = (out["missing"] == 0 and out["answers_equal"] == len(common)
                        and out["points_equal"] == len(grounded) and selections_equal == len(grounded)
                        and out["candidate_masks_equal"] in (None, len(with_candidates)))
    return out


def compare(rows: list[dict]) -> list[dict]:
    """Add to ``rows`` (in place): ``x_published`` (images/s over the published recipe's),
    ``generate_vs_plain`` (generate stage over plain generation's), ``fused_vs_reference`` and
    ``vs_fused`` for the fused variants (:func:`agreement`)."""
    by_label = {row["pipeline"]: row for row in rows}
    published, plain = by_label.get("published"), by_label.get("plain")
    for row in rows:
        if published is not None:
            row["x_published"] = row["images_per_s"] / published["images_per_s"]
        if plain is not None and plain["stages"]["generate"] > 0 and row["pipeline"] != "published":
            row["generate_vs_plain"] = row["stages"]["generate"] / plain["stages"]["generate"]
        if row["pipeline"] in FUSED_VARIANTS and "fused" in by_label:
            row["vs_fused"] = agreement(row["records"], by_label["fused"]["records"])
    if "fused" in by_label and "reference" in by_label:
        by_label["fused"]["fused_vs_reference"] = agreement(by_label["fused"]["records"],
                                                            by_label["reference"]["records"])
    if "fused" in by_label and published is not None:
        by_label["fused"]["fused_vs_published"] = agreement(by_label["fused"]["records"], published["records"])
    return rows


def _agreement_note(title: str, same: dict) -> str:
    verdict = "identical" if same["identical"] else "different"
    return (f"{title}: {verdict} (answers {same['answers_equal']}/{same['records']}, points "
            f"{same['points_equal']}/{same['grounded']}, candidate masks {cell(same['candidate_masks_equal'])}/"
            f"{same['grounded']}, selected masks {same['selected_masks_equal']}/{same['grounded']}, mean IoU between "
            f"the selected masks {cell(same['selected_masks_mean_iou'], '{:.4f}')})")


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`measure`'s rows and the comparisons under it."""
    header = (["pipeline", "batch", "images", "images/s", "x published"] + [f"{STAGE_TITLES[s]} s" for s in STAGES]
              + ["generate / plain", "peak MiB"])
    body = [[row["pipeline"], row["batch_size"], row["images"], f"{row['images_per_s']:.3f}",
             cell(row.get("x_published"), "{:.2f}")] + [f"{row['stages'][s]:.3f}" for s in STAGES]
            + [cell(row.get("generate_vs_plain"), "{:.3f}"),
               cell(None if row["peak_bytes"] is None else row["peak_bytes"] / MIB, "{:.0f}")] for row in rows]
    notes = []
    for row in rows:
        if "fused_vs_reference" in row:
            notes.append(_agreement_note("fused vs reference", row["fused_vs_reference"]))
        if "fused_vs_published" in row:
            notes.append(_agreement_note("fused vs published recipe", row["fused_vs_published"]))
        if "vs_fused" in row:
            notes.append(_agreement_note(f"{row['pipeline']} vs fused", row["vs_fused"]))
    if rows:
        notes.append("stages: seconds summed over the run; capture is the part of generate that records the maps; "
                     f"other: wall time outside the stages; peak: {rows[0]['peak_measure']}")
    return markdown_table(header, body) + "\n\n" + "\n".join(f"- {note}" for note in notes)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _height_width(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 480x640, got {text!r}") from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(LLAVA_SIZES), default="tiny", help="random LLaVA size")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--published-samples", type=int, default=None,
                        help="samples of the (batch-1) published recipe; default: --samples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--protocols", default="1,3")
    parser.add_argument("--selects", default="oracle,similarity")
    parser.add_argument("--image-hw", type=_height_width, default=(96, 128), help="synthetic image size HxW")
    parser.add_argument("--sam", choices=SAM_KINDS, default="tiny")
    parser.add_argument("--sam-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--sam-batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pipelines", default=",".join(PIPELINES),
                        help=f"comma-separated among {', '.join(PIPELINES + tuple(FUSED_VARIANTS))}")
    parser.add_argument("--share-image-prefix", action="store_true")
    parser.add_argument("--kv-cache", choices=("preallocated", "dynamic"), default="preallocated")
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--isolate", action="store_true", help="each pipeline and round in a fresh process")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write every row here")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    import torch

    import pixfound

    if args.worker:
        job = json.loads(args.worker)
        settings = Settings(**job["settings"])
        torch.set_num_threads(settings.threads)
        row = measure_once(job["label"], settings, build_components(settings),
                           samples_for(job["label"], settings, job["published_samples"]))
        pathlib.Path(job["result"]).write_text(json.dumps(row), encoding="utf-8")
        return 0
    settings = Settings(
        size=args.size, samples=args.samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        protocols=tuple(int(p) for p in args.protocols.split(",")), selects=tuple(args.selects.split(",")),
        image_hw=args.image_hw, sam=args.sam, sam_dtype=args.sam_dtype, sam_batch_size=args.sam_batch_size,
        device=args.device, dtype=args.dtype, threads=args.threads, share_image_prefix=args.share_image_prefix,
        kv_cache=args.kv_cache, overlap=args.overlap,
    )
    torch.set_num_threads(settings.threads)
    print(f"pixfound {pixfound.__version__} from {pathlib.Path(pixfound.__file__).parent}", flush=True)
    print(f"{LLAVA_SIZES[settings.size].describe()}; settings {dataclasses.asdict(settings)}", flush=True)
    rows = measure(settings, [p.strip() for p in args.pipelines.split(",") if p.strip()], rounds=args.rounds,
                   isolate=args.isolate, published_samples=args.published_samples,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(dict(pixfound_path=str(pathlib.Path(pixfound.__file__).parent), rows=rows),
                                        indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

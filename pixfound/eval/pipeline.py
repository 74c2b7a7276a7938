"""The per-batch pipeline: generate → phrases → points → SAM → candidates → selections → records.

:class:`GroundingPipeline` turns a batch of samples and one protocol into one JSON-ready record
per sample (the lines of ``samples.jsonl``):

- protocols 1 and 2 score the answer: protocol 2 with the published rule-based letter parser;
  protocol 1 with the judge when one is given (the published yes/no grading question), otherwise
  with the same parser, and ``correct_method`` says which;
- protocols 1 and 3 ground the answer: the attention maps of the generated tokens are grouped
  into noun phrases, each phrase map's peak prompts SAM (3 candidates per phrase), and every
  selection strategy picks one mask (stored as COCO RLE with its IoU and success flag).

Each record carries per-stage wall times in seconds under ``timings``: ``io_s`` (image loading,
mask encoding), ``generate_s`` (the sample's share of its batch's ``generate`` call, capture
included), ``capture_s`` (the capture's own share when the adapter reports it), ``phrases_s``,
``upsample_peak_s``, ``sam_encoder_s`` (0 when the embedding was computed for another protocol of
the same batch), ``sam_decoder_s``, ``selection_s`` and ``judge_answer_s``. Work done once for the
whole batch (the spaCy parse of all answers, the SAM encoder call, the phrase-vector encoding) is
shared out equally among its samples.

Batch-level work: the answers of a batch are parsed by spaCy in one ``nlp.pipe`` pass, the SAM
image encoder runs once per batch of images (shared by protocols 1 and 3), and every phrase and
expression text of the batch goes to the phrase-vector model in one call, memoised per text
(:class:`pixfound.grounding.similarity.CachedPhraseVectors`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import pathlib
import time
from pixfound.errors import MissingFileError, UserError
from typing import Any, Optional, Sequence, Union

import numpy as np

from pixfound.eval import metrics
from pixfound.eval.prompts import JUDGE_SYSTEM_PROMPT, build_prompt, judge_prompt_for_sample
from pixfound.eval.config import EvalConfig
from pixfound.eval.records import record_key

__all__ = [
    "GroundingPipeline",
    "GroundingResult",
    "build_pipeline",
    "ground_demo",
    "load_eval_model",
    "load_segmenter",
    "torch_dtype",
    "worker_device",
]

logger = logging.getLogger("pixfound.eval")


def torch_dtype(name: str) -> Any:
    """``"float32"`` → ``torch.float32`` (also float16, bfloat16)."""
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


@functools.lru_cache(maxsize=2)
def _cached_model(name: str, device: str, dtype: str) -> Any:
    from pixfound.models import load_model

    return load_model(name, device=device, dtype=torch_dtype(dtype))


def load_eval_model(name: str, device: str, dtype: str) -> Any:
    """The model adapter (loaded once per process for a given name, device and dtype)."""
    return _cached_model(name, device, dtype)


def load_segmenter(config: EvalConfig) -> Any:
    """The SAM segmenter of ``config``: the tiny random SAM, or an official checkpoint."""
    from pixfound.grounding.sam import load_sam, tiny_sam

    if config.sam_model == "tiny":
        if config.sam_checkpoint is not None:
            raise ValueError("--sam-checkpoint was given with --sam-model tiny; name the checkpoint's model "
                             "type (vit_h, vit_l or vit_b)")
        return tiny_sam(config.sam_seed, device=config.device, encoder_batch_size=config.sam_batch_size,
                        dtype=config.sam_dtype)
    return load_sam(config.sam_model, config.sam_checkpoint, device=config.device,
                    encoder_batch_size=config.sam_batch_size, dtype=config.sam_dtype)


class _CachedImageSample:
    """What ``adapter.generate`` needs of a sample (``id``, ``load_image``), with the image loaded once."""

    def __init__(self, sample_id: str, image: Any):
        self.id = sample_id
        self._image = image

    def load_image(self) -> Any:
        return self._image


@dataclasses.dataclass
class GroundingResult:
    """Everything grounding produced for one answer (before it becomes a record)."""

    phrases: list            # pixfound.grounding.phrases.Phrase
    points: Any              # int64 tensor [G, P, 2] (x, y)
    masks: Any               # bool tensor [G, 3, H, W]
    scores: Any              # float32 tensor [G, 3]
    candidates: list         # pixfound.grounding.select.Candidate, sorted
    selections: dict         # strategy -> Selection


class GroundingPipeline:
    """Model + SAM + spaCy (+ phrase vectors, + judge) applied to batches of samples.

    ``process(samples, protocol)`` returns one record per sample; ``end_batch()`` forgets the
    images and SAM embeddings kept for the batch (protocols 1 and 3 of a sample share them).
    """

    def __init__(self, adapter: Any, segmenter: Any, nlp: Any, *, config: EvalConfig,
                 vectors: Any = None, judge: Any = None):
        self.adapter = adapter
        self.segmenter = segmenter
        self.nlp = nlp
        self.config = config.resolved()  # idempotent: every recipe setting decided
        self.vectors = vectors
        self.judge = judge
        if "similarity" in config.selects and vectors is None:
            raise ValueError("selection 'similarity' needs phrase vectors (see --phrase-vectors)")
        if "judge" in config.selects and judge is None:
            raise ValueError("selection 'judge' needs a judge (--judge openai:MODEL or hf:MODEL)")
        if vectors is not None and not hasattr(vectors, "prefetch"):
            from pixfound.grounding.similarity import CachedPhraseVectors

            vectors = self.vectors = CachedPhraseVectors(vectors)
        self._images: dict[str, Any] = {}
        self._embeddings: dict[str, Any] = {}
        self._prefixes: dict[str, Any] = {}  # sample id -> ImagePrefix (config.share_image_prefix)
        self._gt_masks: dict[str, Optional[np.ndarray]] = {}
        self._phrase_tokenizer = adapter.tokenizer  # the grounding stage's (see use_private_tokenizer)

    # -- description ----------------------------------------------------------------------------
    def components(self) -> dict:
        """What produced the results (recorded in run.json and summary.md)."""
        from pixfound.grounding.phrases import spacy_pipeline_info

        model = self.adapter
        return {
            "model": {
                "name": getattr(model, "name", self.config.model),
                "family": getattr(model, "family", None),
                "class": type(getattr(model, "model", model)).__name__,
                # the device type only: torchrun ranks use different GPUs for the same run
                "device": str(getattr(model, "device", self.config.device)).split(":")[0],
                "dtype": str(getattr(model, "dtype", self.config.dtype)).replace("torch.", ""),
            },
            "sam": self.segmenter.describe() if hasattr(self.segmenter, "describe") else {"model_type": self.config.sam_model},
            "spacy": spacy_pipeline_info(self.nlp) if self.nlp is not None else None,
            "phrase_vectors": getattr(self.vectors, "name", None),
            "judge": getattr(self.judge, "name", None),
            "capture": self.config.capture,
            "random_weights": self.config.uses_random_weights,
        }

    # -- batches --------------------------------------------------------------------------------
    def end_batch(self) -> None:
        self._images.clear()
        self._embeddings.clear()
        self._prefixes.clear()
        self._gt_masks.clear()

    def forget(self, sample_ids: Sequence[Any]) -> None:
        """Forget what is kept for these samples only (a later batch may already be generating)."""
        keys = {key for sample_id in sample_ids for key in (sample_id, str(sample_id))}  # prefixes use str ids
        for cache in (self._images, self._embeddings, self._prefixes, self._gt_masks):
            for key in keys:
                cache.pop(key, None)

    def _image(self, sample: Any) -> tuple[Any, float]:
        if sample.id in self._images:
            return self._images[sample.id], 0.0
        started = time.perf_counter()
        image = sample.load_image()
        self._images[sample.id] = image
        return image, time.perf_counter() - started

    def _embed(self, samples: Sequence[Any]) -> float:
        """SAM image embeddings of the samples that lack one (one encoder call); returns seconds per new image."""
        missing = [s for s in samples if s.id not in self._embeddings]
        if not missing:
            return 0.0
        started = time.perf_counter()
        embeddings = self.segmenter.embed_images([self._images[s.id] for s in missing])
        for sample, embedding in zip(missing, embeddings):
            self._embeddings[sample.id] = embedding
        return (time.perf_counter() - started) / len(missing)

    @property
    def shares_image_prefix(self) -> bool:
        return bool(self.config.share_image_prefix) and bool(getattr(self.adapter, "shares_image_prefix", False))

    def _image_prefixes(self, items: Sequence[Any]) -> Optional[list]:
        """Cached prompt prefixes (system prompt + image) of the items, encoding the missing ones in one call."""
        if not self.shares_image_prefix:
            return None
        missing = [item for item in items if item.id not in self._prefixes]
        if missing:
            for prefix in self.adapter.encode_image_prefixes(missing):
                self._prefixes[prefix.sample_id] = prefix
        return [self._prefixes[item.id] for item in items]

    def prompts(self, samples: Sequence[Any], protocol: int) -> list[str]:
        if protocol == 3 and self.config.grounding != "attention":
            return [self.native_prompt(s) for s in samples]
        return [build_prompt(s, protocol, vqa_template=self.config.vqa_template,
                             grounding_template=self.config.grounding_template, text=self.config.prompt_text)
                for s in samples]

    def native_prompt(self, sample: Any) -> str:
        """Protocol 3 of the native modes: the published point, box or box-baseline question.

        The published scripts insert the CSV cell (``--prompt-text raw``: ``"Point to the  the dog, ..."``);
        the normalised text leaves the expression's article out so that the question reads as English.
        """
        from pixfound.eval.prompts import strip_article
        from pixfound.grounding.baseline import BOX_PROMPT_TEMPLATE
        from pixfound.grounding.native import box_prompt, point_prompt

        raw = (getattr(sample, "meta", None) or {}).get("raw_expression")
        if self.config.prompt_text == "raw" and isinstance(raw, str):
            target = raw
        else:
            target = strip_article(sample.expression)
        if self.config.grounding == "points":
            return point_prompt(target)
        if self.config.grounding == "boxes":
            return box_prompt(target)
        return BOX_PROMPT_TEMPLATE.format(expression=target)

    def grounds(self, protocol: int) -> bool:
        """Whether ``protocol``'s answers are grounded: 1 and 3 by attention, only 3 in the other modes."""
        return protocol in (1, 3) if self.config.grounding == "attention" else protocol == 3

    def sampling_seed(self, sample_id: Any, protocol: Optional[int]) -> Optional[int]:
        """The sampling seed of one (sample, protocol) answer: from the run seed and the pair alone, so
        batch size, shards, ``--overlap`` and resume cannot change it. None when decoding greedily."""
        from pixfound.models.sampling import row_seed

        return row_seed(self.config.seed, sample_id, protocol) if self.config.do_sample else None

    def generate(self, items: Sequence[Any], prompts: Sequence[str], *, capture: Optional[str],
                 protocol: Optional[int] = None) -> tuple[list, float]:
        """Generations for (sample-like, prompt) pairs in one batch; returns them and seconds per sample."""
        config = self.config
        started = time.perf_counter()
        # The prefix encoding counts as generate time of the batch that first needs it.
        prefixes = self._image_prefixes(items)
        generations = self.adapter.generate(
            list(items), list(prompts), max_new_tokens=config.max_new_tokens, capture=capture,
            batch_size=len(items), first_token_row=config.first_token_row, do_sample=config.do_sample,
            temperature=config.temperature, top_k=config.top_k or None, seed=config.seed,
            sample_seeds=[self.sampling_seed(item.id, protocol) for item in items] if config.do_sample else None,
            backend=config.kernel_backend, prefixes=prefixes, cudnn_attention=config.cudnn_attention,
            kv_cache=config.kv_cache,
        )
        return generations, (time.perf_counter() - started) / max(1, len(items))

    def native_chat(self, items: Sequence[Any], prompts: Sequence[str], protocol: int) -> tuple[list, float]:
        """Answers in the published Qwen scripts' message layout (``adapter.native_chat``), every protocol.

        For boxes, protocol 3 shows the model the image at twice its size, as the published box
        script does; coordinates are read back in the original image.
        """
        started = time.perf_counter()
        images = [item.load_image() for item in items]
        if protocol == 3 and self.config.grounding == "boxes":
            images = [image.resize((2 * image.width, 2 * image.height)) for image in images]
        replies = self.adapter.native_chat(images, list(prompts), max_new_tokens=self.config.max_new_tokens)
        elapsed = (time.perf_counter() - started) / max(1, len(items))
        generations = [NativeGeneration(str(item.id), prompt, reply.text, reply.frame_hw, {"generate_s": elapsed})
                       for item, prompt, reply in zip(items, prompts, replies)]
        return generations, elapsed

    def process(self, samples: Sequence[Any], protocol: int) -> list[dict]:
        """One record per sample for ``protocol`` (see the module docstring)."""
        return self.grounding_stage(self.generate_stage(samples, protocol))

    def generate_stage(self, samples: Sequence[Any], protocol: int) -> "GeneratedBatch":
        """The first half of :meth:`process`: load the images, build the prompts and generate (the model's work)."""
        if protocol not in (1, 2, 3):
            raise ValueError(f"protocol must be 1, 2 or 3, got {protocol!r}")
        load_times = []
        items = []
        for sample in samples:
            image, seconds = self._image(sample)
            load_times.append(seconds)
            items.append(_CachedImageSample(str(sample.id), image))
        prompts = self.prompts(samples, protocol)
        if self.config.grounding in ("points", "boxes"):
            generations, generate_share = self.native_chat(items, prompts, protocol)
        else:
            capture = self.config.capture if self.grounds(protocol) and self.config.grounding == "attention" else None
            generations, generate_share = self.generate(items, prompts, capture=capture, protocol=protocol)
        for sample, generation in zip(samples, generations):
            if generation.sample_id != str(sample.id):
                raise RuntimeError(f"generation for {generation.sample_id!r} came back for sample {sample.id!r}")
        return GeneratedBatch(list(samples), protocol, prompts, list(generations), load_times, generate_share)

    def grounding_stage(self, generated: "GeneratedBatch") -> list[dict]:
        """The second half of :meth:`process`: score, ground (SAM) and build the records of a generated batch.

        It may run in a second thread beside the next batch's :meth:`generate_stage`
        (:attr:`overlaps_safely`): it reads the images that stage loaded, and otherwise only state
        of its own (SAM, spaCy, phrase vectors, a private copy of the tokenizer).
        """
        samples, protocol = generated.samples, generated.protocol
        grounds = self.grounds(protocol)
        native = self.config.grounding != "attention"
        encoder_share = self._embed(samples) if grounds else 0.0
        prepared = (self._prepare_grounding(samples, generated.generations) if grounds and not native
                    else [None] * len(samples))
        encoded_now = set()
        records = []
        for sample, prompt, generation, load_s, ready in zip(samples, generated.prompts, generated.generations,
                                                             generated.load_times, prepared):
            timings: dict[str, Optional[float]] = {
                "io_s": load_s,
                "generate_s": generated.generate_share,
                "capture_s": generation.timings.get("capture_s"),
            }
            record = self._base_record(sample, protocol, prompt, generation)
            if protocol in (1, 2):
                record.update(self._score_answer(sample, protocol, generation.text, timings))
            if grounds:
                image = self._images[sample.id]
                first_use = sample.id not in encoded_now
                encoded_now.add(sample.id)
                timings["sam_encoder_s"] = encoder_share if first_use else 0.0
                if native:
                    result, native_info = self.ground_native(image, generation, expression=self.similarity_expression(
                        sample), gt_mask=self._gt_mask(sample, image), embedding=self._embeddings[sample.id],
                        timings=timings)
                    record["grounding"] = self._grounding_record(result, sample, image, timings)
                    record["grounding"]["native"] = native_info
                else:
                    result = self.ground(image, generation, sample_id=str(sample.id),
                                         expression=self.similarity_expression(sample),
                                         gt_mask=self._gt_mask(sample, image), embedding=self._embeddings[sample.id],
                                         timings=timings, prepared=ready)
                    record["grounding"] = self._grounding_record(result, sample, image, timings)
            else:
                record["grounding"] = None
            record["timings"] = timings
            records.append(record)
        return records

    @property
    def overlaps_safely(self) -> bool:
        """Whether :meth:`grounding_stage` may run beside the next :meth:`generate_stage`.

        Not with a judge: an ``hf:`` judge generates with the same model, and an API judge's
        requests are better kept in order.
        """
        return self.judge is None

    def use_private_tokenizer(self) -> None:
        """Give the grounding stage its own copy of the tokenizer.

        A fast tokenizer is one Rust object; encoding with padding in one thread while another
        thread encodes can fail with "Already borrowed". Same class and settings: same spans.
        """
        if self._phrase_tokenizer is self.adapter.tokenizer:
            self._phrase_tokenizer = copy.deepcopy(self.adapter.tokenizer)

    def _prepare_grounding(self, samples: Sequence[Any], generations: Sequence[Any]) -> list["PreparedGrounding"]:
        """Phrases and points of every answer of the batch (one spaCy pass), and their phrase vectors."""
        from pixfound.grounding.phrases import phrases_from_generations

        started = time.perf_counter()
        parsed = phrases_from_generations(generations, self._phrase_tokenizer, self.nlp, mean=self.config.map_mean,
                                          zero_flat=self.config.zero_flat_maps)
        parse_share = (time.perf_counter() - started) / max(1, len(generations))
        prepared = [self._phrase_points(generation, phrases, maps, parse_share)
                    for generation, (phrases, maps) in zip(generations, parsed)]
        if "similarity" in self.config.selects and self.vectors is not None:
            normalize = self.phrase_normalizer
            started = time.perf_counter()
            texts = [normalize(self.similarity_expression(s)) for s in samples if self.similarity_expression(s)]
            texts += [normalize(str(p.text)) for ready in prepared for p in ready.phrases]
            self.vectors.prefetch(texts)
            share = (time.perf_counter() - started) / max(1, len(samples))
            for ready in prepared:
                ready.vectors_s = share
        return prepared

    @property
    def phrase_normalizer(self) -> Any:
        """How phrases and expressions are normalised before their vectors are taken (--article-rule)."""
        from pixfound.grounding.similarity import PHRASE_NORMALIZERS

        return PHRASE_NORMALIZERS[self.config.article_rule]

    def similarity_expression(self, sample: Any) -> Optional[str]:
        """The expression text that similarity compares with: the benchmark's raw cell under
        ``--prompt-text raw`` (as the published script read it), else the sample's expression."""
        expression = getattr(sample, "expression", None)
        if not isinstance(expression, str) or not expression.strip():
            return None
        raw = (getattr(sample, "meta", None) or {}).get("raw_expression")
        return raw if self.config.prompt_text == "raw" and isinstance(raw, str) else expression

    def _phrase_points(self, generation: Any, phrases: list, maps: Any, phrases_s: float) -> "PreparedGrounding":
        """Each phrase's point prompt(s)."""
        from pixfound.grounding.points import phrase_points

        config = self.config
        started = time.perf_counter()
        geometry = generation.geometry
        if config.upsample_fit == "published" and getattr(geometry, "published_fit", None):
            geometry = dataclasses.replace(geometry, fit=geometry.published_fit)
        points = phrase_points(maps, geometry, point_rank=config.point_rank, num_points=config.num_points,
                               backend=config.kernel_backend)
        return PreparedGrounding(phrases, points, phrases_s=phrases_s, upsample_peak_s=time.perf_counter() - started)

    # -- pieces ---------------------------------------------------------------------------------
    def _base_record(self, sample: Any, protocol: int, prompt: str, generation: Any) -> dict:
        config = self.config
        height, width = (int(v) for v in (self._images[sample.id].height, self._images[sample.id].width))
        return {
            "key": record_key(sample.id, protocol),
            "sample_id": str(sample.id),
            "index": int(sample.index),
            "benchmark": sample.benchmark,
            "protocol": protocol,
            "task": sample.task,
            "pair_index": sample.pair_index,
            "has_expression": bool(sample.has_expression),
            "expression": sample.expression,
            "options": list(sample.options),
            # the image's file stem: the {image} of the published file names (pixfound export)
            "image": pathlib.Path(sample.image_path).stem if getattr(sample, "image_path", None) else str(sample.id),
            "image_hw": [height, width],
            "prompt": prompt,
            "answer": generation.text,
            "token_ids": [int(t) for t in generation.token_ids],
            "generation": {
                "recipe": config.recipe,
                "max_new_tokens": config.max_new_tokens,
                "do_sample": config.do_sample,
                "temperature": config.temperature if config.do_sample else None,
                "top_k": config.top_k if config.do_sample else None,
                "seed": config.seed if config.do_sample else None,
                "sample_seed": self.sampling_seed(sample.id, protocol),
                # whether the answer ended by EOS (else it ran into max_new_tokens)
                "stopped": generation.stop_map is not None if generation.maps is not None else None,
                "capture": config.capture if protocol in (1, 3) else None,
                "first_token_row": config.first_token_row,
                "vqa_template": config.vqa_template,
                "grounding_template": config.grounding_template,
                # whether this answer reused its image's prefix cache (--share-image-prefix)
                "image_prefix_shared": bool(generation.timings.get("prefix_shared", False)),
            },
        }

    def _score_answer(self, sample: Any, protocol: int, reply: str, timings: dict) -> dict:
        """Correctness of an answer: protocol 2 and ungraded protocol 1 by the rule-based parser;
        protocol 1 by the judge with the published grading prompt when one is configured."""
        from pixfound.errors import JudgeError

        config = self.config
        letter = metrics.normalize_letter(sample.answer, sample.options)
        parsed = metrics.parse_choice(reply, sample.options, style=config.parse_style)
        out: dict[str, Any] = {"answer_letter": letter, "parsed_choice": parsed,
                               "correct": parsed == letter, "correct_method": "rule"}
        if protocol == 1 and self.judge is not None and config.accuracy_grader == "judge":
            published = config.judge_rules == "published"
            question = judge_prompt_for_sample(sample, reply, text=config.prompt_text, image_line=published)
            started = time.perf_counter()
            try:
                judge_reply = self.judge.ask([], question, system=JUDGE_SYSTEM_PROMPT)
            except JudgeError as error:
                # The run goes on; the record says this answer fell back to the rule-based parse.
                out["judge_error"] = str(error)
                logger.warning("sample %s: the judge failed to grade the answer (%s); graded by rule instead",
                               sample.id, error)
            else:
                verdict = metrics.parse_judge_verdict(judge_reply, rules=config.judge_rules)
                out.update(correct=verdict is True, correct_method=f"judge:{getattr(self.judge, 'name', 'judge')}",
                           judge_reply=judge_reply, judge_verdict=verdict)
            timings["judge_answer_s"] = time.perf_counter() - started
        return out

    def _gt_mask(self, sample: Any, image: Any) -> Optional[np.ndarray]:
        """The sample's ground-truth mask (loaded once per batch), or None when it has none."""
        if sample.id in self._gt_masks:
            return self._gt_masks[sample.id]
        try:
            mask = np.asarray(sample.gt_mask, dtype=bool)
        except (ValueError, OSError) as error:
            logger.debug("sample %s has no usable ground truth: %s", sample.id, error)
            mask = None
        if mask is not None and mask.shape != (image.height, image.width):
            raise ValueError(f"sample {sample.id}: ground-truth mask is {mask.shape} but the image is "
                             f"{(image.height, image.width)} (H, W)")
        self._gt_masks[sample.id] = mask
        return mask

    def ground(self, image: Any, generation: Any, *, sample_id: str, expression: Optional[str],
               gt_mask: Optional[np.ndarray], embedding: Any = None, timings: Optional[dict] = None,
               selects: Optional[Sequence[str]] = None, prepared: Optional["PreparedGrounding"] = None,
               ) -> GroundingResult:
        """Phrases, points, SAM candidates and selections for one generated answer on ``image``.

        ``prepared`` holds the phrases and points when :meth:`process` computed them for the batch.
        """
        import torch

        from pixfound.grounding.select import build_candidates, select_judge, select_oracle, select_similarity

        timings = {} if timings is None else timings
        config = self.config
        if prepared is None:
            from pixfound.grounding.phrases import phrases_from_generation

            started = time.perf_counter()
            phrases, maps = phrases_from_generation(generation, self._phrase_tokenizer, self.nlp)
            prepared = self._phrase_points(generation, phrases, maps, time.perf_counter() - started)
        phrases, points = prepared.phrases, prepared.points
        timings["phrases_s"] = prepared.phrases_s
        timings["upsample_peak_s"] = prepared.upsample_peak_s
        height, width = image.height, image.width
        started = time.perf_counter()
        if phrases:
            if embedding is None:
                encode_started = time.perf_counter()
                embedding = self.segmenter.embed_images([image])[0]
                timings["sam_encoder_s"] = time.perf_counter() - encode_started
                started = time.perf_counter()
            self.segmenter.set_embedding(embedding)
            masks, scores = self.segmenter.segment_points(points)
        else:
            masks = torch.zeros((0, 3, height, width), dtype=torch.bool)
            scores = torch.zeros((0, 3), dtype=torch.float32)
        timings["sam_decoder_s"] = time.perf_counter() - started
        started = time.perf_counter()
        candidates = build_candidates(phrases, points, masks, scores)
        selections: dict[str, Any] = {}
        for strategy in (config.selects if selects is None else selects):
            if strategy == "oracle":
                if gt_mask is not None:
                    selections[strategy] = select_oracle(candidates, gt_mask, ties=config.oracle_ties)
            elif expression is None:
                selections[strategy] = _empty_selection(strategy, (height, width), "no_expression")
            elif strategy == "similarity":
                selections[strategy] = select_similarity(candidates, phrases, expression, self.vectors,
                                                         image_size=(height, width), pick=config.similarity_pick,
                                                         normalize=self.phrase_normalizer)
            elif strategy == "judge":
                selections[strategy] = select_judge(candidates, image, expression, self.judge, rules=config.judge_rules)
            else:
                raise ValueError(f"unknown selection strategy {strategy!r}")
        # this sample's share of the batch's phrase-vector call counts as selection time
        timings["selection_s"] = prepared.vectors_s + time.perf_counter() - started
        return GroundingResult(phrases, points, masks, scores, candidates, selections)

    def ground_native(self, image: Any, generation: Any, *, expression: Optional[str], gt_mask: Optional[np.ndarray],
                      embedding: Any, timings: dict) -> tuple[GroundingResult, dict]:
        """SAM masks from the model's own points or boxes (or the box baseline's reply), and the selections.

        The candidates sit under one pseudo-phrase named after the mode, mask after mask, as the
        published scripts wrote them (``{image}_000_{mask:03d}.png``): for points every union of one
        mask per point (:func:`pixfound.grounding.native.point_candidates`), for boxes and the baseline
        the single union of each box's mask, which the ``model`` selection scores. A reply that
        cannot be read is no prediction: one empty candidate.
        """
        import torch

        from pixfound.grounding import native
        from pixfound.grounding.baseline import baseline_mask
        from pixfound.grounding.phrases import Phrase
        from pixfound.grounding.select import Selection, build_candidates, select_judge, select_oracle

        mode = self.config.grounding
        height, width = image.height, image.width
        started = time.perf_counter()
        self.segmenter.set_embedding(embedding)
        info: dict[str, Any] = {"mode": mode, "reply": generation.text}
        if mode == "points":
            points = native.parse_points(generation.text, generation.frame_hw, (height, width))
            info["points"] = None if points is None else points.tolist()
            if points is None or len(points) == 0:
                masks = np.zeros((1, 1, height, width), dtype=bool)
            else:
                points = np.clip(points, 0, [width - 1, height - 1])
                sam_masks, _ = self.segmenter.segment_points(torch.as_tensor(points[:, None, :]))
                masks = native.point_candidates(sam_masks.cpu().numpy())[None]
        elif mode == "boxes":
            boxes = native.parse_boxes(generation.text, generation.frame_hw, (height, width))
            info["boxes"] = None if boxes is None else boxes.tolist()
            union = np.zeros((height, width), dtype=bool)
            if boxes is not None and len(boxes):
                box_masks, _ = self.segmenter.segment_boxes(boxes.astype(np.float32), multimask_output=False)
                union = box_masks.cpu().numpy().any(axis=0)
            masks = union[None, None]
        else:
            result = baseline_mask(generation.text, self.segmenter)
            info["boxes"] = result.boxes.tolist()
            masks = np.asarray(result.mask, dtype=bool)[None, None]
        info["no_prediction"] = not masks.any() and (info.get("points") is None and info.get("boxes") in (None, []))
        timings["sam_decoder_s"] = time.perf_counter() - started
        started = time.perf_counter()
        phrase = Phrase(index=0, text=mode, root=mode, char_start=0, char_end=0, position_pct=0.0)
        anchor = np.full((1, 1, 2), -1, dtype=np.int64)
        scores = np.zeros(masks.shape[:2], dtype=np.float32)
        candidates = build_candidates([phrase], anchor, masks, scores)
        selections: dict[str, Any] = {}
        for strategy in self.config.selects:
            if strategy == "oracle" and gt_mask is not None:
                selections[strategy] = select_oracle(candidates, gt_mask, ties=self.config.oracle_ties)
            elif strategy == "judge" and expression is not None:
                selections[strategy] = select_judge(candidates, image, expression, self.judge,
                                                    rules=self.config.judge_rules)
            elif strategy == "model":
                chosen = candidates[0]
                mask = chosen.mask
                if mask.any():
                    selections[strategy] = Selection("model", 0, mask, info={"reason": "the model's mask"},
                                                     candidate=chosen)
                else:
                    selections[strategy] = Selection("model", None, mask, info={"reason": "empty"})
        timings["selection_s"] = time.perf_counter() - started
        return GroundingResult([phrase], torch.as_tensor(anchor), torch.as_tensor(masks), torch.as_tensor(scores),
                               candidates, selections), info

    def _grounding_record(self, result: GroundingResult, sample: Any, image: Any, timings: dict) -> dict:
        from pixfound.grounding.select import candidate_ious, mask_to_rle

        gt = self._gt_mask(sample, image)
        image_area = image.height * image.width
        gt_area = None if gt is None else int(gt.sum())
        started = time.perf_counter()
        ious = None
        if gt is not None and result.candidates:
            oracle = result.selections.get("oracle")
            known = None if oracle is None else oracle.info.get("ious")
            # the oracle compared every candidate with this ground truth already
            ious = known if known is not None and len(known) == len(result.candidates) else candidate_ious(
                result.candidates, gt)
        timings["selection_s"] = (timings.get("selection_s") or 0.0) + time.perf_counter() - started
        started = time.perf_counter()  # from here on: IoUs of the selections and RLE encoding (I/O)
        rles = self._candidate_rles(result) if self.config.save_candidates else None
        candidates = []
        for position, candidate in enumerate(result.candidates):
            entry = {
                "phrase_index": candidate.phrase_index,
                "mask_index": candidate.mask_index,
                "points": [list(p) for p in candidate.points],
                "sam_score": float(candidate.sam_score),
                "area": candidate.area,
                "iou": None if ious is None else float(ious[position]),
            }
            if self.config.save_candidates:
                entry["mask_rle"] = rles[candidate.row] if rles is not None else mask_to_rle(candidate.mask)
            candidates.append(entry)
        selections = {}
        for strategy, selection in result.selections.items():
            entry = selection.to_record(include_mask=False)
            chosen = selection.candidate
            entry["mask_rle"] = (rles[chosen.row] if rles is not None and chosen is not None
                                 else mask_to_rle(selection.mask))
            pred_area = int(np.count_nonzero(selection.mask))
            # A missing prediction (no mask file for the published evaluation to read) scores 0.
            iou = None if gt is None else (0.0 if selection.missing else metrics.iou(selection.mask, gt))
            entry.update(
                iou=iou,
                pred_area=pred_area,
                grounded=None if gt is None else metrics.grounding_success_from_stats(iou, gt_area, pred_area, image_area),
            )
            selections[strategy] = _jsonable(entry)
        timings["io_s"] = (timings.get("io_s") or 0.0) + time.perf_counter() - started
        return {
            "gt_area": gt_area,
            "phrases": [_jsonable(p.to_dict()) for p in result.phrases],
            "points": result.points.tolist(),
            "num_candidates": len(candidates),
            "candidates": candidates,
            "selections": selections,
        }


    @staticmethod
    def _candidate_rles(result: GroundingResult) -> Optional[list]:
        """RLE of every SAM mask, by candidate row, straight from the dense masks (no unpacking); None if unusable."""
        from pixfound.grounding.select import masks_to_rle

        masks = result.masks
        if not result.candidates or getattr(masks, "ndim", 0) != 4:
            return None
        if any(c.packed is not result.candidates[0].packed for c in result.candidates):
            return None
        num_phrases, per_phrase, height, width = masks.shape
        if len(result.candidates[0].packed) != num_phrases * per_phrase:
            return None
        return masks_to_rle(masks.reshape(num_phrases * per_phrase, height, width))


@dataclasses.dataclass
class NativeGeneration:
    """A reply of ``adapter.native_chat``, shaped like the parts of a Generation the records read."""

    sample_id: str
    prompt: str
    text: str
    frame_hw: tuple[int, int]      # the (height, width) in which the model writes coordinates
    timings: dict
    token_ids: list = dataclasses.field(default_factory=list)
    maps: Any = None
    stop_map: Any = None


@dataclasses.dataclass
class GeneratedBatch:
    """What :meth:`GroundingPipeline.generate_stage` hands to :meth:`GroundingPipeline.grounding_stage`."""

    samples: list
    protocol: int
    prompts: list            # str per sample
    generations: list        # the adapter's Generation per sample
    load_times: list         # seconds spent loading each image (0 when cached)
    generate_share: float    # seconds of the batch's generate call per sample


@dataclasses.dataclass
class PreparedGrounding:
    """Phrases and point prompts of one answer, with the seconds spent on them (its share of batch work)."""

    phrases: list            # pixfound.grounding.phrases.Phrase
    points: Any              # int64 tensor [G, P, 2] (x, y)
    phrases_s: float = 0.0
    upsample_peak_s: float = 0.0
    vectors_s: float = 0.0


def _empty_selection(strategy: str, shape: tuple[int, int], reason: str) -> Any:
    from pixfound.grounding.select import Selection

    return Selection(strategy, None, np.zeros(shape, dtype=bool), info={"reason": reason})


def _jsonable(value: Any) -> Any:
    """Plain JSON types (NumPy scalars and arrays, tuples) all the way down; NaN/inf become None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if np.isfinite(value) else None
    return value


# ---------------------------------------------------------------------------------------------
# Building the pipeline
# ---------------------------------------------------------------------------------------------


def worker_device(device: str) -> str:
    """``"cuda"`` becomes ``"cuda:LOCAL_RANK"`` under torchrun, so each rank uses its own GPU."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # More ranks than GPUs (e.g. 2 processes sharing one card): wrap around.
        return f"cuda:{int(local_rank) % max(1, torch.cuda.device_count())}"
    return device


def build_pipeline(config: EvalConfig, *, need_vectors: Optional[bool] = None, need_judge: Optional[bool] = None
                   ) -> GroundingPipeline:
    """Load everything ``config`` names: model (cached per process), SAM, spaCy, phrase vectors, judge."""
    import torch

    from pixfound.eval.judge import make_judge
    from pixfound.grounding.phrases import load_spacy

    config = config.resolved()
    torch.manual_seed(config.seed)
    # What a user is most likely to lack loads first, before the (slow) model: spaCy, vectors.
    grounds = any(p in (1, 3) for p in config.protocols)
    nlp = load_spacy(config.spacy_pipeline) if grounds or need_vectors else None
    vectors = None
    if need_vectors if need_vectors is not None else ("similarity" in config.selects and grounds):
        from pixfound.grounding.similarity import load_phrase_vectors

        vectors = load_phrase_vectors(config.phrase_vectors, nlp=nlp, device="cpu")
    judge = None
    wants_judge = need_judge if need_judge is not None else config.has_judge
    _, _, judge_model = config.judge.partition(":")
    # an hf judge naming the evaluated model reuses it; any other judge is built (and checked) first
    reuse_model = wants_judge and config.judge.lower().startswith("hf:") and judge_model.strip() == config.model
    if wants_judge and not reuse_model:
        judge = make_judge(config.judge, base_url=config.judge_base_url)
    device = worker_device(config.device)
    adapter = load_eval_model(config.model, device, config.dtype)
    if reuse_model:
        judge = make_judge(config.judge, base_url=config.judge_base_url, adapter=adapter)
    if config.grounding in ("points", "boxes") and not getattr(adapter, "writes_coordinates", False):
        raise UserError(f"--grounding {config.grounding} needs a model that writes its own points and boxes "
                        f"(Qwen2.5-VL, Qwen3-VL); {config.model} is {getattr(adapter, 'family', '?')}. Use "
                        "--grounding attention or baseline")
    if config.share_image_prefix and not getattr(adapter, "shares_image_prefix", False):
        raise UserError(f"--share-image-prefix works for the LLaVA families only; {config.model} "
                        f"({getattr(adapter, 'family', '?')}) places its image tokens with positions that a "
                        "shared prefix cannot keep. Leave the flag out")
    segmenter = load_segmenter(dataclasses.replace(config, device=device))
    return GroundingPipeline(adapter, segmenter, nlp, config=config, vectors=vectors, judge=judge)


# ---------------------------------------------------------------------------------------------
# pixfound ground: the interpretability demo for one image
# ---------------------------------------------------------------------------------------------


def ground_outputs(image_path: Union[str, pathlib.Path], output: Union[str, pathlib.Path], *,
                   force: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
    """The PNG and JSON paths ``pixfound ground`` writes for ``output``, checked: never the input
    image, and never an earlier result unless ``force``."""
    from pixfound.errors import OutputExistsError

    output = pathlib.Path(output)
    targets = (output.with_suffix(".png"), output.with_suffix(".json"))
    source = pathlib.Path(image_path)
    for target in targets:
        if source.exists() and target.exists() and target.resolve() == source.resolve():
            raise UserError(f"--output {output} would write {target}, which is the input image; choose another "
                            "--output")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise OutputExistsError(f"{' and '.join(existing)} already exist; pass --force to replace them, or choose "
                                "another --output")
    return targets


def ground_demo(pipeline: GroundingPipeline, image_path: Union[str, pathlib.Path], prompt: str, *,
                expression: Optional[str] = None, output: Union[str, pathlib.Path], force: bool = False) -> dict:
    """Answer ``prompt`` about one image, ground every noun phrase, write ``<output>.png`` and ``<output>.json``.

    The PNG has one row per phrase (label: the phrase), showing its point and its 3 SAM candidates.
    With ``expression``, the judge (if the pipeline has one) or else phrase similarity picks one
    phrase and mask, which is framed in red.
    """
    from PIL import Image, UnidentifiedImageError

    from pixfound.eval.report import render_ground_grid

    path = pathlib.Path(image_path)
    if not path.is_file():
        raise MissingFileError(f"--image {path} does not exist")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"--image {path} is not a readable image: {error}") from None
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("--prompt must be a non-empty text")
    item = _CachedImageSample(path.stem, image)
    expression = expression.strip() if expression else None
    generations, _ = pipeline.generate([item], [prompt], capture=pipeline.config.capture, protocol=1)
    generation = generations[0]
    strategy = None
    if expression:
        strategy = "judge" if pipeline.judge is not None else ("similarity" if pipeline.vectors is not None else None)
        if strategy is None:
            logger.warning("--expression given but neither a judge nor phrase vectors are loaded; nothing is picked")
    timings: dict = {}
    result = pipeline.ground(image, generation, sample_id=item.id, expression=expression, gt_mask=None,
                             timings=timings, selects=[strategy] if strategy else [])
    phrase_rows = [p.to_dict() for p in result.phrases]
    masks = result.masks.numpy() if hasattr(result.masks, "numpy") else np.asarray(result.masks)
    scores = result.scores.numpy() if hasattr(result.scores, "numpy") else np.asarray(result.scores)
    chosen = None
    selection_record = None
    if strategy is not None:
        selection = result.selections[strategy]
        selection_record = _jsonable(selection.to_record(include_mask=False))
        if selection.candidate is not None:
            row = [p.index for p in result.phrases].index(selection.candidate.phrase_index)
            chosen = (row, selection.candidate.mask_index)
    png, json_path = ground_outputs(path, output, force=force)
    png.parent.mkdir(parents=True, exist_ok=True)
    render_ground_grid(image, phrase_rows, result.points.tolist(), [list(m) for m in masks], png,
                       title=f"{prompt}\n→ {generation.text}", chosen=chosen, scores=scores.tolist())
    payload = {
        "image": str(path),
        "prompt": prompt,
        "answer": generation.text,
        "model": pipeline.adapter.name if hasattr(pipeline.adapter, "name") else pipeline.config.model,
        "components": pipeline.components(),
        "expression": expression,
        "phrases": [_jsonable(p) for p in phrase_rows],
        "points": result.points.tolist(),
        "sam_scores": _jsonable(scores),
        "selection": {"strategy": strategy, **selection_record} if selection_record else None,
        "timings": timings,
        "png": str(png),
    }
    from pixfound.eval.records import write_json_atomic

    write_json_atomic(json_path, payload)
    return payload

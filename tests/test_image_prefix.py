"""Shared image prefix: the system prompt + image prefilled once per image and reused by every prompt.

``generate(..., prefixes=...)`` must give what the full prefill gives (same tokens; maps equal to
float rounding) in all three capture modes, fall back cleanly when a prompt does not start with
its prefix, and the pipeline must encode each image's prefix once per batch for all protocols.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pixfound.data.sample import Sample
from pixfound.models import tiny_model
from random_samples import random_image_sample

MAP_TOL = 1e-5  # fp32: the prefix keys come from another matrix shape, so they differ in the last bits
NEW_TOKENS = 6
# Own texts of different lengths: the batch is [prefix][padding][own text], a padding run inside rows.
PROMPTS = [
    "describe the image",
    "what color is the big dog on the left of the wooden table ?",
    "identify the red car in the scene .",
]


def make_sample(index: int, size: tuple[int, int]) -> Sample:
    return random_image_sample(index, size, seed_base=2000, id_prefix="img")


@pytest.fixture(scope="module")
def llava():
    adapter = tiny_model("llava", seed=0)
    samples = [make_sample(i, size) for i, size in enumerate([(30, 50), (64, 48), (40, 40)])]
    return adapter, samples, adapter.encode_image_prefixes(samples)


def _assert_close(full, shared) -> None:
    for a, b in zip(full, shared):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        if a.maps is None:
            assert b.maps is None
            continue
        assert a.maps.shape == b.maps.shape
        diff = (a.maps - b.maps).abs().max().item()
        assert diff <= MAP_TOL, f"maps differ by {diff:.3g}"


def test_prefix_holds_the_image_and_one_cache_entry_per_layer(llava):
    adapter, samples, prefixes = llava
    assert [p.sample_id for p in prefixes] == [s.id for s in samples]
    batch = adapter.prepare([s.load_image() for s in samples[:1]], ["x"])
    layout = batch.layouts[0]
    for prefix in prefixes:
        assert prefix.length == layout.span_start + layout.span_len  # ends with the last image token
        assert prefix.image_start == layout.span_start
        assert prefix.token_ids == tuple(batch.inputs["input_ids"][0, : prefix.length].tolist())
        assert len(prefix.keys) == len(prefix.values) == adapter.num_layers
        heads_kv = adapter.model.config.text_config.num_key_value_heads
        assert prefix.keys[0].shape[:2] == (heads_kv, prefix.length)


@pytest.mark.parametrize("capture", ["fused", "reference", None])
def test_shared_prefix_generation_equals_the_full_prefill(llava, capture):
    adapter, samples, prefixes = llava
    full = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture=capture, batch_size=3)
    shared = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture=capture, batch_size=3,
                              prefixes=prefixes)
    assert all(g.timings["prefix_shared"] for g in shared)
    assert not any(g.timings["prefix_shared"] for g in full)
    _assert_close(full, shared)


def test_fused_equals_reference_with_a_shared_prefix(llava):
    """The padding run between prefix and own text is excluded from the fused capture's softmax."""
    adapter, samples, prefixes = llava
    fused = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="fused", prefixes=prefixes)
    reference = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="reference",
                                 prefixes=prefixes)
    _assert_close(reference, fused)


def test_one_prefix_serves_several_prompts_and_batches(llava):
    adapter, samples, prefixes = llava
    order = [2, 0, 1, 2]
    chosen = [samples[i] for i in order]
    prompts = [PROMPTS[i] for i in (0, 1, 2, 1)]
    full = adapter.generate(chosen, prompts, max_new_tokens=NEW_TOKENS, capture="fused", batch_size=3)
    shared = adapter.generate(chosen, prompts, max_new_tokens=NEW_TOKENS, capture="fused", batch_size=3,
                              prefixes=[prefixes[i] for i in order])
    _assert_close(full, shared)
    # The cached prefix tensors are not extended by generate.
    assert all(p.keys[0].shape[1] == p.length for p in prefixes)


def test_a_prompt_that_does_not_start_with_its_prefix_is_prefilled_in_full(llava):
    adapter, samples, prefixes = llava
    wrong = dataclasses.replace(prefixes[0], token_ids=(0,) + prefixes[0].token_ids[1:])
    shared = adapter.generate(samples[:2], PROMPTS[:2], max_new_tokens=NEW_TOKENS, capture="fused",
                              prefixes=[wrong, prefixes[1]])
    full = adapter.generate(samples[:2], PROMPTS[:2], max_new_tokens=NEW_TOKENS, capture="fused")
    assert not any(g.timings["prefix_shared"] for g in shared)
    for a, b in zip(full, shared):
        assert a.token_ids == b.token_ids and torch.equal(a.maps, b.maps)


def test_prefixes_must_match_the_samples(llava):
    adapter, samples, prefixes = llava
    with pytest.raises(ValueError, match="image prefixes for 3 samples"):
        adapter.generate(samples, PROMPTS, max_new_tokens=2, prefixes=prefixes[:2])
    with pytest.raises(ValueError, match="was given for sample"):
        adapter.generate(samples[:2], PROMPTS[:2], max_new_tokens=2, prefixes=[prefixes[1], prefixes[0]])


def test_llava_next_shares_prefixes_of_equal_length():
    adapter = tiny_model("llava_next", seed=0)
    samples = [make_sample(10 + i, (40, 60)) for i in range(2)]  # one size: equal token counts
    prefixes = adapter.encode_image_prefixes(samples)
    full = adapter.generate(samples, PROMPTS[:2], max_new_tokens=NEW_TOKENS, capture="fused")
    shared = adapter.generate(samples, PROMPTS[:2], max_new_tokens=NEW_TOKENS, capture="fused", prefixes=prefixes)
    assert all(g.timings["prefix_shared"] for g in shared)
    _assert_close(full, shared)


def test_qwen2_vl_cannot_share_prefixes():
    adapter = tiny_model("qwen2_vl", seed=0)
    assert not adapter.shares_image_prefix
    with pytest.raises(ValueError, match="cannot share image prefixes"):
        adapter.encode_image_prefixes([make_sample(0, (84, 140))])


# ---------------------------------------------------------------------------------------------
# The pipeline: one prefix per image and batch, for every protocol
# ---------------------------------------------------------------------------------------------


def _pipeline(**overrides):
    from pixfound.eval.pipeline import build_pipeline
    from pixfound.eval.config import EvalConfig

    values = dict(model="tiny-llava", capture="fused", selects=("oracle",), protocols=(1, 2, 3), device="cpu",
                  dtype="float32", max_new_tokens=8, progress=False, batch_size=4, sam_batch_size=4)
    values.update(overrides)
    return build_pipeline(EvalConfig(**values), need_vectors=False)


def test_pipeline_encodes_each_prefix_once_and_keeps_the_records():
    from pixfound.data import load_benchmark

    samples = list(load_benchmark("synthetic", n=4, seed=0, size=(56, 72)))
    records = {}
    for share in (False, True):
        pipeline = _pipeline(share_image_prefix=share)
        encoded = []
        original = pipeline.adapter.encode_image_prefixes

        def counting(items, _original=original, _log=encoded):
            _log.extend(item.id for item in items)
            return _original(items)

        pipeline.adapter.encode_image_prefixes = counting
        records[share] = [r for protocol in (1, 2, 3) for r in pipeline.process(samples, protocol)]
        pipeline.end_batch()
        assert sorted(encoded) == (sorted(s.id for s in samples) if share else [])
        assert pipeline._prefixes == {}
    full, shared = records[False], records[True]
    assert [r["key"] for r in full] == [r["key"] for r in shared]
    assert not any(r["generation"]["image_prefix_shared"] for r in full)
    assert all(r["generation"]["image_prefix_shared"] for r in shared)
    for a, b in zip(full, shared):
        assert a["answer"] == b["answer"] and a["token_ids"] == b["token_ids"], a["key"]
        if a["grounding"] is not None:
            assert a["grounding"]["points"] == b["grounding"]["points"], a["key"]


def test_share_image_prefix_is_refused_for_families_that_cannot():
    from pixfound.errors import UserError

    with pytest.raises(UserError, match="LLaVA families only"):
        _pipeline(model="tiny-qwen2-vl", share_image_prefix=True, protocols=(1,))


def test_cpp_kernel_backend_runs_the_pipeline_and_matches_the_reference():
    """--kernel-backend cpp: the C++ capture and upsample + peak give the reference backend's records."""
    from pixfound.data import load_benchmark

    samples = list(load_benchmark("synthetic", n=2, seed=1, size=(48, 64)))
    records = {}
    for backend in ("cpp", "reference"):
        pipeline = _pipeline(kernel_backend=backend, protocols=(3,), share_image_prefix=True)
        records[backend] = pipeline.process(samples, 3)
        pipeline.end_batch()
    for a, b in zip(records["cpp"], records["reference"]):
        assert a["answer"] == b["answer"]
        assert a["grounding"]["points"] == b["grounding"]["points"]
        assert a["grounding"]["points"], "no phrase was grounded"

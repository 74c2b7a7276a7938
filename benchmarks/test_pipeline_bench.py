"""End to end (pytest-benchmark): the published recipe vs pixfound --reference vs --fused vs plain generation.

Thin wrappers of :mod:`pipeline_bench` (the functions live there; ``benchmarks/gpu_bench.py`` uses
them too). Configurations (``PIXFOUND_BENCH_CONFIG``):

* ``ci`` (default, well under a minute): the tiny LLaVA of ``pixfound eval``'s offline default,
  tiny SAM, 4 synthetic 96x128 images, batch 4, 8 new tokens, protocols 1 and 3;
* ``medium``: issue 6's CPU setting, a random LLaVA with 8 layers x 8 heads x 512 hidden and
  576 image tokens, tiny SAM, 8 images of 480x640, batch 8, 32 new tokens (a few minutes).

Run::

    python -m pytest benchmarks/test_pipeline_bench.py --benchmark-group-by=group -s
    PIXFOUND_BENCH_CONFIG=medium python -m pytest benchmarks/test_pipeline_bench.py -s

``test_pipeline_table`` measures every pipeline in its own subprocess (peak memory) and prints
the table of ``pipeline_bench.format_table``.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pipeline_bench  # noqa: E402

CONFIGS = {
    "ci": pipeline_bench.BenchSettings(size="tiny", samples=4, batch_size=4, max_new_tokens=8),
    "medium": pipeline_bench.BenchSettings(size="medium", samples=8, batch_size=8, max_new_tokens=32,
                                           image_hw=(480, 640)),
}


def selected_settings() -> pipeline_bench.BenchSettings:
    name = os.environ.get("PIXFOUND_BENCH_CONFIG", "ci")
    if name not in CONFIGS:
        raise ValueError(f"PIXFOUND_BENCH_CONFIG must be one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]


@pytest.fixture(scope="module")
def settings() -> pipeline_bench.BenchSettings:
    return selected_settings()


@pytest.fixture(scope="module")
def components(settings):
    import torch

    torch.set_num_threads(settings.threads)
    return pipeline_bench.build_components(settings)


@pytest.fixture(scope="module")
def samples(settings):
    return pipeline_bench.make_samples(settings.samples, settings.image_hw, settings.seed)


def _expected_records(samples, settings) -> int:
    from pixfound.eval.records import expected_keys

    return len(expected_keys(samples, settings.protocols))


@pytest.mark.parametrize("pipeline", pipeline_bench.PIPELINES)
def test_end_to_end(benchmark, settings, components, samples, pipeline):
    benchmark.group = f"end to end: {settings.size} model, {settings.samples} images {settings.image_hw}"
    result = benchmark.pedantic(lambda: pipeline_bench.run_pipeline(pipeline, settings, components, samples),
                                rounds=1, warmup_rounds=1, iterations=1)
    assert len(result.records) == _expected_records(samples, settings)
    assert result.wall_s > 0 and all(value >= 0 for value in result.stages.values())
    if pipeline != "plain":
        assert any(r["points"] for r in result.records), "no record was grounded"
    benchmark.extra_info.update(images_per_s=result.images_per_s, batch_size=result.batch_size,
                                stages_s=result.stages, settings=settings.to_dict())


def test_fused_answers_and_masks_equal_reference(settings, components, samples):
    fused = pipeline_bench.run_pipeline("fused", settings, components, samples)
    reference = pipeline_bench.run_pipeline("reference", settings, components, samples)
    same = pipeline_bench.agreement(fused.records, reference.records)
    assert same["identical"], same
    assert same["grounded"] > 0


def test_overlap_effect_compares_the_same_records(settings, components):
    effect = pipeline_bench.overlap_effect(dataclasses.replace(settings, batch_size=2), rounds=2,
                                           components=components)
    assert effect["records_equal"] == 2
    assert effect["sequential"]["wall_s"] > 0 and effect["overlapped"]["wall_s"] > 0
    assert effect["speedup"] == effect["sequential"]["wall_s"] / effect["overlapped"]["wall_s"]


def test_pipeline_table(settings):
    rows = pipeline_bench.measure(settings, rounds=1)
    print("\n" + pipeline_bench.format_table(rows))
    by_name = {row["pipeline"]: row for row in rows}
    assert set(by_name) == set(pipeline_bench.PIPELINES)
    assert by_name["fused"]["fused_vs_reference"]["identical"]
    assert all(row["images_per_s"] > 0 for row in rows)
    assert all(row["peak_rss_bytes"] is None or row["peak_rss_bytes"] > 0 for row in rows)


@pytest.mark.parametrize("limit, cap, expected_failure", [(13, 64, 14), (64, 64, None), (0, 8, 1), (1, 1, None)])
def test_find_max_batch_bisects_to_the_largest_fitting_batch(limit, cap, expected_failure):
    def try_batch(batch: int) -> None:
        if batch > limit:
            raise MemoryError(f"batch {batch} does not fit")

    found = pipeline_bench.find_max_batch(try_batch, start=1, cap=cap)
    assert found["max_batch"] == min(limit, cap)
    assert found["first_failure"] == expected_failure
    assert all(ok == (batch <= limit) for batch, ok in found["tried"].items())


def test_find_max_batch_lets_other_errors_through():
    def broken(batch: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        pipeline_bench.find_max_batch(broken, start=1, cap=4)

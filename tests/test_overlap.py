"""--overlap: each batch's grounding stage runs in a second thread while the next batch generates.

The records must be the same as without overlap, written once each, and a failure or an
interruption must keep every record a finished grounding stage produced.
"""
from __future__ import annotations

import threading

import pytest

from pixfound.data import load_benchmark
from pixfound.eval import records as run_records, runner
from pixfound.eval.config import EvalConfig
from pixfound.eval.records import RunPaths, read_jsonl, record_key
from pixfound.eval.runner import run_evaluation
from test_runner import FakePipeline, _config, _strip_volatile, _tiny_config, _use_torch_kernels, fake_record


@pytest.fixture(scope="module")
def samples():
    return load_benchmark("synthetic", n=12, seed=3)


class StagedPipeline(FakePipeline):
    """FakePipeline with the two stages; it logs the order of events across both threads."""

    def __init__(self, config, *, fail_grounding_at=None, fail_generate_at=None, wait_for_next_generate=False):
        super().__init__(config)
        self.events: list[tuple] = []
        self.forgotten: list[list] = []
        self.threads: set[str] = set()
        self.fail_grounding_at = fail_grounding_at
        self.fail_generate_at = fail_generate_at
        self.wait_for_next_generate = wait_for_next_generate
        self.generated = 0
        self.next_generate_started = threading.Event()
        self.lock = threading.Lock()

    overlaps_safely = True

    def process(self, samples, protocol):  # pragma: no cover - the staged runner must not call it
        raise AssertionError("process() called although the stages exist")

    def generate_stage(self, samples, protocol):
        with self.lock:
            self.generated += 1
            unit = self.generated
            self.events.append(("generate", unit))
        if unit > 1:
            self.next_generate_started.set()
        if self.fail_generate_at == unit:
            raise KeyboardInterrupt  # an interrupted run
        return unit, list(samples), protocol

    def grounding_stage(self, generated):
        unit, samples, protocol = generated
        self.threads.add(threading.current_thread().name)
        if self.wait_for_next_generate and unit == 1:
            # Only possible if the next generate runs while this grounding stage is still busy.
            assert self.next_generate_started.wait(timeout=30), "the next batch did not generate meanwhile"
        if self.fail_grounding_at == unit:
            raise RuntimeError("grounding failed")
        with self.lock:
            self.events.append(("ground", unit))
        self.calls.extend((s.id, protocol) for s in samples)
        return [fake_record(s, protocol) for s in samples]

    def forget(self, sample_ids):
        self.forgotten.append(list(sample_ids))


def test_overlap_writes_the_same_records_once_from_a_second_thread(tmp_path, samples):
    plain = run_evaluation(_config(tmp_path, "plain"), pipeline_factory=FakePipeline, samples=samples)
    staged = StagedPipeline(_config(tmp_path, "staged", overlap=True), wait_for_next_generate=True)
    overlapped = run_evaluation(_config(tmp_path, "staged", overlap=True), pipeline_factory=lambda c: staged,
                                samples=samples)
    assert _strip_volatile(overlapped) == _strip_volatile(plain)
    keys = [r["key"] for r in read_jsonl(RunPaths(tmp_path / "staged").samples)[0]]
    assert sorted(keys) == sorted(run_records.expected_keys(samples, EvalConfig().protocols))
    assert len(keys) == len(set(keys))
    assert {k for k in keys} == {r["key"] for r in read_jsonl(RunPaths(tmp_path / "plain").samples)[0]}
    assert all(name.startswith("pixfound-grounding") for name in staged.threads)
    # every batch's ids are forgotten once, after its last protocol was grounded
    assert [sorted(ids) for ids in staged.forgotten] == [sorted(s.id for s in samples[i:i + 3])
                                                         for i in range(0, len(samples), 3)]
    # grounding of unit n never starts before unit n + 1 is generating (except the last), and keeps order
    grounded = [u for kind, u in staged.events if kind == "ground"]
    assert grounded == sorted(grounded) == list(range(1, staged.generated + 1))


def test_a_failed_grounding_stage_stops_the_run_and_keeps_finished_records(tmp_path, samples):
    config = _config(tmp_path, "failed", overlap=True)
    failing = StagedPipeline(config, fail_grounding_at=4)
    with pytest.raises(RuntimeError, match="grounding failed"):
        run_evaluation(config, pipeline_factory=lambda c: failing, samples=samples)
    kept = {r["key"] for r in read_jsonl(RunPaths(tmp_path / "failed").samples)[0]}
    assert kept == {record_key(i, p) for i, p in failing.calls} and kept

    second = StagedPipeline(config)
    run_evaluation(_config(tmp_path, "failed", overlap=True, resume=True), pipeline_factory=lambda c: second,
                   samples=samples)
    recomputed = {record_key(i, p) for i, p in second.calls}
    assert not recomputed & kept, "resume recomputed finished records"
    assert recomputed | kept == set(run_records.expected_keys(samples, config.protocols))


def test_an_interrupt_while_generating_lets_the_running_grounding_stage_finish(tmp_path, samples):
    config = _config(tmp_path, "interrupted", overlap=True)
    interrupted = StagedPipeline(config, fail_generate_at=3, wait_for_next_generate=True)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config, pipeline_factory=lambda c: interrupted, samples=samples)
    kept = {r["key"] for r in read_jsonl(RunPaths(tmp_path / "interrupted").samples)[0]}
    # units 1 and 2 were generated; both grounding stages finished and their records are on disk
    assert ("ground", 1) in interrupted.events and ("ground", 2) in interrupted.events
    assert kept == {record_key(i, p) for i, p in interrupted.calls}
    assert len(kept) == len(interrupted.calls) > 0


def test_without_overlap_or_when_unsafe_the_stages_run_in_order(tmp_path, samples):
    class Unsafe(StagedPipeline):
        overlaps_safely = False

        def process(self, samples, protocol):
            return self.grounding_stage(self.generate_stage(samples, protocol))

    for name, overlap, kind in (("off", False, StagedPipeline), ("unsafe", True, Unsafe)):
        pipeline = kind(_config(tmp_path, name, overlap=overlap))
        if kind is StagedPipeline:
            pipeline.process = lambda s, p, pl=pipeline: pl.grounding_stage(pl.generate_stage(s, p))
        run_evaluation(_config(tmp_path, name, overlap=overlap), pipeline_factory=lambda c, pl=pipeline: pl,
                       samples=samples)
        assert pipeline.threads == {threading.main_thread().name}
        kinds = [kind for kind, _ in pipeline.events]
        assert kinds == ["generate", "ground"] * (len(kinds) // 2)


def test_overlap_is_opt_in_and_not_part_of_the_run_identity():
    assert EvalConfig().resolved().overlap is False
    assert EvalConfig(device="cpu", overlap=True).identity() == EvalConfig(device="cpu").identity()
    with pytest.raises(ValueError, match="overlap"):
        EvalConfig(overlap="yes")


def test_cli_overlap_flag():
    from pixfound.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "--overlap"]).overlap is True
    assert parser.parse_args(["eval"]).overlap is False


@pytest.mark.parametrize("share_image_prefix", [False, True])
def test_overlapped_tiny_run_equals_the_sequential_one(tmp_path, monkeypatch, share_image_prefix):
    """Real tiny models, fp32: the overlapped run's records are the sequential run's, timings aside
    (also when each batch's image prefixes are shared by its protocols)."""
    _use_torch_kernels(monkeypatch)
    common = dict(batch_size=2, share_image_prefix=share_image_prefix)
    sequential = run_evaluation(_tiny_config(tmp_path, "seq", overlap=False, **common))
    overlapped = run_evaluation(_tiny_config(tmp_path, "ovl", overlap=True, **common))
    records_seq = read_jsonl(tmp_path / "seq" / "samples.jsonl")[0]
    records_ovl = read_jsonl(tmp_path / "ovl" / "samples.jsonl")[0]
    assert [r["key"] for r in records_seq] == [r["key"] for r in records_ovl]
    volatile = ("timings", "worker")
    grounded = 0
    for a, b in zip(records_seq, records_ovl):
        assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
        grounded += a["grounding"] is not None and bool(a["grounding"]["candidates"])
    assert grounded > 0
    assert _strip_volatile(sequential) == _strip_volatile(overlapped)

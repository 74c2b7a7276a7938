"""The evaluation harness: batches, shards, resume, merge, summary.

The files of a run folder are described in :mod:`pixfound.eval.records`.

Records are keyed by ``"{sample_id}#p{protocol}"``. ``resume=True`` reads every record file of
the folder, drops a half-written last line (a run killed mid-write), and computes only the keys
that are missing, so a run killed with SIGKILL and resumed ends with the same ``summary.json``
(apart from its ``timings`` and ``run`` sections) as an uninterrupted one. Resuming with another
model, benchmark or result-changing setting is refused (:func:`check_resume_compatible`).

Sharding: sample position ``i`` (after ``--limit``) belongs to rank ``i % world``. Under torchrun
(``WORLD_SIZE > 1``) a gloo process group is opened for the barrier; each rank writes its own
shard file and rank 0 merges once all ranks are done. ``--shard I/N`` (job arrays) writes shard
``I`` and the last job to finish merges.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from pixfound.eval.config import EvalConfig
from pixfound.errors import DataError, OutputExistsError, UserError
from pixfound.eval.records import (RecordWriter, RunPaths, applicable_protocols, check_resume_compatible,
                                   check_selection, collect_records, expected_keys, merge_records, record_key,
                                   record_selection, selection_identity, write_json_atomic, write_or_check_run_json,
                                   write_text_atomic)

__all__ = [
    "RunInterrupted",
    "Worker",
    "compute_records",
    "finalize_run",
    "load_samples",
    "prepare_output_dir",
    "run_evaluation",
    "run_template_sweep",
    "shard_positions",
    "shutdown_distributed",
    "worker_from_env",
]

logger = logging.getLogger("pixfound.eval")


# ---------------------------------------------------------------------------------------------
# Workers and shards
# ---------------------------------------------------------------------------------------------


def shard_positions(count: int, rank: int, world: int) -> list[int]:
    """Positions ``i`` of ``range(count)`` with ``i % world == rank``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must satisfy 0 <= rank < world, got rank={rank}, world={world}")
    return list(range(rank, count, world))


@dataclasses.dataclass(frozen=True)
class Worker:
    """Which part of the samples this process computes.

    ``kind`` is ``"single"`` (everything), ``"torchrun"`` (rank of a process group) or ``"shard"``
    (``--shard I/N``, independent jobs).
    """

    rank: int = 0
    world: int = 1
    kind: str = "single"
    local_rank: int = 0

    @property
    def tag(self) -> str:
        if self.kind == "torchrun":
            return f"rank-{self.rank:03d}-of-{self.world:03d}"
        return f"shard-{self.rank:03d}-of-{self.world:03d}"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_shard_file(self) -> bool:
        return self.kind != "single"


def worker_from_env(shard: Optional[tuple[int, int]] = None, env: Optional[dict] = None) -> Worker:
    """The worker of this process: torchrun's ``RANK``/``WORLD_SIZE`` or ``--shard I/N``."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        if shard is not None:
            raise UserError("--shard cannot be combined with torchrun (WORLD_SIZE > 1): torchrun already shards")
        rank = int(env["RANK"])
        return Worker(rank=rank, world=world, kind="torchrun", local_rank=int(env.get("LOCAL_RANK", rank)))
    if shard is not None:
        return Worker(rank=shard[0], world=shard[1], kind="shard")
    return Worker()


class _ProcessGroup:
    """A gloo process group for torchrun workers (the barriers before run.json and before rank 0 merges).

    Opened once per process and left open (a template sweep runs several evaluations in it);
    :func:`shutdown_distributed` closes it.
    """

    def __init__(self, worker: Worker, timeout_minutes: float):
        self.worker = worker
        if worker.kind != "torchrun":
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=_dt.timedelta(minutes=timeout_minutes))
        if dist.get_world_size() != worker.world or dist.get_rank() != worker.rank:
            raise RuntimeError(
                f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                f"RANK={worker.rank} WORLD_SIZE={worker.world}"
            )

    def barrier(self) -> None:
        if self.worker.kind == "torchrun":
            import torch.distributed as dist

            dist.barrier()



def shutdown_distributed() -> None:
    """Close the process group opened for torchrun (the CLI calls this once, on exit)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Output folder and run.json
# ---------------------------------------------------------------------------------------------


def prepare_output_dir(config: EvalConfig, worker: Worker, *, check_existing: bool = True) -> RunPaths:
    """Create (or check) the output folder before anything expensive loads.

    Refuses an output path that cannot be written, and, unless resuming, a folder that already
    holds a run (for ``--shard`` jobs: that already holds this job's shard or the merged records;
    sibling jobs share run.json). ``check_existing=False`` skips that check (torchrun ranks other
    than 0, which rank 0 has already checked).
    """
    if config.output is None:
        raise ValueError("config.output is not set")
    root = pathlib.Path(config.output)
    if root.exists() and not root.is_dir():
        raise UserError(f"--output {root} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}-{worker.rank}"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--output {root} is not writable: {error.strerror or error}") from None
    paths = RunPaths(root)
    if worker.kind == "shard":
        holds_run = paths.samples.exists() or paths.shard_file(worker).exists()
    else:
        holds_run = paths.run_json.exists() or paths.samples.exists()
    if check_existing and holds_run and not config.resume:
        raise OutputExistsError(
            f"--output {root} already holds a run (run.json / samples.jsonl); pass --resume to continue it "
            "or choose another --output"
        )
    if config.resume and paths.run_json.exists():
        check_resume_compatible(paths, config)
    return paths


# ---------------------------------------------------------------------------------------------
# Work
# ---------------------------------------------------------------------------------------------


class Pipeline(Protocol):
    """What the runner needs from the grounding pipeline (:class:`pixfound.eval.pipeline.GroundingPipeline`)."""

    def process(self, samples: Sequence[Any], protocol: int) -> list[dict]:
        """One record per sample (same order) for ``protocol``."""
        ...

    def end_batch(self) -> None:
        """Forget per-batch caches (image embeddings)."""
        ...


def _batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for begin in range(0, len(items), size):
        yield list(items[begin:begin + size])


def compute_records(
    samples: Sequence[Any],
    protocols: Sequence[int],
    done: set[str],
    pipeline: Pipeline,
    writer: RecordWriter,
    *,
    batch_size: int,
    progress: bool = True,
    worker: Optional["Worker"] = None,
    overlap: bool = False,
) -> int:
    """Run ``pipeline`` on the (sample, protocol) keys not in ``done``; write each record at once.

    Returns the number of records written. Samples whose keys are all done are skipped entirely.
    Each record gets ``worker`` = {"rank", "world"}: which process computed it.

    With ``overlap`` (and a pipeline that has ``generate_stage``/``grounding_stage`` and says it
    ``overlaps_safely``), the grounding stage of one (batch, protocol) runs in a second thread while
    the next one generates, so the host's work (phrases, points, selection, RLE, writing) hides
    behind the model's. The records are the same; they are written by that thread, in order. If
    anything fails or the run is interrupted, the grounding stage already running is let finish, so
    the records it completes are kept and a resumed run computes only the rest.
    """
    worker = worker or Worker()
    pending = [s for s in samples if any(record_key(s.id, p) not in done for p in applicable_protocols(s, protocols))]
    written = 0
    bar = _progress_bar(len(pending), enabled=progress)

    def keep(todo: list, protocol: int, records: list[dict]) -> None:
        nonlocal written
        if len(records) != len(todo):
            raise RuntimeError(f"pipeline returned {len(records)} records for {len(todo)} samples")
        for sample, record in zip(todo, records):
            expected = record_key(sample.id, protocol)
            if record.get("key") != expected:
                raise RuntimeError(f"pipeline record key {record.get('key')!r} != expected {expected!r}")
            record["worker"] = {"rank": worker.rank, "world": worker.world}
            writer.write(record)
            done.add(expected)
            written += 1

    def units(batch: list) -> list[tuple[int, list]]:
        found = []
        for protocol in protocols:
            todo = [s for s in batch if protocol in applicable_protocols(s, protocols)
                    and record_key(s.id, protocol) not in done]
            if todo:
                found.append((protocol, todo))
        return found

    staged = overlap and all(hasattr(pipeline, name) for name in ("generate_stage", "grounding_stage", "forget")) \
        and bool(getattr(pipeline, "overlaps_safely", False))
    try:
        if not staged:
            for number, batch in enumerate(_batches(pending, batch_size), start=1):
                for protocol, todo in units(batch):
                    started = time.perf_counter()
                    keep(todo, protocol, pipeline.process(todo, protocol))
                    logger.debug("batch %d: protocol %d, %d sample(s) in %.2f s", number, protocol, len(todo),
                                 time.perf_counter() - started)
                pipeline.end_batch()
                writer.sync()
                bar.update(len(batch))
        else:
            _overlapped(pending, batch_size, pipeline, units, keep, writer, bar)
    finally:
        bar.close()
    return written


def _overlapped(pending: list, batch_size: int, pipeline: Any, units: Any, keep: Any, writer: RecordWriter,
                bar: Any) -> None:
    """:func:`compute_records` with each grounding stage in a worker thread beside the next generate stage."""
    import concurrent.futures

    if hasattr(pipeline, "use_private_tokenizer"):
        pipeline.use_private_tokenizer()

    def ground(generated: Any, todo: list, protocol: int, finished_batch: Optional[list]) -> None:
        keep(todo, protocol, pipeline.grounding_stage(generated))
        if finished_batch is not None:
            pipeline.forget([s.id for s in finished_batch])
            writer.sync()
            bar.update(len(finished_batch))

    in_flight: Optional[concurrent.futures.Future] = None
    # Leaving this block, also by an exception or Ctrl-C, waits for the running grounding stage: its
    # records are written, and a resumed run does not compute them again.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pixfound-grounding") as executor:
        for batch in _batches(pending, batch_size):
            work = units(batch)
            if not work:
                bar.update(len(batch))
                continue
            for position, (protocol, todo) in enumerate(work):
                generated = pipeline.generate_stage(todo, protocol)
                if in_flight is not None:
                    in_flight.result()  # a failed grounding stage stops the run here
                last = position == len(work) - 1
                in_flight = executor.submit(ground, generated, todo, protocol, batch if last else None)
        if in_flight is not None:
            in_flight.result()


def _progress_bar(total: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="eval", file=sys.stderr, disable=not enabled or total == 0,
                dynamic_ncols=True, smoothing=0.1)


def select_samples(all_samples: Sequence[Any], limit: Optional[int]) -> list[Any]:
    """The first ``limit`` samples of the benchmark (all of them without a limit)."""
    return list(all_samples[:limit]) if limit is not None else list(all_samples)


def finalize_run(paths: RunPaths, samples: Sequence[Any], config: EvalConfig, *, extra: Optional[dict] = None,
                 benchmark_total: Optional[int] = None, skipped: Sequence[Any] = ()) -> dict:
    """Merge record files, build summary.json / summary.md / plots; return the summary.

    ``benchmark_total`` is the number of samples the benchmark holds (loaded + ``skipped``), so
    that every table can say how many of them the numbers stand on.
    """
    from pixfound.eval import report

    keys = set(expected_keys(samples, config.protocols))
    merged = merge_records(paths, keep=keys)
    selected = [r for r in merged if r["key"] in keys]
    run_info = json.loads(paths.run_json.read_text(encoding="utf-8")) if paths.run_json.exists() else {}
    total = len(samples) if benchmark_total is None else benchmark_total
    coverage = report.coverage_block(total, len(samples), list(skipped), config.limit, len(selected), len(keys))
    summary = report.summarize(selected, config=config, components=run_info.get("components", {}),
                               expected=len(keys), coverage=coverage)
    summary["run"] = {
        "output": str(paths.root),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    report.write_reports(paths.root, summary, selected)
    return summary


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def load_samples(config: EvalConfig) -> Any:
    """The benchmark's samples, with missing/bad entries skipped and listed (``strict`` makes them fatal)."""
    from pixfound.data import load_benchmark

    if config.benchmark == "synthetic":
        return load_benchmark("synthetic", config.data_root, n=config.synthetic_n, seed=config.synthetic_seed)
    return load_benchmark(config.benchmark, config.data_root, strict=config.strict)


def report_skipped(skipped: Sequence[Any], *, limit: int = 20) -> list[str]:
    """Log the data problems a non-strict run skipped; return their descriptions."""
    problems = [str(p) for p in skipped]
    if problems:
        logger.warning("%d benchmark entr%s skipped (pass --strict to make this fatal):", len(problems),
                       "y was" if len(problems) == 1 else "ies were")
        for line in problems[:limit]:
            logger.warning("  %s", line)
        if len(problems) > limit:
            logger.warning("  ... and %d more (all listed in summary.json)", len(problems) - limit)
    return problems


PipelineFactory = Callable[[EvalConfig], Any]


def run_evaluation(
    config: EvalConfig,
    *,
    pipeline_factory: Optional[PipelineFactory] = None,
    samples: Optional[Sequence[Any]] = None,
    worker: Optional[Worker] = None,
    dist_timeout_minutes: float = 24 * 60,
) -> Optional[dict]:
    """Run (or resume) one evaluation; return the summary on the process that writes it, else None.

    ``pipeline_factory(config)`` builds the pipeline (default: the real models, see
    :func:`pixfound.eval.pipeline.build_pipeline`); ``samples`` replaces the benchmark load (tests).
    """
    config = config.resolved()
    worker = worker or worker_from_env(config.shard)
    group = _ProcessGroup(worker, dist_timeout_minutes)
    return _run(config, worker, group, pipeline_factory, samples)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the records written so far are kept; the message says how to continue."""


def _check_images(pending: Sequence[Any], strict: bool) -> tuple[list[Any], list[Any]]:
    """Decode the images of the samples still to evaluate: (usable samples, problems).

    A missing, truncated or unreadable image stops a strict run before any work, naming the file;
    otherwise its sample is skipped and listed like any other data problem.
    """
    from pixfound.data.sample import BadDataError, unreadable_images

    problems = unreadable_images(list(pending))
    if problems and strict:
        raise BadDataError(problems[0])
    bad = {p.sample_id for p in problems}
    return [s for s in pending if str(s.id) not in bad], problems


def _clean_up_empty_run(paths: RunPaths, created_root: bool) -> None:
    """Remove what a run that failed before its first record left behind, so a plain rerun works."""
    if any(path.stat().st_size for path in paths.record_files()):
        return
    for path in (paths.run_json, paths.samples):
        path.unlink(missing_ok=True)
    if created_root:
        with contextlib.suppress(OSError):
            paths.root.rmdir()  # only when nothing else is in it


def _run(config: EvalConfig, worker: Worker, group: _ProcessGroup, pipeline_factory: Optional[PipelineFactory],
         samples: Optional[Sequence[Any]]) -> Optional[dict]:
    started = time.perf_counter()
    created_root = config.output is not None and not pathlib.Path(config.output).exists()
    if worker.kind == "torchrun":
        # Rank 0 checks the folder first: the others must not mistake its fresh run.json for an old run.
        if worker.is_main:
            paths = prepare_output_dir(config, worker)
        group.barrier()
        if not worker.is_main:
            paths = prepare_output_dir(config, worker, check_existing=False)
    else:
        paths = prepare_output_dir(config, worker)
    fresh = not paths.run_json.exists()
    try:
        return _run_in(paths, config, worker, group, pipeline_factory, samples, started)
    except BaseException:
        if worker.kind == "single" and fresh:
            _clean_up_empty_run(paths, created_root)
        raise


def _run_in(paths: RunPaths, config: EvalConfig, worker: Worker, group: _ProcessGroup,
            pipeline_factory: Optional[PipelineFactory], samples: Optional[Sequence[Any]], started: float
            ) -> Optional[dict]:
    benchmark_samples = samples if samples is not None else load_samples(config)
    skipped = report_skipped(getattr(benchmark_samples, "skipped", []))
    skipped_ids = set(getattr(benchmark_samples, "skipped_ids", []))
    selected = select_samples(benchmark_samples, config.limit)
    if not selected:
        raise UserError(f"benchmark {config.benchmark!r} gave no samples to evaluate")
    ids = [s.id for s in selected]
    if len(set(ids)) != len(ids):
        raise DataError("benchmark sample ids are not unique; resume cannot work on them")
    selection = selection_identity(ids, config.limit)
    logger.debug("settings: %s", json.dumps(config.to_dict(), sort_keys=True))
    logger.debug("selection: %s (%d skipped by the loader)", selection, len(skipped))
    grown = None
    if config.resume and paths.run_json.exists():
        grown = check_selection(paths, ids, config.limit, extend=config.extend)
    mine = [selected[i] for i in shard_positions(len(selected), worker.rank, worker.world)]

    # Finished keys from every record file (a resumed run, or other ranks' earlier attempts).
    done: set[str] = set()
    if config.resume:
        records, partial = collect_records(paths, repair=worker.kind == "single")
        done = set(records)
        if partial:
            logger.warning("a half-written record was dropped; it will be computed again")
        logger.info("resume: %d record(s) already done", len(done & set(expected_keys(selected, config.protocols))))

    pending = [s for s in mine if any(key not in done for key in expected_keys([s], config.protocols))]
    usable, image_problems = _check_images(pending, config.strict)
    if image_problems:
        skipped += report_skipped(image_problems)
        skipped_ids |= {p.sample_id for p in image_problems}
        mine = [s for s in mine if str(s.id) not in {p.sample_id for p in image_problems}]
        selected = [s for s in selected if str(s.id) not in {p.sample_id for p in image_problems}]
    totals = {"benchmark_total": len(benchmark_samples) + len(skipped_ids - {str(s.id) for s in benchmark_samples}),
              "skipped": sorted(skipped_ids)}
    todo_keys = [k for k in expected_keys(usable, config.protocols) if k not in done]
    load_started = time.perf_counter()
    if pipeline_factory is None:
        from pixfound.eval.pipeline import build_pipeline

        pipeline_factory = build_pipeline
    pipeline = pipeline_factory(config) if todo_keys or not paths.run_json.exists() else None
    load_seconds = time.perf_counter() - load_started
    components = pipeline.components() if pipeline is not None and hasattr(pipeline, "components") else None
    logger.debug("loaded in %.1f s: %s", load_seconds, json.dumps(components, default=str))

    if worker.kind == "torchrun":
        if worker.is_main and components is not None:
            write_or_check_run_json(paths, config, components, selection)
        group.barrier()  # run.json exists from here on
        if not worker.is_main and components is not None:
            check_resume_compatible(paths, config, components)
    elif components is not None:
        write_or_check_run_json(paths, config, components, selection)
    if grown is not None and worker.is_main:
        record_selection(paths, grown)

    target = paths.shard_file(worker) if worker.writes_shard_file else paths.samples
    compute_started = time.perf_counter()
    written = 0
    write_seconds = 0.0
    if todo_keys:
        with RecordWriter(target) as writer:
            try:
                written = compute_records(usable, config.protocols, done, pipeline, writer,
                                          batch_size=config.batch_size, progress=config.progress, worker=worker,
                                          overlap=config.overlap)
            except KeyboardInterrupt:
                raise RunInterrupted(
                    f"interrupted after {writer.count} record(s) in this run, all kept in {target}; continue with: "
                    f"pixfound eval --resume --output {paths.root}") from None
            write_seconds = writer.write_seconds
    compute_seconds = time.perf_counter() - compute_started
    logger.info("%s: wrote %d record(s) in %.1f s", worker.tag if worker.kind != "single" else "run", written,
                compute_seconds)
    extra = {
        "worker": dataclasses.asdict(worker),
        "records_written_now": written,
        "load_s": load_seconds,
        "compute_s": compute_seconds,
        "write_s": write_seconds,
        "wall_s": time.perf_counter() - started,
        "skipped_samples": skipped,
    }

    if worker.kind == "torchrun":
        group.barrier()  # every rank's shard is complete
        if not worker.is_main:
            return None
        return finalize_run(paths, selected, config, extra=extra, **totals)
    if worker.kind == "shard":
        paths.shard_done(worker).write_text(json.dumps({"records_written": written}), encoding="utf-8")
        return _merge_if_last(paths, selected, config, worker, extra, totals)
    return finalize_run(paths, selected, config, extra=extra, **totals)


def _merge_if_last(paths: RunPaths, selected: Sequence[Any], config: EvalConfig, worker: Worker,
                   extra: dict, totals: dict) -> Optional[dict]:
    """For ``--shard`` jobs: the job that finds every shard done merges (under an exclusive lock file)."""
    done_markers = [paths.shards / f"shard-{i:03d}-of-{worker.world:03d}.done" for i in range(worker.world)]
    if not all(marker.exists() for marker in done_markers):
        missing = [i for i, marker in enumerate(done_markers) if not marker.exists()]
        logger.info("shard %d/%d done; waiting for shard(s) %s, the last to finish merges "
                    "(or run `pixfound eval --resume --output %s` without --shard)",
                    worker.rank, worker.world, missing, paths.root)
        return None
    lock = paths.shards / "merge.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        logger.info("another shard job is merging")
        return None
    try:
        summary = finalize_run(paths, selected, config, extra=extra, **totals)
        for marker in done_markers:
            marker.unlink(missing_ok=True)
        return summary
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            paths.shards.rmdir()


# ---------------------------------------------------------------------------------------------
# Prompt-sensitivity sweep
# ---------------------------------------------------------------------------------------------


def run_template_sweep(config: EvalConfig, *, pipeline_factory: Optional[PipelineFactory] = None,
                       samples: Optional[Sequence[Any]] = None, worker: Optional[Worker] = None) -> Optional[dict]:
    """Run every published VQA layout (protocol 2) and grounding phrasing (protocol 3) and report
    mean ± std of A and of M per selection strategy.

    Each template is its own resumable run under ``OUTPUT/sweep/vqa-NN`` / ``grounding-NN``;
    ``OUTPUT/sweep.json`` and ``sweep.md`` hold the aggregate. Models load once for all of them.
    """
    from pixfound.eval import report
    from pixfound.eval.prompts import grounding_templates, vqa_templates

    if config.output is None:
        raise ValueError("config.output is not set")
    if config.vqa_template is not None or config.grounding_template is not None:
        raise UserError("--sweep-templates runs every template; drop --vqa-template / --grounding-template")
    jobs: list[tuple[str, int, EvalConfig]] = []
    root = pathlib.Path(config.output)
    if 2 in config.protocols:
        for index in range(1, len(vqa_templates()) + 1):
            jobs.append(("vqa", index, dataclasses.replace(config, protocols=(2,), vqa_template=index,
                                                           output=str(root / "sweep" / f"vqa-{index:02d}"))))
    if 3 in config.protocols:
        for index in range(1, len(grounding_templates()) + 1):
            jobs.append(("grounding", index, dataclasses.replace(
                config, protocols=(3,), grounding_template=index,
                output=str(root / "sweep" / f"grounding-{index:02d}"))))
    if not jobs:
        raise UserError("--sweep-templates needs protocol 2 (VQA layouts) and/or 3 (grounding phrasings) in --protocol")
    if (root / "sweep.json").exists() and not config.resume:
        raise UserError(f"--output {root} already holds a template sweep; pass --resume or choose another --output")

    build = pipeline_factory
    if build is None:
        from pixfound.eval.pipeline import build_pipeline

        build = build_pipeline
    shared: dict[str, Any] = {}

    def factory(sub_config: EvalConfig) -> Any:
        if "pipeline" not in shared:
            shared["pipeline"] = build(config)  # the full config: everything any template needs
        pipeline = shared["pipeline"]
        pipeline.config = sub_config.resolved()
        return pipeline

    results: list[tuple[str, int, Optional[dict]]] = []
    for kind, index, sub_config in jobs:
        logger.info("template sweep: %s template %d", kind, index)
        results.append((kind, index, run_evaluation(sub_config, pipeline_factory=factory, samples=samples, worker=worker)))
    if any(summary is None for _, _, summary in results):
        return None  # not the merging process
    selects = list(config.selects)
    vqa_rows = [{"template": index, "A": summary["table"][0]["A"]} for kind, index, summary in results if kind == "vqa"]
    grounding_rows = [{"template": index, "M": {row["select"]: row["M"] for row in summary["table"]}}
                      for kind, index, summary in results if kind == "grounding"]
    from pixfound.eval.figures import plot_note

    sweep = {
        "schema": 1,
        "kind": "sweep",
        "model": config.model,
        "benchmark": config.benchmark,
        # every template ran on the same samples: the first one's coverage stands for all
        "note": plot_note(results[0][2]),
        "vqa": {"per_template": vqa_rows, "A": report.mean_std(r["A"] for r in vqa_rows)} if vqa_rows else None,
        "grounding": {
            "per_template": grounding_rows,
            "M": {s: report.mean_std(r["M"].get(s) for r in grounding_rows) for s in selects},
        } if grounding_rows else None,
    }
    write_text_atomic(root / "sweep.md", format_sweep(sweep, markdown=True) + "\n")
    write_json_atomic(root / "sweep.json", sweep)
    return sweep


def format_sweep(sweep: dict, *, markdown: bool = False) -> str:
    """Mean ± std of A over the VQA layouts and of M over the grounding phrasings."""

    def cell(stats: dict) -> str:
        if stats["mean"] is None:
            return "–"
        return f"{stats['mean']:.1f} ± {stats['std']:.1f} (n={stats['n']})"

    rows = []
    if sweep.get("vqa"):
        rows.append(("A (protocol 2, VQA layouts)", cell(sweep["vqa"]["A"])))
    if sweep.get("grounding"):
        for strategy, stats in sweep["grounding"]["M"].items():
            rows.append((f"M (protocol 3, grounding phrasings, {strategy})", cell(stats)))
    note = sweep.get("note")
    if markdown:
        lines = [f"# Prompt sensitivity: {sweep['model']} on {sweep['benchmark']}", ""]
        lines += [f"> {note}", ""] if note else []
        lines += ["| metric | mean ± std (percent) |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)
    width = max(len(name) for name, _ in rows) if rows else 0
    return "\n".join([f"{name.ljust(width)}  {value}" for name, value in rows] + ([note] if note else []))

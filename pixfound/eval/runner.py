"""The evaluation harness: batches, shards, append-only per-sample records, resume, merge, summary.

Output folder of one run (``--output``)::

    run.json        resolved configuration, versions and components (model, SAM, spaCy, judge)
    samples.jsonl   one JSON record per (sample, protocol); appended and flushed as each finishes,
                    rewritten sorted by (sample index, protocol) when the run completes
    shards/         per-rank (torchrun) or per-job (``--shard I/N``) record files until merged
    summary.json    everything needed to rebuild the tables (see :mod:`pixfound.eval.report`)
    summary.md      the paper-style table; failure_bins.png, when.png/json beside it

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
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence, Union

from pixfound.models.kv_cache import KV_CACHES

__all__ = [
    "EvalConfig",
    "IDENTITY_EXEMPT",
    "PROTOCOLS",
    "STRATEGIES",
    "ConfigMismatchError",
    "RecordWriter",
    "RunPaths",
    "Worker",
    "check_resume_compatible",
    "collect_records",
    "expected_keys",
    "finalize_run",
    "merge_records",
    "parse_protocols",
    "parse_selects",
    "parse_shard",
    "read_jsonl",
    "record_key",
    "repair_jsonl_tail",
    "run_evaluation",
    "shard_positions",
    "shutdown_distributed",
    "versions",
    "worker_from_env",
]

logger = logging.getLogger("pixfound.eval")

PROTOCOLS = (1, 2, 3)
STRATEGIES = ("oracle", "similarity", "judge")
GROUNDING_PROTOCOLS = (1, 3)
ANSWER_PROTOCOLS = (1, 2)

# Settings that do not change any record: a resumed run may change them.
# Backends of the capture kernel; "cpp" (float32 CPU only) leaves the upsample+peak op on torch.
from pixfound.ops.backends import KERNEL_BACKENDS  # noqa: E402

IDENTITY_EXEMPT = frozenset(
    # kv_cache only changes where the keys are stored: the same answers, maps equal up to float rounding.
    # overlap only changes which thread runs the grounding stage: the same records.
    {"output", "resume", "batch_size", "sam_batch_size", "limit", "shard", "progress", "judge_base_url", "kv_cache",
     "overlap"}
)


class ConfigMismatchError(ValueError):
    """``--resume`` on a folder whose run.json was made with other settings or versions."""


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


def versions() -> dict:
    """Versions of everything that can change a result."""
    import numpy
    import torch

    found = {
        "pixfound": _package_version("pixfound"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("transformers", "segment_anything", "spacy", "tokenizers", "triton"):
        found[name] = _package_version(name.replace("_", "-")) or _package_version(name)
    return found


def _package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Records on disk
# ---------------------------------------------------------------------------------------------


def record_key(sample_id: str, protocol: int) -> str:
    """The resume key of one (sample, protocol) record."""
    return f"{sample_id}#p{int(protocol)}"


def repair_jsonl_tail(path: pathlib.Path) -> bool:
    """Drop a half-written last line of ``path`` in place; True when something was dropped.

    A last line that parses as JSON but lost its newline keeps its content (the newline is added).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return False
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return False
        # Read back until the last newline (records are small: a few KB to a few hundred KB).
        chunk = 1 << 16
        position = size
        tail = b""
        while position > 0:
            step = min(chunk, position)
            position -= step
            handle.seek(position)
            tail = handle.read(step) + tail
            if b"\n" in tail[:-1] or position == 0:
                break
        if tail.endswith(b"\n"):
            return False
        cut = tail.rfind(b"\n")
        last_line = tail[cut + 1:]
        start_of_last = size - len(last_line)
        try:
            json.loads(last_line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            handle.truncate(start_of_last)
            return True
        handle.seek(0, os.SEEK_END)
        handle.write(b"\n")
        return False


def read_jsonl(path: pathlib.Path, *, allow_partial_tail: bool = True) -> tuple[list[dict], bool]:
    """All records of a JSONL file and whether a half-written last line was skipped.

    A malformed line other than an unterminated last one raises ValueError naming file and line.
    """
    path = pathlib.Path(path)
    records: list[dict] = []
    partial = False
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    terminated = data.endswith(b"\n")
    if terminated:
        lines = lines[:-1]
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_last = number == len(lines)
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            if is_last and not terminated and allow_partial_tail:
                partial = True
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON ({error}); the file is corrupt") from None
        if not isinstance(record, dict) or "key" not in record:
            raise ValueError(f"{path}: line {number} is not a pixfound record (no 'key')")
        records.append(record)
    return records, partial


class RecordWriter:
    """Appends records to a JSONL file, one line each, flushed as soon as it is written."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl_tail(self.path)
        self._handle = open(self.path, "a", encoding="utf-8")
        self.write_seconds = 0.0
        self.count = 0

    def write(self, record: dict) -> None:
        started = time.perf_counter()
        line = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self._handle.write(line + "\n")
        self._handle.flush()
        self.write_seconds += time.perf_counter() - started
        self.count += 1

    def sync(self) -> None:
        """Flush to stable storage (once per batch: survives a power cut, not only a kill)."""
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            self._handle.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its files."""

    root: pathlib.Path

    @property
    def run_json(self) -> pathlib.Path:
        return self.root / "run.json"

    @property
    def samples(self) -> pathlib.Path:
        return self.root / "samples.jsonl"

    @property
    def shards(self) -> pathlib.Path:
        return self.root / "shards"

    @property
    def summary_json(self) -> pathlib.Path:
        return self.root / "summary.json"

    @property
    def summary_md(self) -> pathlib.Path:
        return self.root / "summary.md"

    def shard_file(self, worker: "Worker") -> pathlib.Path:
        return self.shards / f"{worker.tag}.jsonl"

    def shard_done(self, worker: "Worker") -> pathlib.Path:
        return self.shards / f"{worker.tag}.done"

    def record_files(self) -> list[pathlib.Path]:
        files = [self.samples] if self.samples.is_file() else []
        if self.shards.is_dir():
            files += sorted(self.shards.glob("*.jsonl"))
        return files


def collect_records(paths: RunPaths, *, repair: bool = False) -> tuple[dict[str, dict], int]:
    """Records of every record file of a run, by key (first seen wins), and how many partial lines were met.

    With ``repair`` the half-written tails are cut from the files (only do that when no other
    process writes to them).
    """
    records: dict[str, dict] = {}
    partial_lines = 0
    for path in paths.record_files():
        if repair and repair_jsonl_tail(path):
            partial_lines += 1
            logger.warning("dropped a half-written last line of %s", path)
        found, partial = read_jsonl(path)
        partial_lines += int(partial)
        for record in found:
            records.setdefault(record["key"], record)
    return records, partial_lines


def sort_key(record: dict) -> tuple:
    return (int(record.get("index", 0)), int(record.get("protocol", 0)), str(record.get("sample_id", "")))


def write_jsonl_atomic(path: pathlib.Path, records: Iterable[dict]) -> None:
    """Write ``records`` to ``path`` through a temporary file and a rename (never half a file)."""
    path = pathlib.Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def write_json_atomic(path: pathlib.Path, payload: Any) -> None:
    path = pathlib.Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, ensure_ascii=False, allow_nan=False)
            handle.write("\n")
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def merge_records(paths: RunPaths, keep: Optional[set[str]] = None) -> list[dict]:
    """Merge ``samples.jsonl`` and every shard file into one sorted ``samples.jsonl``; remove the shards.

    Each key appears once (the first copy found). ``keep``, the keys of the current selection,
    only serves the log line: records outside it are kept. Returns all merged records.
    """
    records, _ = collect_records(paths, repair=True)
    merged = sorted(records.values(), key=sort_key)
    if keep is not None:
        # Records outside the selection (an earlier run with a larger --limit) stay in the file for reuse.
        outside = sum(1 for r in merged if r["key"] not in keep)
        if outside:
            logger.info("%d record(s) outside this run's selection are kept in %s", outside, paths.samples.name)
    write_jsonl_atomic(paths.samples, merged)
    if paths.shards.is_dir():
        for shard_file in sorted(paths.shards.glob("*.jsonl")):
            shard_file.unlink()
        with contextlib.suppress(OSError):
            paths.shards.rmdir()  # only when empty (job-array markers may still be there)
    return merged


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
            raise ValueError("--shard cannot be combined with torchrun (WORLD_SIZE > 1): torchrun already shards")
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


def default_output_dir(base: Union[str, pathlib.Path] = "pixfound-runs") -> pathlib.Path:
    """``./pixfound-runs/<timestamp>`` (UTC, second resolution; a suffix keeps it unique)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    candidate = pathlib.Path(base) / stamp
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = pathlib.Path(base) / f"{stamp}-{suffix}"
    return candidate


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
        raise ValueError(f"--output {root} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}-{worker.rank}"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--output {root} is not writable: {error.strerror or error}") from None
    paths = RunPaths(root)
    if worker.kind == "shard":
        holds_run = paths.samples.exists() or paths.shard_file(worker).exists()
    else:
        holds_run = paths.run_json.exists() or paths.samples.exists()
    if check_existing and holds_run and not config.resume:
        raise ValueError(
            f"--output {root} already holds a run (run.json / samples.jsonl); pass --resume to continue it "
            "or choose another --output"
        )
    if config.resume and paths.run_json.exists():
        check_resume_compatible(paths, config)
    return paths


def _diff(left: dict, right: dict) -> list[str]:
    lines = []
    for key in sorted(set(left) | set(right)):
        if left.get(key) != right.get(key):
            lines.append(f"  {key}: run.json has {left.get(key)!r}, now {right.get(key)!r}")
    return lines


def check_resume_compatible(paths: RunPaths, config: EvalConfig, components: Optional[dict] = None) -> dict:
    """Raise :class:`ConfigMismatchError` when ``config`` (or the loaded ``components``) differ from run.json."""
    try:
        stored = json.loads(paths.run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigMismatchError(f"cannot read {paths.run_json}: {error}") from None
    stored_config = EvalConfig.from_dict(stored["config"]).identity()
    differences = _diff(stored_config, config.resolved().identity())
    differences += [f"  version {line.strip()}" for line in _diff(stored.get("versions", {}), versions())]
    if components is not None and "components" in stored:
        differences += [f"  component {line.strip()}" for line in _diff(stored["components"], components)]
    if differences:
        raise ConfigMismatchError(
            f"cannot resume {paths.root}: the run was made with other settings:\n" + "\n".join(differences)
            + "\nUse the original settings, or start a new run with another --output."
        )
    return stored


def write_or_check_run_json(paths: RunPaths, config: EvalConfig, components: dict) -> None:
    """Create run.json (atomically, first writer wins) or check that it matches this run."""
    payload = {
        "config": config.resolved().to_dict(),
        "versions": versions(),
        "components": components,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }
    fd, tmp_name = tempfile.mkstemp(prefix="run.json.", suffix=".tmp", dir=paths.root)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    try:
        os.link(tmp_name, paths.run_json)  # fails if another process (or an earlier run) made it first
        created = True
    except FileExistsError:
        created = False
    finally:
        os.unlink(tmp_name)
    if not created:
        check_resume_compatible(paths, config, components)


# ---------------------------------------------------------------------------------------------
# Work
# ---------------------------------------------------------------------------------------------


def applicable_protocols(sample: Any, protocols: Sequence[int]) -> list[int]:
    """Protocol 3 grounds the referring expression: skip it for samples that have none."""
    return [p for p in protocols if p != 3 or getattr(sample, "expression", None) is not None]


def expected_keys(samples: Sequence[Any], protocols: Sequence[int]) -> list[str]:
    return [record_key(s.id, p) for s in samples for p in applicable_protocols(s, protocols)]


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
            for batch in _batches(pending, batch_size):
                for protocol, todo in units(batch):
                    keep(todo, protocol, pipeline.process(todo, protocol))
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


def finalize_run(paths: RunPaths, samples: Sequence[Any], config: EvalConfig, *, extra: Optional[dict] = None) -> dict:
    """Merge record files, build summary.json / summary.md / plots; return the summary."""
    from pixfound.eval import report

    keys = set(expected_keys(samples, config.protocols))
    merged = merge_records(paths, keep=keys)
    selected = [r for r in merged if r["key"] in keys]
    run_info = json.loads(paths.run_json.read_text(encoding="utf-8")) if paths.run_json.exists() else {}
    summary = report.summarize(selected, config=config, components=run_info.get("components", {}),
                               expected=len(keys))
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


def report_skipped(samples: Any, *, limit: int = 20) -> list[str]:
    """Log the samples a non-strict load skipped; return their descriptions."""
    problems = [str(p) for p in getattr(samples, "skipped", [])]
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


def _run(config: EvalConfig, worker: Worker, group: _ProcessGroup, pipeline_factory: Optional[PipelineFactory],
         samples: Optional[Sequence[Any]]) -> Optional[dict]:
    started = time.perf_counter()
    if worker.kind == "torchrun":
        # Rank 0 checks the folder first: the others must not mistake its fresh run.json for an old run.
        if worker.is_main:
            paths = prepare_output_dir(config, worker)
        group.barrier()
        if not worker.is_main:
            paths = prepare_output_dir(config, worker, check_existing=False)
    else:
        paths = prepare_output_dir(config, worker)
    benchmark_samples = samples if samples is not None else load_samples(config)
    skipped = report_skipped(benchmark_samples)
    selected = select_samples(benchmark_samples, config.limit)
    if not selected:
        raise ValueError(f"benchmark {config.benchmark!r} gave no samples to evaluate")
    ids = [s.id for s in selected]
    if len(set(ids)) != len(ids):
        raise ValueError("benchmark sample ids are not unique; resume cannot work on them")
    mine = [selected[i] for i in shard_positions(len(selected), worker.rank, worker.world)]

    # Finished keys from every record file (a resumed run, or other ranks' earlier attempts).
    done: set[str] = set()
    if config.resume:
        records, partial = collect_records(paths, repair=worker.kind == "single")
        done = set(records)
        if partial:
            logger.warning("a half-written record was dropped; it will be computed again")
        logger.info("resume: %d record(s) already done", len(done & set(expected_keys(selected, config.protocols))))

    todo_keys = [k for k in expected_keys(mine, config.protocols) if k not in done]
    load_started = time.perf_counter()
    if pipeline_factory is None:
        from pixfound.eval.pipeline import build_pipeline

        pipeline_factory = build_pipeline
    pipeline = pipeline_factory(config) if todo_keys or not paths.run_json.exists() else None
    load_seconds = time.perf_counter() - load_started
    components = pipeline.components() if pipeline is not None and hasattr(pipeline, "components") else None

    if worker.kind == "torchrun":
        if worker.is_main and components is not None:
            write_or_check_run_json(paths, config, components)
        group.barrier()  # run.json exists from here on
        if not worker.is_main and components is not None:
            check_resume_compatible(paths, config, components)
    elif components is not None:
        write_or_check_run_json(paths, config, components)

    target = paths.shard_file(worker) if worker.writes_shard_file else paths.samples
    compute_started = time.perf_counter()
    written = 0
    if todo_keys:
        with RecordWriter(target) as writer:
            written = compute_records(mine, config.protocols, done, pipeline, writer, batch_size=config.batch_size,
                                      progress=config.progress, worker=worker, overlap=config.overlap)
            write_seconds = writer.write_seconds
    else:
        write_seconds = 0.0
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
        return finalize_run(paths, selected, config, extra=extra)
    if worker.kind == "shard":
        paths.shard_done(worker).write_text(json.dumps({"records_written": written}), encoding="utf-8")
        return _merge_if_last(paths, selected, config, worker, extra)
    return finalize_run(paths, selected, config, extra=extra)


def _merge_if_last(paths: RunPaths, selected: Sequence[Any], config: EvalConfig, worker: Worker,
                   extra: dict) -> Optional[dict]:
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
        summary = finalize_run(paths, selected, config, extra=extra)
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
        raise ValueError("--sweep-templates runs every template; drop --vqa-template / --grounding-template")
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
        raise ValueError("--sweep-templates needs protocol 2 (VQA layouts) and/or 3 (grounding phrasings) in --protocol")
    if (root / "sweep.json").exists() and not config.resume:
        raise ValueError(f"--output {root} already holds a template sweep; pass --resume or choose another --output")

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
    sweep = {
        "schema": 1,
        "kind": "sweep",
        "model": config.model,
        "benchmark": config.benchmark,
        "vqa": {"per_template": vqa_rows, "A": report.mean_std(r["A"] for r in vqa_rows)} if vqa_rows else None,
        "grounding": {
            "per_template": grounding_rows,
            "M": {s: report.mean_std(r["M"].get(s) for r in grounding_rows) for s in selects},
        } if grounding_rows else None,
    }
    write_json_atomic(root / "sweep.json", sweep)
    (root / "sweep.md").write_text(format_sweep(sweep, markdown=True) + "\n", encoding="utf-8")
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
    if markdown:
        lines = [f"# Prompt sensitivity: {sweep['model']} on {sweep['benchmark']}", "",
                 "| metric | mean ± std (percent) |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)
    width = max(len(name) for name, _ in rows) if rows else 0
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)

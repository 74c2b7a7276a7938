"""A run's files: the per-sample JSONL records, atomic writes, run.json and resume checks.

Output folder of one run (``--output``)::

    run.json        resolved configuration, versions and components (model, SAM, spaCy, judge)
    samples.jsonl   one JSON record per (sample, protocol); appended and flushed as each finishes,
                    rewritten sorted by (sample index, protocol) when the run completes
    shards/         per-rank (torchrun) or per-job (``--shard I/N``) record files until merged
    summary.json    everything needed to rebuild the tables (see :mod:`pixfound.eval.report`)
    summary.md      the paper-style table; failure_bins.png, when.png/json beside it

Records are keyed by ``"{sample_id}#p{protocol}"``. A half-written last line (a run killed
mid-write) is dropped on resume; a malformed line elsewhere is an error naming file and line.
This module imports nothing of pixfound above the configuration.
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
from typing import Any, Iterable, Optional, Sequence, Union

from pixfound.errors import UserError
from pixfound.eval.config import EvalConfig

__all__ = [
    "ConfigMismatchError",
    "RecordWriter",
    "RunPaths",
    "applicable_protocols",
    "check_resume_compatible",
    "check_selection",
    "record_selection",
    "selection_identity",
    "collect_records",
    "default_output_dir",
    "expected_keys",
    "merge_records",
    "read_jsonl",
    "record_key",
    "repair_jsonl_tail",
    "sort_key",
    "versions",
    "write_json_atomic",
    "write_jsonl_atomic",
    "write_text_atomic",
    "write_or_check_run_json",
]

logger = logging.getLogger("pixfound.eval")


class ConfigMismatchError(UserError):
    """``--resume`` on a folder whose run.json was made with other settings or versions."""


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
    """Appends records to a JSONL file, one line each, written through as soon as it is complete.

    A failed write (a full disk) cuts the file back to its last complete line before the error
    goes on, so the file stays valid and ``--resume`` continues from there.
    """

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self.write_seconds = 0.0
        self.count = 0

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def write(self, record: dict) -> None:
        started = time.perf_counter()
        data = (json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            self._write_all(data)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)  # no half record stays behind
            if error.filename is None:
                error.filename = str(self.path)
            raise
        self.write_seconds += time.perf_counter() - started
        self.count += 1

    def sync(self) -> None:
        """Flush to stable storage (once per batch: survives a power cut, not only a kill)."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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

    def shard_file(self, worker: Any) -> pathlib.Path:
        return self.shards / f"{worker.tag}.jsonl"

    def shard_done(self, worker: Any) -> pathlib.Path:
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


def _default_mode() -> int:
    """The permissions an ordinary new file gets here (0o666 less the umask); mkstemp makes 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomic(path: pathlib.Path, write: Any) -> None:
    """Write ``path`` through a temporary file and a rename: never half a file, never a lost old one."""
    path = pathlib.Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def write_jsonl_atomic(path: pathlib.Path, records: Iterable[dict]) -> None:
    """Write ``records`` to ``path`` through a temporary file and a rename (never half a file)."""

    def write(handle: Any) -> None:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")

    _write_atomic(path, write)


def write_json_atomic(path: pathlib.Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file and a rename."""

    def write(handle: Any) -> None:
        json.dump(payload, handle, indent=2, ensure_ascii=False, allow_nan=False)
        handle.write("\n")

    _write_atomic(path, write)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    _write_atomic(path, lambda handle: handle.write(text))


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


def default_output_dir(base: Union[str, pathlib.Path] = "pixfound-runs") -> pathlib.Path:
    """``./pixfound-runs/<timestamp>`` (UTC, second resolution; a suffix keeps it unique)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    candidate = pathlib.Path(base) / stamp
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = pathlib.Path(base) / f"{stamp}-{suffix}"
    return candidate


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


def write_or_check_run_json(paths: RunPaths, config: EvalConfig, components: dict,
                            selection: Optional[dict] = None) -> None:
    """Create run.json (atomically, first writer wins) or check that it matches this run.

    ``selection`` (:func:`selection_identity`) records which samples the run covers.
    """
    payload = {
        "config": config.resolved().to_dict(),
        "selection": selection,
        "versions": versions(),
        "components": components,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }
    fd, tmp_name = tempfile.mkstemp(prefix="run.json.", suffix=".tmp", dir=paths.root)
    os.fchmod(fd, _default_mode())
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


def _ids_digest(ids: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def selection_identity(sample_ids: Sequence[Any], limit: Optional[int]) -> dict:
    """Which samples a run covers: its ``--limit`` and a digest of the selected sample ids, in order."""
    ids = [str(i) for i in sample_ids]
    return {"limit": limit, "samples": len(ids), "ids_sha256": _ids_digest(ids)}


def check_selection(paths: RunPaths, sample_ids: Sequence[Any], limit: Optional[int], *, extend: bool) -> Optional[dict]:
    """On ``--resume``: the samples must be the run's own, or, with ``extend``, more samples that
    start with the run's own. Returns the selection to record in run.json when it grows, else None.
    """
    try:
        stored = json.loads(paths.run_json.read_text(encoding="utf-8")).get("selection")
    except (OSError, ValueError):
        return None  # check_resume_compatible reports an unreadable run.json
    if not stored:
        return None  # written before run.json recorded the selection
    current = selection_identity(sample_ids, limit)
    if current == stored:
        return None
    ids = [str(i) for i in sample_ids]
    grows = len(ids) > stored["samples"] and _ids_digest(ids[:stored["samples"]]) == stored["ids_sha256"]
    if grows and extend:
        return current
    if grows:
        raise ConfigMismatchError(
            f"cannot resume {paths.root}: it was started with --limit {stored['limit']} ({stored['samples']} samples), "
            f"now {limit if limit is not None else 'no limit'} ({len(ids)} samples); pass the same --limit, or add "
            "--extend to evaluate the added samples too")
    if stored["samples"] == len(ids) or stored["limit"] == limit:
        raise ConfigMismatchError(
            f"cannot resume {paths.root}: the benchmark's samples are not the ones the run started with "
            f"({stored['samples']} then, {len(ids)} now, not the same ids); did the data root change? Start a new "
            "run with another --output")
    raise ConfigMismatchError(
        f"cannot resume {paths.root}: it was started with --limit {stored['limit']} ({stored['samples']} samples); "
        f"--limit {limit} would evaluate fewer or other samples. Pass the same --limit")


def record_selection(paths: RunPaths, selection: dict) -> None:
    """Store a grown selection in run.json (after ``--resume --extend``)."""
    payload = json.loads(paths.run_json.read_text(encoding="utf-8"))
    payload["selection"] = selection
    payload["config"]["limit"] = selection["limit"]
    write_json_atomic(paths.run_json, payload)


def applicable_protocols(sample: Any, protocols: Sequence[int]) -> list[int]:
    """Protocol 3 grounds the referring expression: skip it for samples that have none."""
    return [p for p in protocols if p != 3 or getattr(sample, "expression", None) is not None]


def expected_keys(samples: Sequence[Any], protocols: Sequence[int]) -> list[str]:
    return [record_key(s.id, p) for s in samples for p in applicable_protocols(s, protocols)]

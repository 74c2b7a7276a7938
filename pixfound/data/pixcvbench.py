"""PixCV-Bench: CV-Bench's 2D questions (ADE20K and COCO) with referring expressions and masks.

Layout under ``root``::

    test.parquet | test.jsonl            CV-Bench (nyu-visionx/CV-Bench); only the 2D rows are used
    Objects.csv                          ",Id,file,Objects": Id is CV-Bench's idx
    ADE20K/FinalSegmentations.json       (or ADE20K/validation/FinalSegmentations.json)
    COCO/FinalSegmentations.json
    ADE20K/validation/images/<source_filename>                          the images; their root can
    COCO/coco/images/<source_filename without its /coco/val2017/ prefix> be moved with images_root=,
                                         and may sit under a CV-Bench/ folder as in Objects.csv

CV-Bench rows carry ``idx, type, task, question, choices, answer ("(A)"), prompt, source
("ADE20K" | "COCO" | "Omni3D"), source_filename`` (ADE: ``ADE_val_00000248.jpg``, COCO:
``/coco/val2017/000000412362.jpg``). A row joins its Objects.csv row by ``idx == Id``; within each
source the JSON image ids follow Objects.csv row order, and the file names must agree in all three.

Expressions: a tuple cell ``('spoon', 'broccoli')`` becomes ``"spoon and broccoli"`` (parsed with
``ast.literal_eval`` and checked to be a tuple of strings); ADE20K synonym lists such as
``"curtain, drape, drapery"`` stay whole, commas included. ``meta["objects"]`` keeps the parts.

Masks: union of the image's annotations (compressed RLE and polygons) decoded by pycocotools at the
actual image size; an RLE of another size is resized nearest-neighbour to the image.
"""
from __future__ import annotations

import ast
import json
import pathlib
import re
from pixfound.errors import MissingFileError
from typing import Optional, Union

from ._coco import (CocoFile, CsvRow, LazyMask, ProblemLog, as_int, fail, load_coco, read_csv, require_file,
                    resolve_image)
from .sample import BenchmarkSamples, Sample

SOURCES = ("ADE20K", "COCO")
_IMAGE_DIRS = {"ADE20K": ("ADE20K", "validation", "images"), "COCO": ("COCO", "coco", "images")}
_JSON_CANDIDATES = {"ADE20K": (("ADE20K", "FinalSegmentations.json"),
                               ("ADE20K", "validation", "FinalSegmentations.json")),
                    "COCO": (("COCO", "FinalSegmentations.json"),)}
_COCO_PREFIX = "/coco/val2017/"
_REQUIRED_FIELDS = ("idx", "task", "question", "choices", "answer", "source", "source_filename")
_OPTIONAL_FIELDS = ("type", "prompt", "filename")
_ANSWER = re.compile(r"\s*\(([A-Z])\)\s*")
_MAX_TUPLE_CELL = 2000  # characters; longer cells are not parsed as tuples


def parse_objects_cell(text: str) -> list[str]:
    """The objects named by one Objects.csv cell.

    ``"('spoon', 'broccoli')"`` → ``["spoon", "broccoli"]`` (a Python tuple literal of strings,
    read with ``ast.literal_eval``, which evaluates literals only); any other text is one object,
    commas included. ``"None"`` or an empty cell → ``[]``.
    """
    text = text.strip()
    if not text or text == "None":
        return []
    if not (text.startswith("(") and text.endswith(")")):
        return [text]
    if len(text) > _MAX_TUPLE_CELL:
        raise ValueError(f"tuple cell longer than {_MAX_TUPLE_CELL} characters")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"{text!r} looks like a tuple but is not a tuple of quoted strings") from None
    if isinstance(value, str):  # "(spoon)" style parentheses around one name
        value = (value,)
    if not isinstance(value, tuple) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{text!r} must be a tuple of non-empty strings")
    return [v.strip() for v in value]


def image_relative_path(source: str, source_filename: str) -> tuple[str, ...]:
    """Path parts of a CV-Bench image under the images root."""
    name = source_filename
    if source == "COCO" and name.startswith(_COCO_PREFIX):
        name = name[len(_COCO_PREFIX):]
    return _IMAGE_DIRS[source] + tuple(part for part in name.strip("/").split("/") if part)


def _find_questions_file(root: pathlib.Path) -> pathlib.Path:
    for name in ("test.parquet", "test.jsonl"):
        if (root / name).is_file():
            return root / name
    raise MissingFileError(f"CV-Bench questions not found: neither {root / 'test.parquet'} nor "
                           f"{root / 'test.jsonl'} exists; put CV-Bench's test.parquet (or test.jsonl) into "
                           f"{root} (README: Benchmarks and data)")


def read_cvbench_rows(path: pathlib.Path, log: ProblemLog) -> list[tuple[str, dict]]:
    """(location, row) for every CV-Bench row in a .parquet or .jsonl file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); "
                              "or provide CV-Bench's test.jsonl instead") from None
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [f for f in _REQUIRED_FIELDS if f not in names]
        if missing:
            raise fail(path, "schema", f"missing required column(s) {missing}; found {names}")
        # Only the text columns: the embedded images are most of the file.
        columns = [f for f in _REQUIRED_FIELDS + _OPTIONAL_FIELDS if f in names]
        table = pq.read_table(path, columns=columns)
        return [(f"row {k}", row) for k, row in enumerate(table.to_pylist())]
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    log.report(path, f"line {line_no}", f"invalid JSON: {err.msg}")
                    continue
                if not isinstance(row, dict):
                    log.report(path, f"line {line_no}", f"expected a JSON object, got {type(row).__name__}")
                    continue
                rows.append((f"line {line_no}", row))
        return rows
    raise ValueError(f"CV-Bench questions file must be .parquet or .jsonl, got {path}")


def _is_2d(row: dict) -> bool:
    return row.get("source") in SOURCES and row.get("type", "2D") == "2D"


def _check_row(row: dict) -> Optional[str]:
    """Why a 2D CV-Bench row is unusable, or None."""
    missing = [f for f in _REQUIRED_FIELDS if f not in row]
    if missing:
        return f"missing field(s) {missing}"
    if as_int(row["idx"]) is None:
        return f"'idx' must be an integer, got {row['idx']!r}"
    for field in ("task", "question", "source_filename"):
        if not isinstance(row[field], str) or not row[field].strip():
            return f"{field!r} must be a non-empty string, got {row[field]!r}"
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in choices):
        return f"'choices' must be a list of at least two strings, got {choices!r}"
    answer = row["answer"]
    match = _ANSWER.fullmatch(answer) if isinstance(answer, str) else None
    if match is None:
        return f"'answer' must look like '(A)', got {answer!r}"
    if ord(match.group(1)) - ord("A") >= len(choices):
        return f"'answer' {answer!r} points past the {len(choices)} choices"
    return None


def _find_json(root: pathlib.Path, source: str) -> pathlib.Path:
    for parts in _JSON_CANDIDATES[source]:
        if root.joinpath(*parts).is_file():
            return root.joinpath(*parts)
    tried = ", ".join(str(root.joinpath(*p)) for p in _JSON_CANDIDATES[source])
    raise MissingFileError(f"PixCV-Bench {source} segmentations not found (tried {tried})")


def _images_base(base: pathlib.Path) -> pathlib.Path:
    """``base``, or ``base / "CV-Bench"`` when only that holds the image folders (the layout that
    Objects.csv's ``file`` column names: ``CV-Bench/ADE20K/validation/images/…``)."""
    def has_images(folder: pathlib.Path) -> bool:
        return any(folder.joinpath(*parts).is_dir() for parts in _IMAGE_DIRS.values())

    if not has_images(base) and has_images(base / "CV-Bench"):
        return base / "CV-Bench"
    return base


def _source_of_file(file_cell: str) -> Optional[str]:
    parts = pathlib.PurePosixPath(file_cell.strip()).parts
    found = [s for s in SOURCES if s in parts]
    return found[0] if len(found) == 1 else None


def load_pixcvbench(root: Union[str, pathlib.Path], *, strict: bool = True, require_images: bool = True,
                    images_root: Optional[Union[str, pathlib.Path]] = None,
                    questions_file: Optional[Union[str, pathlib.Path]] = None) -> BenchmarkSamples:
    """Load PixCV-Bench (633 ADE20K + 805 COCO = 1,438 samples) from ``root``.

    Args:
        root: folder with CV-Bench's test file, Objects.csv and the two FinalSegmentations.json.
        strict: raise :class:`~pixfound.data.sample.BadDataError` (a ``ValueError`` naming file and
            row) on the first defect; with ``strict=False`` the affected samples are left out and
            listed in ``result.skipped``. A missing required column always raises.
        require_images: a missing image file is a defect. With ``False`` samples keep the size
            their RLEs declare (``None`` for polygon-only images) and ``meta["image_missing"]``.
        images_root: folder holding ``ADE20K/validation/images`` and ``COCO/coco/images``, directly
            or under ``CV-Bench/`` (default ``root``).
        questions_file: CV-Bench's ``test.parquet`` (needs pyarrow) or ``test.jsonl``; default:
            whichever of the two is in ``root``. Omni3D (3D) rows are ignored.

    ``Sample.id`` is CV-Bench's idx as a string, ``task`` is "Count" or "Relation",
    ``meta["prompt"]`` is CV-Bench's ready-made prompt with lettered choices.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise MissingFileError(f"PixCV-Bench root folder not found: {root}")
    images_base = _images_base(pathlib.Path(images_root) if images_root is not None else root)
    questions_path = require_file(pathlib.Path(questions_file), "CV-Bench questions file") \
        if questions_file is not None else _find_questions_file(root)
    objects_path = root / "Objects.csv"

    log = ProblemLog(strict)
    rows = [(where, row) for where, row in read_cvbench_rows(questions_path, log) if _is_2d(row)]
    object_rows = read_csv(objects_path, ["Id", "Objects"])
    cocos: dict[str, CocoFile] = {source: load_coco(_find_json(root, source), log) for source in SOURCES}

    # Objects.csv: Id -> (row, source, position of the row within its source).
    objects: dict[int, tuple[CsvRow, Optional[str], Optional[int]]] = {}
    next_position = {source: 0 for source in SOURCES}
    duplicated: set[int] = set()
    for obj in object_rows:
        if obj.values is None:
            log.report(objects_path, obj.location(), f"has {obj.num_cells} cells, the header has a different count")
            continue
        # Positions count every row of a source, even a bad one, so later rows keep their JSON ids.
        source = _source_of_file(obj.values["file"]) if "file" in obj.values else None
        position = None
        if source is not None:
            position = next_position[source]
            next_position[source] += 1
        obj_id = as_int(obj.values["Id"])
        if obj_id is None:
            log.report(objects_path, obj.location(), f"'Id' {obj.values['Id']!r} is not an integer")
            continue
        if obj_id in objects or obj_id in duplicated:
            objects.pop(obj_id, None)
            duplicated.add(obj_id)
            log.report(objects_path, obj.location(), f"duplicate Id {obj_id}", sample_id=str(obj_id))
            continue
        objects[obj_id] = (obj, source, position)

    # Without a `file` column, positions follow Objects.csv order among rows of each source, and
    # the source comes from the CV-Bench row.
    has_file_column = any(obj.values is not None and "file" in obj.values for obj in object_rows)
    if not has_file_column:
        source_by_idx = {as_int(row.get("idx")): row.get("source") for _, row in rows}
        next_position = {source: 0 for source in SOURCES}
        for obj_id, (obj, _, _) in list(objects.items()):
            source = source_by_idx.get(obj_id)
            if source in SOURCES:
                objects[obj_id] = (obj, source, next_position[source])
                next_position[source] += 1

    count_note = (f"{questions_path.name} has {len(rows)} 2D rows, {objects_path.name} has {len(object_rows)} rows")
    seen_ids: set[int] = set()
    used_images: dict[str, set[int]] = {source: set() for source in SOURCES}
    samples = BenchmarkSamples(name="pixcvbench", root=root)
    ordered = sorted(((as_int(row.get("idx")), where, row) for where, row in rows),
                     key=lambda t: (t[0] is None, t[0] if t[0] is not None else 0))
    for position, (idx, where, row) in enumerate(ordered):
        sample_id = str(idx) if idx is not None else f"{questions_path.name}:{where}"
        error = _check_row(row)
        if error is not None:
            log.report(questions_path, where, error, sample_id)
            continue
        if idx in seen_ids:
            log.report(questions_path, where, f"duplicate idx {idx}", sample_id)
            continue
        seen_ids.add(idx)
        if idx in duplicated:
            continue  # reported with Objects.csv
        source = row["source"]
        if idx not in objects:
            log.report(objects_path, f"Id {idx}", f"row count mismatch ({count_note}): no row for "
                       f"{questions_path.name} {where} (idx {idx})", sample_id)
            continue
        obj, obj_source, obj_position = objects[idx]
        if obj_source != source or obj_position is None:
            log.report(objects_path, obj.location(), f"file {obj.values.get('file', '')!r} is not from "
                       f"{source}, the source of {questions_path.name} {where}", sample_id)
            continue
        coco = cocos[source]
        image = coco.by_id.get(obj_position)
        if image is None:
            log.report(coco.path, "images", f"no image with id {obj_position} for {objects_path.name} "
                       f"{obj.location()} (the {obj_position + 1}-th {source} row; the JSON has "
                       f"{len(coco.images)} images)", sample_id)
            continue
        used_images[source].add(image.id)
        name = pathlib.PurePosixPath(row["source_filename"]).name
        obj_name = pathlib.PurePosixPath(obj.values["file"].strip()).name if "file" in obj.values else name
        if not (name == image.file_name == obj_name):
            log.report(coco.path, f"images[{image.position}]",
                       f"file names disagree: {questions_path.name} {where} has {name!r}, "
                       f"{objects_path.name} {obj.location()} has {obj_name!r}, the JSON has "
                       f"{image.file_name!r}", sample_id)
            continue
        if image.errors:
            for location, reason in image.errors:
                log.report(coco.path, location, reason, sample_id)
            continue
        try:
            parts = parse_objects_cell(obj.values["Objects"])
        except ValueError as err:
            log.report(objects_path, obj.location(), str(err), sample_id)
            continue

        choices = [str(c).strip() for c in row["choices"]]
        meta: dict = {
            "source": source,
            "source_filename": row["source_filename"],
            "json_image_id": image.id,
            "objects": parts,
            "prompt": row.get("prompt"),
            "cvbench_filename": row.get("filename"),
            "num_annotations": len(image.segmentations),
            "num_rle": image.num_rle,
            "num_polygons": image.num_polygons,
            "annotated_absent": bool(parts) and not image.segmentations,
        }
        image_path = images_base.joinpath(*image_relative_path(source, row["source_filename"]))
        usable, size = resolve_image(image_path, image.declared_size, meta, require_images, log,
                                     sample_id, (str(questions_path), where))
        if not usable:
            continue
        mask_loader = LazyMask(image.segmentations, size,
                               where=f"pixcvbench sample {sample_id} ({coco.path}, {image.file_name})",
                               size_error=f"image {image_path} is missing and its annotations are "
                                          "polygons only, which declare no size")
        samples.append(Sample(
            id=sample_id, index=position, benchmark="pixcvbench", question=row["question"].strip(),
            options=choices, answer=_ANSWER.fullmatch(row["answer"]).group(1),
            expression=" and ".join(parts) if parts else None, image_path=image_path, image_size=size,
            task=row["task"].strip(), meta=meta, mask_loader=mask_loader))

    for obj_id in sorted(set(objects) - seen_ids):
        obj = objects[obj_id][0]
        # a PixCV-Bench entry without its CV-Bench question: a sample the run cannot evaluate
        log.report(objects_path, obj.location(), f"row count mismatch ({count_note}): Id {obj_id} "
                   f"has no 2D row in {questions_path.name}", str(obj_id))
    for source, coco in cocos.items():
        for image in coco.images:
            if image.id not in used_images[source] and image.id >= next_position[source]:
                log.report(coco.path, f"images[{image.position}]",
                           f"image id {image.id} ({image.file_name}) has no {source} row in {objects_path.name}")
    samples.skipped = log.problems
    log.log_summary("pixcvbench")
    return samples

"""PixMMVP: MMVP's 300 questions (150 image pairs) with referring expressions and masks.

Layout under ``root`` (as released; images come from MMVP)::

    MMVP Images/1.jpg … 300.jpg
    Questions.csv          MMVP's questions: Index (MMVP spells it "lndex"), Question, Options, Correct Answer
    visual_patterns.csv    the same questions plus a Pattern column (used for ``Sample.task``);
                           the question source when Questions.csv is absent
    Objects.csv            Index, Object: the referring expression per question ("None" where there is none)
    Segmentations.json     COCO-style polygons; image ``file_name`` is "{index}.jpg"
    meta_none.txt          the images whose expression is None (cross-checked with Objects.csv)

Sample ``i`` (1-based, as in the file names) has ``id == str(i)``, ``index == i - 1`` and
``pair_index == (i - 1) // 2``: MMVP pairs are images (1, 2), (3, 4), …
"""
from __future__ import annotations

import pathlib
import re
from pixfound.errors import MissingFileError
from typing import Optional, Union

from ._coco import (CsvRow, LazyMask, ProblemLog, as_int, load_coco, read_csv, require_file,
                    resolve_image, strip_expression)
from .sample import BenchmarkSamples, Sample

IMAGES_DIR = "MMVP Images"
_INDEX_COLUMNS = ("Index", "lndex")  # MMVP's Questions.csv header really says "lndex"
_OPTION_MARK = re.compile(r"\(([a-z])\)")
_ANSWER = re.compile(r"\s*\(?\s*([a-zA-Z])\s*\)?\s*")


def parse_mmvp_options(text: str) -> list[str]:
    """``"(a) Open (b) Closed"`` → ``["Open", "Closed"]``; letters must run a, b, c, … in order."""
    parts = _OPTION_MARK.split(text)
    # split gives [before, "a", text_a, "b", text_b, ...]
    if len(parts) < 5 or parts[0].strip():
        raise ValueError(f"options {text!r} are not of the form '(a) … (b) …'")
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    expected = [chr(ord("a") + k) for k in range(len(letters))]
    if letters != expected:
        raise ValueError(f"options {text!r} have letters {letters}, expected {expected}")
    if not all(texts):
        raise ValueError(f"options {text!r} have an empty option")
    return texts


def parse_answer_letter(text: str, num_options: int) -> str:
    """``"(a)"`` / ``"a"`` / ``"(A)"`` → ``"A"``, checked against the number of options."""
    match = _ANSWER.fullmatch(text)
    if not match:
        raise ValueError(f"answer {text!r} is not a letter such as '(a)'")
    letter = match.group(1).upper()
    if ord(letter) - ord("A") >= num_options:
        raise ValueError(f"answer {text!r} points past the {num_options} options")
    return letter


def _index_rows(rows: list[CsvRow], path: pathlib.Path, log: ProblemLog, conflicted: set[int]
                ) -> dict[int, CsvRow]:
    """Rows keyed by their 1-based index: the Index/lndex column when present, else position.
    Indices that occur twice are reported, dropped, and added to ``conflicted``."""
    keyed: dict[int, CsvRow] = {}
    duplicated: set[int] = set()
    for position, row in enumerate(rows, start=1):
        if row.values is None:
            log.report(path, row.location(), f"has {row.num_cells} cells, the header has a different count")
            continue
        column = next((c for c in _INDEX_COLUMNS if c in row.values), None)
        index = as_int(row.values[column]) if column else position
        if index is None or index < 1:
            log.report(path, row.location(), f"index {row.values[column]!r} is not a positive integer")
            continue
        if index in keyed or index in duplicated:
            first = keyed.pop(index, None)
            log.report(path, row.location(), f"duplicate index {index}"
                       + (f" (first on {first.location()})" if first else ""), sample_id=str(index))
            duplicated.add(index)
            continue
        keyed[index] = row
    conflicted |= duplicated
    return keyed


def load_pixmmvp(root: Union[str, pathlib.Path], *, strict: bool = True, require_images: bool = True,
                 images_dir: Optional[Union[str, pathlib.Path]] = None,
                 questions_file: Optional[Union[str, pathlib.Path]] = None) -> BenchmarkSamples:
    """Load PixMMVP from ``root`` (layout in the module docstring).

    Args:
        root: the PixMMVP folder.
        strict: raise :class:`~pixfound.data.sample.BadDataError` (a ``ValueError`` naming file and
            row) on the first defect; with ``strict=False`` the affected samples are left out and
            listed in ``result.skipped``. A missing required CSV column always raises.
        require_images: a missing image file is a defect. With ``False`` (annotation-only use, e.g.
            statistics) samples keep their declared 224×224 size and ``meta["image_missing"]``.
        images_dir: image folder, default ``root / "MMVP Images"``.
        questions_file: default ``Questions.csv``, else ``visual_patterns.csv``.

    Masks are the union of an image's polygons, rasterised by pycocotools at the actual image size
    (declared size if the image is absent); decoded lazily by ``Sample.mask_loader``.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise MissingFileError(f"PixMMVP root folder not found: {root}")
    image_dir = pathlib.Path(images_dir) if images_dir is not None else root / IMAGES_DIR
    patterns_path = root / "visual_patterns.csv"
    if questions_file is not None:
        questions_path = require_file(pathlib.Path(questions_file), "PixMMVP questions file")
    elif (root / "Questions.csv").is_file():
        questions_path = root / "Questions.csv"
    elif patterns_path.is_file():
        questions_path = patterns_path
    else:
        raise MissingFileError(f"PixMMVP questions not found: neither {root / 'Questions.csv'} "
                                f"nor {patterns_path} exists")
    objects_path = root / "Objects.csv"
    json_path = root / "Segmentations.json"
    none_path = root / "meta_none.txt"

    log = ProblemLog(strict)
    conflicted: set[int] = set()  # indices already reported as duplicated
    questions = _index_rows(read_csv(questions_path, ["Question", "Options", "Correct Answer"]),
                            questions_path, log, conflicted)
    objects = _index_rows(read_csv(objects_path, ["Object"]), objects_path, log, conflicted)
    patterns = _index_rows(read_csv(patterns_path, ["Pattern"]), patterns_path, log, conflicted) \
        if patterns_path.is_file() else None
    none_images: Optional[set[str]] = None
    if none_path.is_file():
        none_images = {line.strip() for line in none_path.read_text(encoding="utf-8").splitlines() if line.strip()}
    coco = load_coco(require_file(json_path, "PixMMVP segmentations"), log)
    json_by_name = {image.file_name: image for image in coco.images}

    def count_mismatch(path: pathlib.Path, rows: dict) -> str:
        return f"row count mismatch: {path.name} has {len(rows)} rows, {questions_path.name} has {len(questions)}"

    # Rows without a question: the files disagree on the benchmark's length.
    for path, rows in ((objects_path, objects), (patterns_path, patterns or {})):
        for index in sorted(set(rows) - set(questions) - conflicted):
            log.report(path, rows[index].location(),
                       f"{count_mismatch(path, rows)}; index {index} has no question")
    for name in sorted(set(json_by_name) - {f"{i}.jpg" for i in questions}):
        log.report(json_path, f"images[{json_by_name[name].position}]",
                   f"image {name!r} matches no question in {questions_path.name}")

    samples = BenchmarkSamples(name="pixmmvp", root=root)
    for index in sorted(questions):
        if index in conflicted:
            continue  # reported as a duplicate
        sample_id = str(index)
        row = questions[index].values
        where_q = questions[index].location()
        try:
            options = parse_mmvp_options(row["Options"])
            answer = parse_answer_letter(row["Correct Answer"], len(options))
        except ValueError as err:
            log.report(questions_path, where_q, str(err), sample_id)
            continue
        question = row["Question"].strip()
        if not question:
            log.report(questions_path, where_q, "empty question", sample_id)
            continue
        if index not in objects:
            log.report(objects_path, f"index {index}",
                       f"{count_mismatch(objects_path, objects)}; no expression for the question on "
                       f"{questions_path.name} {where_q}", sample_id)
            continue
        if patterns is not None and index not in patterns:
            log.report(patterns_path, f"index {index}",
                       f"{count_mismatch(patterns_path, patterns)}; no pattern for the question on "
                       f"{questions_path.name} {where_q}", sample_id)
            continue
        expression = strip_expression(objects[index].values["Object"])
        file_name = f"{index}.jpg"
        if none_images is not None and (expression is None) != (file_name in none_images):
            log.report(objects_path, objects[index].location(),
                       f"expression {objects[index].values['Object'].strip()!r} disagrees with "
                       f"{none_path.name} ({file_name} {'is' if file_name in none_images else 'is not'} "
                       "listed as expression-less)", sample_id)
            continue
        image = json_by_name.get(file_name)
        if image is None:
            log.report(json_path, "images", f"no image with file_name {file_name!r} for the question on "
                                            f"{questions_path.name} {where_q}", sample_id)
            continue
        if image.errors:
            for location, reason in image.errors:
                log.report(json_path, location, reason, sample_id)
            continue

        meta: dict = {
            "image_file": file_name,
            "json_image_id": image.id,
            "options_text": row["Options"].strip(),
            # The cells as the published scripts read them (pandas, nothing trimmed): --prompt-text raw.
            "raw_question": row["Question"],
            "raw_options": row["Options"],
            "raw_answer": row["Correct Answer"],
            "raw_expression": objects[index].values["Object"],
            "num_annotations": len(image.segmentations),
            # an expression whose object the annotators found absent: empty ground truth
            "annotated_absent": expression is not None and not image.segmentations,
        }
        image_path = image_dir / file_name
        usable, size = resolve_image(image_path, image.declared_size, meta, require_images, log,
                                     sample_id, (str(questions_path), where_q))
        if not usable:
            continue
        # An image without annotations gets an all-False mask of shape (H, W). The published
        # loader built np.zeros((w, h)) here, which is transposed for non-square images.
        mask_loader = LazyMask(image.segmentations, size, where=f"pixmmvp sample {sample_id} ({json_path}, "
                               f"{file_name})", size_error=f"image {image_path} is missing and "
                               f"{json_path.name} declares no size")
        samples.append(Sample(
            id=sample_id, index=index - 1, benchmark="pixmmvp", question=question, options=options,
            answer=answer, expression=expression, image_path=image_path, image_size=size,
            task=patterns[index].values["Pattern"].strip() if patterns is not None else None,
            pair_index=(index - 1) // 2, meta=meta, mask_loader=mask_loader))
    samples.skipped = log.problems
    log.log_summary("pixmmvp")
    return samples

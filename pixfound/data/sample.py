"""One evaluation sample: an image, a VQA question, and a referring expression with its mask."""
from __future__ import annotations

import dataclasses
import pathlib
from pixfound.errors import DataError
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass
class Sample:
    id: str                         # unique within its benchmark, stable across runs (resume keys on it)
    index: int                      # position in the benchmark's canonical order
    benchmark: str                  # "pixmmvp" | "pixcvbench" | "synthetic"
    question: str
    options: list[str]              # option texts in letter order: options[0] is "A"
    answer: str                     # the correct letter, "A", "B", ...
    expression: Optional[str]       # referring expression, None where the benchmark has none
    image_path: Optional[pathlib.Path] = None
    image_size: Optional[tuple[int, int]] = None   # (H, W) of the image, when known without opening it
    task: Optional[str] = None      # MMVP visual pattern or CV-Bench task
    pair_index: Optional[int] = None  # MMVP-style pairs: samples 2k and 2k+1 share pair_index k
    meta: dict = dataclasses.field(default_factory=dict)
    # Loaders keep memory flat: 1,438 CV-Bench masks would otherwise be ~0.5 GB of bools.
    mask_loader: Optional[Callable[[], np.ndarray]] = dataclasses.field(default=None, repr=False, compare=False)
    image_loader: Optional[Callable[[], "object"]] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def has_expression(self) -> bool:
        return self.expression is not None

    @property
    def gt_mask(self) -> np.ndarray:
        """Ground-truth mask, bool [H, W]; all False where the object is absent."""
        if self.mask_loader is None:
            raise ValueError(f"sample {self.id} has no ground-truth mask")
        return self.mask_loader()

    def load_image(self):
        """The image as an RGB ``PIL.Image``; a missing or unreadable file is a :class:`BadDataError`
        naming the file."""
        if self.image_loader is not None:
            return self.image_loader()
        if self.image_path is None:
            raise ValueError(f"sample {self.id} has no image")
        from PIL import Image

        path = pathlib.Path(self.image_path)
        if not path.is_file():
            raise MissingImageError(DataProblem(str(path), "", "image file not found", str(self.id)))
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for broken files
            raise BadDataError(DataProblem(str(path), "", f"image file cannot be read ({error})", str(self.id))) from None


# ----------------------------------------------------------------------------------------------
# Loading results and data errors
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataProblem:
    """One defect found in a benchmark's files, and what the loader did about it.

    ``path`` is the file at fault, ``location`` the row inside it (``"line 12"`` for CSV/JSONL,
    ``"annotations[7]"`` for COCO JSON), ``sample_id`` the sample it cost (``None`` when only an
    annotation was dropped).
    """

    path: str
    location: str
    reason: str
    sample_id: Optional[str] = None

    def __str__(self) -> str:
        where = f"{self.path}: {self.location}" if self.location else self.path
        who = f" (sample {self.sample_id})" if self.sample_id is not None else ""
        return f"{where}: {self.reason}{who}"


class BadDataError(DataError):
    """A benchmark file holds something the loader cannot use; the message names file and row."""

    def __init__(self, problem: DataProblem):
        super().__init__(str(problem))
        self.problem = problem


class MissingImageError(BadDataError, FileNotFoundError):
    """A sample's image file does not exist (both a ``ValueError`` and a ``FileNotFoundError``)."""


class BenchmarkSamples(list):
    """The samples of one benchmark, in canonical order: a plain ``list`` of :class:`Sample` plus

    - ``name``: the benchmark name,
    - ``root``: the folder it was read from (``None`` for the synthetic benchmark),
    - ``skipped``: the :class:`DataProblem` s met with ``strict=False`` (empty when strict, since
      a strict load raises on the first one). A problem with a ``sample_id`` removed that sample;
      one without (an annotation pointing at an unknown image) only dropped that annotation.

    Slicing returns a plain list.
    """

    def __init__(self, samples=(), *, name: str, root: Optional[pathlib.Path] = None,
                 skipped: Optional[list[DataProblem]] = None):
        super().__init__(samples)
        self.name = name
        self.root = root
        self.skipped: list[DataProblem] = list(skipped or [])

    @property
    def skipped_ids(self) -> list[str]:
        """Ids of the samples that a non-strict load left out."""
        return [p.sample_id for p in self.skipped if p.sample_id is not None]

    def __repr__(self) -> str:
        return f"BenchmarkSamples(name={self.name!r}, n={len(self)}, skipped={len(self.skipped)})"


def unreadable_images(samples: "list[Sample]") -> list[DataProblem]:
    """Decode every sample's image file in full: missing, truncated or unreadable files, one
    problem each (a header check alone misses a truncated JPEG). In-memory images are not checked."""
    problems = []
    for sample in samples:
        if sample.image_loader is not None or sample.image_path is None:
            continue
        try:
            sample.load_image()
        except BadDataError as error:
            problems.append(error.problem)
    return problems

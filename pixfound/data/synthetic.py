"""A procedural benchmark: coloured shapes with exact masks, needing no download.

Each pair of samples (2k, 2k+1) shares one two-choice question, MMVP-style, and the two scenes are
built so that the answers differ. Pair k's task cycles through :data:`TASKS`, so any ``n >= 12``
covers all of them:

- ``left_right`` / ``above_below``: "Is the red triangle to the left or to the right of the blue
  circle?", decided by the shapes' centres, which are at least one full shape apart on that axis;
- ``colour``: "What colour is the square?";
- ``count``: "How many green circles are in the image?";
- ``presence``: "Is there a yellow square in the image?"; in the "No" scene the expression's
  object is absent and its mask is empty;
- ``comparison``: "Are there more circles or more squares in the image?"; no expression (None).

Shapes never touch (their bounding circles stay 2 px apart), so a mask is exactly the pixels
painted for its objects. Pixel (i, j) belongs to a shape when its centre (j + 0.5, i + 0.5) does.
Everything is drawn from ``numpy.random.default_rng([seed, k])``: loads are deterministic, and
``n=8`` gives the first 8 samples of ``n=16``. Images and masks are rendered on demand.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import numpy as np

from pixfound.errors import UserError

from .sample import BenchmarkSamples, Sample

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 30),
}
TASKS = ("left_right", "above_below", "colour", "count", "presence", "comparison")
DEFAULT_SIZE = (96, 128)
MIN_SIDE = 32
_GAP = 2.0              # pixels between bounding circles
_TRIANGLE_SCALE = 1.25  # a triangle's circumradius is 1.25 r so that its area is close to the others'


@dataclasses.dataclass(frozen=True)
class Shape:
    """One object in a scene: ``r`` is the circle's radius, the square's half side, and 1/1.25 of
    the triangle's circumradius (an upward triangle)."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float

    @property
    def bounding_radius(self) -> float:
        return self.r * {"circle": 1.0, "square": math.sqrt(2.0), "triangle": _TRIANGLE_SCALE}[self.shape]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def triangle_vertices(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices (x, y) of the upward equilateral triangle drawn for a ``triangle`` of size ``r``."""
    radius = r * _TRIANGLE_SCALE
    return [(cx + radius * math.cos(a), cy + radius * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]


def shape_mask(shape: Shape, size: tuple[int, int]) -> np.ndarray:
    """Exact bool mask [H, W] of one shape, tested at pixel centres."""
    height, width = size
    y = (np.arange(height, dtype=np.float64) + 0.5)[:, None]
    x = (np.arange(width, dtype=np.float64) + 0.5)[None, :]
    if shape.shape == "circle":
        return (x - shape.cx) ** 2 + (y - shape.cy) ** 2 <= shape.r ** 2
    if shape.shape == "square":
        return (np.abs(x - shape.cx) <= shape.r) & (np.abs(y - shape.cy) <= shape.r)
    if shape.shape == "triangle":
        inside = np.ones((height, width), dtype=bool)
        vertices = triangle_vertices(shape.cx, shape.cy, shape.r)
        for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
            # Vertices run clockwise on screen (y down), so the inside is where the cross product is >= 0.
            inside &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
        return inside
    raise ValueError(f"unknown shape {shape.shape!r}; expected one of {SHAPES}")


def render_scene(objects: Sequence[Shape], size: tuple[int, int], background: int) -> np.ndarray:
    """RGB uint8 image [H, W, 3] of the scene."""
    image = np.full((*size, 3), background, dtype=np.uint8)
    for obj in objects:
        image[shape_mask(obj, size)] = COLOURS[obj.colour]
    return image


def objects_mask(objects: Sequence[Shape], size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    for obj in objects:
        mask |= shape_mask(obj, size)
    return mask


# ----------------------------------------------------------------------------------------------
# Scene construction
# ----------------------------------------------------------------------------------------------


class _Canvas:
    """Places non-touching shapes at random, optionally under a constraint on the new centre."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int]):
        self.rng = rng
        self.height, self.width = size
        side = min(size)
        self.r_range = (0.07 * side, 0.11 * side)
        self.objects: list[Shape] = []

    def add(self, shape: str, colour: str,
            where: Optional[Callable[[float, float, float], bool]] = None) -> Shape:
        for _ in range(2000):
            r = float(self.rng.uniform(*self.r_range))
            probe = Shape(shape, colour, 0.0, 0.0, r)
            margin = probe.bounding_radius + 1.0
            if 2 * margin >= min(self.width, self.height):
                continue
            cx = float(self.rng.uniform(margin, self.width - margin))
            cy = float(self.rng.uniform(margin, self.height - margin))
            candidate = Shape(shape, colour, cx, cy, r)
            if where is not None and not where(cx, cy, candidate.bounding_radius):
                continue
            if all(math.hypot(cx - o.cx, cy - o.cy) >= candidate.bounding_radius + o.bounding_radius + _GAP
                   for o in self.objects):
                self.objects.append(candidate)
                return candidate
        raise _NoRoom()


class _NoRoom(Exception):
    pass


def _distractors(canvas: _Canvas, allowed: list[tuple[str, str]], count: int) -> None:
    for _ in range(count):
        shape, colour = allowed[int(canvas.rng.integers(len(allowed)))]
        canvas.add(shape, colour)


def _pick(rng: np.random.Generator, items: Sequence[str], k: int) -> list[str]:
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


@dataclasses.dataclass
class _Scene:
    objects: list[Shape]
    answer: int                      # index into the options
    expression: Optional[str]
    targets: list[Shape]             # the objects the expression refers to (empty when absent)
    background: int
    reference: Optional[Shape] = None


def _build_pair(task: str, rng: np.random.Generator, size: tuple[int, int]
                ) -> tuple[str, list[str], list[_Scene], dict]:
    """Question, options, the two scenes (answers 0 and 1) and task facts for meta."""
    all_kinds = [(s, c) for s in SHAPES for c in COLOURS]
    if task in ("left_right", "above_below"):
        (t_shape, r_shape), (t_colour, r_colour) = _pick(rng, SHAPES, 2), _pick(rng, list(COLOURS), 2)
        target, ref = f"{t_colour} {t_shape}", f"{r_colour} {r_shape}"
        axis = 0 if task == "left_right" else 1
        if axis == 0:
            question, options = f"Is the {target} to the left or to the right of the {ref}?", ["Left", "Right"]
        else:
            question, options = f"Is the {target} above or below the {ref}?", ["Above", "Below"]
        others = [k for k in all_kinds if k not in ((t_shape, t_colour), (r_shape, r_colour))]
        scenes = []
        for answer in (0, 1):
            canvas = _Canvas(rng, size)
            reference = canvas.add(r_shape, r_colour)
            ref_pos = (reference.cx, reference.cy)[axis]

            def beside(cx, cy, br, answer=answer, ref_pos=ref_pos, ref_br=reference.bounding_radius):
                # a full shape apart on the asked axis, on the side that gives `answer`
                offset = (cx, cy)[axis] - ref_pos
                return (offset <= -(br + ref_br)) if answer == 0 else (offset >= br + ref_br)

            obj = canvas.add(t_shape, t_colour, beside)
            _distractors(canvas, others, int(rng.integers(0, 3)))
            scenes.append(_Scene(canvas.objects, answer, f"the {target}", [obj], 0, reference))
        return question, options, scenes, {"target": (t_shape, t_colour), "reference": (r_shape, r_colour)}

    if task == "colour":
        shape = _pick(rng, SHAPES, 1)[0]
        colours = _pick(rng, list(COLOURS), 2)
        others = [k for k in all_kinds if k[0] != shape]
        scenes = []
        for answer in (0, 1):
            canvas = _Canvas(rng, size)
            obj = canvas.add(shape, colours[answer])
            _distractors(canvas, others, int(rng.integers(1, 3)))
            scenes.append(_Scene(canvas.objects, answer, f"the {colours[answer]} {shape}", [obj], 0))
        return f"What colour is the {shape}?", [c.capitalize() for c in colours], scenes, {"shape": shape}

    if task == "count":
        shape, colour = _pick(rng, SHAPES, 1)[0], _pick(rng, list(COLOURS), 1)[0]
        low = int(rng.integers(1, 3))
        counts = [low, low + 1]
        others = [k for k in all_kinds if k != (shape, colour)]
        scenes = []
        for answer in (0, 1):
            canvas = _Canvas(rng, size)
            targets = [canvas.add(shape, colour) for _ in range(counts[answer])]
            _distractors(canvas, others, int(rng.integers(0, 3)))
            scenes.append(_Scene(canvas.objects, answer, f"the {colour} {shape}s", targets, 0))
        return (f"How many {colour} {shape}s are in the image?", [str(c) for c in counts], scenes,
                {"target": (shape, colour)})

    if task == "presence":
        shape, colour = _pick(rng, SHAPES, 1)[0], _pick(rng, list(COLOURS), 1)[0]
        others = [k for k in all_kinds if k != (shape, colour)]
        scenes = []
        for answer in (0, 1):  # 0: "Yes", the object is there; 1: "No", it is absent
            canvas = _Canvas(rng, size)
            targets = [canvas.add(shape, colour)] if answer == 0 else []
            _distractors(canvas, others, int(rng.integers(1, 4)))
            scenes.append(_Scene(canvas.objects, answer, f"the {colour} {shape}", targets, 0))
        return f"Is there a {colour} {shape} in the image?", ["Yes", "No"], scenes, {"target": (shape, colour)}

    if task == "comparison":
        first, second = _pick(rng, SHAPES, 2)
        third = next(s for s in SHAPES if s not in (first, second))
        scenes = []
        for answer in (0, 1):
            more = int(rng.integers(2, 4))
            fewer = int(rng.integers(1, more))
            counts = {first: more, second: fewer} if answer == 0 else {first: fewer, second: more}
            canvas = _Canvas(rng, size)
            for shape, count in counts.items():
                for _ in range(count):
                    canvas.add(shape, _pick(rng, list(COLOURS), 1)[0])
            _distractors(canvas, [(third, c) for c in COLOURS], int(rng.integers(0, 2)))
            scenes.append(_Scene(canvas.objects, answer, None, [], 0))
        return (f"Are there more {first}s or more {second}s in the image?",
                [f"{first.capitalize()}s", f"{second.capitalize()}s"], scenes, {"shapes": (first, second)})
    raise ValueError(f"unknown task {task!r}")


def _pair_scenes(seed: int, k: int, size: tuple[int, int]):
    rng = np.random.default_rng([seed, k])
    task = TASKS[k % len(TASKS)]
    for _ in range(50):  # a crowded draw can fail to fit; draw again from the same stream
        try:
            question, options, scenes, facts = _build_pair(task, rng, size)
            break
        except _NoRoom:
            continue
    else:
        raise UserError(f"synthetic: cannot fit the scenes of pair {k} into size {size}; use a larger size")
    for scene in scenes:
        scene.background = int(rng.integers(200, 246))
    order = [int(i) for i in rng.permutation(2)]  # which answer comes first within the pair
    return task, question, options, [scenes[i] for i in order], facts


def _check_args(n: int, seed: int, size: Sequence[int]) -> tuple[int, int]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
        raise UserError(f"synthetic: n must be an even integer >= 2 (samples come in pairs), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"synthetic: seed must be a non-negative integer, got {seed!r}")
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise UserError(f"synthetic: size must be (H, W), got {size!r}") from None
    if height < MIN_SIDE or width < MIN_SIDE:
        raise UserError(f"synthetic: size (H, W) must be at least {MIN_SIDE} on each side, got {tuple(size)}")
    return height, width


def load_synthetic(root=None, *, n: int = 16, seed: int = 0, size: Sequence[int] = DEFAULT_SIZE
                   ) -> BenchmarkSamples:
    """``n`` procedural samples (n even) of ``size`` (H, W), deterministic in ``seed``.

    ``root`` must be None (nothing is read from disk). ``Sample.meta`` holds the scene
    (``objects``: shape, colour, cx, cy, r per object; ``background``), the ``targets`` the
    expression refers to, and for position tasks the ``reference`` object, so that answers and
    masks can be re-derived from geometry.
    """
    if root is not None:
        raise UserError(f"the synthetic benchmark reads no files; got root={root!r}")
    size = _check_args(n, seed, size)
    samples = BenchmarkSamples(name="synthetic")
    for k in range(n // 2):
        task, question, options, scenes, facts = _pair_scenes(seed, k, size)
        for j, scene in enumerate(scenes):
            index = 2 * k + j
            objects, targets, background = tuple(scene.objects), tuple(scene.targets), scene.background
            meta = {
                "objects": [o.to_dict() for o in objects],
                "targets": [o.to_dict() for o in targets],
                "reference": scene.reference.to_dict() if scene.reference is not None else None,
                "background": background,
                "annotated_absent": scene.expression is not None and not targets,
                "seed": seed,
                **facts,
            }
            samples.append(Sample(
                id=f"s{seed}-{index}", index=index, benchmark="synthetic", question=question,
                options=list(options), answer="AB"[scene.answer], expression=scene.expression,
                image_path=None, image_size=size, task=task, pair_index=k, meta=meta,
                # partials of module functions, not lambdas, so samples pickle (worker processes)
                mask_loader=functools.partial(objects_mask, targets, size),
                image_loader=functools.partial(_render_pil, objects, size, background)))
    return samples


def _render_pil(objects: Sequence[Shape], size: tuple[int, int], background: int):
    from PIL import Image

    return Image.fromarray(render_scene(objects, size, background))

"""A scripted MLLM, segmenter, judge and phrase vectors, so that an end-to-end run has known answers.

- :class:`ScriptedAdapter` answers each (sample, protocol) with a chosen text, word by word, and
  gives each word's map a single peak at a chosen pixel (or none): a phrase's point is then exactly
  the pixel its words point at. Its maps have the image's own size, so upsampling changes nothing.
- :class:`ScriptedSegmenter` returns, for each point, three masks: a 5x5 box around it, the whole
  image, and the synthetic shape under the point (empty on the background), with SAM scores 0.3,
  0.2 and 0.9, so the highest-scoring mask and the last mask file are both the shape.
- :class:`TableVectors` gives each normalised phrase a fixed vector, with exact cosines (0.75, 0.7,
  0.69) to the expression's vector.
- :class:`ScriptedJudge` grades protocol-1 answers "yes" exactly when they pick the right letter.

Nothing here imports a test module: tests import this one.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Sequence

import numpy as np
import torch

from pixfound.data.synthetic import Shape, shape_mask
from pixfound.models import tiny_model
from pixfound.models.base import Generation, ImageGeometry

BOX = 2  # the box distractor reaches 2 pixels around the point
SCORES = (0.3, 0.2, 0.9)  # box, whole image, the shape


def protocol_of(prompt: str) -> int:
    """Which protocol a prompt belongs to (the pipeline builds them; see pixfound.eval.prompts)."""
    if prompt.lstrip().startswith(("Identify", "Output bounding box", "Point to", "Locate")):
        return 3
    return 2 if "Answer with the option's letter" in prompt else 1


@dataclasses.dataclass
class Answer:
    """A scripted answer: words, and for each word the pixel (x, y) its map peaks at, or None."""

    words: list[str]
    targets: list[Optional[tuple[int, int]]]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def words(*parts) -> Answer:
    """``words("the", ("green", p), ("square", p), "is", ...)``: a word, or (word, pixel) for a peak."""
    out, targets = [], []
    for part in parts:
        word, target = (part, None) if isinstance(part, str) else part
        out.append(word)
        targets.append(target)
    return Answer(out, targets)


class ScriptedAdapter:
    """A model adapter whose answers and attention maps are given: ``script[(sample_id, protocol)]``."""

    family = "scripted"
    name = "scripted"
    shares_image_prefix = False
    writes_coordinates = True

    def __init__(self, script: dict):
        self.script = script
        self.tokenizer = tiny_model("llava").tokenizer  # a word-level vocabulary: one token per word
        self.model = torch.nn.Linear(1, 1)
        self.calls: list[tuple[str, int]] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def generate(self, samples, prompts, *, max_new_tokens: int, capture=None, **_: object) -> list[Generation]:
        out = []
        for sample, prompt in zip(samples, prompts):
            protocol = protocol_of(prompt)
            self.calls.append((str(sample.id), protocol))
            answer = self.script[(str(sample.id), protocol)]
            image = sample.load_image()
            height, width = image.height, image.width
            if isinstance(answer, str):  # a plain reply (e.g. box coordinates): no tokens, no maps
                assert capture is None, "a plain reply has no attention maps"
                out.append(Generation(sample_id=str(sample.id), prompt=prompt, text=answer, token_ids=[], maps=None,
                                      geometry=ImageGeometry(height, width, height, width, "resize"), timings={}))
                continue
            ids = [self.tokenizer.convert_tokens_to_ids(word) for word in answer.words][:max_new_tokens]
            unknown = [w for w, i in zip(answer.words, ids) if i is None or i == self.tokenizer.unk_token_id]
            assert not unknown, f"words outside the vocabulary: {unknown}"
            maps = None
            if capture is not None:
                maps = torch.zeros((len(ids), height, width), dtype=torch.float32)
                for row, target in enumerate(answer.targets[:len(ids)]):
                    if target is not None:
                        maps[row, target[1], target[0]] = 1.0
            out.append(Generation(
                sample_id=str(sample.id), prompt=prompt, text=self.tokenizer.decode(ids), token_ids=ids, maps=maps,
                geometry=ImageGeometry(height, width, height, width, "resize"), timings={"capture": capture},
                stop_map=torch.zeros((height, width)) if capture is not None else None))
        return out


    def native_chat(self, images, prompts, *, max_new_tokens: int) -> list:
        """The model's own points or boxes: ``script[(key of the image shown, protocol)]`` is the reply
        text; the frame is the image shown (the pipeline shows boxes at twice the size)."""
        from pixfound.models.base import NativeReply

        replies = []
        for image, prompt in zip(images, prompts):
            key = (_image_key(image), protocol_of(prompt))
            self.calls.append(key)
            replies.append(NativeReply(self.script[key], (image.height, image.width)))
        return replies


def _image_key(image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


class ScriptedSegmenter:
    """Three masks per point: a small box, the whole image, and the synthetic shape under the point."""

    def __init__(self, samples: Sequence):
        self.scenes = {_image_key(s.load_image()): ([Shape(**o) for o in s.meta["objects"]], s.image_size)
                       for s in samples}
        self.current = None

    def describe(self) -> dict:
        return {"model_type": "scripted"}

    def embed_images(self, images) -> list:
        return [self.scenes[_image_key(image)] for image in images]

    def set_embedding(self, embedding) -> None:
        self.current = embedding

    def masks_for(self, x: int, y: int) -> np.ndarray:
        shapes, (height, width) = self.current
        box = np.zeros((height, width), dtype=bool)
        box[max(0, y - BOX):y + BOX + 1, max(0, x - BOX):x + BOX + 1] = True
        under = [m for m in (shape_mask(s, (height, width)) for s in shapes) if m[y, x]]
        shape = under[0] if under else np.zeros((height, width), dtype=bool)
        return np.stack([box, np.ones((height, width), dtype=bool), shape])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.current[1])

    def segment_boxes(self, boxes, *, multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per box: the shape under the box's centre."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        masks = [self.masks_for(int((b[0] + b[2]) / 2), int((b[1] + b[3]) / 2))[2] for b in boxes]
        shape = tuple(self.current[1])
        stacked = np.stack(masks) if masks else np.zeros((0, *shape), dtype=bool)
        return torch.from_numpy(stacked), torch.full((len(masks),), 0.9)

    def segment_points(self, points) -> tuple[torch.Tensor, torch.Tensor]:
        points = torch.as_tensor(points)
        masks = torch.from_numpy(np.stack([self.masks_for(int(p[0, 0]), int(p[0, 1])) for p in points]))
        scores = torch.tensor([SCORES] * len(points), dtype=torch.float32)
        return masks, scores


# Cosines with the expression's vector (1, 0, 0, 0, 0, 0), exact in float64 and, printed with %f, in float32:
# 0.75 = 3/4, 0.7 = 7/10, 0.69 = 69/100.
VECTORS = {
    0.75: (3, 2, 1, 1, 1, 0),
    0.7: (7, 7, 1, 1, 0, 0),
    0.69: (69, 72, 7, 2, 1, 1),
}
EXPRESSION_VECTOR = (1, 0, 0, 0, 0, 0)


class TableVectors:
    """Phrase vectors from a table of normalised texts; a text not in it has the zero vector."""

    name = "table"

    def __init__(self, expressions: Sequence[str], phrases: dict):
        self.table = {text: EXPRESSION_VECTOR for text in expressions}
        self.table.update({text: VECTORS[cosine] for text, cosine in phrases.items()})

    def encode(self, texts) -> np.ndarray:
        return np.asarray([self.table.get(t, (0,) * 6) for t in texts], dtype=np.float32)


class ScriptedJudge:
    """Grades protocol-1 answers: "yes" exactly for the answers listed as right; says every
    expression exists and picks the first overlay."""

    name = "scripted-judge"

    def __init__(self, right_answers: set[str]):
        self.right_answers = right_answers

    def ask(self, images, prompt: str, *, system: Optional[str] = None) -> str:
        if prompt.startswith("Given the following question"):
            answer = prompt.split("answer:", 1)[1].rsplit("? Respond with a Yes/No", 1)[0]
            return "Yes" if answer in self.right_answers else "No"
        if prompt.startswith("Does this image have"):
            return "yes"
        return "1"

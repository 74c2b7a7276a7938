"""When-analysis: the oracle phrase's position histogram and the judge's concept categories."""
from __future__ import annotations

import json

import pytest

from fake_openai_server import FakeOpenAIServer, chat_reply
from pixfound import cli
from pixfound.eval import when

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_histogram_has_ten_bins_and_100_goes_to_the_last():
    result = when.when_histogram([0.0, 9.99, 10.0, 55.0, 99.9, 100.0])
    assert result["edges"] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert result["counts"] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert result["n"] == 6 and sum(result["fractions"]) == pytest.approx(1.0)
    assert result["labels"][0] == "0-10%" and result["labels"][-1] == "90-100%"
    assert when.when_histogram([])["counts"] == [0] * 10


@pytest.mark.parametrize("bad", [[-1.0], [100.5], [float("nan")]])
def test_histogram_rejects_positions_outside_percent(bad):
    with pytest.raises(ValueError, match="positions"):
        when.when_histogram(bad)


def _record(index, protocol, position, *, has_expression=True, gt_area=50, chosen=True, phrase="the red square"):
    oracle = {"candidate_index": 0 if chosen else None, "phrase_index": 1 if chosen else None, "iou": 0.6}
    return {
        "key": f"s{index}#p{protocol}", "sample_id": f"s{index}", "index": index, "protocol": protocol,
        "has_expression": has_expression, "expression": "the red square" if has_expression else None,
        "answer": f"There is {phrase} on the left.",
        "grounding": {"gt_area": gt_area, "phrases": [{"index": 0, "text": "There", "position_pct": 0.0},
                                                      {"index": 1, "text": phrase, "position_pct": position}],
                      "selections": {"oracle": oracle}},
    }


def test_oracle_phrases_leave_out_what_the_paper_leaves_out():
    records = [
        _record(0, 1, 30.0),
        _record(1, 1, 70.0),
        _record(2, 1, 10.0, has_expression=False),
        _record(3, 1, 10.0, gt_area=0),
        _record(4, 1, 10.0, chosen=False),
        _record(5, 3, 90.0),
    ]
    items, excluded = when.oracle_phrases(records)
    assert [i["sample_id"] for i in items] == ["s0", "s1"]
    assert excluded == {"protocol": 1, "empty_ground_truth": 1, "no_candidates": 1, "without_expression": 1}
    analysis = when.when_analysis(records)
    assert analysis["protocol"] == 1 and analysis["n"] == 2
    assert analysis["counts"][3] == 1 and analysis["counts"][7] == 1
    only_p3 = when.when_analysis(records, protocol=3)
    assert only_p3["n"] == 1 and only_p3["counts"][9] == 1
    assert when.when_analysis([{"key": "a", "protocol": 2, "grounding": None}]) is None


def test_parse_category():
    assert when.parse_category("3") == "object part"
    assert when.parse_category("Answer: 1.") == "colour & appearance"
    assert when.parse_category("I think it's the state of things") == "state"
    assert when.parse_category("9") is None
    assert when.parse_category("no idea") is None


def test_categorize_with_a_judge_object():
    class Judge:
        name = "fake"

        def __init__(self):
            self.prompts = []

        def ask(self, images, prompt, *, system=None):
            self.prompts.append(prompt)
            return "5" if "square" in prompt else "garbage"

    judge = Judge()
    items = [{"sample_id": "a", "phrase": "the red square", "answer": "the red square is left", "expression": "x"},
             {"sample_id": "b", "phrase": "the sky", "answer": "the sky", "expression": None}]
    result = when.categorize_concepts(items, judge)
    assert result["counts"]["object/entity"] == 1 and result["unparsed"] == 1
    assert sum(result["counts"].values()) == 1
    assert "Answer with the number only" in judge.prompts[0] and '"the red square"' in judge.prompts[0]


def test_when_command_with_the_judge_server(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [_record(0, 1, 30.0), _record(1, 1, 45.0, phrase="the wheel"), _record(2, 1, 95.0)]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with FakeOpenAIServer([chat_reply("2"), chat_reply("3"), chat_reply("unsure")]) as server:
        code = cli.main(["when", "--run", str(run), "--judge", "openai:fake-judge", "--judge-base-url", server.base_url])
        prompts = [r.body["messages"][-1]["content"] for r in server.requests]
    assert code == 0
    assert len(prompts) == 3 and "the wheel" in prompts[1]
    result = json.loads((run / "when.json").read_text())
    assert result["n"] == 3 and result["counts"][3] == 1 and result["counts"][4] == 1 and result["counts"][9] == 1
    assert result["concepts"]["counts"]["location & position"] == 1
    assert result["concepts"]["counts"]["object part"] == 1
    assert result["concepts"]["unparsed"] == 1
    assert (run / "when.png").read_bytes()[:8] == PNG_MAGIC
    assert "oracle phrase position" in capsys.readouterr().out


def test_when_command_errors(tmp_path, capsys):
    assert cli.main(["when", "--run", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["when", "--run", str(empty)]) == 2
    assert "holds no samples.jsonl" in capsys.readouterr().err

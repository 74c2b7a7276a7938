"""Prompt text for protocols 1-3, the prompt-sensitivity templates and the judge question."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from pixfound.data.sample import Sample
from pixfound.eval import prompts as P

INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _mmvp_sample(**overrides) -> Sample:
    fields = dict(
        id="pixmmvp-1",
        index=0,
        benchmark="pixmmvp",
        question="Are the butterfly's wings closer to being open or closed?",
        options=["Open", "Closed"],
        answer="A",
        expression=" the butterfly's wings",
    )
    fields.update(overrides)
    return Sample(**fields)


def _cvbench_sample() -> Sample:
    question = "How many organs are in the image?"
    return Sample(
        id="pixcvbench-7",
        index=7,
        benchmark="pixcvbench",
        question=question,
        options=["3", "2", "1", "0"],
        answer="D",
        expression="organ",
        meta={"prompt": f"{question} Select from the following choices.\n(A) 3\n(B) 2\n(C) 1\n(D) 0"},
    )


# ------------------------------------------------------------------------------------------ protocols


def test_protocol_prompts_mmvp():
    sample = _mmvp_sample()
    assert P.build_prompt(sample, 1) == (
        "Are the butterfly's wings closer to being open or closed? (a) Open (b) Closed"
    )
    assert P.build_prompt(sample, 2) == (
        "Are the butterfly's wings closer to being open or closed? Options:\nA. Open\nB. Closed\n" + INSTRUCTION
    )
    assert P.build_prompt(sample, 3) == "Identify the butterfly's wings in the scene."


def test_protocol_prompts_with_more_options_and_custom_instruction():
    sample = SimpleNamespace(
        id="s", question="Which colour?", options=["red", "green", "blue"], expression="x", meta={}
    )
    assert P.build_prompt(sample, 1) == "Which colour? (a) red (b) green (c) blue"
    assert P.build_prompt(sample, 2, instruction="Letter only.") == (
        "Which colour? Options:\nA. red\nB. green\nC. blue\nLetter only."
    )


def test_protocol_prompts_use_the_benchmarks_own_prompt():
    sample = _cvbench_sample()
    assert P.build_prompt(sample, 1) == sample.meta["prompt"]
    assert P.build_prompt(sample, 2) == sample.meta["prompt"] + "\n" + INSTRUCTION
    assert P.build_prompt(sample, 3) == "Identify organ in the scene."


def test_protocol3_grounding_template_overrides():
    sample = _mmvp_sample()
    assert P.build_prompt(sample, 3, grounding_template="Segment {expression}.") == "Segment the butterfly's wings."
    assert P.build_prompt(sample, 3, grounding_template="Where is {}?") == "Where is the butterfly's wings?"
    assert P.build_prompt(sample, 3, grounding_template=2) == "Can you segment the butterfly's wings in this image?"


@pytest.mark.parametrize("template", ["Segment it.", "Segment {} and {}.", "Segment {name}.", "Segment {0.x}.", "{"])
def test_protocol3_rejects_bad_grounding_templates(template):
    with pytest.raises(ValueError, match="grounding template"):
        P.build_prompt(_mmvp_sample(), 3, grounding_template=template)


def test_protocol3_without_expression_raises():
    with pytest.raises(ValueError, match="pixmmvp-1 has no referring expression"):
        P.build_prompt(_mmvp_sample(expression=None), 3)
    with pytest.raises(ValueError, match="non-empty"):
        P.build_prompt(_mmvp_sample(expression="  "), 3)


@pytest.mark.parametrize(
    "overrides, protocol, message",
    [
        ({}, 4, "protocol"),
        ({}, True, "protocol"),
        ({"question": ""}, 1, "question"),
        ({"options": "Open Closed"}, 2, "options"),
        ({"options": []}, 2, "1 to 26"),
        ({"options": ["Open", 3]}, 1, r"options\[1\]"),
        ({"meta": {"prompt": ""}}, 1, "meta"),
    ],
)
def test_build_prompt_rejects_bad_samples(overrides, protocol, message):
    with pytest.raises(ValueError, match=message):
        P.build_prompt(_mmvp_sample(**overrides), protocol)


# ------------------------------------------------------------------------------------------ articles


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the butterfly's wings", "butterfly's wings"),
        (" the butterfly's wings", "butterfly's wings"),  # published slip: leading space kept the article
        ("The dog", "dog"),
        ("a red car", "red car"),
        ("An apple ", "apple"),
        ("another cat", "another cat"),
        ("theatre seats", "theatre seats"),
        ("the", "the"),
        ("the the cat", "the cat"),
        ("", ""),
    ],
)
def test_strip_article(text, expected):
    assert P.strip_article(text) == expected


def test_strip_article_rejects_non_strings():
    with pytest.raises(ValueError, match="str"):
        P.strip_article(None)


# ------------------------------------------------------------------------------------------ templates


def test_template_counts_and_indices():
    assert len(P.vqa_templates()) == 10
    assert len(P.grounding_templates()) == 7
    assert P.vqa_template(1) == P.vqa_templates()[0]
    assert P.grounding_template(7) == P.grounding_templates()[-1]
    for bad in (0, 11, True, "1"):
        with pytest.raises(ValueError, match="VQA template"):
            P.vqa_template(bad)
    with pytest.raises(ValueError, match="1 to 7"):
        P.grounding_template(8)


def test_every_template_renders():
    for index in range(1, 11):
        rendered = P.render_vqa_template(index, "QQ?", "A. x\nB. y", "II.")
        assert "|" not in rendered and "{}" not in rendered
        assert rendered.index("QQ?") < rendered.index("A. x") < rendered.index("II.")
    for index in range(1, 8):
        rendered = P.render_grounding_template(index, "the red cube")
        assert "the red cube" in rendered and "{}" not in rendered


def test_vqa_template_parts_and_escapes():
    assert P.vqa_template_parts(1, "Q?", "OPTS", "INS") == ("Ques:Q?\\n", "OPTS\\nInstruct:", "INS\\nAns:")
    assert P.render_vqa_template(1, "Q?", "OPTS", "INS", decode=True) == "Ques:Q?\nOPTS\nInstruct:INS\nAns:"
    assert P.render_vqa_template(5, "Q?", "OPTS", "INS", decode=True) == "Q?\tOPTS\tINSAnswer::"
    # A '|' inside the question must not shift the parts.
    assert P.vqa_template_parts(9, "a|b", "O", "I") == ("a|b", "O", "I")
    with pytest.raises(ValueError, match="three parts"):
        P.render_vqa_template("{} {} |{}", "Q", "O", "I")


def test_protocol2_with_vqa_template():
    sample = _mmvp_sample()
    question = sample.question
    assert P.build_prompt(sample, 2, vqa_template=9) == P.build_prompt(sample, 2)
    assert P.build_prompt(sample, 2, vqa_template=4) == (
        f"Question-{question}  Options:\nA. Open\nB. Closed.\n{INSTRUCTION}.Answer-"
    )
    assert P.build_prompt(sample, 2, vqa_template=7, decode_template_escapes=True) == (
        f"Q: {question}\n Options:\nA. Open\nB. Closed\n\n{INSTRUCTION}\nA:"
    )
    # The template changes protocol 2 only.
    assert P.build_prompt(sample, 1, vqa_template=4) == P.build_prompt(sample, 1)
    assert P.build_prompt(sample, 3, vqa_template=4) == P.build_prompt(sample, 3)


def test_protocol2_with_vqa_template_on_own_prompt():
    sample = _cvbench_sample()
    prompt = P.build_prompt(sample, 2, vqa_template=6)
    assert prompt == (
        f"Question, {sample.question}  Select from the following choices.\n"
        f"(A) 3\n(B) 2\n(C) 1\n(D) 0. . {INSTRUCTION}. Answer,"
    )
    broken = _cvbench_sample()
    broken.meta = {"prompt": "Something else entirely"}
    with pytest.raises(ValueError, match="pixcvbench-7"):
        P.build_prompt(broken, 2, vqa_template=6)


def _published_templates(path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["Index"]) for row in rows] == list(range(1, len(rows) + 1))
    return [row["Template"] for row in rows]


def test_template_wording_matches_published_csv(annotations_root):
    folder = annotations_root / "pixmmvp"
    assert P.vqa_templates() == _published_templates(folder / "prompt_templates.csv")
    assert P.grounding_templates() == _published_templates(folder / "lang_grounding_prompt_templates.csv")


# ---------------------------------------------------------------------------------------------- judge


def test_judge_prompt_wording():
    assert P.judge_prompt("Is it open? (a) Open (b) Closed", "(a)", "It is open.") == (
        "Given the following question Is it open? (a) Open (b) Closed, the correct answer is (a). "
        "Does the following answer correctly answers the question, answer:It is open.? Respond with a Yes/No"
    )
    with pytest.raises(ValueError, match="response"):
        P.judge_prompt("q", "(a)", None)


def test_judge_prompt_for_sample_labels_the_answer_like_the_prompt():
    mmvp = P.judge_prompt_for_sample(_mmvp_sample(), "Open")
    assert mmvp == P.judge_prompt(P.build_prompt(_mmvp_sample(), 1), "(a)", "Open")
    cvbench = P.judge_prompt_for_sample(_cvbench_sample(), "0")
    assert cvbench == P.judge_prompt(_cvbench_sample().meta["prompt"], "(D)", "0")
    with pytest.raises(ValueError, match="pixmmvp-1"):
        P.judge_prompt_for_sample(_mmvp_sample(answer="C"), "x")

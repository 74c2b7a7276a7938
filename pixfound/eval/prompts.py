"""Prompt text for the three evaluation protocols, the prompt-sensitivity templates and the judge.

Wording follows the published PixFoundation inference scripts (``pixmmvp/inference/infer_llava.py``,
``infer_pixfoundation.py``, ``infer_qwen.py``, ``pixcvbench/inference/*``):

- protocol 1 (free answer): ``"{question} (a) {A} (b) {B}"``, MMVP's question followed by its options.
- protocol 2 (letter answer): ``"{question} Options:\\nA. {A}\\nB. {B}\\nAnswer with the option's letter
  from the given choices directly."``
- protocol 3 (grounding): ``"Identify {expression} in the scene."``, or any template with one slot.

A sample that carries its benchmark's own ready-made prompt in ``sample.meta["prompt"]`` (CV-Bench's
``prompt`` column, which already lists the choices as ``(A) …``) uses it verbatim for protocol 1, and
with ``"\\n" + instruction`` appended for protocol 2, as the published CV-Bench scripts do.

Only the text is built here; the chat template and the image token are the model adapter's job.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import re
import string
from collections.abc import Sequence
from typing import Any, Optional, Union

from pixfound.eval.metrics import normalize_letter, option_letters

__all__ = [
    "DEFAULT_GROUNDING_TEMPLATE",
    "JUDGE_SYSTEM_PROMPT",
    "PROTOCOL2_INSTRUCTION",
    "build_prompt",
    "decode_escapes",
    "format_options_inline",
    "format_options_lines",
    "grounding_template",
    "grounding_templates",
    "judge_prompt",
    "judge_prompt_for_sample",
    "render_grounding_template",
    "render_vqa_template",
    "strip_article",
    "vqa_template",
    "vqa_template_parts",
    "vqa_templates",
]

PROTOCOL2_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# LLaVA's image placeholder line, which the published answers file kept at the start of each prompt.
IMAGE_LINE = "<image>\n"
DEFAULT_GROUNDING_TEMPLATE = "Identify {} in the scene."
# System message of the published protocol-1 grader (pixmmvp/eval/protocol1_accuracy.py).
JUDGE_SYSTEM_PROMPT = (
    "You are a helpful and precise assistant for checking the quality of the answer. "
    "Please answer in only yes or no."
)

TemplateArg = Union[int, str, None]

_ARTICLE = re.compile(r"^(?:the|an|a)\s+(?=\S)", re.IGNORECASE)


def strip_article(text: str) -> str:
    """The text without surrounding white space and without one leading "the", "a" or "an".

    Used before comparing a phrase with the referring expression. Leading white space is trimmed
    first: PixMMVP's ``Objects.csv`` stores expressions as ``" the butterfly's wings"``, and the
    published check missed the article there (a known slip, fixed here). Words that merely start
    with an article ("another", "theatre") and a lone article are left as they are.
    """
    if not isinstance(text, str):
        raise ValueError(f"strip_article expects a str, got {type(text).__name__}")
    return _ARTICLE.sub("", text.strip(), count=1)


# ------------------------------------------------------------------------------------------ options


def format_options_inline(options: Sequence[str], *, upper: bool = False) -> str:
    """Options as MMVP writes them after the question: ``"(a) Open (b) Closed"``."""
    letters = option_letters(options)
    return " ".join(
        f"({letter if upper else letter.lower()}) {option.strip()}" for letter, option in zip(letters, options)
    )


def format_options_lines(options: Sequence[str]) -> str:
    """Options one per line for protocol 2: ``"A. Open\\nB. Closed"``."""
    letters = option_letters(options)
    return "\n".join(f"{letter}. {option.strip()}" for letter, option in zip(letters, options))


def _choices_block(options: Sequence[str]) -> str:
    # How the published CV-Bench template sweep wrote the choices: "(A) x\n(B) y".
    letters = option_letters(options)
    return "\n".join(f"({letter}) {option}" for letter, option in zip(letters, options))


# ---------------------------------------------------------------------------------------- templates


@functools.lru_cache(maxsize=None)
def _load_templates(filename: str, slots: int, separators: int) -> tuple[str, ...]:
    resource = importlib.resources.files("pixfound.eval").joinpath("templates", filename)
    try:
        payload = json.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"package data pixfound/eval/templates/{filename} is missing") from error
    entries = payload.get("templates") if isinstance(payload, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"pixfound/eval/templates/{filename}: expected a non-empty 'templates' list")
    templates = []
    for position, entry in enumerate(entries):
        well_formed = isinstance(entry, dict) and isinstance(entry.get("template"), str)
        if not well_formed or entry.get("index") != position + 1:
            raise ValueError(
                f"pixfound/eval/templates/{filename}: entry {position} must be "
                f"{{'index': {position + 1}, 'template': str}}, got {entry!r}"
            )
        text = entry["template"]
        if text.count("{}") != slots or text.count("|") != separators:
            raise ValueError(
                f"pixfound/eval/templates/{filename}: template {position + 1} must have {slots} '{{}}' slot(s) "
                f"and {separators} '|' separator(s): {text!r}"
            )
        templates.append(text)
    return tuple(templates)


def vqa_templates() -> list[str]:
    """The 10 published VQA prompt layouts ``question | options | instruction`` (index 1 first).

    Each has three ``{}`` slots separated by ``|``. Backslash-n / backslash-t are kept as the two
    literal characters, as in the published CSV; see :func:`decode_escapes`.
    """
    return list(_load_templates("vqa_templates.json", 3, 2))


def grounding_templates() -> list[str]:
    """The 7 published grounding phrasings, each with one ``{}`` slot for the expression (index 1 first)."""
    return list(_load_templates("grounding_templates.json", 1, 0))


def _pick(templates: list[str], index: int, what: str) -> str:
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"{what} index must be an int, got {index!r}")
    if not 1 <= index <= len(templates):
        raise ValueError(f"{what} index {index} is out of range: choose 1 to {len(templates)} (1-based)")
    return templates[index - 1]


def vqa_template(index: int) -> str:
    """VQA layout number ``index``, 1-based as in the published ``prompt_templates.csv``."""
    return _pick(vqa_templates(), index, "VQA template")


def grounding_template(index: int) -> str:
    """Grounding phrasing number ``index``, 1-based as in ``lang_grounding_prompt_templates.csv``."""
    return _pick(grounding_templates(), index, "grounding template")


def decode_escapes(template: str) -> str:
    """Turn the literal two-character sequences backslash-n / backslash-t into a newline / tab."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def _resolve_vqa_template(template: Union[int, str]) -> str:
    text = vqa_template(template) if isinstance(template, int) and not isinstance(template, bool) else template
    if not isinstance(text, str):
        raise ValueError(f"vqa_template must be a 1-based index or a template string, got {template!r}")
    if text.count("|") != 2 or any(piece.count("{}") != 1 for piece in text.split("|")):
        raise ValueError(
            f"a VQA template needs three parts separated by two '|', each with one '{{}}' slot "
            f"(question, options, instruction): {text!r}"
        )
    return text


def vqa_template_parts(
    template: Union[int, str],
    question: str,
    options_text: str,
    instruction: str,
    *,
    decode: bool = False,
) -> tuple[str, str, str]:
    """The (question, options, instruction) parts of a VQA layout, each with its separators.

    ``template`` is a 1-based index into :func:`vqa_templates` or a template string. The published
    sweep formats the whole template and splits it at ``|``; the slot values are inserted after the
    split here, so a ``|`` inside a question cannot shift the parts. ``decode=True`` turns literal
    backslash-n / backslash-t in the template into a newline / tab (:func:`decode_escapes`).
    """
    text = _resolve_vqa_template(template)
    if decode:
        text = decode_escapes(text)
    for name, value in (("question", question), ("options_text", options_text), ("instruction", instruction)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    parts = []
    for piece, value in zip(text.split("|"), (question, options_text, instruction)):
        before, _, after = piece.partition("{}")
        parts.append(f"{before}{value}{after}")
    return parts[0], parts[1], parts[2]


def render_vqa_template(
    template: Union[int, str],
    question: str,
    options_text: str,
    instruction: str,
    *,
    decode: bool = False,
) -> str:
    """A VQA layout filled in: the three parts of :func:`vqa_template_parts` joined without ``|``."""
    return "".join(vqa_template_parts(template, question, options_text, instruction, decode=decode))


def _grounding_slot_check(text: str) -> None:
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as error:
        raise ValueError(f"grounding template {text!r} is not a valid format string: {error}") from error
    if len(fields) != 1 or fields[0] not in ("", "0", "expression"):
        raise ValueError(
            f"a grounding template needs exactly one '{{}}' or '{{expression}}' slot and no other fields: {text!r}"
        )


def render_grounding_template(template: Union[int, str], expression: str, *, raw: bool = False) -> str:
    """A grounding prompt: ``template`` (1-based index or string with ``{}`` / ``{expression}``) filled in.

    The expression is trimmed, unless ``raw`` (the published scripts format the CSV cell as read,
    leading space included: ``"Identify  the dog in the scene."``).
    """
    text = grounding_template(template) if isinstance(template, int) and not isinstance(template, bool) else template
    if not isinstance(text, str):
        raise ValueError(f"grounding_template must be a 1-based index or a template string, got {template!r}")
    _grounding_slot_check(text)
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"expression must be a non-empty str, got {expression!r}")
    value = expression if raw else expression.strip()
    return text.format(value, expression=value)


# -------------------------------------------------------------------------------------------- build


def _sample_fields(sample: Any) -> tuple[str, list[str], Optional[str], str]:
    sample_id = str(getattr(sample, "id", "?"))
    question = getattr(sample, "question", None)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"sample {sample_id}: question must be a non-empty str, got {question!r}")
    options = getattr(sample, "options", None)
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise ValueError(f"sample {sample_id}: options must be a list of option texts, got {options!r}")
    try:
        option_letters(options)
    except ValueError as error:
        raise ValueError(f"sample {sample_id}: {error}") from error
    own_prompt = (getattr(sample, "meta", None) or {}).get("prompt")
    if own_prompt is not None and (not isinstance(own_prompt, str) or not own_prompt.strip()):
        raise ValueError(f"sample {sample_id}: meta['prompt'] must be a non-empty str, got {own_prompt!r}")
    return question.strip(), list(options), own_prompt, sample_id


PromptText = str  # "normalized" | "raw"


def _raw_meta(sample: Any, *keys: str) -> Optional[tuple[str, ...]]:
    """The benchmark's raw cells ``keys`` from ``sample.meta``, or None when the loader kept none."""
    meta = getattr(sample, "meta", None) or {}
    values = tuple(meta.get(key) for key in keys)
    return values if all(isinstance(v, str) for v in values) else None


def build_prompt(
    sample: Any,
    protocol: int,
    *,
    vqa_template: TemplateArg = None,
    grounding_template: TemplateArg = None,
    instruction: str = PROTOCOL2_INSTRUCTION,
    decode_template_escapes: bool = False,
    text: PromptText = "normalized",
) -> str:
    """The text prompt for ``sample`` under protocol 1, 2 or 3.

    ``sample`` needs ``question`` (str), ``options`` (option texts in letter order) and ``expression``
    (str or None); ``meta["prompt"]`` is used when present (see the module docstring).

    - ``vqa_template`` (1-based index or layout string) changes protocol 2 only: question, options
      and instruction are decorated by the layout, then assembled as protocol 2 is. On a sample with
      its own prompt, the question and ``(A) …`` choices inside it are replaced by their decorated
      forms and ``". " + instruction`` is appended, as in the published CV-Bench sweep.
    - ``grounding_template`` (1-based index or string with ``{}``/``{expression}``) changes
      protocol 3 only; the default is :data:`DEFAULT_GROUNDING_TEMPLATE`.
    - ``text="raw"`` builds the prompt from the benchmark's cells exactly as the published scripts
      read them with pandas (``meta["raw_question"]``, ``["raw_options"]``, ``["raw_expression"]``,
      kept by the PixMMVP loader): protocol 1 is ``question + " " + options`` untrimmed, protocol 2
      starts with the untrimmed question, protocol 3 formats the expression cell with its leading
      space and doubled quotes. Samples without raw cells (synthetic, CV-Bench) use their own text.

    Protocol 3 on a sample without an expression raises ``ValueError``: there is nothing to ground,
    and the runner skips protocol 3 for such samples.
    """
    if isinstance(protocol, bool) or protocol not in (1, 2, 3):
        raise ValueError(f"protocol must be 1, 2 or 3, got {protocol!r}")
    if text not in ("normalized", "raw"):
        raise ValueError(f"text must be 'normalized' or 'raw', got {text!r}")
    raw = text == "raw"
    if protocol == 3:
        expression = getattr(sample, "expression", None)
        sample_id = str(getattr(sample, "id", "?"))
        if expression is None:
            raise ValueError(f"sample {sample_id} has no referring expression; protocol 3 does not apply to it")
        raw_cell = _raw_meta(sample, "raw_expression") if raw else None
        template = DEFAULT_GROUNDING_TEMPLATE if grounding_template is None else grounding_template
        try:
            if raw_cell is not None:
                return render_grounding_template(template, raw_cell[0], raw=True)
            return render_grounding_template(template, expression)
        except ValueError as error:
            raise ValueError(f"sample {sample_id}: {error}") from None

    question, options, own_prompt, sample_id = _sample_fields(sample)
    raw_cells = _raw_meta(sample, "raw_question", "raw_options") if raw and own_prompt is None else None
    if protocol == 1:
        if own_prompt is not None:
            return own_prompt
        if raw_cells is not None:
            return f"{raw_cells[0]} {raw_cells[1]}"
        return f"{question} {format_options_inline(options)}"

    if not isinstance(instruction, str):
        raise ValueError(f"instruction must be a str, got {type(instruction).__name__}")
    if vqa_template is None:
        if own_prompt is not None:
            return f"{own_prompt}\n{instruction}"
        lead = raw_cells[0] if raw_cells is not None else question
        return f"{lead} Options:\n{format_options_lines(options)}\n{instruction}"

    if own_prompt is not None:
        choices = _choices_block(options)
        missing = [name for name, value in (("question", question), ("choices", choices)) if value not in own_prompt]
        if missing:
            raise ValueError(
                f"sample {sample_id}: cannot apply a VQA template, the {' and '.join(missing)} "
                f"text is not found in meta['prompt'] {own_prompt!r}"
            )
        new_question, new_choices, new_instruction = vqa_template_parts(
            vqa_template, question, choices, instruction, decode=decode_template_escapes
        )
        return own_prompt.replace(question, new_question).replace(choices, new_choices) + ". " + new_instruction
    new_question, new_options, new_instruction = vqa_template_parts(
        vqa_template, question, format_options_lines(options), instruction, decode=decode_template_escapes
    )
    # The published assembly strips spaces around the option lines (not the separators).
    return f"{new_question} Options:\n{new_options.strip(' ')}\n{new_instruction}"


# -------------------------------------------------------------------------------------------- judge


def judge_prompt(question: str, correct_answer: str, response: str) -> str:
    """The published protocol-1 grading question (send with :data:`JUDGE_SYSTEM_PROMPT`).

    Wording, spacing and grammar exactly as in ``pixmmvp/eval/protocol1_accuracy.py``; there
    ``question`` is the full protocol-1 prompt and ``correct_answer`` the labelled letter, e.g. "(a)".
    """
    for name, value in (("question", question), ("correct_answer", correct_answer), ("response", response)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    return (
        f"Given the following question {question}, the correct answer is {correct_answer}. "
        f"Does the following answer correctly answers the question, answer:{response}? Respond with a Yes/No"
    )


def judge_prompt_for_sample(sample: Any, response: str, *, text: PromptText = "normalized",
                            image_line: bool = False) -> str:
    """:func:`judge_prompt` for a sample's protocol-1 reply.

    The question is the protocol-1 prompt (built with ``text``); the correct answer is the letter
    labelled as in that prompt: ``"(a)"`` for MMVP-style options, ``"(A)"`` for a benchmark's own
    prompt (CV-Bench). ``image_line`` starts the question with ``"<image>\\n"``, as the published
    grader read it from the answers file (LLaVA's prompt with its image placeholder).
    """
    question, options, own_prompt, sample_id = _sample_fields(sample)
    try:
        letter = normalize_letter(getattr(sample, "answer", None), options)
    except ValueError as error:
        raise ValueError(f"sample {sample_id}: {error}") from error
    label = f"({letter})" if own_prompt is not None else f"({letter.lower()})"
    prompt = build_prompt(sample, 1, text=text)
    return judge_prompt(f"{IMAGE_LINE}{prompt}" if image_line else prompt, label, response)

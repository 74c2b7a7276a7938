"""When does grounding emerge? Where in the answer the best (oracle) phrase sits, and what it names.

For every grounded record the oracle selection names the phrase whose SAM mask best matches the
ground truth. Its start, as a percentage of the answer length (``Phrase.position_pct``), goes into
ten 10% bins. Left out, as published: samples without a referring expression, samples whose
ground-truth mask is empty, and samples where the oracle has no candidate to choose.

Optionally a judge sorts each oracle phrase into one of :data:`CONCEPT_CATEGORIES` (the paper's
concept analysis): colour & appearance, location & position, object part, context/setting,
object/entity, state.
"""
from __future__ import annotations

import json
import logging
import pathlib
import re
from collections import Counter
from typing import Any, Optional, Sequence, Union

import numpy as np

__all__ = [
    "CONCEPT_CATEGORIES",
    "categorize_concepts",
    "concept_prompt",
    "parse_categories_published",
    "oracle_phrases",
    "parse_category",
    "plot_when",
    "run_when",
    "when_analysis",
    "when_histogram",
]

logger = logging.getLogger("pixfound.eval")

CONCEPT_CATEGORIES = (
    "colour & appearance",
    "location & position",
    "object part",
    "context/setting",
    "object/entity",
    "state",
)
NUM_BINS = 10


def oracle_phrases(records: Sequence[dict], protocol: Optional[int] = None) -> tuple[list[dict], dict]:
    """The oracle phrase of each eligible record, and counts of the records left out (by reason).

    ``protocol=None`` takes protocol 1 when the records have it (free answers, as in the paper),
    else protocol 3.
    """
    grounded = [r for r in records if r.get("grounding")]
    if protocol is None:
        available = {int(r["protocol"]) for r in grounded}
        protocol = 1 if 1 in available else (3 if 3 in available else None)
    items: list[dict] = []
    excluded: Counter = Counter()
    if protocol is None:
        return items, {"protocol": None}
    for record in sorted(grounded, key=lambda r: (int(r["index"]), str(r["sample_id"]))):
        if int(record["protocol"]) != protocol:
            continue
        grounding = record["grounding"]
        oracle = (grounding.get("selections") or {}).get("oracle")
        if grounding.get("native"):
            excluded["native_grounding"] += 1  # the model's own points or boxes: no phrase in an answer
        elif not record.get("has_expression"):
            excluded["without_expression"] += 1
        elif not grounding.get("gt_area"):
            excluded["empty_ground_truth"] += 1
        elif oracle is None:
            excluded["no_oracle_selection"] += 1
        elif oracle.get("candidate_index") is None:
            excluded["no_candidates"] += 1
        else:
            phrase = next((p for p in grounding.get("phrases", []) if p["index"] == oracle.get("phrase_index")), None)
            if phrase is None:
                excluded["phrase_missing"] += 1
                continue
            items.append({
                "sample_id": record["sample_id"],
                "protocol": protocol,
                "phrase": phrase["text"],
                "root": phrase.get("root"),
                "position_pct": float(phrase["position_pct"]),
                "iou": oracle.get("iou"),
                "answer": record.get("answer", ""),
                "expression": record.get("expression"),
            })
    return items, {"protocol": protocol, **dict(sorted(excluded.items()))}


def when_histogram(positions: Sequence[float], bins: int = NUM_BINS) -> dict:
    """Counts of ``positions`` (percent, 0..100) in ``bins`` equal bins; 100 falls in the last bin."""
    values = np.asarray(list(positions), dtype=np.float64)
    if values.size and (np.isnan(values).any() or values.min() < 0 or values.max() > 100):
        raise ValueError(f"positions must lie in [0, 100] percent, got min {values.min()} max {values.max()}")
    width = 100.0 / bins
    index = np.minimum((values // width).astype(np.int64), bins - 1) if values.size else np.zeros(0, dtype=np.int64)
    counts = np.bincount(index, minlength=bins).astype(int)
    edges = [round(i * width, 6) for i in range(bins + 1)]
    total = int(counts.sum())
    return {
        "edges": edges,
        "labels": [f"{edges[i]:g}-{edges[i + 1]:g}%" for i in range(bins)],
        "counts": counts.tolist(),
        "fractions": [(c / total) if total else 0.0 for c in counts.tolist()],
        "n": total,
    }


def when_analysis(records: Sequence[dict], protocol: Optional[int] = None) -> Optional[dict]:
    """The location histogram of the oracle phrase (see the module docstring); None without grounding."""
    items, excluded = oracle_phrases(records, protocol)
    if excluded.get("protocol") is None:
        return None
    histogram = when_histogram([item["position_pct"] for item in items])
    return {"protocol": excluded.pop("protocol"), "strategy": "oracle", **histogram, "excluded": excluded,
            "mean_position_pct": float(np.mean([i["position_pct"] for i in items])) if items else None}


# ---------------------------------------------------------------------------------------------
# Concept categories through a judge
# ---------------------------------------------------------------------------------------------


CONCEPT_PROMPTS = ("published", "pixfound")
# The published concept question (pixmmvp/eval/gpt_concept_when.py), its system message, verbatim.
PUBLISHED_CONCEPT_QUESTION = (
    "Can you classify the following noun phrase belongs to which of these 6 concepts: (a) Color and appearance, "
    "(b) Location and position, (c) Object part, (d) Context or setting, (e) Objects/entities, (f) State. Please "
    "respond with one or two letters and provide letters only. You will be given the noun phrase and the "
    "correponding full context."
)
PUBLISHED_CONCEPT_SYSTEM = ("You are a helpful and precise assistant for providing the main concept of the noun "
                            "phrase of interest.")


def concept_prompt(phrase: str, answer: str, expression: Optional[str], *, wording: str = "pixfound") -> str:
    """The question that sorts one oracle phrase into concept categories.

    ``"published"``: the published question, letters (a)-(f), one or two of them, followed by
    ``: 'PHRASE', 'ANSWER'. `` with the answer's line breaks turned into spaces, as the published
    meta file stored it (the expression is not shown). ``"pixfound"``: numbered categories, one
    answer, with the expression named.
    """
    if wording == "published":
        return PUBLISHED_CONCEPT_QUESTION + f": '{phrase}', '{answer.replace(chr(10), ' ')}'. "
    listing = " ".join(f"{i}. {name}" for i, name in enumerate(CONCEPT_CATEGORIES, start=1))
    target = f' It is the phrase whose location best matches "{expression.strip()}".' if expression else ""
    return (
        f'An assistant described an image with this answer: "{answer.strip()}". '
        f'Consider the noun phrase "{phrase.strip()}" in that answer.{target} '
        f"Which kind of concept does the phrase express? {listing}. Answer with the number only."
    )


_FIRST_INTEGER = re.compile(r"\d+")


def parse_category(reply: str) -> Optional[str]:
    """The category a reply names: its first integer 1..6, else a category name it contains; None otherwise."""
    match = _FIRST_INTEGER.search(reply or "")
    if match is not None:
        number = int(match.group(0))
        return CONCEPT_CATEGORIES[number - 1] if 1 <= number <= len(CONCEPT_CATEGORIES) else None
    lowered = (reply or "").lower()
    for name in CONCEPT_CATEGORIES:
        head = name.split(" ")[0].split("/")[0]
        if head in lowered:
            return name
    return None


def parse_categories_published(reply: str) -> Optional[list[str]]:
    """The categories of a reply to the published question, read as the published counting did:
    lowercase, split at commas, parentheses dropped, each piece a letter a-f, else its first word.

    Returns the categories (one or two), or None where the published script would have stopped
    with a KeyError (a piece that is no letter).
    """
    letters = "abcdef"
    found = []
    for piece in reply.lower().split(","):
        piece = piece.replace("(", "").replace(")", "")
        key = piece.strip() if piece.strip() in letters and piece.strip() else piece.split(" ")[0].strip()
        if len(key) != 1 or key not in letters:
            return None
        found.append(CONCEPT_CATEGORIES[letters.index(key)])
    return found


def categorize_concepts(items: Sequence[dict], judge: Any, *, wording: str = "pixfound") -> dict:
    """Ask ``judge`` (``ask(images, prompt)``) for the concept category of every oracle phrase.

    With the published wording a reply may name two categories, and both are counted, as published.
    """
    if wording not in CONCEPT_PROMPTS:
        raise ValueError(f"wording must be one of {CONCEPT_PROMPTS}, got {wording!r}")
    per_sample = []
    counts: Counter = Counter()
    unparsed = 0
    for item in items:
        prompt = concept_prompt(item["phrase"], item["answer"], item.get("expression"), wording=wording)
        if wording == "published":
            reply = judge.ask([], prompt, system=PUBLISHED_CONCEPT_SYSTEM)
            categories = parse_categories_published(reply)
        else:
            reply = judge.ask([], prompt)
            category = parse_category(reply)
            categories = None if category is None else [category]
        if categories is None:
            unparsed += 1
        else:
            counts.update(categories)
        per_sample.append({"sample_id": item["sample_id"], "phrase": item["phrase"], "reply": reply,
                           "categories": categories})
    return {
        "judge": getattr(judge, "name", type(judge).__name__),
        "wording": wording,
        "categories": list(CONCEPT_CATEGORIES),
        "counts": {name: counts.get(name, 0) for name in CONCEPT_CATEGORIES},
        "unparsed": unparsed,
        "per_sample": per_sample,
    }


# ---------------------------------------------------------------------------------------------
# Plot and command
# ---------------------------------------------------------------------------------------------


def plot_when(when: dict, path: Union[str, pathlib.Path], *, note: str = "") -> pathlib.Path:
    """Bar chart of the when-histogram (and of the concept categories when present); ``note`` under the title."""
    from pixfound.eval.figures import new_figure

    concepts = when.get("concepts")
    figure = new_figure(10 if concepts else 6, 3.8)
    axes = figure.add_subplot(1, 2 if concepts else 1, 1)
    axes.bar(range(len(when["counts"])), when["counts"], color="#4363d8")
    axes.set_xticks(range(len(when["labels"])))
    axes.set_xticklabels(when["labels"], rotation=45, ha="right", fontsize=7)
    axes.set_xlabel("start of the oracle phrase in the answer")
    axes.set_ylabel("samples")
    axes.set_title(f"When does grounding emerge? (protocol {when.get('protocol')}, n={when.get('n')})"
                   + (f"\n{note}" if note else ""), fontsize=9)
    if concepts:
        axes = figure.add_subplot(1, 2, 2)
        names = list(concepts["counts"])
        axes.barh(range(len(names)), [concepts["counts"][n] for n in names], color="#f58231")
        axes.set_yticks(range(len(names)))
        axes.set_yticklabels(names, fontsize=7)
        axes.set_xlabel("oracle phrases")
        axes.set_title(f"Concept of the oracle phrase ({concepts['judge']})", fontsize=9)
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path)
    return path


def run_when(run_dir: Union[str, pathlib.Path], *, protocol: Optional[int] = None, judge: Any = None,
             output: Optional[Union[str, pathlib.Path]] = None, wording: Optional[str] = None,
             force: bool = False) -> dict:
    """``pixfound when``: read a run's samples.jsonl, write when.json and when.png (into ``output`` or the run).

    ``wording`` of the concept question defaults to the run's recipe (published → the published
    question). Earlier when.json / when.png in ``output`` are kept unless ``force``.
    """
    from pixfound.errors import OutputExistsError, UserError
    from pixfound.eval.records import RunPaths, collect_records, write_json_atomic

    paths = RunPaths(pathlib.Path(run_dir))
    if not paths.root.is_dir():
        raise UserError(f"--run {paths.root} is not a directory")
    if not paths.record_files():
        raise UserError(f"--run {paths.root} holds no samples.jsonl (is it a `pixfound eval` output?)")
    records, _ = collect_records(paths)
    if protocol is not None and protocol not in (1, 3):
        raise UserError(f"--protocol for `when` must be 1 or 3 (the grounding protocols), got {protocol}")
    if wording is None:
        try:
            recipe = json.loads(paths.run_json.read_text(encoding="utf-8"))["config"].get("recipe")
        except (OSError, ValueError, KeyError):
            recipe = None
        wording = "published" if recipe == "published" else "pixfound"
    out = pathlib.Path(output) if output is not None else paths.root
    targets = [out / "when.json", out / "when.png"]
    # The eval run writes its own when.json/png into the run folder; a concept analysis may replace those.
    if output is not None and not force and any(t.exists() for t in targets):
        raise OutputExistsError(f"{out} already holds when.json / when.png; pass --force to replace them")
    result = when_analysis(list(records.values()), protocol)
    if result is None:
        raise UserError(f"{paths.root} holds no grounded records (protocol 1 or 3 with grounding)")
    if judge is not None:
        items, _ = oracle_phrases(list(records.values()), result["protocol"])
        result["concepts"] = categorize_concepts(items, judge, wording=wording)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "when.json", result)
    from pixfound.eval.figures import plot_note

    try:
        summary = json.loads(paths.summary_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    plot_when(result, out / "when.png", note=plot_note(summary))
    logger.info("wrote %s and %s", out / "when.json", out / "when.png")
    return result


def format_when(result: dict) -> str:
    """A short text rendering of the histogram for stdout."""
    lines = [f"oracle phrase position (protocol {result['protocol']}, n={result['n']}):"]
    peak = max(result["counts"]) if result["counts"] else 0
    for label, count in zip(result["labels"], result["counts"]):
        bar = "#" * (0 if not peak else round(30 * count / peak))
        lines.append(f"  {label:>9}  {count:5d}  {bar}")
    if result.get("excluded"):
        lines.append("  excluded: " + json.dumps(result["excluded"]))
    concepts = result.get("concepts")
    if concepts:
        lines.append(f"concept categories ({concepts['judge']}):")
        for name, count in concepts["counts"].items():
            lines.append(f"  {name:<22} {count:5d}")
        lines.append(f"  unparsed               {concepts['unparsed']:5d}")
    return "\n".join(lines)

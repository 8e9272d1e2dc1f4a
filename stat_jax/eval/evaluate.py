"""`stat-jax eval`: generate answers to math benchmarks with a student, grade them, and report accuracy.

`evaluate` is the library entry point: it takes any generator (a `RolloutBackend`, or a callable
`(prompts, SamplingParams, n) -> completions[prompt][sample]` returning `Completion`s or strings), renders
prompts with the student's chat template, grades with math-verify in a process pool, and writes under
`out_dir`:
  <benchmark>.jsonl          one record per question: prompt, responses, extracted answers, correctness, metrics
  <benchmark>.summary.json   pass@1 (greedy), avg@k, pass@j, per subject and level; the questions it could not
                             evaluate (malformed rows, prompts over the rollout limits) and why. Every answer is
                             graded twice: strictly (`pass@1`, the last \\boxed{}: the paper's protocol) and by
                             the benchmark's flexible rule (`pass@1_flexible`: lm-eval's for GSM8K, math-verify's
                             last expression otherwise); `grading` names both rules and `headline` the one
                             eval.headline.<benchmark> picks
  <benchmark>.settings.json  what produced the records (a resumed run must match it)
  summary.json               all benchmarks and the settings
Work proceeds in chunks of questions appended to the JSONL, so `resume=True` continues an interrupted run.
On a multi-process mesh every process runs the same generate calls (the device programs are collective) and
reads the same completions; process 0 alone grades and writes the files, and decides where a resumed run starts.
Every prompt is tokenized and checked against the rollout limits (`prompt_limit`) before anything is generated:
the ones that cannot run are left out and counted (`rollout.on_long_prompt="skip"`) or stop the evaluation
before it starts (`"error"`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stat_jax import validity
from stat_jax.data.grader import (FLEXIBLE_RULES, NO_BOXED, STRICT_RULE, TIMEOUT, WORKER_DIED, GradeResult,
                                  GraderPool)
from stat_jax.data.prompting import DEFAULT_DATE_STRING, DEFAULT_INSTRUCTION, render_prompts
from stat_jax.data.records import MathProblem
from stat_jax.distributed import broadcast_from_coordinator, is_coordinator
from stat_jax.eval.metrics import FLEXIBLE_SUFFIX, grouped_metrics, mean_metrics, question_metrics
from stat_jax.lengths import (LongPrompt, PromptLimit, enforce_policy, long_prompt_report, prompt_token_counts,
                              split_by_length)
from stat_jax.rollout.base import Completion, SamplingParams

logger = logging.getLogger(__name__)

GRADINGS = ("strict", "flexible")  # eval.headline values: pass@1 (the last \\boxed{}) or pass@1_flexible
GenerateFn = Callable[[list[str], SamplingParams, int], Sequence[Sequence[Completion | str]]]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Everything about a run that changes its numbers (the `eval` config section, typed)."""

    instruction: str = DEFAULT_INSTRUCTION
    system_prompt: str = ""
    use_chat_template: bool = True
    date_string: str = DEFAULT_DATE_STRING  # what date-reading chat templates (Llama-3.x) write into prompts
    greedy: bool = True
    num_samples: int = 0  # k for avg@k / pass@k; 0 = greedy only
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    pass_k: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    max_new_tokens: int = 2048
    seed: int = 0
    grade_workers: int = 2
    grade_timeout: float = 10.0
    chunk_size: int = 256  # questions per generate-grade-append step
    headline: Mapping[str, str] = dataclasses.field(default_factory=dict)  # benchmark -> strict | flexible

    @classmethod
    def from_config(cls, config) -> EvalSettings:
        """From the `eval` ConfigDict section (or a full config holding one); unknown keys are ignored."""
        section = config.eval if "eval" in config else config
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: section[k] for k in section.keys() if k in names}
        if "seed" in config and section is not config:
            values["seed"] = int(config.seed)  # the run's seed, so samples are reproducible per run
        if "pass_k" in values:
            values["pass_k"] = tuple(int(j) for j in values["pass_k"])
        if "headline" in values:
            values["headline"] = {str(k): str(v) for k, v in dict(values["headline"]).items()}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.greedy and self.num_samples <= 0:
            raise ValueError("eval: nothing to do; set eval.greedy=true or eval.num_samples=k > 0")
        if self.num_samples < 0:
            raise ValueError(f"eval.num_samples must be >= 0, got {self.num_samples}")
        if self.num_samples > 0 and self.temperature <= 0:
            raise ValueError("eval.num_samples > 0 needs eval.temperature > 0 (k greedy samples would be identical)")
        bad = {k: v for k, v in self.headline.items() if v not in GRADINGS}
        if bad:
            raise ValueError(f"eval.headline: {bad} — each benchmark's headline grading is one of {GRADINGS}")

    def headline_grading(self, benchmark: str) -> str:
        """`benchmark`'s headline grading: "flexible" when eval.headline says so, else "strict"."""
        return self.headline.get(benchmark, "strict")

    def headline_metric(self, benchmark: str) -> str:
        """The summary key that is `benchmark`'s headline figure: pass@1, or pass@1_flexible."""
        return "pass@1" + (FLEXIBLE_SUFFIX if self.headline_grading(benchmark) == "flexible" else "")

    def sampling(self, greedy: bool) -> SamplingParams:
        if greedy:
            return SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens, seed=self.seed)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=self.seed)


def _generate_fn(generator) -> GenerateFn:
    """A RolloutBackend (anything with .generate) or a plain callable, as one calling convention."""
    if hasattr(generator, "generate"):
        return lambda prompts, sampling, n: generator.generate(prompts, sampling, n)
    if callable(generator):
        return generator
    raise TypeError(f"generator must be a RolloutBackend or a callable, got {type(generator).__name__}")


def _texts(outputs, n_prompts: int, n: int) -> list[list[tuple[str, str | None]]]:
    """Validates completions[prompt][sample] and returns (text, finish_reason) pairs."""
    if len(outputs) != n_prompts:
        raise RuntimeError(f"generator returned results for {len(outputs)} prompts, expected {n_prompts}")
    out = []
    for i, samples in enumerate(outputs):
        if len(samples) != n:
            raise RuntimeError(f"generator returned {len(samples)} samples for prompt {i}, expected n={n}")
        row = []
        for s in samples:
            if isinstance(s, Completion):
                row.append((s.text, s.finish_reason))
            elif isinstance(s, str):
                row.append((s, None))
            else:
                raise RuntimeError(f"generator returned a {type(s).__name__} for prompt {i}; expected Completion or str")
        out.append(row)
    return out


def flexible_rule(benchmark: str) -> str:
    """The flexible grading rule of a benchmark (a key of grader.FLEXIBLE_RULES): GSM8K's, else MATH-style."""
    from stat_jax.data.math_datasets import BENCHMARKS

    return BENCHMARKS[benchmark].flexible_rule if benchmark in BENCHMARKS else "math"


def _sample_record(text: str, finish_reason: str | None, grade: GradeResult) -> dict[str, Any]:
    return {"response": text, "extracted": grade.extracted, "correct": grade.correct, "reason": grade.reason,
            "flexible_extracted": grade.flexible_extracted, "flexible_correct": grade.flexible_correct,
            "finish_reason": finish_reason}


def _question_record(benchmark: str, problem: MathProblem, prompt: str, greedy, samples, pass_ks) -> dict[str, Any]:
    flexible = (greedy["flexible_correct"] if greedy else None, [s["flexible_correct"] for s in samples])
    metrics = question_metrics(greedy["correct"] if greedy else None, [s["correct"] for s in samples], pass_ks,
                               flexible)
    return {"id": problem.id, "benchmark": benchmark, "subject": problem.subject, "level": problem.level,
            "answer": problem.answer, "prompt": prompt, "greedy": greedy, "samples": samples, "metrics": metrics}


def _generate_chunk(generate, prompts, settings) -> list[tuple[str, list[list[tuple[str, str | None]]]]]:
    """The greedy and/or k sampled completions of `prompts`, as (kind, texts[prompt][sample]) runs."""
    runs: list[tuple[str, list[list[tuple[str, str | None]]]]] = []
    if settings.greedy:
        runs.append(("greedy", _texts(generate(prompts, settings.sampling(True), 1), len(prompts), 1)))
    if settings.num_samples:
        k = settings.num_samples
        runs.append(("samples", _texts(generate(prompts, settings.sampling(False), k), len(prompts), k)))
    return runs


def _grade_chunk(runs, problems, prompts, settings, pool, benchmark) -> list[dict[str, Any]]:
    """Grades a chunk's runs in the pool and returns one record per question."""
    pairs = [(text, p.answer) for _, outs in runs for p, row in zip(problems, outs) for text, _ in row]
    grades = iter(pool.grade_many(pairs, desc=f"grading {benchmark}", flexible=flexible_rule(benchmark)))
    graded: dict[str, list[list[dict]]] = {}
    for kind, outs in runs:
        graded[kind] = [[_sample_record(text, fr, next(grades)) for text, fr in row] for row in outs]
    records = []
    for i, (problem, prompt) in enumerate(zip(problems, prompts)):
        greedy = graded["greedy"][i][0] if "greedy" in graded else None
        samples = graded.get("samples", [[]] * len(problems))[i]
        records.append(_question_record(benchmark, problem, prompt, greedy, samples, settings.pass_k))
    return records


def _settings_fingerprint(benchmark: str, problems: Sequence[MathProblem], settings: EvalSettings,
                          few_shot: Sequence[MathProblem], model: str) -> dict[str, Any]:
    # Speed (validity.NOT_RESULT_FIELDS) and presentation (which grading the summary leads with) are left out.
    numeric = {k: v for k, v in dataclasses.asdict(settings).items()
               if not validity.is_how(f"eval.{k}") and k != "headline"}
    ids = hashlib.sha256("\n".join(p.id + "\t" + p.answer for p in problems).encode()).hexdigest()[:16]
    return {"benchmark": benchmark, "questions": len(problems), "questions_hash": ids, "model": model,
            "few_shot_ids": [p.id for p in few_shot], "flexible_rule": flexible_rule(benchmark), **numeric}


def _read_done(records_path: Path, settings_path: Path, fingerprint: dict, resume: bool) -> list[dict]:
    """Records already written by an identical earlier run (resume), else [] after clearing stale files."""
    if resume and records_path.exists() and settings_path.exists():
        previous = json.loads(settings_path.read_text())
        fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as stored
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise ValueError(f"{settings_path}: cannot resume, the settings changed ({', '.join(changed)}); "
                             "use another eval.out_dir or drop --resume to start over")
        done, lines = [], records_path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut off by the interruption: redo from there
        if len(done) < len(lines):
            records_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
        return done
    settings_path.write_text(json.dumps(fingerprint, indent=2))
    records_path.write_text("")
    return []


def grading_summary(benchmark: str, settings: EvalSettings) -> dict[str, Any]:
    """Which rule produced each figure of a benchmark's summary, and which figure is the headline."""
    rule = flexible_rule(benchmark)
    return {"pass@1": STRICT_RULE, f"pass@1{FLEXIBLE_SUFFIX}": FLEXIBLE_RULES[rule][1], "flexible_rule": rule,
            "headline": settings.headline_metric(benchmark)}


def _summarize(benchmark: str, records: Sequence[dict], seconds: float, settings: EvalSettings) -> dict[str, Any]:
    samples = [s for r in records for s in ([r["greedy"]] if r["greedy"] else []) + r["samples"]]
    finish = [s["finish_reason"] for s in samples if s["finish_reason"] is not None]
    metrics = mean_metrics([r["metrics"] for r in records])
    grading = grading_summary(benchmark, settings)
    return {
        "benchmark": benchmark,
        "n": len(records),
        **metrics,
        "headline": metrics.get(grading["headline"]),
        "grading": grading,
        "no_boxed_rate": sum(s["reason"] == NO_BOXED for s in samples) / max(1, len(samples)),
        "truncated_rate": (sum(f == "length" for f in finish) / len(finish)) if finish else None,
        "grading_timeouts": sum(s["reason"] == TIMEOUT for s in samples),
        "ungraded_samples": sum(s["reason"] in (TIMEOUT, WORKER_DIED) for s in samples),  # counted as wrong
        "by_subject": grouped_metrics(records, "subject"),
        "by_level": grouped_metrics(records, "level"),
        "seconds": round(seconds, 2),
    }


@dataclasses.dataclass
class _Prepared:
    """One benchmark's questions with their rendered prompts, minus those whose prompts cannot run."""

    problems: list[MathProblem]
    prompts: list[str]
    long: list[LongPrompt]  # indices into the benchmark's full question list
    all_ids: list[str]


def _prepare(problems: Sequence[MathProblem], tokenizer, settings: EvalSettings, few_shot,
             prompt_limit: PromptLimit | None) -> _Prepared:
    problems = list(problems)
    prompts = render_prompts(tokenizer, problems, instruction=settings.instruction,
                             system_prompt=settings.system_prompt, few_shot=few_shot,
                             use_chat_template=settings.use_chat_template, date_string=settings.date_string)
    ids = [p.id for p in problems]
    if prompt_limit is None:
        return _Prepared(problems, prompts, [], ids)
    kept, long = split_by_length(prompt_token_counts(tokenizer, prompts), prompt_limit)
    return _Prepared([problems[i] for i in kept], [prompts[i] for i in kept], long, ids)


def _not_evaluated(prep: _Prepared, dropped: Mapping[str, Any]) -> dict[str, Any]:
    """Why questions of the benchmark were not evaluated: bad rows (loader), long prompts; and exclusions."""
    report = long_prompt_report(prep.long, prep.all_ids)
    return {"not_evaluated": {"bad_rows": int(dropped.get("bad_rows", 0)), "long_prompts": len(prep.long)},
            "not_evaluated_examples": list(dropped.get("bad_row_examples", []))
            + report["skipped_long_prompt_examples"],
            "excluded": int(dropped.get("excluded", 0))}


def _evaluate_benchmark(name, prep: _Prepared, dropped, generate, settings, few_shot, pool, out_dir, resume, model):
    start = time.perf_counter()
    problems, prompts = prep.problems, prep.prompts
    records_path, settings_path = out_dir / f"{name}.jsonl", out_dir / f"{name}.settings.json"
    fingerprint = _settings_fingerprint(name, problems, settings, few_shot, model)
    writer = is_coordinator()
    records = _read_done(records_path, settings_path, fingerprint, resume) if writer else []
    # Every process must run the same generate calls, so all start where process 0's records end.
    done = int(broadcast_from_coordinator(np.int32(len(records))))
    if records:
        logger.info("%s: resuming after %d/%d questions from %s", name, len(records), len(problems), records_path)
    if prep.long:
        logger.warning("%s: %d of %d prompts do not fit the rollout limits and are left out (first: %s: %s)",
                       name, len(prep.long), len(prep.all_ids), prep.all_ids[prep.long[0].index],
                       prep.long[0].reason)
    chunk = settings.chunk_size if settings.chunk_size > 0 else len(problems)
    for lo in range(done, len(problems), chunk):
        hi = min(lo + chunk, len(problems))
        logger.info("%s: questions %d-%d of %d", name, lo, hi, len(problems))
        runs = _generate_chunk(generate, prompts[lo:hi], settings)
        if not writer:
            continue
        new = _grade_chunk(runs, problems[lo:hi], prompts[lo:hi], settings, pool, name)
        with open(records_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
        records.extend(new)
    if not writer:
        return None
    summary = {**_summarize(name, records, time.perf_counter() - start, settings), **_not_evaluated(prep, dropped)}
    (out_dir / f"{name}.summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(
    generator,
    benchmarks: Mapping[str, Sequence[MathProblem]],
    tokenizer,
    config,
    *,
    out_dir: str | os.PathLike | None = None,
    few_shot: Sequence[MathProblem] = (),
    resume: bool = False,
    model_name: str = "",
    pool: GraderPool | None = None,
    print_table: bool = True,
    prompt_limit: PromptLimit | None = None,
    on_long_prompt: str = "skip",
    dropped: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluates `generator` on each named benchmark; writes records and summaries under `out_dir`.

    `config` is a full config, its `eval` section, or an EvalSettings; `out_dir` defaults to eval.out_dir,
    else <workdir>/eval. `prompt_limit`: the rollout limits every prompt must fit (None: no check), with
    `on_long_prompt` "skip" or "error" for the others, decided before anything is generated. `dropped`:
    per benchmark, questions left out before this call ({"bad_rows", "bad_row_examples", "excluded"}), for
    the summaries. Returns the overall summary dict on process 0; None on the other processes of a
    multi-process job, which only take part in generation (process 0 grades and writes every file).
    """
    settings = config if isinstance(config, EvalSettings) else EvalSettings.from_config(config)
    settings.validate()
    out = Path(out_dir or _default_out_dir(config))
    writer = is_coordinator()
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    generate = _generate_fn(generator)
    dropped = dropped or {}
    prepared = {name: _prepare(problems, tokenizer, settings, few_shot, prompt_limit)
                for name, problems in benchmarks.items()}
    for name, prep in prepared.items():  # every benchmark is checked before the first one generates
        enforce_policy(prep.long, on_long_prompt, f"eval benchmark {name!r}", prep.all_ids)
    own_pool = pool is None and writer
    if own_pool:
        pool = GraderPool(workers=settings.grade_workers, timeout=settings.grade_timeout)
    try:
        results = {name: _evaluate_benchmark(name, prep, dropped.get(name, {}), generate, settings, few_shot, pool,
                                             out, resume, model_name)
                   for name, prep in prepared.items()}
    finally:
        if own_pool:
            pool.close()
    if not writer:
        return None
    summary = {"model": model_name, "settings": dataclasses.asdict(settings),
               "few_shot_ids": [p.id for p in few_shot], "benchmarks": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if print_table:
        print(format_table(summary))
    return summary


def _default_out_dir(config) -> Path:
    if not isinstance(config, EvalSettings):
        section = config.eval if "eval" in config else config
        if section.get("out_dir"):
            return Path(section.out_dir)
        if config.get("workdir"):
            return Path(config.workdir) / "eval"
    raise ValueError("evaluate: pass out_dir=..., or a config with eval.out_dir or workdir set")


def _table(title: str, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    columns = list(dict.fromkeys(k for _, r in rows for k in r if "@" in k))
    width = max([len(title)] + [len(name) for name, _ in rows]) + 2
    widths = [max(10, len(c) + 2) for c in columns]
    lines = [title.ljust(width) + "n".rjust(6) + "".join(c.rjust(w) for c, w in zip(columns, widths))]
    for name, r in rows:
        cells = "".join((f"{100 * r[c]:.1f}" if c in r else "-").rjust(w) for c, w in zip(columns, widths))
        lines.append(name.ljust(width) + str(r["n"]).rjust(6) + cells)
    return "\n".join(lines)


def format_table(summary: Mapping[str, Any]) -> str:
    """Accuracy (%) per benchmark, then per subject and per level where the benchmark has them."""
    benchmarks = summary["benchmarks"]
    parts = [_table("benchmark", [(name, b) for name, b in benchmarks.items()])]
    parts.append("\n".join(_grading_lines(benchmarks)))
    left_out = [f"{name}: {sum(b['not_evaluated'].values())} questions not evaluated ("
                + ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in b["not_evaluated"].items() if n) + ")"
                for name, b in benchmarks.items() if sum(b.get("not_evaluated", {}).values())]
    if left_out:
        parts.append("\n".join(left_out))
    for name, b in benchmarks.items():
        for group in ("by_subject", "by_level"):
            if b[group]:
                parts.append(_table(f"{name} {group[3:]}", list(b[group].items())))
    return "\n\n".join(parts)


def _grading_lines(benchmarks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Which rule graded each column, and each benchmark's headline figure."""
    lines = [f"pass@1: {STRICT_RULE}"]
    for name, b in benchmarks.items():
        g = b.get("grading")
        if not g:
            continue
        lines.append(f"{name}: pass@1{FLEXIBLE_SUFFIX} = {g[f'pass@1{FLEXIBLE_SUFFIX}']}; headline "
                     f"{g['headline']}" + (f" = {100 * b['headline']:.1f}" if b.get("headline") is not None else ""))
    return lines


def benchmark_names(value) -> list[str]:
    """eval.benchmarks (a tuple, or "a,b" from the command line) as a list of names; empty is an error."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("eval.benchmarks is empty; e.g. --config.eval.benchmarks=math500,aime24")
    return names


@dataclasses.dataclass
class EvalData:
    """What `stat-jax eval` evaluates: the benchmarks, the few-shot examples, and what was left out of each."""

    benchmarks: dict[str, list[MathProblem]]
    few_shot: list[MathProblem]
    dropped: dict[str, dict[str, Any]]  # per benchmark: bad_rows, bad_row_examples, excluded


def _section_value(section, name: str) -> str:
    return str(section[name]) if name in section and section[name] else ""


def read_eval_benchmark(config, name: str, *, limit: int | None = None):
    """One benchmark as config.eval reads it (eval.paths.<name>, eval.fields.<name>, eval.on_bad_row)."""
    from stat_jax.data.math_datasets import read_benchmark

    ev = config.eval
    fields = ev.fields if "fields" in ev else {}
    return read_benchmark(name, _section_value(ev.paths, name) or None, limit=limit,
                          on_bad_row=ev.get("on_bad_row", "error"), fields=_section_value(fields, name) or None)


def load_eval_data(config) -> EvalData:
    """The benchmarks named in config.eval, read from eval.paths (else the hub) with eval.fields, minus the
    questions of eval.exclude_from, and the few-shot examples.

    A name that is no built-in benchmark is a file of the user's: eval.paths.<name> (and, when its keys are not
    the usual ones, eval.fields.<name>="problem:q,answer:a").
    """
    from stat_jax.data.math_datasets import load_answer_file
    from stat_jax.data.splits import shared_questions

    ev = config.eval
    excluded = load_answer_file(ev.exclude_from) if ev.get("exclude_from") else []
    benchmarks, dropped = {}, {}
    for name in benchmark_names(ev.benchmarks):
        loaded = read_eval_benchmark(config, name, limit=ev.limit or None)
        problems = loaded.problems
        if excluded:
            leave_out = {p.id for p in shared_questions(problems, excluded)}
            problems = [p for p in problems if p.id not in leave_out]
            if not problems:
                raise ValueError(f"eval.exclude_from={ev.exclude_from}: it holds every question of {name!r}; "
                                 "nothing is left to evaluate")
        benchmarks[name] = problems
        dropped[name] = {"bad_rows": len(loaded.bad_rows), "bad_row_examples": loaded.bad_rows[:5],
                         "excluded": len(loaded.problems) - len(problems)}
    few_shot = []
    if ev.few_shot > 0:
        few_shot = read_eval_benchmark(config, ev.few_shot_from, limit=ev.few_shot).problems
    return EvalData(benchmarks, few_shot, dropped)


def eval_prompt_limit(config) -> PromptLimit:
    """The limits every eval prompt must fit: the rollout engine's, with eval.max_new_tokens new tokens."""
    return PromptLimit.from_config(config, int(config.eval.max_new_tokens))


def check_eval_prompts(data: EvalData, tokenizer, config) -> None:
    """With rollout.on_long_prompt=error, raises before any work when a prompt is over the rollout limits."""
    settings = EvalSettings.from_config(config)
    limit, policy = eval_prompt_limit(config), str(config.rollout.get("on_long_prompt", "skip"))
    for name, problems in data.benchmarks.items():
        prep = _prepare(problems, tokenizer, settings, data.few_shot, limit)
        enforce_policy(prep.long, policy, f"eval benchmark {name!r}", prep.all_ids)


def evaluate_model(config, *, out_dir: str | os.PathLike | None = None, resume: bool = False, tokenizer=None,
                   data: EvalData | None = None, backend=None, print_table: bool = True) -> dict[str, Any] | None:
    """Evaluates the checkpoint at config.model.path on config.eval's benchmarks: loads the data, the tokenizer
    (unless given; prompts are checked before any weight loads), the model and a rollout backend (unless a
    `backend` already holding that checkpoint is given), then `evaluate`.

    Returns the summary on process 0 (None on the others), as `evaluate` does.
    """
    from stat_jax.lengths import check_config_lengths
    from stat_jax.models.student import load_model, load_tokenizer
    from stat_jax.rollout.factory import make_rollout_backend  # the engine is heavy: import only when generating

    check_config_lengths(config, "eval")
    data = data or load_eval_data(config)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
    check_eval_prompts(data, tokenizer, config)  # before the weights reach a device
    out_dir = Path(out_dir or config.eval.out_dir or Path(config.workdir) / "eval")

    def run(backend):
        return evaluate(backend, data.benchmarks, tokenizer, config, out_dir=out_dir, few_shot=data.few_shot,
                        resume=resume, model_name=str(config.model.path), prompt_limit=eval_prompt_limit(config),
                        on_long_prompt=str(config.rollout.get("on_long_prompt", "skip")), dropped=data.dropped,
                        print_table=print_table)

    if backend is not None:
        summary = run(backend)
    else:
        with make_rollout_backend(config, load_model(config), tokenizer) as built:
            summary = run(built)
    logger.info("eval results in %s", out_dir)
    return summary


def main(config, args) -> int:
    """`stat-jax eval`: the data (printed with --dry-run), then `evaluate_model`."""
    from stat_jax.lengths import check_config_lengths

    check_config_lengths(config, "eval")
    data = load_eval_data(config)
    out_dir = Path(config.eval.out_dir or Path(config.workdir) / "eval")
    if getattr(args, "dry_run", False):
        print(json.dumps({"out_dir": str(out_dir), "model": config.model.path,
                          "benchmarks": {k: len(v) for k, v in data.benchmarks.items()},
                          "not_evaluated": data.dropped, "few_shot": [p.id for p in data.few_shot]}, indent=2))
        return 0
    evaluate_model(config, out_dir=out_dir, resume=bool(getattr(args, "resume", False)), data=data)
    return 0

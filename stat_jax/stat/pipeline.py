"""`stat-jax run`: the STAT pipeline as a list of stages over one run directory.

Each stage reads files written by earlier stages and writes its own files plus `<stage>/manifest.json`: the
config fields it read with their values (stat_jax/validity.py notes them; nobody lists them), input hashes, output
hashes. A stage whose manifest still holds is skipped, so re-running after a crash, a budget stop or a config
change redoes only what changed; teacher answers come from the cache, so redoing a teacher stage costs nothing.
With `stat.stage_cache`, finished stages are shared between runs (stat_jax/stat/stage_cache.py). Teacher
stages run on process 0 only; the other processes of a multi-host job wait for the manifest and read the files.

    data -> skills -> label -> rollout -> hard -> diagnose -> profile -> sel / syn -> sft -> eval [-> grpo -> eval]

The last four stages run `stat-jax sft / eval / grpo / eval` in <run_dir>/<stage>/ (models exported to sft/hf and
grpo/hf, GRPO prompts default to data/train.jsonl); they resume only work whose attempt read the same settings
and inputs (<stage>/attempt.json), and remove work left there by other ones.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stat_jax import errors, validity
from stat_jax.config import sub_config
from stat_jax.distributed import barrier, is_coordinator
from stat_jax.data.records import MathProblem, SFTExample
from stat_jax.stat import baselines as baselines_mod
from stat_jax.stat import hard as hard_mod
from stat_jax.stat import io
from stat_jax.stat import profile as profile_mod
from stat_jax.stat import sel as sel_mod
from stat_jax.stat import skills as skills_mod
from stat_jax.stat import stage_cache
from stat_jax.stat import syn as syn_mod
from stat_jax.teacher.base import TeacherBackend

log = logging.getLogger(__name__)



def stat_seed(config: Any) -> int:
    """The seed of the profiling and set-building stages: stat.seed, or `seed` when it is -1. A sweep over
    training seeds with one stat.seed profiles once (the stages never read `seed`)."""
    seed = int(config.stat.get("seed", -1))
    return seed if seed >= 0 else int(config.seed)


@dataclasses.dataclass
class StageContext:
    """What stages share: the config, the run directory, and lazily built teacher/student/scorer."""

    config: Any
    run_dir: Path
    teacher_backend: TeacherBackend | None = None
    rollout_backend: Any = None  # a RolloutBackend; built from config.model when None
    tokenizer: Any = None
    scorer: Any = None  # a hard.Scorer; built from config.stat.scorer (hard.SCORERS) when None
    # One backend for every student the stages serve (rollout, eval, eval_grpo, GRPO's policy), weights swapped
    # in (stat_jax/rollout/students.py); handed in by a caller that runs many pipelines (the demo). None: each
    # stage builds its own and releases it before training.
    server: Any = None
    resume: bool = True
    # The record of this stage's previous attempt (<stage>/attempt.json: its reads and input hashes), read by
    # run_stage before the stage starts: whether work a killed attempt left may be continued (`attempt_is_same`).
    previous_attempt: dict[str, Any] | None = None
    _teacher: Any = None
    _owns_rollout_backend: bool = False
    _built_reads: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def _shared(self, name: str, build: Callable[[], Any]) -> Any:
        """An object stages share (built by the first one that asks): every stage that uses it depends on the
        config fields read to build it, so they are noted again for each (validity.replay)."""
        if getattr(self, name) is None:
            with validity.reads() as log:
                setattr(self, name, build())
            self._built_reads[name] = log.values
        validity.replay(self._built_reads.get(name, {}))
        return getattr(self, name)

    def context_values(self) -> dict[str, Any]:
        """The "@name" values a stage may depend on that are not config fields: injected objects' identities."""
        return {"@teacher_backend": getattr(self.teacher_backend, "backend_id", None),
                "@scorer": type(self.scorer).__name__ if self.scorer is not None else None}

    @property
    def teacher(self):
        from stat_jax.teacher.build import build_teacher_client

        if self.teacher_backend is not None:  # an injected backend (the demo's offline teacher) is named by its id
            validity.replay({"@teacher_backend": self.teacher_backend.backend_id})
        return self._shared("_teacher", lambda: build_teacher_client(self.config, self.run_dir, self.teacher_backend,
                                                                     seed=self.stat_seed))

    def path(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def stat_seed(self) -> int:
        return stat_seed(self.config)

    @property
    def instruction(self) -> str:
        return self.config.stat.instruction or self.config.eval.instruction

    def _note_student(self) -> None:
        """An injected tokenizer or backend stands for the config's student: a stage using it depends on the
        fields that name that student, as when it is loaded from them."""
        m = self.config.model
        _ = (m.path, m.get("tokenizer_path"), m.dtype, m.param_dtype)

    def student_tokenizer(self):
        from stat_jax.models.student import load_tokenizer

        self._note_student()
        return self._shared("tokenizer", lambda: load_tokenizer(self.config))

    def student_backend(self):
        from stat_jax.models.student import load_model

        def build():
            from stat_jax.rollout.factory import make_rollout_backend  # heavy: only when the student generates

            tokenizer = self.student_tokenizer()  # first: it says what to pass when model.path is unset
            self._owns_rollout_backend = True
            return make_rollout_backend(self.config, load_model(self.config), tokenizer)

        if self.server is not None and self.rollout_backend is None:
            return self.server.serve(self.config.model.path)
        self._note_student()
        return self._shared("rollout_backend", build)

    def served(self, model_dir: str):
        """The handed-in server's backend holding `model_dir`'s weights, or None (the stage builds its own)."""
        return self.server.serve(model_dir) if self.server is not None else None

    def release_student_backend(self) -> None:
        """Closes a backend this context built, so its weights and KV cache leave the devices before training."""
        if self._owns_rollout_backend and self.rollout_backend is not None:
            self.rollout_backend.close()
            self.rollout_backend = None
            self._owns_rollout_backend = False


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step: `run(ctx) -> stats` turns `inputs` into `outputs` (paths relative to the run directory)."""

    name: str
    run: Callable[[StageContext], dict[str, Any] | None]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    uses_teacher: bool = False  # its calls are planned and priced by the dry run, and need credentials
    cacheable: bool = True  # False: its files point into its own run directory (trained models): no stage cache
    process0_only: bool = True  # False: every process takes part (device work), process 0 writes
    # Inputs known only at run time (SFT: the sets stat.method names), after `inputs`.
    more_inputs: Callable[[StageContext], tuple[str, ...]] | None = None


def _write_examples(path: Path, examples: Sequence[SFTExample]) -> int:
    return io.write_jsonl(path, (e.to_dict() for e in examples))


# ----- stages --------------------------------------------------------------------------------------------------
def check_heldout_unseen(config, heldout: Sequence[MathProblem]) -> None:
    """Raises HeldoutOverlapError (listing the shared questions) when an evaluated benchmark holds a held-out one.

    With a validation split (stat.heldout_size > 0) the held-out benchmark itself is evaluated on the rest of
    it (eval.exclude_from = data/heldout.jsonl), as in the paper: `math` = the 4,000 MATH test questions
    outside the 1,000 that built the profile. Every other benchmark must be disjoint from the held-out set.
    """
    from stat_jax.data.splits import check_disjoint
    from stat_jax.eval.evaluate import benchmark_names, read_eval_benchmark

    s = config.stat
    for name in benchmark_names(config.eval.benchmarks):
        if s.heldout_size and name == s.heldout_benchmark:
            continue
        check_disjoint(heldout, read_eval_benchmark(config, name).problems,
                       f"benchmark {name!r}, which the eval stages evaluate (eval.benchmarks); add it to "
                       f"stat.heldout_exclude (with stat.heldout_size > 0) to keep its questions out of the profile")


def _heldout_with_training_subjects(heldout: Sequence[MathProblem], train: Sequence[MathProblem]
                                    ) -> tuple[list[MathProblem], dict[str, int]]:
    """Held-out questions whose subject has training questions, and {subject: count} of the others.

    Skill catalogs are built per subject from the training questions, so a held-out question of a subject with no
    training question could not be diagnosed (the diagnose stage would stop after the rollouts were paid for), and
    STAT-Sel would have no training question to select for its skills. Seen with the real MATH files and a small
    stat.train_limit (the first rows are all Algebra).
    """
    subjects = {skills_mod.subject_of(p) for p in train}
    kept = [p for p in heldout if skills_mod.subject_of(p) in subjects]
    dropped = dict(collections.Counter(skills_mod.subject_of(p) for p in heldout
                                       if skills_mod.subject_of(p) not in subjects))
    if dropped:
        log.warning("stage data: %d held-out questions have a subject with no training question and are left out "
                    "of the profile: %s (the training data's subjects: %s)", len(heldout) - len(kept),
                    ", ".join(f"{k} ({v})" for k, v in sorted(dropped.items())), ", ".join(sorted(subjects)))
    if heldout and not kept:
        raise errors.DataError(
            f"no held-out question has a subject that the training data has (held-out: {sorted(dropped)}; "
            f"training: {sorted(subjects)})",
            hint="train on questions of the held-out subjects (raise stat.train_limit or change stat.train_source)")
    return kept, dropped


def stage_data(ctx: StageContext) -> dict[str, Any]:
    """Snapshots the training and held-out questions into the run directory (later stages read only these).

    Malformed rows are skipped and counted (stat.on_bad_row=skip) or stop the stage (error). The held-out set
    is a seeded stat.heldout_size split of the held-out source that avoids stat.heldout_exclude's questions;
    training questions that are also held-out questions are dropped from training (and counted). When the run
    diagnoses, held-out questions of a subject without training questions (no skill catalog) are left out too.
    """
    from stat_jax.data import splits
    from stat_jax.data.math_datasets import read_benchmark
    from stat_jax.eval.evaluate import read_eval_benchmark

    s = ctx.config.stat
    on_bad_row = s.get("on_bad_row", "error")
    train = read_benchmark(s.train_benchmark, s.train_source or None, limit=s.train_limit or None,
                           on_bad_row=on_bad_row)
    source = read_benchmark(s.heldout_benchmark, s.heldout_source or None, limit=s.heldout_limit or None,
                            on_bad_row=on_bad_row)
    heldout, kept_out = source.problems, {}
    if s.get("heldout_size", 0):
        exclude = []
        for name in s.heldout_exclude:
            if name == s.heldout_benchmark:
                raise ValueError(f"stat.heldout_exclude names the held-out benchmark {name!r} itself; list the "
                                 "benchmarks whose questions must stay out of the profile (e.g. math500)")
            problems = read_eval_benchmark(ctx.config, name).problems
            kept_out[name] = len(splits.shared_questions(heldout, problems))
            exclude += problems
        heldout, _ = splits.validation_split(heldout, int(s.heldout_size), int(s.heldout_seed), exclude)
    if any(stage in s.stages for stage in ("eval", "eval_grpo")):
        check_heldout_unseen(ctx.config, heldout)  # before any teacher call or device work is spent
    shared = {p.id for p in splits.shared_questions(train.problems, heldout)}
    if shared:
        log.warning("stage data: %d training questions are also held-out questions and are left out of training "
                    "(first: %s)", len(shared), sorted(shared)[0])
    train_problems = [p for p in train.problems if p.id not in shared]
    no_catalog: dict[str, int] = {}
    if "diagnose" in s.stages:  # the stage that needs a catalog for each held-out question's subject
        heldout, no_catalog = _heldout_with_training_subjects(heldout, train_problems)
    io.write_jsonl(ctx.path("data/train.jsonl"), (p.to_dict() for p in train_problems))
    io.write_jsonl(ctx.path("data/heldout.jsonl"), (p.to_dict() for p in heldout))
    for what, loaded in (("train", train), ("heldout", source)):
        if loaded.bad_rows:
            log.warning("stage data: %s source %s: %d malformed rows skipped (first: %s)", what, loaded.source,
                        len(loaded.bad_rows), loaded.bad_rows[0])
    return {"train": len(train_problems), "heldout": len(heldout), "heldout_source": len(source.problems),
            "heldout_kept_out": kept_out, "train_dropped_as_heldout": sorted(shared),
            "heldout_dropped_no_training_subject": no_catalog,
            "bad_rows": {"train": train.report(), "heldout": source.report()}}


def _reused_from_previous_round(ctx: StageContext, files: Sequence[str]) -> dict[str, Any] | None:
    """A continual round (stat.round > 1) on the previous round's training set reuses its catalog and Skill-Map
    (`files`, copied from stat.previous_run) instead of asking the teacher again; None when it cannot."""
    s = ctx.config.stat
    if int(s.get("round", 1)) <= 1:
        return None
    previous = Path(s.previous_run)
    if io.file_hash(previous / "data/train.jsonl") != io.file_hash(ctx.path("data/train.jsonl")):
        log.warning("round %s: the training set differs from %s's, so its catalog and Skill-Map are rebuilt",
                    s.round, previous)
        return None
    if not all((previous / f).exists() for f in files):
        return None
    for f in files:
        ctx.path(f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(previous / f, ctx.path(f))
    return {"reused_from": str(previous), "files": list(files)}


def stage_skills(ctx: StageContext) -> dict[str, Any]:
    """Teacher proposes skills for a per-subject sample of training questions, then merges them per subject."""
    reused = _reused_from_previous_round(ctx, ("skills/proposed.jsonl", "skills/catalog.json"))
    if reused:
        catalog = io.read_json(ctx.path("skills/catalog.json"))
        return {**reused, "catalog_sizes": {k: len(v) for k, v in catalog.items()}}
    s = ctx.config.stat
    sample = skills_mod.sample_per_subject(io.read_problems(ctx.path("data/train.jsonl")), s.skills_sample_per_subject,
                                           ctx.stat_seed)
    proposed = skills_mod.propose_skills(ctx.teacher, sample, s.propose_max_skills)
    io.write_jsonl(ctx.path("skills/proposed.jsonl"), proposed)
    catalog = skills_mod.merge_catalog(ctx.teacher, skills_mod.count_proposed(proposed), s.catalog_max_skills)
    io.write_json(ctx.path("skills/catalog.json"), catalog)
    return {"questions": len(sample), "catalog_sizes": {k: len(v) for k, v in catalog.items()}}


def stage_label(ctx: StageContext) -> dict[str, Any]:
    """The Skill-Map: every training question gets 1-3 catalog skills."""
    reused = _reused_from_previous_round(ctx, ("label/skill_map.jsonl",))
    if reused:
        return reused
    catalog = io.read_json(ctx.path("skills/catalog.json"))
    labelled = skills_mod.label_problems(ctx.teacher, io.read_problems(ctx.path("data/train.jsonl")), catalog,
                                         ctx.config.stat.label_max_skills)
    io.write_jsonl(ctx.path("label/skill_map.jsonl"), (p.to_dict() for p in labelled))
    return {"labelled": len(labelled)}


def stage_rollout(ctx: StageContext) -> dict[str, Any]:
    """The student answers every held-out question `rollout_samples` times."""
    from stat_jax.data.prompting import render_prompts
    from stat_jax.rollout.base import SamplingParams
    from stat_jax.stat.rollout import sample_responses

    from stat_jax.lengths import PromptLimit, enforce_policy, long_prompt_report, prompt_token_counts, split_by_length

    s, ev = ctx.config.stat, ctx.config.eval
    heldout = io.read_problems(ctx.path("data/heldout.jsonl"))
    tokenizer = ctx.student_tokenizer()
    prompts = render_prompts(tokenizer, heldout, instruction=ctx.instruction,
                             system_prompt=ev.system_prompt, use_chat_template=ev.use_chat_template,
                             date_string=ev.date_string)
    # Every prompt is checked against the rollout limits before the student is loaded: the ones that cannot
    # run are left out (and counted) or stop the stage here, never halfway through generation.
    limit = PromptLimit.from_config(ctx.config, int(s.rollout_max_new_tokens))
    kept, long = split_by_length(prompt_token_counts(tokenizer, prompts), limit)
    ids = [p.id for p in heldout]
    enforce_policy(long, str(ctx.config.rollout.get("on_long_prompt", "skip")), "stage rollout (data/heldout.jsonl)",
                   ids)
    skipped_rows = [{"id": ids[p.index], "prompt": prompts[p.index], "responses": [], "finish_reasons": [],
                     "skipped": p.reason} for p in long]
    if long:
        log.warning("stage rollout: %d of %d held-out prompts do not fit the rollout limits and are left out "
                    "(first: %s: %s)", len(long), len(heldout), skipped_rows[0]["id"], long[0].reason)
    heldout, prompts = [heldout[i] for i in kept], [prompts[i] for i in kept]
    sampling = SamplingParams(temperature=s.rollout_temperature, top_p=s.rollout_top_p,
                              max_new_tokens=s.rollout_max_new_tokens, seed=ctx.stat_seed)
    # Partial rows are reused by prompt only: an interrupted attempt's rows are kept only when that attempt read
    # the same settings and inputs (another student or other sampling settings never leak into this one).
    prepare_subrun(ctx, "rollout", ("partial.jsonl",))
    partial = ctx.path("rollout/partial.jsonl")
    try:
        rows = sample_responses(ctx.student_backend(), heldout, prompts, sampling, s.rollout_samples, partial,
                                chunk_size=s.rollout_chunk_size)
    finally:
        ctx.release_student_backend()
    if is_coordinator():
        io.write_jsonl(ctx.path("rollout/responses.jsonl"), rows + skipped_rows)
    return {"questions": len(rows), "samples": s.rollout_samples, **long_prompt_report(long, ids)}


def stage_hard(ctx: StageContext) -> dict[str, Any]:
    """Scores every response and keeps up to `num_hard` questions the scorer's rule finds hard, hardest first.

    hard/scores.jsonl and hard/hard.jsonl record, per question, the rule (`rule`) and its score (`score`: the
    mean response score; for consistency the share of samples in the largest agreeing group).
    """
    s = ctx.config.stat
    heldout = io.read_problems(ctx.path("data/heldout.jsonl"))
    rows = {r["id"]: r for r in io.read_jsonl(ctx.path("rollout/responses.jsonl"))}
    heldout = [p for p in heldout if not rows.get(p.id, {}).get("skipped")]  # prompts too long for the rollout
    missing = [p.id for p in heldout if p.id not in rows]
    if missing:
        raise ValueError(f"{ctx.path('rollout/responses.jsonl')} lacks {len(missing)} held-out questions "
                         f"(first: {missing[0]}); re-run the rollout stage")
    responses = [rows[p.id]["responses"] for p in heldout]
    if ctx.scorer is not None:
        validity.replay({"@scorer": ctx.context_values()["@scorer"]})
    scorer = ctx.scorer if ctx.scorer is not None else hard_mod.build_scorer(ctx.config)
    rule, uses_labels = scorer.hard_rule(s), bool(scorer.uses_labels)
    log.info("stage hard: rule %s%s", rule, " (uses the reference answers: labels)" if uses_labels else
             " (label-free)")
    scores = scorer.score(heldout, responses)
    flags = scorer.hard_flags()
    details = scorer.question_details() or [{} for _ in heldout]
    io.write_jsonl(ctx.path("hard/scores.jsonl"),
                   ({"id": p.id, "rule": scorer.name, "score": sum(sc) / len(sc) if sc else None, "scores": sc,
                     **({"hard": f} if flags is not None else {}), **d}
                    for p, sc, d, f in zip(heldout, scores, details, flags or [None] * len(heldout))))
    hard = hard_mod.select_hard(heldout, responses, scores, s.num_hard, ctx.stat_seed, threshold=s.hard_threshold,
                                hard=flags, rule=scorer.name)
    by_id = {p.id: d for p, d in zip(heldout, details)}
    hard = [{**row, **by_id[row["id"]]} for row in hard]
    io.write_jsonl(ctx.path("hard/hard.jsonl"), hard)
    return {"scorer": scorer.name, "rule": rule, "uses_reference_labels": uses_labels,
            "flagged_by_rule": sum(flags) if flags is not None else None, "heldout": len(heldout), "hard": len(hard),
            "mean_score": sum(map(sum, scores)) / max(1, sum(map(len, scores))), **scorer.manifest}


def stage_diagnose(ctx: StageContext) -> dict[str, Any]:
    """Teacher names the 2-3 catalog skills the student failed to apply on each hard question."""
    rows = profile_mod.diagnose_hard(ctx.teacher, io.read_jsonl(ctx.path("hard/hard.jsonl")),
                                     io.read_json(ctx.path("skills/catalog.json")), ctx.config.stat.diagnose_max_skills,
                                     ctx.config.stat.diagnose_min_skills)
    io.write_jsonl(ctx.path("diagnose/diagnoses.jsonl"), rows)
    return {"diagnosed": len(rows)}


def stage_profile(ctx: StageContext) -> dict[str, Any]:
    """The Missing-Skill-Profile as JSON and as a bar chart."""
    profile = profile_mod.missing_skill_profile(io.read_jsonl(ctx.path("diagnose/diagnoses.jsonl")))
    io.write_json(ctx.path("profile/profile.json"), profile)
    profile_mod.plot_profile(profile, ctx.path("profile/profile.png"), title=f"Missing-Skill-Profile ({Path(ctx.config.workdir).name})")
    top = profile["skills"][:5]
    log.info("top missing skills: %s", ", ".join(f"{r['skill']} ({r['count']})" for r in top))
    return {"skills": len(profile["skills"]), "top": [r["skill"] for r in top]}


def _missing_pairs_and_skill_map(ctx: StageContext):
    """(hard id, missing skill) of every diagnosis, and skill -> the Skill-Map questions labelled with it."""
    pairs = sel_mod.missing_pairs(io.read_jsonl(ctx.path("diagnose/diagnoses.jsonl")))
    return pairs, skills_mod.problems_by_skill(io.read_problems(ctx.path("label/skill_map.jsonl")))


def stage_sel(ctx: StageContext) -> dict[str, Any]:
    """STAT-Sel: training questions and answers chosen through the Skill-Map for each missing skill."""
    s = ctx.config.stat
    pairs, by_skill = _missing_pairs_and_skill_map(ctx)
    selected = sel_mod.select_by_profile(pairs, by_skill, s.sel_questions_per_skill, ctx.stat_seed)
    examples, stats = sel_mod.build_sel(
        ctx.teacher if s.sel_answer_source != "dataset" else None, selected, source=s.sel_answer_source,
        answers_per_question=s.sel_answers_per_question, target_size=s.sel_target_size, seed=ctx.stat_seed,
        instruction=ctx.instruction, system_prompt=ctx.config.eval.system_prompt, grade_workers=s.grade_workers,
        answer_filter=s.sel_answer_filter)
    _write_examples(ctx.path("sel/stat_sel.jsonl"), examples)
    io.write_json(ctx.path("sel/stats.json"), stats)
    return stats


def stage_syn(ctx: StageContext) -> dict[str, Any]:
    """STAT-Syn: teacher-written questions per missing skill, kept when their solutions agree."""
    s = ctx.config.stat
    pairs, by_skill = _missing_pairs_and_skill_map(ctx)
    hard_subject = {r["id"]: r.get("subject") or skills_mod.DEFAULT_SUBJECT
                    for r in io.read_jsonl(ctx.path("hard/hard.jsonl"))}
    catalog = io.read_json(ctx.path("skills/catalog.json"))
    descriptions = {sk["name"]: sk["description"] for subject in sorted(catalog) for sk in catalog[subject]}
    examples, questions, stats = syn_mod.build_syn(
        ctx.teacher, pairs, hard_subject, by_skill, descriptions, num_references=s.syn_reference_questions,
        num_new=s.syn_new_questions, num_solutions=s.syn_solutions, min_agree=s.syn_min_agree, seed=ctx.stat_seed,
        temperature=ctx.config.teacher.temperature, instruction=ctx.instruction,
        system_prompt=ctx.config.eval.system_prompt)
    examples = sel_mod.subsample(examples, s.syn_target_size, ctx.stat_seed)
    stats["examples_after_subsample"] = len(examples)
    _write_examples(ctx.path("syn/stat_syn.jsonl"), examples)
    io.write_jsonl(ctx.path("syn/questions.jsonl"), questions)
    io.write_json(ctx.path("syn/stats.json"), stats)
    return stats


# ----- training and evaluation (other packages; imported lazily by name) ------------------------------------
def _method(config) -> Method:
    name = config.stat.method
    if name not in METHODS:
        raise errors.ConfigError(f"stat.method={name!r}: choose one of {sorted(METHODS)}")
    return METHODS[name]


def _sft_files(ctx: StageContext) -> list[str]:
    return list(_method(ctx.config).files)


def attempt_is_same(ctx: StageContext) -> bool:
    """Whether the previous attempt of the running stage (finished or killed) read the same values of every
    config field it read, and had the same inputs: only then may its partial work be continued."""
    attempt = ctx.previous_attempt
    if not attempt or "reads" not in attempt:
        return False
    try:
        same_inputs = attempt.get("inputs") == io.input_hashes(ctx.run_dir, attempt.get("input_names", []))
    except OSError:  # an input of that attempt is gone
        return False
    return same_inputs and not validity.changed(attempt["reads"], ctx.config, ctx.context_values())


def prepare_subrun(ctx: StageContext, name: str, stale: Sequence[str]) -> bool:
    """Whether the trainer/evaluator may resume the work in <run_dir>/<name>.

    Only work started from the same config and inputs may continue (`attempt_is_same`). Work for other inputs
    is stale: its checkpoints, results and export (`stale`, relative to the stage directory) are removed,
    because the trainers' own resume check sees the same file paths and would otherwise continue or return it.
    """
    same = attempt_is_same(ctx)
    if not same and is_coordinator():
        for rel in stale:
            path = ctx.path(f"{name}/{rel}")
            if path.is_dir():
                log.warning("stage %s: removing %s, written for other inputs or settings", name, path)
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    barrier(f"stat-{name}-prepared")  # nobody reads what process 0 removes
    return same and ctx.resume


def _check_preempted(result: dict[str, Any], what: str, workdir: Path) -> None:
    if result.get("preempted"):
        raise RuntimeError(f"{what} stopped by SIGTERM after writing a checkpoint under {workdir}/checkpoints; "
                           "re-run `stat-jax run --resume` to continue it")


def _done_record(ctx: StageContext, name: str, result_file: str) -> dict[str, Any]:
    """<stage>/done.json: the exported model and a key of its weights, so later stages re-run when it is
    retrained to other weights."""
    if not is_coordinator():
        # Process 0 may still be writing the export and the result file; run_stage waits for its manifest.
        return {}
    export = ctx.path(f"{name}/hf")
    if not (export / "config.json").exists():
        raise RuntimeError(f"stage {name!r} finished but {export}/config.json is missing: the trainer's HF export "
                           f"did not land where the pipeline set it; see {ctx.path(f'{name}/{result_file}')}")
    result = io.read_json(ctx.path(f"{name}/{result_file}"))
    key = io.json_hash(sorted(io.file_hash(w) for w in export.glob("*.safetensors")))  # what eval reads
    record = {"model": str(export), "stage_key": key, "steps": result.get("steps")}
    if "final_loss" in result:
        record["final_loss"] = result["final_loss"]
    io.write_json(ctx.path(f"{name}/done.json"), record)
    return record


def stage_sft(ctx: StageContext) -> dict[str, Any]:
    """SFT of the student on the STAT set with `train_sft` (its own checkpoints and resume)."""
    from stat_jax.train import sft

    resume = prepare_subrun(ctx, "sft", ("checkpoints", "hf", "sft_result.json", "done.json"))
    config = sub_config(ctx.config, ctx.path("sft"))
    config.data.train_files = tuple(str(ctx.path(f)) for f in _sft_files(ctx))
    config.train.export_dir = str(ctx.path("sft/hf"))  # explicit: done.json and the eval stage read it there
    examples, budget = _token_budget_set(ctx, config.data.train_files), {}
    if examples is not None:
        budget = {"token_budget": int(ctx.config.stat.token_budget), "examples": len(examples)}
    _check_preempted(sft.train_sft(config, examples, workdir=config.workdir, resume=resume), "SFT", ctx.path("sft"))
    return {**_done_record(ctx, "sft", "sft_result.json"), **budget}


def budget_seed(seed: int) -> int:
    """The seed of the token-budget draw for training seed `seed` (the demo's recorded sets were drawn with it)."""
    return 1000 * seed + 17


def _token_budget_set(ctx: StageContext, files: Sequence[str]) -> list[SFTExample] | None:
    """stat.token_budget > 0: the method's set drawn in seeded passes until that many training tokens (every
    method compared at the same budget trains on as many tokens), written to sft/train.jsonl; else None."""
    from stat_jax.data.sft_data import equal_budget, example_tokens, load_sft_examples

    budget = int(ctx.config.stat.get("token_budget", 0))
    if budget <= 0:
        return None
    examples = load_sft_examples(files)
    tokenizer = ctx.student_tokenizer()
    chosen = equal_budget(examples, [example_tokens(tokenizer, e) for e in examples], budget,
                          budget_seed(int(ctx.config.seed)))
    if is_coordinator():
        _write_examples(ctx.path("sft/train.jsonl"), chosen)
    return chosen


def _evaluate(ctx: StageContext, name: str, model_file: str) -> dict[str, Any]:
    from stat_jax.eval import evaluate

    resume = prepare_subrun(ctx, name, ("summary.json",))
    config = sub_config(ctx.config, ctx.path(name))
    config.model.path = io.read_json(ctx.path(model_file))["model"]
    config.eval.out_dir = str(ctx.path(name))
    # No profiled question is evaluated: the held-out benchmark is evaluated on the rest of it, every other
    # benchmark must not share a question with the held-out set (checked again: eval.benchmarks may have changed).
    # Without data/heldout.jsonl this run built no profile (a model evaluated on its own), so nothing can leak.
    heldout_file = ctx.path("data/heldout.jsonl")
    if heldout_file.exists():
        check_heldout_unseen(config, io.read_problems(heldout_file))
        if config.stat.get("heldout_size", 0):
            config.eval.exclude_from = str(heldout_file)
    summary = evaluate.evaluate_model(config, out_dir=ctx.path(name), resume=resume, print_table=False,
                                      backend=ctx.served(config.model.path))
    if summary:  # the command prints its stages' JSON; the table goes to the log
        log.info("stage %s:\n%s", name, evaluate.format_table(summary))
    if not is_coordinator():
        return {}  # process 0 grades, writes the summary and the manifest; run_stage waits for that
    summary_path = ctx.path(f"{name}/summary.json")
    results = io.read_json(summary_path).get("benchmarks", {})
    missing = [b for b in evaluate.benchmark_names(config.eval.benchmarks) if b not in results]
    if missing:
        raise RuntimeError(f"{summary_path} has no results for {missing} (eval.benchmarks); see the "
                           f"<benchmark>.jsonl records beside it")
    # The manifest keeps the scalar figures and what could not be evaluated (bad rows, long prompts).
    return {b: {k: v for k, v in r.items() if not isinstance(v, (dict, list)) or k == "not_evaluated"}
            for b, r in results.items()}


def stage_eval(ctx: StageContext) -> dict[str, Any]:
    """Evaluates the SFT student on config.eval.benchmarks."""
    return {"benchmarks": _evaluate(ctx, "eval", "sft/done.json")}


GRPO_PROMPT_WEIGHTINGS = ("uniform", "profile")


def _grpo_prompt_files(ctx: StageContext) -> tuple[str, ...]:
    """What GRPO's prompts are drawn from: grpo.train_files, else the run's own training questions ({problem,
    answer} rows from the data stage); with grpo.prompt_weighting=profile, the Skill-Map and the diagnoses."""
    if ctx.config.grpo.prompt_weighting == "profile":
        return ("diagnose/diagnoses.jsonl", "label/skill_map.jsonl")
    return tuple(str(f) for f in ctx.config.grpo.train_files) or ("data/train.jsonl",)


def _profile_weighted_prompts(ctx: StageContext) -> Path:
    """grpo/prompts.jsonl: Skill-Map questions in proportion to the Missing-Skill-Profile (sel.profile_prompts),
    written by process 0 and read by every process once written."""
    pairs, by_skill = _missing_pairs_and_skill_map(ctx)
    prompts = sel_mod.profile_prompts(pairs, by_skill, ctx.config.stat.sel_questions_per_skill, ctx.stat_seed)
    if not prompts:
        raise errors.DataError(f"grpo.prompt_weighting=profile: no Skill-Map question carries a missing skill of "
                               f"{ctx.path('diagnose/diagnoses.jsonl')}; use grpo.prompt_weighting=uniform")
    if is_coordinator():
        io.write_jsonl(ctx.path("grpo/prompts.jsonl"), (p.to_dict() for p in prompts))
    barrier("stat-grpo-prompts-written")
    return ctx.path("grpo/prompts.jsonl")


def stage_grpo(ctx: StageContext) -> dict[str, Any]:
    """GRPO starting from the SFT student with `train_grpo`; it exports to <workdir>/hf."""
    from stat_jax.lengths import check_config_lengths
    from stat_jax.train import grpo

    resume = prepare_subrun(ctx, "grpo", ("checkpoints", "hf", "grpo_result.json", "done.json"))
    config = sub_config(ctx.config, ctx.path("grpo"))
    config.model.path = io.read_json(ctx.path("sft/done.json"))["model"]
    if ctx.config.grpo.prompt_weighting == "profile":
        config.grpo.train_files = (str(_profile_weighted_prompts(ctx)),)
    else:
        config.grpo.train_files = tuple(str(ctx.path(f)) for f in _grpo_prompt_files(ctx))
    # GRPO samples the prompt SFT trained on (stat.instruction), unless it names its own.
    config.grpo.instruction = ctx.config.grpo.instruction or ctx.instruction
    check_config_lengths(config, "grpo")
    try:
        result = grpo.train_grpo(config, workdir=config.workdir, resume=resume, backend=ctx.served(config.model.path))
    finally:
        if ctx.server is not None:
            ctx.server.forget()  # it holds GRPO's last policy now, not the checkpoint it loaded
    _check_preempted(result, "GRPO", ctx.path("grpo"))
    return _done_record(ctx, "grpo", "grpo_result.json")


def stage_eval_grpo(ctx: StageContext) -> dict[str, Any]:
    """Evaluates the GRPO student."""
    return {"benchmarks": _evaluate(ctx, "eval_grpo", "grpo/done.json")}


# Which config fields make each stage's result is not listed here: the stage runner notes the fields each stage
# reads (stat_jax/validity.py) and reuses a result only while they are unchanged.
STAGES: tuple[Stage, ...] = (
    Stage("data", stage_data, (), ("data/train.jsonl", "data/heldout.jsonl")),
    Stage("skills", stage_skills, ("data/train.jsonl",), ("skills/proposed.jsonl", "skills/catalog.json"),
          uses_teacher=True),
    Stage("label", stage_label, ("data/train.jsonl", "skills/catalog.json"), ("label/skill_map.jsonl",),
          uses_teacher=True),
    Stage("rollout", stage_rollout, ("data/heldout.jsonl",), ("rollout/responses.jsonl",), process0_only=False),
    Stage("hard", stage_hard, ("data/heldout.jsonl", "rollout/responses.jsonl"),
          ("hard/scores.jsonl", "hard/hard.jsonl")),
    Stage("diagnose", stage_diagnose, ("hard/hard.jsonl", "skills/catalog.json"), ("diagnose/diagnoses.jsonl",),
          uses_teacher=True),
    Stage("profile", stage_profile, ("diagnose/diagnoses.jsonl",), ("profile/profile.json", "profile/profile.png")),
    Stage("sel", stage_sel, ("diagnose/diagnoses.jsonl", "label/skill_map.jsonl"),
          ("sel/stat_sel.jsonl", "sel/stats.json"), uses_teacher=True),
    Stage("syn", stage_syn, ("diagnose/diagnoses.jsonl", "label/skill_map.jsonl", "hard/hard.jsonl",
                             "skills/catalog.json"),
          ("syn/stat_syn.jsonl", "syn/questions.jsonl", "syn/stats.json"), uses_teacher=True),
    # The paper's baselines at STAT-Sel's budget (stat_jax/stat/baselines.py), chosen with stat.method.
    Stage("math_train", baselines_mod.stage_math_train, ("data/train.jsonl",),
          (baselines_mod.METHOD_FILES["math_train"], "math_train/stats.json")),
    Stage("math_hard", baselines_mod.stage_math_hard, ("data/train.jsonl",),
          (baselines_mod.METHOD_FILES["math_hard"], "math_hard/ratings.jsonl", "math_hard/stats.json"),
          uses_teacher=True),
    Stage("embed_sel", baselines_mod.stage_embed_sel, ("data/train.jsonl", "hard/hard.jsonl"),
          (baselines_mod.METHOD_FILES["embed_sel"], "embed_sel/stats.json"), uses_teacher=True),
    Stage("embed_syn", baselines_mod.stage_embed_syn, ("data/train.jsonl", "hard/hard.jsonl"),
          (baselines_mod.METHOD_FILES["embed_syn"], "embed_syn/questions.jsonl", "embed_syn/stats.json"),
          uses_teacher=True),
    Stage("sft", stage_sft, (), ("sft/done.json",), process0_only=False, cacheable=False,
          more_inputs=lambda ctx: tuple(_sft_files(ctx))),
    Stage("eval", stage_eval, ("sft/done.json",), ("eval/summary.json",), process0_only=False, cacheable=False),
    Stage("grpo", stage_grpo, ("sft/done.json",), ("grpo/done.json",), process0_only=False, cacheable=False,
          more_inputs=lambda ctx: _grpo_prompt_files(ctx)),
    Stage("eval_grpo", stage_eval_grpo, ("grpo/done.json",), ("eval_grpo/summary.json",), process0_only=False,
          cacheable=False),
)
# The baseline stages build another training set (stat.method=<name>); a STAT run's stages are the others.
STAGE_NAMES = tuple(s.name for s in STAGES if s.name not in baselines_mod.METHOD_FILES)


@dataclasses.dataclass(frozen=True)
class Method:
    """An SFT-set method (stat.method): the set files the sft stage trains on and the stages that write them."""

    files: tuple[str, ...]
    stages: tuple[str, ...]


# stat.method name -> Method. STAT-Sel, STAT-Syn, both, and the paper's baselines at STAT-Sel's budget.
METHODS: dict[str, Method] = {
    "sel": Method(("sel/stat_sel.jsonl",), ("sel",)),
    "syn": Method(("syn/stat_syn.jsonl",), ("syn",)),
    "sel+syn": Method(("sel/stat_sel.jsonl", "syn/stat_syn.jsonl"), ("sel", "syn")),
    **{m: Method((f,), (m,)) for m, f in baselines_mod.METHOD_FILES.items()},
}
_REGISTERED_STAGES: list[Stage] = []  # the stages of methods registered with register_method


def register_method(name: str, stage: Stage) -> None:
    """Makes `stat.method=name` train on what `stage` writes (its first output); the stage runs before sft when
    stat.stages names it. A new SFT-set method is one file with its stage function and this one line."""
    if any(s.name == stage.name for s in pipeline_stages()):
        raise ValueError(f"a stage named {stage.name!r} already exists")
    _REGISTERED_STAGES.append(stage)
    METHODS[name] = Method((stage.outputs[0],), (stage.name,))


def pipeline_stages() -> tuple[Stage, ...]:
    """Every stage in pipeline order: the built-in ones, with registered methods' stages just before sft."""
    i = next(i for i, s in enumerate(STAGES) if s.name == "sft")
    return STAGES[:i] + tuple(_REGISTERED_STAGES) + STAGES[i:]


def _multi_process() -> bool:
    import jax

    return jax.process_count() > 1


def _inputs_for(stage: Stage, ctx: StageContext) -> tuple[str, ...]:
    return stage.inputs + (stage.more_inputs(ctx) if stage.more_inputs else ())


def run_stage(stage: Stage, ctx: StageContext, *, force: bool = False) -> str:
    """Runs one stage unless its manifest says it is done (or the stage cache holds it); returns "done",
    "skipped", "cached" or "waited"."""
    ctx.config = validity.watch(ctx.config)  # the fields the stage reads are noted (its manifest keeps them)
    inputs = _inputs_for(stage, ctx)
    missing = [n for n in inputs if not ctx.path(n).exists()]
    if missing:
        # The pipeline's own stages (its baselines too) have an order to name; a demo step is not among them.
        order = f" (order: {', '.join(STAGE_NAMES)})" if stage in pipeline_stages() else ""
        raise errors.RunStateMissingError(f"stage {stage.name!r} needs {missing} under {ctx.run_dir}: run the "
                                          f"stages before it{order}")
    context = ctx.context_values()
    if not force and io.stage_is_done(ctx.run_dir, stage.name, ctx.config, inputs, context, stage.outputs):
        log.info("stage %s: up to date, skipped", stage.name)
        return "skipped"
    cache = _stage_cache(ctx, stage)
    if cache and not force and (entry := stage_cache.lookup(cache, stage.name, ctx.run_dir, inputs, ctx.config,
                                                             context, stage.outputs)):
        if is_coordinator():
            stage_cache.restore(entry, ctx.run_dir, stage.name)
        log.info("stage %s: copied from the stage cache (%s)", stage.name, entry)
        return "cached"
    if stage.process0_only and _multi_process() and not is_coordinator():
        _wait_for(stage, ctx, inputs)
        return "waited"
    log.info("stage %s: running", stage.name)
    start = time.monotonic()
    attempt_file = ctx.path(f"{stage.name}/attempt.json")
    ctx.previous_attempt = _read_attempt(attempt_file)
    hashes = io.input_hashes(ctx.run_dir, inputs)

    def record_attempt(reads: dict[str, Any]) -> None:  # kept current, so a killed attempt is judged too
        if is_coordinator():
            io.write_json(attempt_file, {"reads": reads, "inputs": hashes, "input_names": list(inputs)})

    try:
        record_attempt({})
        stats = io.run_recorded(ctx.run_dir, stage.name, inputs, stage.outputs, lambda: stage.run(ctx),
                                write=is_coordinator(), on_read=record_attempt)
    except Exception as e:
        e.add_note(f"stage {stage.name!r} failed; its files are under {ctx.path(stage.name)}")
        raise
    finally:
        ctx.previous_attempt = None
    if _multi_process() and not stage.process0_only and not is_coordinator():
        _wait_for(stage, ctx, inputs)
    if cache and is_coordinator():
        stage_cache.store(cache, stage.name, ctx.run_dir)
    log.info("stage %s: done in %.1fs %s", stage.name, time.monotonic() - start, json.dumps(stats, default=str)[:300])
    return "done"


def _stage_cache(ctx: StageContext, stage: Stage) -> Path | None:
    """stat.stage_cache (a directory shared by runs), when set and the stage can be cached."""
    with validity.unrecorded():  # where results are kept, not what they are
        where = ctx.config.stat.get("stage_cache", "") if hasattr(ctx.config, "stat") else ""
    return Path(where) if where and stage.cacheable else None


def _read_attempt(path: Path) -> dict[str, Any] | None:
    try:
        return io.read_json(path) if path.exists() else None
    except ValueError:  # cut short by a kill while it was written: no attempt to continue
        return None


def _wait_for(stage: Stage, ctx: StageContext, inputs: Sequence[str]) -> None:
    timeout = ctx.config.stat.wait_timeout_s
    deadline = time.monotonic() + timeout
    log.info("stage %s: waiting for process 0 to write %s", stage.name, ctx.path(stage.name) / io.MANIFEST)
    while not io.stage_is_done(ctx.run_dir, stage.name, ctx.config, inputs, ctx.context_values(), stage.outputs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"stage {stage.name!r}: process 0 did not finish within {timeout}s "
                               f"(stat.wait_timeout_s); is {ctx.run_dir} on storage every host shares?")
        time.sleep(2.0)


def stages_to_run(config: Any, only: str | None) -> list[Stage]:
    """The configured stage list (`stat.stages`), or the stages named in `--only` in pipeline order."""
    names = [n.strip() for n in (only.split(",") if only else config.stat.stages) if n.strip()]
    known = [s.name for s in pipeline_stages()]
    unknown = [n for n in names if n not in known]
    if unknown:
        others = [n for n in known if n not in STAGE_NAMES]
        raise ValueError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGE_NAMES)} (the other methods' "
                         f"sets: {', '.join(others)})")
    return [s for s in pipeline_stages() if s.name in names]


def check_stage_config(config: Any, stages: Sequence[Stage]) -> None:
    """Raises ConfigError for settings that would make a stage fail after earlier stages were paid for."""
    names = {st.name for st in stages}
    if "hard" in names:
        hard_mod.check_hard_config(config.stat)
    if "sft" in names:
        _check_method_stages(config, names)
    if "grpo" in names:
        g = config.grpo
        if g.prompt_weighting not in GRPO_PROMPT_WEIGHTINGS:
            raise errors.ConfigError(f"grpo.prompt_weighting={g.prompt_weighting!r}: choose one of "
                                     f"{GRPO_PROMPT_WEIGHTINGS}")
        if g.prompt_weighting == "profile" and g.train_files:
            raise errors.ConfigError("grpo.prompt_weighting=profile draws GRPO's prompts from the Skill-Map, "
                                     f"so grpo.train_files={tuple(g.train_files)} would be ignored",
                                     hint="leave grpo.train_files empty, or set grpo.prompt_weighting=uniform")


def _check_method_stages(config: Any, names: set[str]) -> None:
    """stat.method's set must be written by a stage this run runs, or be in the run directory already."""
    method = _method(config)
    run_dir = Path(config.stat.run_dir or Path(config.workdir) / "stat")
    absent = [(f, st) for f, st in zip(method.files, method.stages) if st not in names and not (run_dir / f).exists()]
    if absent:
        f, st = absent[0]
        raise errors.ConfigError(
            f"stat.method={config.stat.method!r} trains on {f}, which stage {st!r} writes, but stat.stages does not "
            f"run it and {run_dir} does not hold it yet",
            hint=f"add {st} to --config.stat.stages (before sft), or choose the stat.method your stages build")


def run_pipeline(config: Any, *, only: str | None = None, resume: bool = True, force: bool = False,
                 teacher_backend: TeacherBackend | None = None, rollout_backend: Any = None, tokenizer: Any = None,
                 scorer: Any = None, server: Any = None) -> dict[str, str]:
    """Runs the stages in order; returns {stage: "done"|"skipped"|"waited"}. Raises BudgetExceeded resumably."""
    check_stage_config(config, stages_to_run(config, only))  # before any stage spends teacher or device time
    run_dir = Path(config.stat.run_dir or Path(config.workdir) / "stat")
    config, round_record = continual_round(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if round_record and is_coordinator():
        io.write_json(run_dir / "round.json", round_record)
    ctx = StageContext(config, run_dir, teacher_backend=teacher_backend, rollout_backend=rollout_backend,
                       tokenizer=tokenizer, scorer=scorer, server=server, resume=resume)
    results = {}
    try:
        for stage in stages_to_run(config, only):
            results[stage.name] = run_stage(stage, ctx, force=force and bool(only))
    finally:
        if ctx._teacher is not None:
            summary = ctx._teacher.summary()
            log.info("teacher: %d calls this session (%d failed), %d cache hits, %d tokens, ~$%.4f; run total %d calls",
                     summary["session"]["calls"], summary["session"]["failed_calls"], summary["cache_hits"],
                     summary["session"]["input_tokens"] + summary["session"]["output_tokens"],
                     summary["session"]["cost_usd"], summary["run_total"]["calls"])
            if is_coordinator():
                io.write_json(run_dir / "teacher" / "summary.json", summary)
                _write_teacher_plan(config, run_dir, stages_to_run(config, only))
        ctx.release_student_backend()
    return results


def _teacher_plan(config: Any, names: Sequence[str], run_dir: Path,
                  rows: tuple[list[MathProblem], list[MathProblem]]) -> dict[str, Any]:
    """The plan (stat/plan.py) of the teacher stages `names` on these training and held-out rows, priced."""
    from stat_jax.stat import plan as plan_mod

    catalog_file = run_dir / "skills/catalog.json"
    catalog = io.read_json(catalog_file) if catalog_file.exists() else None
    summary = plan_mod.plan_summary(plan_mod.plan_teacher(config, *rows, names, catalog), config.teacher)
    summary["rows"] = {"train": len(rows[0]), "heldout": len(rows[1])}
    return summary


def _write_teacher_plan(config: Any, run_dir: Path, stages: Sequence[Stage]) -> None:
    """teacher/plan.json: the dry run's plan for this run's teacher stages and rows, beside the ledger's figures."""
    names = [st.name for st in stages if st.uses_teacher]
    files = (run_dir / "data/train.jsonl", run_dir / "data/heldout.jsonl")
    if not names or not all(f.exists() for f in files):
        return
    try:
        summary = _teacher_plan(config, names, run_dir, (io.read_problems(files[0]), io.read_problems(files[1])))
        io.write_json(run_dir / "teacher" / "plan.json", summary)
    except Exception as e:  # noqa: BLE001  (the plan is for the report; it never fails the run)
        log.warning("teacher plan for the report could not be computed: %s: %s", type(e).__name__, e)


def continual_round(config: Any, run_dir: Path) -> tuple[Any, dict[str, Any] | None]:
    """(config, round record) for continual STAT (PAPER.md §3.3): round stat.round > 1 starts from the student
    that stat.previous_run's sft stage trained (model.path is set to it), profiles this run's held-out file
    (stat.heldout_source: the new validation set) and trains further; round 1 returns the config as it is."""
    s = config.stat
    number = int(s.get("round", 1))
    if number <= 1:
        if s.get("previous_run", ""):
            raise errors.ConfigError(f"stat.previous_run={s.previous_run!r} is set but stat.round={number}",
                                     hint="set --config.stat.round=2 (or more) to continue from that run")
        return config, None
    previous = Path(s.previous_run) if s.get("previous_run", "") else None
    if previous is None:
        raise errors.ConfigError(f"stat.round={number} needs the previous round's run directory",
                                 hint="set --config.stat.previous_run=<workdir of round 1>/stat")
    done = previous / "sft/done.json"
    student = s.get("previous_student", "")
    if student and not (Path(student) / "config.json").is_file():
        raise errors.ConfigError(f"stat.previous_student={student!r}: no config.json there",
                                 hint="give the HF directory of the student the previous round trained")
    if not student and not done.exists():
        raise errors.RunStateMissingError(f"stat.round={number}: {done} is missing, so {previous} has no trained "
                                          "student to continue from; run that round's sft stage first (or name "
                                          "the student it trained elsewhere with --config.stat.previous_student)")
    if previous.resolve() == run_dir.resolve():
        raise errors.ConfigError(f"stat.round={number}: stat.previous_run is this run's own directory {run_dir}",
                                 hint="give the new round its own --config.workdir (or stat.run_dir)")
    model = student or io.read_json(done)["model"]
    previous_round = io.read_json(previous / "round.json")["round"] if (previous / "round.json").exists() else 1
    if previous_round != number - 1:
        raise errors.ConfigError(f"stat.round={number}, but {previous} is round {previous_round}",
                                 hint=f"set --config.stat.round={previous_round + 1}")
    config = config.copy_and_resolve_references()
    config.unlock()
    config.model.path = model
    log.info("continual STAT round %d: starting from %s (trained by %s), profiling %s", number, model, previous,
             s.heldout_source or s.heldout_benchmark)
    record = {"round": number, "previous_run": str(previous), "student": model,
              "previous_sft_stage_key": None if student else io.read_json(done).get("stage_key"),
              "heldout_source": s.heldout_source or s.heldout_benchmark}
    return config, record


def _dry_run_rows(config: Any, run_dir: Path) -> tuple[list[MathProblem], list[MathProblem]] | str:
    """The run's training and held-out rows (its data stage's files, else that stage run into a temporary
    directory), or why they cannot be read without downloading."""
    import tempfile

    files = (run_dir / "data/train.jsonl", run_dir / "data/heldout.jsonl")
    if all(f.exists() for f in files):
        return io.read_problems(files[0]), io.read_problems(files[1])
    s = config.stat
    remote = [f"stat.{k}" for k in ("train_source", "heldout_source") if not (s[k] and Path(s[k]).exists())]
    if s.heldout_size:
        remote += [f"eval.paths.{n}" for n in s.heldout_exclude
                   if not (config.eval.paths.get(n) and Path(config.eval.paths[n]).exists())]
    if remote:
        return (f"not estimated: {', '.join(remote)} not a local file (--dry-run downloads nothing); "
                "pass them as --config.<key>=FILE")
    data_config = config.copy_and_resolve_references()
    data_config.unlock()
    # The plan needs only the rows: the check that evaluated benchmarks are unseen reads those benchmarks too.
    data_config.stat.stages = tuple(n for n in s.stages if n not in ("eval", "eval_grpo"))
    with tempfile.TemporaryDirectory() as tmp:
        stage_data(StageContext(data_config, Path(tmp)))
        return io.read_problems(Path(tmp) / "data/train.jsonl"), io.read_problems(Path(tmp) / "data/heldout.jsonl")


def dry_run_teacher_plan(config: Any, stages: Sequence[Stage], run_dir: Path) -> dict[str, Any]:
    """The teacher calls, tokens and price of `stages` (stat_jax/stat/plan.py); asks the teacher nothing.

    The table goes to stderr; the returned JSON is part of the dry run's output. Raises BudgetFailure when the
    plan exceeds teacher.max_calls.
    """
    import sys

    from stat_jax.stat import plan as plan_mod

    names = [st.name for st in stages if st.uses_teacher]
    if not names:
        return {"stages": [], "note": "no teacher stage"}
    rows = _dry_run_rows(config, run_dir)
    if isinstance(rows, str):
        print(f"teacher plan: {rows}", file=sys.stderr)
        return {"stages": [], "note": rows}
    summary = _teacher_plan(config, names, run_dir, rows)
    print(plan_mod.format_table(summary), file=sys.stderr)
    plan_mod.check_cap(summary)
    return summary


def main(config, args) -> int:
    """`stat-jax run [--only=stage[,stage]] [--resume]`."""
    from stat_jax.lengths import check_config_lengths

    check_config_lengths(config, "run")  # before any stage: a shipped config must not fail halfway
    only = getattr(args, "only", None)
    if getattr(args, "dry_run", False):
        stages = stages_to_run(config, only)
        check_stage_config(config, stages)
        run_dir = Path(config.stat.run_dir or Path(config.workdir) / "stat")
        config, _ = continual_round(config, run_dir)
        print(json.dumps({"run_dir": str(run_dir), "stages": [s.name for s in stages],
                          "teacher_plan": dry_run_teacher_plan(config, stages, run_dir)}, indent=2))
        return 0
    # A spent budget (BudgetExceeded, exit status errors.EXIT_BUDGET, resumable) and other teacher errors end the command
    # through stat_jax.cli: one line on stderr and the error's exit status.
    results = run_pipeline(config, only=only, resume=bool(getattr(args, "resume", False)), force=bool(only))
    if is_coordinator():
        from stat_jax.report import write_report_quietly

        write_report_quietly(config.workdir)
    print(json.dumps(results, indent=2))
    return 0

"""`stat-jax demo`: the whole STAT experiment, offline, on the built-in arithmetic task, through the real code.

    task splits -> tiny Llama pre-trained on a skill-imbalanced mix (the student, an HF checkpoint)
    -> STAT pipeline (`stat.pipeline`: skills, label, rollout via the rollout backend, hard, diagnose,
       profile, sel, syn) with the offline teacher behind the shared teacher client
    -> per seed: plain SFT on the original mix vs STAT-Sel vs STAT-Syn at an equal token budget
       (`train.sft`), each optionally followed by a short GRPO (`train.grpo`)
    -> per seed, continual STAT: the STAT-Sel student profiled again on a new validation split (the pipeline's
       round 2) and trained further on its new selection
    -> per-skill evaluation on the test split (`eval.evaluate`) -> table, JSON, plots.

Every step is a pipeline `Stage` run by the pipeline's stage runner (`stat.pipeline.run_stage`): it writes
under `config.workdir` with a manifest and is skipped when its manifest still matches, so a re-run is a no-op
that reprints the same table and a killed run resumes. Fine-tuning, GRPO and evaluation call the trainers and
the evaluator directly rather than through the pipeline's sft/eval stages: the demo's ~30 students share one
compiled rollout backend (weights swapped in), where each pipeline run builds its own. The test split is only
evaluated: nothing is chosen by looking at it.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stat_jax.config import sub_config
from stat_jax.data.records import MathProblem, SFTExample
from stat_jax.data.sft_data import equal_budget, example_tokens
from stat_jax.demo import task
from stat_jax.models.student import load_tokenizer
from stat_jax.progress import progress_bar
from stat_jax.rollout.students import StudentServer
from stat_jax.stat import io
from stat_jax import validity
from stat_jax.stat.pipeline import Stage, StageContext, prepare_subrun, run_pipeline, run_stage

log = logging.getLogger(__name__)

STAT_STAGES = ("skills", "label", "rollout", "hard", "diagnose", "profile", "sel", "syn")
METHOD_FILES = {"sft": "data/original_mix.jsonl", "math_hard": "baselines/math_hard.jsonl",
                "embed_sel": "baselines/embed_sel.jsonl", "stat_sel": "stat/sel/stat_sel.jsonl",
                "stat_syn": "stat/syn/stat_syn.jsonl"}
BASELINES = ("math_hard", "embed_sel")
SHIPPED_STUDENT = Path(__file__).with_name("student")  # the pre-trained base student (configs/demo.py)
METHOD_LABELS = {"base": "base", "sft": "SFT (original mix)", "math_hard": "MATH-Hard", "embed_sel": "Embed-Sel",
                 "stat_sel": "STAT-Sel", "stat_syn": "STAT-Syn"}
ROUND2_SPLIT = "validation_round2"  # generated after the train split, so no earlier split changes with its size
GRPO_SPLIT = task.LAST_SPLIT  # fresh GRPO prompts, generated after every other split (none changes with its size)


# ----- small helpers -------------------------------------------------------------------------------------------
def _step(ctx: StageContext, name: str, inputs: Sequence[str], outputs: Sequence[str],
          run: Callable[[], dict[str, Any] | None]) -> str:
    """Runs one demo step as a pipeline Stage, through the pipeline's stage runner: skipped when its manifest
    (the config fields `run` read, input and output hashes) says it is done, else run and recorded. So `run`
    reads every setting it uses from the demo's config itself (a value read before it would not be noted)."""
    return run_stage(Stage(name, lambda _ctx: run(), tuple(inputs), tuple(outputs)), ctx)


def _model_record(export: Path) -> dict[str, Any]:
    """Where a trained student is, and a hash of its weights (so steps that read it notice a retrain)."""
    weights = sorted(export.glob("*.safetensors"))
    return {"model": str(export), "weights_sha256": [io.file_hash(w) for w in weights]}


def _problems(path: Path) -> list[MathProblem]:
    return [MathProblem.from_dict(r) for r in io.read_jsonl(path)]


def _examples(path: Path) -> list[SFTExample]:
    rows = io.read_jsonl(path)
    return [SFTExample(response=r["response"], prompt=r.get("prompt"), messages=r.get("messages"), meta=r.get("meta"))
            for r in rows]


def reference_example(p: MathProblem, instruction: str) -> SFTExample:
    """A training question with its reference solution, rendered like every other SFT example."""
    from stat_jax.stat.sel import question_messages

    return SFTExample(messages=question_messages(p.problem, instruction), response=p.solution,
                      meta={"method": "original", "question_id": p.id, "skills": p.skills})


def per_skill_accuracy(records: Sequence[dict[str, Any]], problems: Sequence[MathProblem]) -> dict[str, Any]:
    """Overall greedy accuracy and accuracy on the test questions that exercise each skill."""
    by_id = {p.id: p for p in problems}
    correct = {r["id"]: bool(r["greedy"]["correct"]) for r in records}
    missing = [p.id for p in problems if p.id not in correct]
    if missing:
        raise ValueError(f"evaluation records lack {len(missing)} test questions (first: {missing[0]})")
    out = {"overall": sum(correct.values()) / len(correct), "per_skill": {}}
    for skill in task.SKILL_NAMES:
        ids = [pid for pid in correct if skill in (by_id[pid].skills or [])]
        out["per_skill"][skill] = sum(correct[i] for i in ids) / len(ids) if ids else None
    return out


def flagged_skills(profile: dict[str, Any], min_share: float) -> list[str]:
    """The skills (task names) the Missing-Skill-Profile blames for at least `min_share` of all mentions."""
    from stat_jax.stat.skills import bare_skill_name  # the profile's names are qualified by the subject

    return [bare_skill_name(r["skill"]) for r in profile["skills"] if r["frequency"] >= min_share]


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


# ----- the student ---------------------------------------------------------------------------------------------
def make_initial_student(config, out_dir: Path) -> dict[str, Any]:
    """A randomly initialised tiny Llama and the character tokenizer, saved as an HF checkpoint."""
    from stat_jax.data.char_tokenizer import save_char_tokenizer
    from stat_jax.models import export_hf_checkpoint, init_model, param_count
    from stat_jax.models.llama import tiny_llama

    d = config.demo
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(out_dir)
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=d.hidden_size, intermediate_size=3 * d.hidden_size,
                     num_layers=d.num_layers, num_heads=d.num_heads, num_kv_heads=d.num_heads,
                     head_dim=d.hidden_size // d.num_heads, max_position_embeddings=2 * d.max_seq_len,
                     bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    model = init_model(cfg, seed=config.seed)
    export_hf_checkpoint(model, out_dir, tokenizer_source=out_dir)
    return {"params": param_count(model), "vocab": len(tok)}


def train(config, workdir: Path, init_model: Path, files: Sequence[Path], *, steps: int, batch_size: int,
          lr: float, seed: int, resume: bool = True) -> Path:
    """SFT through `stat_jax.train.sft.train_sft` (the real trainer); returns the HF export directory.

    steps=0 means one epoch over `files` (the equal-budget sets): with packed rows, equal tokens give equal steps.
    """
    from stat_jax.train.sft import train_sft

    sub = sub_config(config, workdir, **{"model.path": str(init_model), "data.train_files": tuple(map(str, files))})
    sub.seed = seed
    sub.train.steps = steps
    sub.train.epochs = 1.0
    sub.train.batch_size = batch_size
    sub.train.learning_rate = lr
    result = train_sft(sub, None, workdir, resume=resume)
    if result.get("preempted"):
        raise RuntimeError(f"SFT in {workdir} was stopped at step {result['steps']}; re-run the demo to resume")
    return Path(result["export_dir"])


def evaluate_on(server: StudentServer, pool, model_dir: Path, out_dir: Path, test: Sequence[MathProblem],
                config) -> dict[str, Any]:
    """Greedy answers to the test split through the shared backend, graded; per-skill accuracy."""
    from stat_jax.eval.evaluate import evaluate

    backend = server.serve(model_dir)
    evaluate(backend, {"test": test}, server.tokenizer, config.eval, out_dir=out_dir, model_name=str(model_dir),
             pool=pool, print_table=False)
    result = per_skill_accuracy(io.read_jsonl(out_dir / "test.jsonl"), test)
    io.write_json(out_dir / "per_skill.json", result)
    return result


# ----- the experiment ------------------------------------------------------------------------------------------
class Demo:
    """The steps of the demo over one work directory."""

    def __init__(self, config):
        self.config = validity.watch(config)  # the steps' reads are noted: what decides whether a step re-runs
        self.d = self.config.demo
        self.root = Path(config.workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.server = StudentServer(self.config)  # one compiled backend for every student of the demo
        self.pool = None  # the graders' worker processes, shared by every evaluation
        self.ctx = StageContext(config, self.root)  # the demo's steps run as pipeline stages over its workdir
        self.grpo_skipped: str | None = None

    def path(self, name: str) -> Path:
        return self.root / name

    # data -------------------------------------------------------------------------------------------------
    def split_sizes(self) -> dict[str, int]:
        d = self.d
        sizes = {"train": d.train_size, "heldout": d.heldout_size, "test": d.test_size}
        if d.round2_methods:
            sizes[ROUND2_SPLIT] = d.round2_heldout_size
        if self.config.grpo.steps > 0 and d.grpo_prompt_source == "fresh":
            sizes[GRPO_SPLIT] = self.grpo_prompt_count()
        return sizes

    def data(self) -> str:
        d = self.d
        if d.skill_map_size > d.train_size:  # before any file is written
            raise ValueError(f"demo.skill_map_size={d.skill_map_size} is larger than demo.train_size="
                             f"{d.train_size}; use at most train_size (0 = the whole train split)")
        outputs = [f"data/{name}.jsonl" for name in self.split_sizes()] + [
            "data/original_mix.jsonl", "stat/data/train.jsonl", "stat/data/heldout.jsonl"]

        def run():
            d, sizes = self.d, self.split_sizes()
            skill_map_size = d.skill_map_size or d.train_size  # 0: every train question
            splits = task.make_splits(self.config.seed, sizes, {s: d.rare_weight for s in d.rare_skills})
            for name, rows in splits.items():
                io.write_jsonl(self.path(f"data/{name}.jsonl"), (p.to_dict() for p in rows))
            io.write_jsonl(self.path("data/original_mix.jsonl"),
                           (reference_example(p, self.config.eval.instruction).to_dict() for p in splits["train"]))
            # The STAT pipeline's own data files: the questions the teacher labels (the Skill-Map pool the
            # selection draws from) and the held-out questions the student is profiled on.
            pool = random.Random(f"skill-map:{self.config.seed}").sample(splits["train"], skill_map_size)
            io.write_jsonl(self.path("stat/data/train.jsonl"), (p.to_dict() for p in pool))
            io.write_jsonl(self.path("stat/data/heldout.jsonl"), (p.to_dict() for p in splits["heldout"]))
            return {k: len(v) for k, v in splits.items()}

        return _step(self.ctx, "data", [], outputs, run)

    # student ----------------------------------------------------------------------------------------------
    def student(self) -> str:
        """The base student: the shipped checkpoint when it was built from these settings, else pre-trained here."""
        shipped = self.shipped_student()
        if shipped is not None:
            def use_shipped():
                self.shipped_student()  # notes the settings the shipped build must match
                io.write_json(self.path("student/base.json"), _model_record(shipped))
                return {"shipped": str(shipped)}

            weights = [str(w) for w in sorted(shipped.glob("*.safetensors"))]  # absolute: outside the workdir
            return _step(self.ctx, "student/base", weights, ["student/base.json"], use_shipped)
        _step(self.ctx, "student/init", [], ["student/init/config.json"],
              lambda: make_initial_student(self.config, self.path("student/init")))

        def run():
            start = time.monotonic()
            d = self.d
            resume = prepare_subrun(self.ctx, "student/base", ("sft",))  # another attempt's checkpoints: removed
            export = train(self.config, self.path("student/base/sft"), self.path("student/init"),
                           [self.path("data/original_mix.jsonl")], steps=d.pretrain_steps,
                           batch_size=d.pretrain_batch_size, lr=d.pretrain_lr, seed=self.config.seed, resume=resume)
            io.write_json(self.path("student/base.json"), _model_record(export))
            return {"seconds": round(time.monotonic() - start, 1)}

        return _step(self.ctx, "student/base", ["data/original_mix.jsonl", "student/init/config.json"],
                     ["student/base.json"], run)

    def student_settings(self) -> dict[str, Any]:
        """What a shipped base student must have been built from: the task's mix, architecture and pre-training.

        Split sizes are not part of it: the test split is generated first and the held-out split next, so a
        smaller run's (--quick) test and held-out questions are among the ones the student never trained on.
        """
        d, c = self.d, self.config
        return {"seed": c.seed, "rare": list(d.rare_skills),
                "rare_weight": d.rare_weight, "arch": [d.hidden_size, d.num_layers, d.num_heads, d.max_seq_len],
                "steps": d.pretrain_steps, "batch": d.pretrain_batch_size, "lr": d.pretrain_lr,
                "max_length": c.data.max_length, "packing": c.data.packing, "dtype": c.model.dtype,
                "schedule": [c.train.lr_schedule, c.train.warmup_steps, c.train.min_lr_ratio]}

    def shipped_dir(self) -> Path:
        return Path(self.d.student_dir) if self.d.student_dir else SHIPPED_STUDENT

    def shipped_student(self) -> Path | None:
        """The shipped student's directory if it exists and its build record matches student_settings()."""
        if not self.d.use_shipped_student:
            return None
        build = self.shipped_dir() / "build.json"
        if not build.exists():
            log.warning("demo: no shipped base student at %s; pre-training one here (%d steps)",
                        self.shipped_dir(), self.d.pretrain_steps)
            return None
        if io.read_json(build)["settings"] != self.student_settings():
            log.warning("demo: the shipped base student (%s) was built from other settings; pre-training one here. "
                        "Rebuild it with `stat-jax demo --config.demo.export_student=True`", build)
            return None
        return self.shipped_dir()

    def export_student(self) -> dict[str, Any]:
        """Pre-trains the base student (data + student steps) and writes it to the shipped directory."""
        import shutil

        self.d.use_shipped_student = False  # build it, never copy the old one onto itself
        self.data()
        self.student()
        out = self.shipped_dir()
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for f in sorted(self.base_model.iterdir()):
            if f.is_file():
                shutil.copy2(f, out / f.name)
        record = {"settings": self.student_settings(), **_model_record(out),
                  "data": {"sizes": [self.d.train_size, self.d.heldout_size, self.d.test_size]},
                  "command": "stat-jax demo --config.demo.export_student=True"}
        # relative to the repository when inside it: the committed record must not name this machine's path
        record["model"] = str(out.resolve().relative_to(Path.cwd().resolve())) if out.resolve().is_relative_to(
            Path.cwd().resolve()) else str(out)
        io.write_json(out / "build.json", record)
        return record

    @property
    def base_model(self) -> Path:
        return Path(io.read_json(self.path("student/base.json"))["model"])

    # STAT --------------------------------------------------------------------------------------------------
    def stat(self) -> dict[str, str]:
        """The STAT pipeline's stages on the base student, with the offline teacher and the rollout backend."""
        config = sub_config(self.config, self.root, **{"model.path": str(self.base_model),
                                                        "stat.run_dir": str(self.path("stat")),
                                                        "stat.stages": STAT_STAGES})
        teacher = self.offline_teacher(config)
        # The rollout stage samples through the demo's one backend, serving the base student; a re-run whose
        # rollout stage is up to date never builds it.
        return run_pipeline(config, resume=True, teacher_backend=teacher,
                            tokenizer=load_tokenizer(self.config, self.base_model), server=self.server)

    def offline_teacher(self, config):
        """The demo's teacher (offline: it knows each question's skills and answer), as every STAT round sees it."""
        from stat_jax.demo.offline_teacher import OfflineTeacher

        d = self.d
        return OfflineTeacher(seed=self.config.seed, solution_slip_rate=d.teacher_slip_rate,
                              label_noise=d.teacher_label_noise, max_missing_skills=config.stat.diagnose_max_skills)

    # the paper's baselines -----------------------------------------------------------------------------------
    def baselines(self) -> str:
        """MATH-Hard and Embed-Sel training sets (stat_jax.demo.baselines), from the same Skill-Map pool as STAT-Sel."""
        from stat_jax.demo import baselines
        from stat_jax.models.student import load_model

        wanted = [m for m in self.d.methods if m in BASELINES]
        if not wanted:
            return "skipped"
        inputs = ["stat/data/train.jsonl", "stat/hard/hard.jsonl", "student/base.json"]

        def run():
            wanted = [m for m in self.d.methods if m in BASELINES]
            pool = _problems(self.path("stat/data/train.jsonl"))
            instruction = self.config.eval.instruction
            stats = {}
            if "math_hard" in wanted:
                chosen = baselines.hardest_levels(pool)
                io.write_jsonl(self.path(METHOD_FILES["math_hard"]),
                               (reference_example(p, instruction).to_dict() for p in chosen))
                stats["math_hard"] = {"questions": len(chosen), "level": chosen[0].level}
            if "embed_sel" in wanted:
                hard = _problems(self.path("stat/hard/hard.jsonl"))  # rows: the problem's fields + its scores
                model = load_model(self.config, self.base_model)
                tokenizer = load_tokenizer(self.config, self.base_model)
                vecs = baselines.mean_pooled_embeddings(model, tokenizer, [p.problem for p in hard + pool])
                picked = baselines.embed_sel(hard, vecs[:len(hard)], pool, vecs[len(hard):],
                                             self.config.stat.sel_questions_per_skill)
                io.write_jsonl(self.path(METHOD_FILES["embed_sel"]),
                               (reference_example(s["problem"], instruction).to_dict() for s in picked))
                stats["embed_sel"] = {"hard": len(hard), "examples": len(picked),
                                      "unique_questions": len({s["problem"].id for s in picked})}
            return stats

        return _step(self.ctx, "baselines", inputs, [METHOD_FILES[m] for m in wanted], run)

    def grpo_prompt_count(self) -> int:
        g = self.config.grpo
        return self.d.grpo_prompt_pool or g.steps * g.prompts_per_step * g.oversample

    def grpo_prompts(self) -> str:
        """The GRPO prompts every method trains on (the same for every method and seed: a fair +GRPO comparison),
        balanced over the skills because the test split is.

        demo.grpo_prompt_source="fresh": questions of their own split, which no student has trained on (the
        base student saw every train question ~5 times in pre-training and answers them far better than new
        ones, so their groups are mostly all right and teach little); "train": balanced picks from the train split.
        """
        source_file = f"data/{GRPO_SPLIT}.jsonl" if self.d.grpo_prompt_source == "fresh" else "data/train.jsonl"

        def run():
            n, source = self.grpo_prompt_count(), self.d.grpo_prompt_source
            rows = _problems(self.path(source_file))
            chosen = rows[:n] if source == "fresh" else balanced_picks(rows, n, f"grpo-prompts:{self.config.seed}")
            io.write_jsonl(self.path("grpo/prompts.jsonl"), (p.to_dict() for p in chosen))
            return {"prompts": len(chosen), "unique": len({p.id for p in chosen}), "source": source_file}

        return _step(self.ctx, "grpo/prompts", [source_file], ["grpo/prompts.jsonl"], run)

    # fine-tuning -------------------------------------------------------------------------------------------
    def finetune_sets(self) -> str:
        """Per seed and method, the training examples that fill exactly the same token budget."""
        d = self.d
        inputs = [METHOD_FILES[m] for m in d.methods] + ["student/base.json"]
        outputs = [f"finetune/seed{s}/{m}/train.jsonl" for s in d.seeds for m in d.methods]

        def run():
            tokenizer = load_tokenizer(self.config, self.base_model)
            stats = {}
            for m in d.methods:
                examples = _examples(self.path(METHOD_FILES[m]))
                tokens = [example_tokens(tokenizer, e) for e in examples]
                for s in d.seeds:
                    chosen = equal_budget(examples, tokens, d.finetune_tokens, seed=1000 * s + 17)
                    io.write_jsonl(self.path(f"finetune/seed{s}/{m}/train.jsonl"), (e.to_dict() for e in chosen))
                    stats[f"seed{s}/{m}"] = {"examples": len(chosen), "unique_source": len(examples),
                                             "tokens": sum(example_tokens(tokenizer, e) for e in chosen),
                                             "skill_shares": skill_shares(chosen)}
            return stats

        return _step(self.ctx, "finetune/sets", inputs, outputs, run)

    def finetune(self, seed: int, method: str) -> Path:
        return self._finetune(f"finetune/seed{seed}/{method}", "student/base.json", seed)

    def _finetune(self, name: str, start_record: str, seed: int) -> Path:
        """SFT on `name`/train.jsonl from the student `start_record` names; writes `name`/model.json."""
        train_file = self.path(f"{name}/train.jsonl")

        def run():
            # A killed attempt's checkpoints are resumed only when it read the same settings and inputs.
            resume = prepare_subrun(self.ctx, f"{name}/train", ("sft",))
            start = Path(io.read_json(self.path(start_record))["model"])
            t = self.config.train
            export = train(self.config, self.path(f"{name}/train/sft"), start, [train_file], steps=0,
                           batch_size=t.batch_size, lr=t.learning_rate, seed=seed, resume=resume)
            io.write_json(self.path(f"{name}/model.json"), _model_record(export))

        _step(self.ctx, f"{name}/train", [f"{name}/train.jsonl", start_record], [f"{name}/model.json"], run)
        return Path(io.read_json(self.path(f"{name}/model.json"))["model"])

    # continual STAT ----------------------------------------------------------------------------------------
    def round2(self, seed: int, method: str) -> str:
        """Continual STAT (PAPER.md §3.3): this seed's round-1 `method` student is profiled again, by the pipeline
        with stat.round=2, on a new validation split; its new selection (same token budget) trains it further.
        Returns the record file of the round-2 model."""
        d = self.d
        name = f"round2/seed{seed}/{method}"
        start_record = f"finetune/seed{seed}/{method}/model.json"
        start = Path(io.read_json(self.path(start_record))["model"])
        run_dir = self.path(f"{name}/stat")
        # The round's data files, as the demo's data step writes round 1's: the same Skill-Map pool (so the
        # catalog and Skill-Map are round 1's, copied) and the new validation split as its held-out file.
        for f, source in (("train.jsonl", "stat/data/train.jsonl"), ("heldout.jsonl", f"data/{ROUND2_SPLIT}.jsonl")):
            (run_dir / "data").mkdir(parents=True, exist_ok=True)
            if not (run_dir / "data" / f).exists() or io.file_hash(run_dir / "data" / f) != io.file_hash(
                    self.path(source)):
                (run_dir / "data" / f).write_bytes(self.path(source).read_bytes())
        stages = ("skills", "label", "rollout", "hard", "diagnose", "profile", {"stat_sel": "sel",
                                                                               "stat_syn": "syn"}[method])
        config = sub_config(self.config, self.root, **{
            "model.path": str(start), "stat.run_dir": str(run_dir), "stat.stages": stages, "stat.round": 2,
            "stat.previous_run": str(self.path("stat")), "stat.previous_student": str(start),
            "stat.heldout_source": str(self.path(f"data/{ROUND2_SPLIT}.jsonl"))})
        teacher = self.offline_teacher(config)
        run_pipeline(config, resume=True, teacher_backend=teacher, tokenizer=load_tokenizer(self.config, start),
                     server=self.server)
        source = run_dir / Path(METHOD_FILES[method]).relative_to("stat")
        def choose():
            examples = _examples(source)
            tokenizer = load_tokenizer(self.config, start)
            tokens = [example_tokens(tokenizer, e) for e in examples]
            chosen = equal_budget(examples, tokens, d.finetune_tokens, seed=1000 * seed + 17)
            io.write_jsonl(self.path(f"{name}/train.jsonl"), (e.to_dict() for e in chosen))
            return {"examples": len(chosen), "unique_source": len(examples),
                    "tokens": sum(example_tokens(tokenizer, e) for e in chosen), "skill_shares": skill_shares(chosen)}

        _step(self.ctx, f"{name}/set", [source.relative_to(self.root).as_posix(), start_record],
              [f"{name}/train.jsonl"], choose)
        self._finetune(name, start_record, seed)
        return f"{name}/model.json"

    def grpo(self, seed: int, method: str, start: Path) -> Path:
        """A short GRPO from the fine-tuned student, on training-split questions (never the test split)."""
        from stat_jax.train import grpo as grpo_mod

        name = f"finetune/seed{seed}/{method}"

        def run():
            resume = prepare_subrun(self.ctx, f"{name}/grpo", ("run",))  # another attempt's checkpoints: removed
            prompts = self.path("grpo/prompts.jsonl")
            workdir = self.path(f"{name}/grpo/run")
            sub = grpo_run_config(self.config, workdir, start, seed, prompts)
            # GRPO samples through the demo's one compiled backend (it swaps the policy's weights in each step);
            # afterwards the backend holds GRPO's weights, so the next serve() must load its model again.
            backend = self.server.serve(start)
            try:
                result = grpo_mod.train_grpo(sub, workdir=sub.workdir, resume=resume, backend=backend)
            finally:
                self.server.forget()
            if result["preempted"]:
                raise RuntimeError(f"GRPO was stopped by SIGTERM; re-run the demo to resume ({sub.workdir})")
            export = workdir / "hf"
            if not (export / "config.json").exists():
                raise RuntimeError(f"GRPO finished without an HF export at {export}")
            io.write_json(self.path(f"{name}/grpo_model.json"), _model_record(export))
            # The reward curve (per step: mean reward of the step's rollouts) travels with the model record.
            curve = [{k: r[k] for k in ("step", "reward_mean", "reward_std", "zero_std_groups") if k in r}
                     for r in io.read_jsonl(Path(result["metrics_path"])) if "reward_mean" in r]
            io.write_json(self.path(f"{name}/grpo_curve.json"), curve)

        _step(self.ctx, f"{name}/grpo", [f"{name}/model.json", "grpo/prompts.jsonl"],
              [f"{name}/grpo_model.json", f"{name}/grpo_curve.json"], run)
        return Path(io.read_json(self.path(f"{name}/grpo_model.json"))["model"])

    def evaluation(self, name: str, model_file: str) -> dict[str, Any]:
        # demo.eval_split=heldout scores the rows on the profiling split instead: settings are chosen that way,
        # so the test split is only ever read by the final table.
        split = self.d.eval_split
        if split not in ("test", "heldout"):
            raise ValueError(f"demo.eval_split={split!r}: use 'test' (the table) or 'heldout' (choosing settings)")
        out = self.path(f"{name}/eval" + ("" if split == "test" else f"-{split}"))

        def run():
            test = _problems(self.path(f"data/{self.d.eval_split}.jsonl"))
            model = Path(io.read_json(self.path(model_file))["model"])
            if self.pool is None:
                from stat_jax.data.grader import GraderPool

                self.pool = GraderPool(workers=self.config.eval.grade_workers, timeout=self.config.eval.grade_timeout)
            return evaluate_on(self.server, self.pool, model, out, test, self.config)

        _step(self.ctx, out.relative_to(self.root).as_posix(), [f"data/{split}.jsonl", model_file],
              [f"{out.relative_to(self.root).as_posix()}/per_skill.json"], run)
        return io.read_json(out / "per_skill.json")

    # report --------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Runs (or resumes) every step and returns the report (also written to results.json)."""
        d = self.d
        start = time.monotonic()
        grid = [(s, m) for s in d.seeds for m in d.methods]
        check_round2_methods(d)
        check_grpo_prompt_source(d)
        steps = (["data", "student", "stat", "base eval", "sets"] + [f"seed {s} {m}" for s, m in grid]
                 + [f"seed {s} {m} round 2" for s in d.seeds for m in d.round2_methods] + ["report"])
        try:
            report = self._run_steps(steps, grid)
        finally:
            self.server.close()
            if self.pool is not None:
                self.pool.close()
        report["runtime_s_this_invocation"] = round(time.monotonic() - start, 1)
        return report

    def _run_steps(self, steps: list[str], grid: list[tuple[int, str]]) -> dict[str, Any]:
        d = self.d
        with_grpo = self.config.grpo.steps > 0 and grpo_available()
        if self.config.grpo.steps > 0 and not with_grpo:
            self.grpo_skipped = "stat_jax.train.grpo is not installed in this checkout; the +GRPO rows are missing"
            log.warning("demo: %s", self.grpo_skipped)
        with progress_bar(total=len(steps), desc="demo", unit="step") as bar:
            def advance(label: str):
                bar.set_postfix_str(label)
                bar.update(1)

            for label, stage in (("data", self.data), ("student", self.student), ("stat", self.stat)):
                stage()
                advance(label)
            self.baselines()
            if with_grpo:
                self.grpo_prompts()
            io.write_json(self.path("student/base_model.json"), io.read_json(self.path("student/base.json")))
            results: dict[str, list[dict[str, Any]]] = {"base": [self.evaluation("student", "student/base_model.json")]}
            advance("base eval")
            self.finetune_sets()
            advance("sets")
            for s, m in grid:
                self.finetune(s, m)
                results.setdefault(m, []).append(self.evaluation(f"finetune/seed{s}/{m}",
                                                                 f"finetune/seed{s}/{m}/model.json"))
                if with_grpo and m in d.grpo_methods:
                    self.grpo(s, m, self.finetune(s, m))
                    results.setdefault(f"{m}+grpo", []).append(
                        self.evaluation(f"finetune/seed{s}/{m}/grpo_run", f"finetune/seed{s}/{m}/grpo_model.json"))
                advance(f"seed {s} {m}")
            for s in d.seeds:
                for m in d.round2_methods:
                    model_file = self.round2(s, m)
                    results.setdefault(f"{m}+round2", []).append(
                        self.evaluation(f"round2/seed{s}/{m}", model_file))
                    advance(f"seed {s} {m} round 2")
            report = self.report(results)
            advance("report")
        return report

    def report(self, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        profile = io.read_json(self.path("stat/profile/profile.json"))
        flagged = flagged_skills(profile, self.config.demo.flag_min_share)
        rows = {}
        for name, runs in results.items():
            per_skill = {s: _spread([r["per_skill"][s] for r in runs]) for s in task.SKILL_NAMES
                         if all(r["per_skill"][s] is not None for r in runs)}
            flagged_acc = [statistics.fmean(r["per_skill"][s] for s in flagged) for r in runs] if flagged else []
            rows[name] = {"overall": _spread([r["overall"] for r in runs]), "per_skill": per_skill,
                          "flagged": _spread(flagged_acc) if flagged_acc else None, "runs": len(runs)}
        d = self.config.demo
        sets = io.read_json(self.path("finetune/sets/manifest.json"))["stats"]
        curves = {f"seed{s}/{m}": io.read_json(self.path(f"finetune/seed{s}/{m}/grpo_curve.json"))
                  for s in d.seeds for m in d.methods if (self.path(f"finetune/seed{s}/{m}/grpo_curve.json")).exists()
                  and f"{m}+grpo" in results}
        report = {
            "split": d.eval_split,
            "seeds": list(d.seeds),
            "token_budget": d.finetune_tokens,
            "flagged_skills": flagged,
            "rare_skills": list(d.rare_skills),
            "profile": profile,
            "rows": rows,
            "sets": sets,
            # share of each method's training examples that exercise a flagged skill (mean over seeds)
            "flagged_share": {m: statistics.fmean(flagged_share(sets[f"seed{s}/{m}"]["skill_shares"], flagged)
                                                  for s in d.seeds) for m in d.methods},
            "sel_stats": io.read_json(self.path("stat/sel/stats.json")),
            "syn_stats": io.read_json(self.path("stat/syn/stats.json")),
            "grpo_curves": curves,
        }
        if self.path("baselines/manifest.json").exists():
            report["baseline_stats"] = io.read_json(self.path("baselines/manifest.json"))["stats"]
        if d.round2_methods:
            # Per seed and method: what round 2 profiled (its own flagged skills) and the set it trained on.
            report["round2"] = {
                f"seed{s}/{m}": {"flagged_skills": flagged_skills(io.read_json(self.path(
                    f"round2/seed{s}/{m}/stat/profile/profile.json")), d.flag_min_share),
                    "round": _relative(io.read_json(self.path(f"round2/seed{s}/{m}/stat/round.json")), self.root),
                    "set": io.read_json(self.path(f"round2/seed{s}/{m}/set/manifest.json"))["stats"]}
                for s in d.seeds for m in d.round2_methods}
        if self.grpo_skipped:
            report["grpo_skipped"] = self.grpo_skipped
        report["verdict"] = verdict(report)
        io.write_json(self.path("results.json"), report)
        plot_per_skill(rows, flagged, self.path("per_skill_accuracy.png"))
        if curves:
            plot_grpo_curves(curves, self.path("grpo_reward.png"))
        (self.path("results.txt")).write_text(format_table(report) + "\n")
        return report


def _relative(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """The record's paths under `root` made relative to it: results.json does not depend on where the workdir is."""
    out = {}
    for k, v in record.items():
        if isinstance(v, str) and Path(v).is_absolute() and Path(v).is_relative_to(root):
            v = Path(v).relative_to(root).as_posix()
        out[k] = v
    return out


def example_question(e: SFTExample) -> str:
    """The problem text of a training example (its last user turn, without the instruction)."""
    if e.messages:
        return e.messages[-1]["content"].split("\n\n")[0]
    return e.prompt or ""


def skill_shares(examples: Sequence[SFTExample]) -> dict[str, float]:
    """Per skill: the share of `examples` whose question exercises it (read back from the question text)."""
    counts = dict.fromkeys(task.SKILL_NAMES, 0)
    for e in examples:
        for skill in set(task.problem_skills(example_question(e))):
            counts[skill] += 1
    return {k: v / max(1, len(examples)) for k, v in counts.items()}


def flagged_share(shares: dict[str, float], flagged: Sequence[str]) -> float:
    """The mean, over the flagged skills, of the share of examples that exercise each one."""
    return statistics.fmean(shares[s] for s in flagged) if flagged else 0.0


def _gap(rows: dict[str, Any], a: str, b: str, key: str) -> tuple[float, float]:
    """Mean difference a - b in points and its spread (std of the per-seed differences, seeds paired)."""
    va, vb = rows[a][key]["values"], rows[b][key]["values"]
    diffs = [100 * (x - y) for x, y in zip(va, vb)] if len(va) == len(vb) else [100 * (statistics.fmean(va) -
                                                                                    statistics.fmean(vb))]
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def verdict(report: dict[str, Any]) -> list[str]:
    """One line per comparison the demo exists for, in words and numbers (seeds paired)."""
    rows, n = report["rows"], len(report["seeds"])
    lines = []
    if "sft" in rows and "base" in rows:
        gap = 100 * (rows["sft"]["overall"]["mean"] - rows["base"]["overall"]["mean"])
        lines.append(f"SFT on more of the original mix moves the base student by {gap:+.1f} points overall "
                     f"({'saturated' if abs(gap) <= 2 else 'not saturated'})")
    for m in ("math_hard", "embed_sel", "stat_sel", "stat_syn"):
        if m in rows and "sft" in rows and rows[m]["flagged"] and rows["sft"]["flagged"]:
            mean, std = _gap(rows, m, "sft", "overall")
            flagged, _ = _gap(rows, m, "sft", "flagged")
            lines.append(f"{METHOD_LABELS[m]} - SFT = {mean:+.1f} ± {std:.1f} overall, {flagged:+.1f} on flagged "
                         f"skills over {n} seeds")
    for name in rows:
        if name.endswith("+grpo") and name.split("+")[0] in rows:
            base = name.split("+")[0]
            mean, std = _gap(rows, name, base, "overall")
            lines.append(f"GRPO on top of {METHOD_LABELS[base]}: {mean:+.1f} ± {std:.1f} overall over {n} seeds")
    for name in rows:
        if name.endswith("+round2") and name.split("+")[0] in rows:
            base = name.split("+")[0]
            mean, std = _gap(rows, name, base, "overall")
            flagged = (f", {_gap(rows, name, base, 'flagged')[0]:+.1f} on round 1's flagged skills"
                       if rows[name]["flagged"] and rows[base]["flagged"] else "")
            lines.append(f"{METHOD_LABELS[base]} round 2 (profiled again on a new validation split, trained further "
                         f"at the same budget) - round 1 = {mean:+.1f} ± {std:.1f} overall{flagged} over {n} seeds")
    return lines


def row_label(name: str) -> str:
    """The table's name for a row: a method, or a method +GRPO / round 2."""
    if name in METHOD_LABELS:
        return METHOD_LABELS[name]
    method, suffix = name.split("+", 1)
    return METHOD_LABELS.get(method, method) + {"grpo": " +GRPO", "round2": " round 2"}.get(suffix, f" +{suffix}")


def balanced_picks(rows: Sequence[MathProblem], n: int, seed: str) -> list[MathProblem]:
    """`n` seeded picks from `rows`, question i exercising skill i mod 10 (the train split is imbalanced), each
    question at most once until all have been picked."""
    rng = random.Random(seed)
    by_skill = {s: [p for p in rows if s in (p.skills or [])] for s in task.SKILL_NAMES}
    chosen, seen = [], set()
    while len(chosen) < n:
        p = rng.choice(by_skill[task.SKILL_NAMES[len(chosen) % len(task.SKILL_NAMES)]])
        if p.id not in seen or len(seen) == len(rows):
            seen.add(p.id)
            chosen.append(p)
    return chosen


def check_grpo_prompt_source(d) -> None:
    if d.grpo_prompt_source not in ("fresh", "train"):
        raise ValueError(f"demo.grpo_prompt_source={d.grpo_prompt_source!r}: use 'fresh' (a split of new questions) "
                         "or 'train' (balanced picks from the train split)")


def check_round2_methods(d) -> None:
    """demo.round2_methods names STAT methods the demo also runs (round 2 continues their round-1 students)."""
    bad = [m for m in d.round2_methods if m not in ("stat_sel", "stat_syn") or m not in d.methods]
    if bad:
        raise ValueError(f"demo.round2_methods={tuple(d.round2_methods)}: {bad} cannot get a round 2; use STAT "
                         f"methods among demo.methods={tuple(d.methods)} (or () for no round-2 rows)")


def format_table(report: dict[str, Any]) -> str:
    """Accuracy (%) per method: overall, on the flagged skills, and per skill, as mean±std over seeds."""
    rows = report["rows"]
    skills = list(task.SKILL_NAMES)
    flagged = set(report["flagged_skills"])
    header = ["method", "overall", "flagged"] + [s[:11] + ("*" if s in flagged else "") for s in skills]

    def cell(v):
        if v is None:
            return "-"
        return f"{100 * v['mean']:.1f}" + (f"±{100 * v['std']:.1f}" if v["values"] and len(v["values"]) > 1 else "")

    lines = []
    for name, r in rows.items():
        label = row_label(name)
        lines.append([label, cell(r["overall"]), cell(r["flagged"])] + [cell(r["per_skill"].get(s)) for s in skills])
    widths = [max(len(str(x)) for x in col) + 2 for col in zip(header, *lines)]
    fmt = lambda row: "".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
    notes = (f"accuracy (%) on the {report.get('split', 'test')} split; mean±std over seeds {report['seeds']}; equal budget of "
             f"{report['token_budget']} training tokens per method; * = flagged by the Missing-Skill-Profile")
    return "\n".join([notes, fmt(header)] + [fmt(r) for r in lines] + [""] + list(report.get("verdict", [])))


def plot_per_skill(rows: dict[str, Any], flagged: Sequence[str], path: Path) -> None:
    """Grouped bars: per-skill test accuracy of each method (mean over seeds, std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    skills = list(task.SKILL_NAMES)
    names = list(rows)
    x = np.arange(len(skills))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(13, 4.5))
    for i, name in enumerate(names):
        means = [rows[name]["per_skill"].get(s, {"mean": np.nan})["mean"] * 100 for s in skills]
        stds = [rows[name]["per_skill"].get(s, {"std": 0})["std"] * 100 for s in skills]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(x, [s + ("*" if s in flagged else "") for s in skills], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Per-skill accuracy before (base) and after fine-tuning (* = flagged by the profile)")
    ax.legend(fontsize=8, ncol=min(4, len(names)))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grpo_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Mean rollout reward per GRPO step, one line per (seed, method) run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot([r["step"] for r in curve], [r["reward_mean"] for r in curve], marker="o", ms=3, label=name)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward of the step's rollouts")
    ax.set_title("GRPO training reward (balanced train-split prompts)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grpo_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("stat_jax.train.grpo") is not None


def grpo_run_config(config, workdir: Path, start: Path, seed: int, prompts: Path):
    """The config of one demo GRPO run: the demo's (its grpo section as the user left it) with this run's
    workdir, student, seed, prompts and rows sized to them."""
    sub = sub_config(config, workdir, **{"model.path": str(start), "grpo.train_files": (str(prompts),)})
    sub.seed = seed
    sub.grpo.max_length = grpo_row_length(sub, load_tokenizer(config, start), prompts)
    return sub


def grpo_row_length(c, tokenizer, prompts_file: Path) -> int:
    """Tokens per GRPO training row: the longest of the demo's GRPO prompts plus max_new_tokens, rounded up to 16.

    The update costs what its rows hold, and the demo's prompts (< 80 tokens) are far shorter than the prefill
    bucket (128): rows sized to the bucket were a third padding."""
    from stat_jax.train.grpo import grpo_prompt_ids

    longest = max(len(ids) for ids in grpo_prompt_ids(c, tokenizer, _problems(prompts_file)))
    return -(-(longest + int(c.grpo.max_new_tokens)) // 16) * 16


def use_compilation_cache(workdir: Path) -> None:
    """JAX's persistent compilation cache under the workdir. The demo compiles the same trainer, GRPO and rollout
    programs for each of its ~30 runs; with the cache each is compiled once (the quick run, 2 cores: 125 s without,
    87 s with an empty cache, 52 s on a re-run after a changed setting), and results.json is byte for byte the
    same. JAX_COMPILATION_CACHE_DIR, when set, wins."""
    import os

    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the demo's programs compile in < 1 s
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(config, args) -> int:
    """`stat-jax demo [--quick]`: runs (or resumes) the experiment and prints the results table."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint step at INFO
    if getattr(args, "dry_run", False):
        print(json.dumps({"workdir": config.workdir, "seeds": list(config.demo.seeds),
                          "methods": list(config.demo.methods)}, indent=2))
        return 0
    if config.demo.export_student:
        record = Demo(config).export_student()
        print(json.dumps(record, indent=2))
        return 0
    use_compilation_cache(Path(config.workdir))
    report = Demo(config).run()
    from stat_jax.report import write_report_quietly

    write_report_quietly(config.workdir)
    print(format_table(report))
    print(f"\nresults: {Path(config.workdir) / 'results.json'} and {Path(config.workdir) / 'report.html'}; plots: "
          f"{Path(config.workdir) / 'stat/profile/profile.png'}, {Path(config.workdir) / 'per_skill_accuracy.png'}")
    return 0

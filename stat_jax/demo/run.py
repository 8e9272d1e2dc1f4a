"""`stat-jax demo`: the whole STAT experiment, offline, as a grid of `stat-jax run` pipelines.

    task splits (stat_jax/data/arith_task.py) -> the base student (shipped, or pre-trained here)
    -> the profile run (<workdir>/stat): the pipeline's stages data .. profile, STAT-Sel, STAT-Syn and the
       paper's baselines, with the offline teacher (teacher.backend=offline)
    -> a cell per (method, seed): the same pipeline in cells/<method>-seed<s>: its profiling stages copied from
       the stage cache, the method's set at the token budget, SFT, eval [, GRPO, eval]
    -> skill-targeted GRPO cells: a cell again, its GRPO prompts drawn by the Missing-Skill-Profile
    -> round-2 cells: continual STAT from a cell's student, profiled again on a new validation split
    -> the comparison (demo/compare.py): per-skill accuracy of every cell, table, plots, verdict.

Every cell is a `stat-jax run` (results.json records the command that reproduces it), run in-process with one
compiled student backend (stat_jax/rollout/students.py). Nothing is chosen by looking at the test split.
"""

from __future__ import annotations

import json
import logging
import random
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stat_jax import validity
from stat_jax.config import build_config, sub_config
from stat_jax.data import arith_task as task
from stat_jax.demo import compare
from stat_jax.report.verdict import format_table
from stat_jax.models.llama import save_char_llama
from stat_jax.progress import progress_bar
from stat_jax.rollout.students import StudentServer
from stat_jax.stat import io
from stat_jax.stat.pipeline import Stage, StageContext, prepare_subrun, run_pipeline, run_stage

log = logging.getLogger(__name__)

SHIPPED_STUDENT = Path(__file__).with_name("student")  # the pre-trained base student (configs/demo.py)
ROUND2_SPLIT = "validation_round2"  # generated after the train split, so no earlier split changes with its size
GRPO_SPLIT = task.LAST_SPLIT  # fresh GRPO prompts, generated after every other split
CELL_METHODS = {"sft": "math_train", "math_hard": "math_hard", "embed_sel": "embed_sel", "stat_sel": "sel",
                "stat_syn": "syn"}  # the demo's rows -> the pipeline's stat.method (and the stage writing its set)
PROFILE = ("data", "skills", "label", "rollout", "hard", "diagnose", "profile")
STAGES = PROFILE + ("sel", "syn", "math_train", "math_hard", "embed_sel", "sft", "eval", "grpo", "eval_grpo")


def _model_record(export: Path) -> dict[str, Any]:
    """Where a trained student is, and a hash of its weights (so steps that read it notice a retrain)."""
    return {"model": str(export), "weights_sha256": [io.file_hash(w) for w in sorted(export.glob("*.safetensors"))]}


def _cli(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class Demo:
    """The demo over one work directory: its own steps (data, student, base eval) run as pipeline stages; the
    rows are pipelines."""

    def __init__(self, config, spec: str = "configs/demo.py"):
        self.config = validity.watch(config)  # the steps' reads are noted: what decides whether a step re-runs
        self.d = self.config.demo
        self.spec = spec  # the config file the cells' commands name
        self.root = Path(config.workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ctx = StageContext(self.config, self.root)
        self.path = self.ctx.path  # a file of the work directory
        self.server = StudentServer(self.config)  # one compiled backend for every student of the demo

    def step(self, name: str, inputs: Sequence[str], outputs: Sequence[str], run) -> str:
        """A demo step, through the pipeline's stage runner: `run` reads every setting it uses from the config."""
        return run_stage(Stage(name, lambda _ctx: run(), tuple(inputs), tuple(outputs)), self.ctx)

    # data ---------------------------------------------------------------------------------------------------
    def split_sizes(self) -> dict[str, int]:
        d, g = self.d, self.config.grpo
        if d.eval_split not in ("test", "validation"):
            raise ValueError(f"demo.eval_split={d.eval_split!r}: use 'test' (the table) or 'validation' (a split of "
                             "its own, to choose settings)")
        sizes = {"train": d.train_size, "heldout": d.heldout_size, "test": d.test_size}
        if d.eval_split == "validation":
            sizes["validation"] = d.test_size
        if d.round2_methods:
            sizes[ROUND2_SPLIT] = d.round2_heldout_size
        if g.steps > 0 and d.grpo_methods:
            sizes[GRPO_SPLIT] = d.grpo_prompt_pool or g.steps * g.prompts_per_step * g.oversample
        return sizes

    def data(self) -> str:
        """The task's splits, the Skill-Map pool (the training questions the teacher labels) and GRPO's prompts."""
        d = self.d
        if d.skill_map_size > d.train_size:  # before any file is written
            raise ValueError(f"demo.skill_map_size={d.skill_map_size} is larger than demo.train_size="
                             f"{d.train_size}; use at most train_size (0 = the whole train split)")

        def run():
            sizes = self.split_sizes()
            splits = task.make_splits(self.config.seed, sizes, {s: d.rare_weight for s in d.rare_skills})
            for name, rows in splits.items():
                io.write_jsonl(self.path(f"data/{name}.jsonl"), (p.to_dict() for p in rows))
            pool = random.Random(f"skill-map:{self.config.seed}").sample(splits["train"],
                                                                       d.skill_map_size or d.train_size)
            io.write_jsonl(self.path("data/pool.jsonl"), (p.to_dict() for p in pool))
            return {k: len(v) for k, v in splits.items()}

        return self.step("data", [], [f"data/{n}.jsonl" for n in self.split_sizes()] + ["data/pool.jsonl"], run)

    # the base student -----------------------------------------------------------------------------------------
    def student_settings(self) -> dict[str, Any]:
        """What a shipped base student must have been built from (split sizes are not: smaller runs' test and
        held-out questions are among the ones it never trained on)."""
        d, c = self.d, self.config
        return {"seed": c.seed, "rare": list(d.rare_skills), "rare_weight": d.rare_weight,
                "arch": [d.hidden_size, d.num_layers, d.num_heads, d.max_seq_len],
                "steps": d.pretrain_steps, "batch": d.pretrain_batch_size, "lr": d.pretrain_lr,
                "max_length": c.data.max_length, "packing": c.data.packing, "dtype": c.model.dtype,
                "schedule": [c.train.lr_schedule, c.train.warmup_steps, c.train.min_lr_ratio]}

    def shipped_student(self) -> Path | None:
        """The shipped student's directory when it was built from student_settings(), else None."""
        where = Path(self.d.student_dir) if self.d.student_dir else SHIPPED_STUDENT
        build = where / "build.json"
        if not self.d.use_shipped_student:
            return None
        if not build.exists() or io.read_json(build)["settings"] != self.student_settings():
            log.warning("demo: no shipped base student built from these settings at %s; pre-training one here "
                        "(`stat-jax demo --config.demo.export_student=True` rebuilds the shipped one)", where)
            return None
        return where

    def student(self) -> str:
        shipped = self.shipped_student()
        if shipped is not None:
            def use_shipped():
                self.shipped_student()  # notes the settings the shipped build must match
                io.write_json(self.path("student/base.json"), _model_record(shipped))

            weights = [str(w) for w in sorted(shipped.glob("*.safetensors"))]  # absolute: outside the workdir
            return self.step("student/base", weights, ["student/base.json"], use_shipped)
        d = self.d
        self.step("student/init", [], ["student/init/config.json"], lambda: save_char_llama(
            self.path("student/init"), hidden_size=d.hidden_size, num_layers=d.num_layers, num_heads=d.num_heads,
            max_seq_len=d.max_seq_len, seed=self.config.seed))

        def pretrain():
            from stat_jax.stat.sel import question_messages
            from stat_jax.train.sft import train_sft

            d = self.d
            resume = prepare_subrun(self.ctx, "student/base", ("sft",))  # another attempt's checkpoints: removed
            sub = sub_config(self.config, self.path("student/base/sft"), **{
                "model.path": str(self.path("student/init")), "train.steps": d.pretrain_steps,
                "train.batch_size": d.pretrain_batch_size, "train.learning_rate": d.pretrain_lr,
                "data.train_files": (str(self.path("data/original_mix.jsonl")),)})
            io.write_jsonl(self.path("data/original_mix.jsonl"), (
                {"messages": question_messages(p.problem, self.config.eval.instruction), "response": p.solution}
                for p in io.read_problems(self.path("data/train.jsonl"))))
            result = train_sft(sub, None, sub.workdir, resume=resume)
            io.write_json(self.path("student/base.json"), _model_record(Path(result["export_dir"])))

        return self.step("student/base", ["data/train.jsonl", "student/init/config.json"], ["student/base.json"],
                         pretrain)

    def export_student(self) -> dict[str, Any]:
        """Pre-trains the base student and writes it to the shipped directory with its build record."""
        self.d.use_shipped_student = False  # build it, never copy the old one onto itself
        self.data()
        self.student()
        out = Path(self.d.student_dir) if self.d.student_dir else SHIPPED_STUDENT
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(self.base_model, out, ignore=shutil.ignore_patterns("*.json.lock"))
        record = {"settings": self.student_settings(), **_model_record(out),
                  "command": "stat-jax demo --config.demo.export_student=True"}
        inside = out.resolve().is_relative_to(Path.cwd().resolve())  # the committed record names no local path
        record["model"] = str(out.resolve().relative_to(Path.cwd().resolve())) if inside else str(out)
        io.write_json(out / "build.json", record)
        return record

    @property
    def base_model(self) -> Path:
        return Path(io.read_json(self.path("student/base.json"))["model"])

    def base_eval(self) -> dict[str, Any]:
        """The base student on the evaluated split (the table's first row), through the shared backend."""
        from stat_jax.eval.evaluate import evaluate

        split = f"data/{self.d.eval_split}.jsonl"

        def run():
            test = io.read_problems(self.path(split))
            evaluate(self.server.serve(self.base_model), {"demo_test": test}, self.server.tokenizer, self.config.eval,
                     out_dir=self.path("student/eval"), model_name=str(self.base_model), print_table=False)

        self.step("student/eval", [split, "student/base.json"], ["student/eval/demo_test.jsonl"], run)
        return compare.per_skill_accuracy(io.read_jsonl(self.path("student/eval/demo_test.jsonl")),
                                          io.read_problems(self.path(split)))

    # the pipelines -----------------------------------------------------------------------------------------
    def overrides(self, name: str, method: str, seed: int, **more: Any) -> dict[str, Any]:
        """A cell's `stat-jax run` settings on top of the demo's config: its workdir, method and seed, and where
        the demo's files are."""
        d, root = self.d, self.root
        out = {"workdir": str(root / "cells" / name), "seed": seed, "stat.method": CELL_METHODS[method],
               "model.path": str(self.base_model), "stat.stages": STAGES,
               "stat.stage_cache": str(root / "stage_cache"), "stat.train_source": str(root / "data/pool.jsonl"),
               "stat.heldout_source": str(root / "data/heldout.jsonl"),
               "eval.paths.demo_test": str(root / f"data/{d.eval_split}.jsonl")}
        if GRPO_SPLIT in self.split_sizes():
            prompts = root / f"data/{GRPO_SPLIT}.jsonl"
            out.update({"grpo.train_files": (str(prompts),), "grpo.max_length": self.grpo_row_length(prompts)})
        return {**out, **more}

    def grpo_row_length(self, prompts: Path) -> int:
        """The longest GRPO prompt plus grpo.max_new_tokens, rounded up to 16: rows sized to the demo's prompts
        (< 80 tokens) rather than the prefill bucket (128), a third of which was padding."""
        from stat_jax.models.student import load_tokenizer
        from stat_jax.train.grpo import grpo_prompt_ids

        ids = grpo_prompt_ids(self.config, load_tokenizer(self.config, self.base_model), io.read_problems(prompts))
        return -(-(max(map(len, ids)) + int(self.config.grpo.max_new_tokens)) // 16) * 16

    def cell_config(self, overrides: dict[str, Any]):
        """The demo's config (the user's overrides included) with a cell's settings on top."""
        return sub_config(self.config, overrides["workdir"], **{k: v for k, v in overrides.items() if k != "workdir"})

    def command(self, c, only: Sequence[str]) -> str:
        """The `stat-jax run` command line that reproduces a cell: every field that differs from the config file."""
        base = build_config(self.spec)
        changed = [(k, v) for k, v in validity.leaves(c)
                   if validity.normal(v) != validity.normal(validity.current(base, k))]
        return " ".join([f"stat-jax run --config={self.spec} --only={','.join(only)}"]
                        + [shlex.quote(f"--config.{k}={_cli(v)}") for k, v in changed])

    def pipeline(self, overrides: dict[str, Any], only: Sequence[str]) -> dict[str, Any]:
        """Runs one `stat-jax run` in-process, the shared backend handed in; its record for results.json."""
        c = self.cell_config(overrides)
        run_pipeline(c, only=",".join(only), server=self.server)
        return {"command": self.command(c, only)}

    def cell(self, method: str, seed: int) -> dict[str, Any]:
        grpo = method in self.d.grpo_methods and self.config.grpo.steps > 0
        only = PROFILE + (CELL_METHODS[method], "sft", "eval") + (("grpo", "eval_grpo") if grpo else ())
        return self.pipeline(self.overrides(f"{method}-seed{seed}", method, seed), only)

    def targeted(self, method: str, seed: int) -> dict[str, Any]:
        """The cell again with skill-targeted GRPO: its prompts drawn in proportion to the Missing-Skill-Profile
        (grpo.prompt_weighting=profile); its SFT trains again on the same set and seed (the same weights)."""
        more = {"grpo.prompt_weighting": "profile", "grpo.train_files": (),
                "grpo.max_length": self.grpo_row_length(self.path("data/pool.jsonl"))}
        return self.pipeline(self.overrides(f"{method}+targeted-seed{seed}", method, seed, **more),
                             PROFILE + (CELL_METHODS[method], "sft", "eval", "grpo", "eval_grpo"))

    def round2(self, method: str, seed: int) -> dict[str, Any]:
        """Continual STAT (PAPER.md §3.3): the cell's student profiled again (stat.round=2) on a new validation
        split, and trained further on its new set at the same budget."""
        more = {"stat.round": 2, "stat.previous_run": str(self.path(f"cells/{method}-seed{seed}/stat")),
                "stat.heldout_source": str(self.path(f"data/{ROUND2_SPLIT}.jsonl"))}
        return self.pipeline(self.overrides(f"{method}+round2-seed{seed}", method, seed, **more),
                             PROFILE + (CELL_METHODS[method], "sft", "eval"))

    # the experiment -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Runs (or resumes) every step and pipeline; returns the results (also written to results.json)."""
        d, start = self.d, time.monotonic()
        bad = [m for m in d.round2_methods if m not in ("stat_sel", "stat_syn") or m not in d.methods]
        if bad:
            raise ValueError(f"demo.round2_methods={tuple(d.round2_methods)}: {bad} cannot get a round 2; use STAT "
                             f"methods among demo.methods={tuple(d.methods)} (or () for no round-2 rows)")
        grpo = self.config.grpo.steps > 0
        jobs = ([(f"{m}-seed{s}", self.cell, m, s) for s in d.seeds for m in d.methods]
                + [(f"{m}+targeted-seed{s}", self.targeted, m, s) for s in d.seeds for m in d.targeted_grpo_methods
                   if grpo]
                + [(f"{m}+round2-seed{s}", self.round2, m, s) for s in d.seeds for m in d.round2_methods])
        try:
            with progress_bar(total=5 + len(jobs), desc="demo", unit="step") as bar:
                self.data()
                bar.update(1)
                self.student()
                bar.update(1)
                base = self.base_eval()  # the table's first row
                bar.update(1)
                # The profile run: the stages every cell shares, once (the cells copy them from the stage cache).
                sets = tuple(CELL_METHODS[m] for m in d.methods)
                self.pipeline({**self.overrides("profile", "stat_sel", self.config.seed),
                               "workdir": str(self.root)}, PROFILE + sets)
                bar.update(1)
                records = {}
                for name, run, m, s in jobs:
                    bar.set_postfix_str(name)
                    records[name] = run(m, s)
                    bar.update(1)
                results = compare.write_results(self.config, self.root, base, records)
                bar.update(1)
        finally:
            self.server.close()
        results["runtime_s_this_invocation"] = round(time.monotonic() - start, 1)
        return results


def use_compilation_cache(workdir: Path) -> None:
    """JAX's persistent compilation cache under the workdir: the ~30 students' trainer, GRPO and rollout programs
    compile once (the quick run, 2 cores: 125 s without, 87 s with an empty cache); results are byte for byte the
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
    spec = "configs/demo.py:quick" if getattr(args, "quick", False) else "configs/demo.py"
    if getattr(args, "dry_run", False):
        print(json.dumps({"workdir": config.workdir, "seeds": list(config.demo.seeds),
                          "methods": list(config.demo.methods)}, indent=2))
        return 0
    if config.demo.export_student:
        print(json.dumps(Demo(config, spec).export_student(), indent=2))
        return 0
    use_compilation_cache(Path(config.workdir))
    results = Demo(config, spec).run()
    from stat_jax.report import write_report_quietly

    write_report_quietly(config.workdir)
    print(format_table(results))
    print(f"\nresults: {Path(config.workdir) / 'results.json'}; the report with every chart: "
          f"{Path(config.workdir) / 'report.html'}")
    return 0

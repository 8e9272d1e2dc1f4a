"""`stat-jax demo`: the complete offline STAT experiment on the built-in arithmetic task (2 CPU cores).

`get_config()` is the default run (<= 15 minutes on 2 cores); `--quick` (or `--config=configs/demo.py:quick`)
shrinks every stage for the test suite (<= 3 minutes). Every field can be overridden from the command line.
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict


def _base() -> ConfigDict:
    spec = importlib.util.spec_from_file_location("stat_jax_base_config", Path(__file__).with_name("base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _set(c: ConfigDict, section: str, **values) -> None:
    """Sets existing fields of a base.py section (owned by another module); a renamed field fails loudly."""
    for k, v in values.items():
        if k not in c[section]:
            raise KeyError(f"configs/demo.py: configs/base.py has no field {section}.{k} any more; update the demo")
        c[section][k] = v


def get_config(variant: str = "default") -> ConfigDict:
    c = _base()
    c.seed = 0
    c.workdir = "runs/demo"
    c.model.dtype = "float32"  # the demo's recorded results are float32 runs; bf16 would change them
    c.model.param_dtype = "float32"
    # The demo's step holds 0.18 GB without recomputing layers, and trains ~17% faster with the same results.
    c.model.remat = "none"

    d = c.demo = ConfigDict()
    # The task: sizes of the splits; the train split's skill weights make some skills rare (the gaps STAT finds).
    d.train_size = 20000
    d.heldout_size = 400  # profiling questions (the paper's MATH validation split)
    d.test_size = 600  # never used for any choice: only the final table
    # Rare: skills a 2-layer student learns from a few dozen examples (one line each: "53-7=46", "46%4=2",
    # "46~50"); docs/decisions.md says why not `percent`.
    d.rare_skills = ("borrow_subtraction", "modular_reduction", "rounding")
    d.rare_weight = 0.003  # ~50-80 distinct train questions per rare skill against 4,000-12,000 for the others
    # The student: a tiny Llama, character-level.
    d.hidden_size = 128
    d.num_layers = 2
    d.num_heads = 4
    d.max_seq_len = 128  # longest prompt + answer; positions restart per packed example
    # The base student is shipped pre-trained (stat_jax/demo/student, a few MB): pre-training it to saturation
    # takes longer than the rest of the demo. `stat-jax demo --config.demo.export_student=True` rebuilds it from
    # the settings below (deterministic); when they differ from the shipped build.json the demo pre-trains here.
    d.use_shipped_student = True
    d.student_dir = ""  # "" = stat_jax/demo/student
    d.export_student = False
    # Pre-training on the (imbalanced) train split: ~4.7 epochs, saturated on the mix (plain SFT no longer moves it).
    d.pretrain_steps = 2000
    d.pretrain_batch_size = 16  # rows of data.max_length tokens, ~3 packed examples each
    d.pretrain_lr = 3e-3
    # STAT: the pipeline's own settings (configs/base.py `stat`), sized for the demo.
    # - scorer=consistency, 4 samples, consistency_min_agree=4: label-free, as `stat-jax run`; a question is hard
    #   unless all 4 answers agree (the paper's 2-of-5 marked 52 of 400; chosen on the validation split against
    #   accuracy with labels and 6-of-8: docs/decisions.md).
    # - diagnose_min_skills=1: the offline teacher names only the skills of the wrong steps.
    # - sel_answer_source=dataset: STAT-Sel trains on dataset solutions, as SFT and the baselines do, so the rows
    #   differ only in their questions (docs/decisions.md: the teacher's answers instead).
    # - skills_sample_per_subject: the catalog is proposed from this many pool questions; it must see every rare
    #   skill.
    _set(c, "stat", scorer="consistency", consistency_min_agree=4, rollout_samples=4, rollout_temperature=0.7,
         rollout_top_p=1.0, rollout_max_new_tokens=48, num_hard=150, grade_workers=0, skills_sample_per_subject=1000,
         label_max_skills=3, diagnose_min_skills=1, diagnose_max_skills=3,
         sel_questions_per_skill=5, sel_answers_per_question=3, sel_answer_source="dataset", sel_target_size=0,
         syn_reference_questions=3, syn_new_questions=2, syn_solutions=3, syn_min_agree=2, syn_target_size=0)
    # The cells' pipelines: the task's files as a benchmark of the user's own (their paths are set per run), one
    # profile for every training seed (stat.seed), every method's set at the same token budget, MATH-Hard = the
    # training questions with the most steps (the task's "level"), held-out = the whole profiling split.
    _set(c, "stat", seed=0, token_budget=200_000, train_benchmark="demo_task", heldout_benchmark="demo_task",
         heldout_size=0, math_hard_top_levels=1)
    c.eval.benchmarks = ("demo_test",)
    _set(c, "teacher", backend="offline", model="offline-demo", max_workers=1, max_retries=0,
         price_input_per_mtok=0.0, price_output_per_mtok=0.0, max_calls=0)  # the offline teacher is free
    # Train questions the teacher labels (the Skill-Map STAT-Sel selects from): the whole train split, so every
    # one of the few rare-skill questions can be selected. Labelling 20,000 takes ~15 s of the offline teacher.
    d.skill_map_size = 0  # 0 = the whole train split
    # "validation": score the rows on a split of its own (test_size questions, disjoint from the profiling and
    # test splits) to choose settings without reading the test split.
    d.eval_split = "test"
    d.flag_min_share = 0.1  # skills with >= 10% of the profile's mentions are "flagged" in the table
    # The grid: a `stat-jax run` per method and seed (fine-tuning the base model at stat.token_budget tokens;
    # train.* and grpo.* below, docs/decisions.md: how chosen).
    d.seeds = (0, 1, 2)
    # sft: the original mix (the pipeline's math_train set); math_hard / embed_sel: the paper's baselines
    d.methods = ("sft", "math_hard", "embed_sel", "stat_sel", "stat_syn")
    d.grpo_methods = ("sft", "stat_sel", "stat_syn")  # methods that get a +GRPO row (grpo.steps=0: none)
    # GRPO prompts: a balanced split of new questions no student trained on (train questions are answered
    # 80-95% right, so most groups carry no signal); 0 = steps x prompts x oversample (none seen twice).
    d.grpo_prompt_pool = 0
    # Skill-targeted GRPO (grpo.prompt_weighting=profile): these methods also get a "+GRPO (skill-targeted
    # prompts)" row, its prompts Skill-Map questions in proportion to the Missing-Skill-Profile.
    d.targeted_grpo_methods = ("stat_sel",)
    # Continual STAT (PAPER.md §3.3): per seed, round 1's STAT-Sel student is profiled again (the pipeline with
    # stat.round=2) on a new validation split of this size and trained further on its new selection at the
    # same token budget: the table's "round 2" row. () leaves it out.
    d.round2_methods = ("stat_sel",)
    d.round2_heldout_size = 400

    # The real SFT trainer's settings (configs/base.py `data`/`train`); steps and learning rates are set per run.
    _set(c, "data", max_length=256, packing=True)
    _set(c, "train", warmup_steps=10, min_lr_ratio=0.1, checkpoint_every=200, keep_checkpoints=1,
         async_checkpointing=False, log_every=10, tensorboard=False,
         learning_rate=3e-4, batch_size=16,  # the fine-tunes' (pre-training: demo.pretrain_*)
         steps=0, epochs=1.0)  # one pass over the budgeted set: equal tokens, equal steps

    # The rollout backend (JetStream in-process): prompts are < 128 tokens, answers < 48.
    _set(c, "rollout", max_concurrent_decodes=64, max_prefill_length=128, max_target_length=192)
    # GRPO: 8 steps of 16 trained prompts, the 16 of 48 sampled groups whose rewards differ (DAPO's dynamic
    # sampling), 8 answers each at temperature 0.7, lr 1e-4 constant (docs/decisions.md). It samples as many new
    # tokens as eval; a row holds a prompt plus them (each run sizes its rows to its prompts: run.grpo_row_length).
    _set(c, "grpo", steps=8, prompts_per_step=16, oversample=3, num_generations=8, temperature=0.7,
         learning_rate=1e-4, lr_schedule="constant", warmup_steps=0, max_new_tokens=48, max_length=128 + 48)

    c.eval.instruction = ""  # the demo's prompts are the bare problem text: short, like its training data
    c.eval.max_new_tokens = 48  # answers are < 48 characters
    _set(c, "eval", grade_workers=1, chunk_size=1024)

    if variant == "quick":
        quick(c)
    elif variant != "default":
        raise ValueError(f"configs/demo.py: unknown variant {variant!r}; use 'default' or 'quick'")
    return c


def quick(c: ConfigDict) -> ConfigDict:
    """The suite's variant: every stage runs, on tiny sizes (<= 3 minutes on 2 cores)."""
    d = c.demo
    c.workdir = "runs/demo-quick"
    d.train_size, d.heldout_size, d.test_size = 2000, 60, 100
    d.round2_heldout_size = 60
    # The shipped (saturated) base student, as in the default run: what the quick run asserts (the profile
    # finds the rare skills, ...) needs a student that has learned the common skills.
    # The whole (quick) train split is the Skill-Map and the catalog's sample: it holds a handful of each rare skill.
    d.skill_map_size = 0
    c.stat.skills_sample_per_subject = 0
    c.stat.rollout_samples, c.stat.consistency_min_agree = 2, 2  # hard unless both answers agree
    c.stat.num_hard = 30
    d.seeds = (0, 1)
    c.stat.token_budget = 15_000  # one example overshoots the budget by < 1%
    c.train.batch_size = 8
    d.grpo_methods = ("stat_sel",)
    d.targeted_grpo_methods = ("stat_sel",)
    # The same 24 prompts sampled every step (8 of them trained on): the training reward curve measures learning;
    # at lr 5e-4 and temperature 1.0 a rise shows within 6 steps (docs/decisions.md).
    d.grpo_prompt_pool = 24
    c.grpo.steps, c.grpo.prompts_per_step, c.grpo.learning_rate, c.grpo.temperature = 6, 8, 5e-4, 1.0
    return c

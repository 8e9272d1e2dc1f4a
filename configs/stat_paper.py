"""The STAT paper's recipes, one student x method per variant: `--config=configs/stat_paper.py:STUDENT,METHOD`.

  stat-jax run --config=configs/stat_paper.py:llama3_2_1b,sel      # = configs/stat_sel_llama3_2_1b.py
  stat-jax run --config=configs/stat_paper.py:qwen2_5_3b,syn       # = configs/stat_syn_qwen2_5_3b.py

STUDENT: llama3_2_1b | llama3_2_3b | qwen2_5_3b; METHOD: sel | syn, or one of the paper's baselines at the same
budget (stat_jax/stat/baselines.py): math_train | math_hard | embed_sel. Every figure below is the paper's (He et al.,
"Skill-Targeted Adaptive Training", arXiv 2510.10023; summarised in shared/PAPER.md, whose section is named in
each comment), or says that the paper does not give one. The per-student files (stat_{sel,syn}_*.py), the SFT
recipes (sft_llama3_2_*.py, sft_qwen2_5_3b.py) and the GRPO recipe (grpo_llama3_2_1b.py) are this file's variants,
so there is one copy of each figure. Where stat-jax trains differently from the paper (LoRA on a bf16/f32 base,
not QLoRA's 4-bit one; one GRPO update per rollout batch) the comment says so.
"""

import math
from pathlib import Path

from stat_jax.config import ConfigError, load_config_file
from stat_jax.stat import baselines

# PAPER.md "Setup": the three students; Qwen2.5-3B is the base model, not the Instruct one.
STUDENTS = {
    "llama3_2_1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3_2_3b": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen2_5_3b": "Qwen/Qwen2.5-3B",
}
# The stages each method runs: STAT-Sel and STAT-Syn build their set from the Missing-Skill-Profile.
_PROFILE = ("data", "skills", "label", "rollout", "hard", "diagnose", "profile")
METHOD_STAGES = {
    "sel": _PROFILE + ("sel", "sft", "eval"),
    "syn": _PROFILE + ("syn", "sft", "eval"),
    **baselines.METHOD_STAGES,
}

MATH_TRAIN_QUESTIONS = 7500  # PAPER.md "Setup": MATH is 7.5k train / 5k test
PAIRS = 9500  # PAPER.md "Stage 3": every training set is standardised to 9.5k QA pairs
GRPO_EPOCHS = 6  # PAPER.md "Training recipe": GRPO for 6 epochs over MATH train
GRPO_PROMPTS = 256  # ... 256 questions x 4 rollouts per batch
GRPO_NEW_TOKENS = 2048  # ... responses <= 2,048 tokens


def parse_variant(arg: str) -> tuple[str, str]:
    """"student,method" -> (student, method), with the choices named when either is unknown."""
    student, _, method = arg.partition(",")
    if student not in STUDENTS or method not in METHOD_STAGES:
        raise ConfigError(f"configs/stat_paper.py:{arg}: expected STUDENT,METHOD with STUDENT one of "
                          f"{sorted(STUDENTS)} and METHOD one of {sorted(METHOD_STAGES)}")
    return student, method


def get_config(arg: str = "llama3_2_1b,sel"):
    student, method = parse_variant(arg)
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = f"runs/stat_{method}_{student}"
    c.model.path = STUDENTS[student]
    c.model.dtype = "bfloat16"  # "Training recipe": bf16 compute
    c.model.param_dtype = "float32"  # the frozen base stays in float32 (the paper's QLoRA base is 4-bit NF4)
    c.model.remat = "full"  # 2048-token rows: activations dominate memory without it (configs/base.py)

    # Data (PAPER.md "Setup"): MATH only. MATH test is split at random into 1k validation, which builds the
    # profile, and 4k test, the MATH column: the eval stage's `math` is MATH test minus data/heldout.jsonl.
    c.stat.train_benchmark = "math_train"
    c.stat.heldout_benchmark = "math"
    c.stat.heldout_size = 1000
    c.stat.heldout_seed = 0  # the paper gives no split seed; its evaluation seed is 0 ("Training recipe")
    c.stat.heldout_exclude = ()  # a plain random split: none of the evaluated benchmarks is part of MATH test
    # "Results": MATH, GSM8K, AMC23, AIME24, AIME25 are the columns stat-jax ships (MATH^D, MATH^2 and
    # MATH-Perturb are not). "Training recipe": pass@1 at temperature 0.1; greedy is that up to rare ties.
    c.eval.benchmarks = ("math", "gsm8k", "amc23", "aime24", "aime25")
    c.eval.greedy = True

    # Stage 1 (difficult questions): about 500 per student. The consistency heuristic samples 5 answers per
    # question (a question is difficult when its most common answer appears fewer than 2 times).
    c.stat.rollout_samples = 5
    c.stat.consistency_min_agree = 2
    c.stat.scorer = "auto"  # the paper's PRM when stat.prm_path is set, else that label-free consistency rule
    c.stat.num_hard = 500
    # Stage 2: the catalog from skills named for every training question (Didolkar et al.; 0 = no sample), merged
    # per subject; the Skill-Map labels every training question with <= 5 skills; each difficult question gets
    # the 2-3 skills the student failed to apply.
    c.stat.skills_sample_per_subject = 0
    c.stat.label_max_skills = 5
    c.stat.diagnose_max_skills = 3
    # Stage 3, STAT-Sel: per (difficult question, missing skill) 5 training questions with that skill, 3
    # teacher-written answers each, 9.5k pairs sampled.
    c.stat.method = method
    c.stat.stages = METHOD_STAGES[method]
    c.stat.sel_questions_per_skill = 5
    c.stat.sel_answers_per_question = 3
    c.stat.sel_answer_source = "teacher"
    c.stat.sel_answer_filter = "none"  # every teacher answer kept: the paper filters none against the labels
    c.stat.sel_target_size = PAIRS
    # STAT-Syn: 3 reference questions -> 2 new questions -> 3 solutions each, kept when >= 2 agree; 9.5k pairs.
    c.stat.syn_reference_questions = 3
    c.stat.syn_new_questions = 2
    c.stat.syn_solutions = 3
    c.stat.syn_min_agree = 2
    c.stat.syn_target_size = PAIRS
    # Baselines ("Stage 3"), every set 9.5k pairs (stat.baseline_size 0 = stat.sel_target_size): MATH-Train is
    # the original questions with their solutions; MATH-Hard all Level 4-5 questions (MATH's top 2 levels);
    # Embed-Sel the 5 most similar training questions per difficult question; both with 3 answers each, as
    # STAT-Sel. The paper embeds with gte-Qwen2-7B-instruct; "" embeds with the student (any HF encoder dir works).
    c.stat.baseline_size = 0
    c.stat.math_hard_top_levels = 2
    c.stat.embed_per_question = 5
    c.stat.embed_model = ""

    # SFT ("Training recipe"): 3 epochs, cosine with 3% warmup, effective batch 8, clipping 0.3, weight
    # decay 0.1. One example per row (no packing), so a batch of 8 rows is 8 QA pairs as in the paper.
    # Adapters as the paper's QLoRA: rank 16, alpha 32, dropout 0.05 on the attention and MLP projections, over
    # a 4-bit NF4 frozen base (--config.train.lora.base_quant=none keeps the base at the compute dtype). The paper tunes the peak lr per method from {5e-4, 2e-4, 1e-4, 8e-5, 2e-5} and
    # does not say which won; 1e-4 is that grid's middle: tune it (--config.train.learning_rate) as the paper did.
    # --config.train.lora.rank=0 fine-tunes every weight instead (then ~1e-5 is the usual lr).
    c.data.max_length = 2048  # not given in the paper; the longest MATH solutions fit with the prompt
    c.data.packing = False
    c.train.epochs = 3.0
    c.train.batch_size = 8
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 0
    c.train.warmup_ratio = 0.03
    c.train.max_grad_norm = 0.3
    c.train.weight_decay = 0.1
    c.train.learning_rate = 1e-4
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.dropout = 0.05
    c.train.lora.targets = "q,k,v,o,gate,up,down"
    c.train.lora.base_quant = "nf4"
    c.train.export_dtype = "bfloat16"

    # GRPO after SFT ("Training recipe"): constant lr 5e-7, 256 questions x 4 rollouts per batch, responses
    # <= 2,048 tokens, no KL (beta 0 keeps no reference copy), no entropy bonus (stat-jax has none), 6 epochs
    # over MATH train. Not reproduced: PPO mini-batches of 64 (stat-jax makes one update per rollout batch).
    c.grpo.learning_rate = 5e-7
    c.grpo.lr_schedule = "constant"
    c.grpo.warmup_steps = 0
    c.grpo.warmup_ratio = 0.0
    c.grpo.num_generations = 4
    c.grpo.prompts_per_step = GRPO_PROMPTS
    c.grpo.steps = math.ceil(GRPO_EPOCHS * MATH_TRAIN_QUESTIONS / GRPO_PROMPTS)  # 176
    c.grpo.max_new_tokens = GRPO_NEW_TOKENS
    c.grpo.beta = 0.0
    c.grpo.micro_batches = 0  # 1,024 rows per update: as many micro-batches as the memory budget needs
    # Every prompt the prefill admits, plus the new tokens, fits the KV cache and a GRPO training row.
    c.rollout.max_target_length = int(c.rollout.max_prefill_length) + GRPO_NEW_TOKENS
    c.grpo.max_length = int(c.rollout.max_prefill_length) + GRPO_NEW_TOKENS
    return c

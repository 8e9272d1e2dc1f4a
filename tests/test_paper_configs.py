"""The paper's recipes as configs (issue 16, item 7): each student x method config is built, carries the paper's
figures (written here again from shared/PAPER.md, so a changed config figure fails), fits its token lengths, and
`stat-jax run --dry-run` plans it without weights or a teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from stat_jax import cli
from stat_jax.config import ConfigError, build_config
from stat_jax.lengths import check_config_lengths, config_length_problems

STUDENTS = {"llama3_2_1b": "meta-llama/Llama-3.2-1B-Instruct", "llama3_2_3b": "meta-llama/Llama-3.2-3B-Instruct",
            "qwen2_5_3b": "Qwen/Qwen2.5-3B"}  # PAPER.md "Setup": Qwen2.5-3B is the base model
PAPER_CONFIGS = [(f"configs/stat_{m}_{s}.py", s, m) for s in STUDENTS for m in ("sel", "syn")]
MATH_TEST = Path("/work/shared/data/math_test.jsonl")


def _figures(c) -> dict:
    return {
        # data split ("Setup"): 1k validation of MATH test builds the profile; `math` is evaluated on the rest
        "heldout": (c.stat.heldout_benchmark, c.stat.heldout_size, tuple(c.stat.heldout_exclude)),
        "train_benchmark": c.stat.train_benchmark,
        # "Stage 1": ~500 difficult questions; consistency: 5 samples, difficult if the top answer appears < 2 times
        "hard": (c.stat.num_hard, c.stat.rollout_samples, c.stat.consistency_min_agree, c.stat.scorer),
        # "Stage 3": 9.5k pairs; STAT-Sel 5 questions per (question, skill), 3 answers each (teacher-written)
        "sel": (c.stat.sel_target_size, c.stat.sel_questions_per_skill, c.stat.sel_answers_per_question,
                c.stat.sel_answer_source, c.stat.sel_answer_filter),
        # "Stage 2": skills named for every training question; 2-3 missing skills per difficult question
        "catalog": (c.stat.skills_sample_per_subject, c.stat.label_max_skills, c.stat.diagnose_max_skills),
        "syn": (c.stat.syn_target_size, c.stat.syn_reference_questions, c.stat.syn_new_questions,
                c.stat.syn_solutions, c.stat.syn_min_agree),
        # "Training recipe", SFT
        "sft": (c.train.epochs, c.train.lr_schedule, c.train.warmup_steps, c.train.warmup_ratio, c.train.batch_size,
                c.data.packing, c.train.max_grad_norm, c.train.weight_decay, c.model.dtype),
        # "Training recipe": QLoRA rank 16, alpha 32, dropout 0.05 on attention + MLP, NF4 base; lr from the paper's grid
        "lora": (c.train.lora.rank, c.train.lora.alpha, c.train.lora.dropout, c.train.lora.targets,
                 c.train.lora.base_quant, c.train.learning_rate in (5e-4, 2e-4, 1e-4, 8e-5, 2e-5)),
        # "Training recipe", GRPO
        "grpo": (c.grpo.learning_rate, c.grpo.lr_schedule, c.grpo.warmup_steps, c.grpo.num_generations,
                 c.grpo.prompts_per_step, c.grpo.max_new_tokens, c.grpo.beta, c.grpo.steps),
    }


PAPER = {
    "heldout": ("math", 1000, ()),
    "train_benchmark": "math_train",
    "hard": (500, 5, 2, "auto"),
    "sel": (9500, 5, 3, "teacher", "none"),
    "catalog": (0, 5, 3),
    "syn": (9500, 3, 2, 3, 2),
    # batch 8 of unpacked rows = 8 QA pairs per update
    "sft": (3.0, "cosine", 0, 0.03, 8, False, 0.3, 0.1, "bfloat16"),
    "lora": (16, 32.0, 0.05, "q,k,v,o,gate,up,down", "nf4", True),
    # 176 steps = 6 epochs of 7,500 MATH train questions at 256 a batch, rounded up
    "grpo": (5e-7, "constant", 0, 4, 256, 2048, 0.0, 176),
}


@pytest.mark.parametrize("path, student, method", PAPER_CONFIGS)
def test_paper_config_is_the_papers_recipe_fits_its_lengths_and_dry_runs(path, student, method, tmp_path, capsys):
    c = build_config(path)
    assert c.model.path == STUDENTS[student] and c.stat.method == method
    assert _figures(c) == PAPER
    assert c.stat.stages[-3:] == (method, "sft", "eval") and c.stat.stages[0] == "data"
    assert "math" in c.eval.benchmarks and "math500" not in c.eval.benchmarks  # the paper reports no MATH-500
    for command in ("run", "sft", "grpo", "eval"):
        assert config_length_problems(c, command) == [], (path, command)
        check_config_lengths(c, command)
    # The KV cache holds the longest admitted prompt plus GRPO's 2,048 new tokens, and so does a GRPO row.
    assert c.rollout.max_target_length >= c.rollout.max_prefill_length + 2048
    assert c.grpo.max_length >= c.rollout.max_prefill_length + 2048
    # dry-run: no weights (model.path is a hub name that is not on this machine), no teacher key, nothing written
    workdir = tmp_path / "never"
    assert cli.main(["run", f"--config={path}", f"--config.workdir={workdir}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in c.stat.stages:
        assert f'"{stage}"' in out
    assert str(workdir / "stat") in out and not workdir.exists()


def test_variants_and_recipe_files_share_one_copy_of_each_figure():
    sel = build_config("configs/stat_paper.py:llama3_2_3b,sel")
    assert sel.to_dict() == build_config("configs/stat_sel_llama3_2_3b.py").to_dict()
    for student in STUDENTS:
        sft = build_config(f"configs/sft_{student}.py")
        paper = build_config(f"configs/stat_paper.py:{student},sel")
        assert sft.train.to_dict() == paper.train.to_dict() and sft.data.to_dict() == paper.data.to_dict()
        assert sft.model.path == STUDENTS[student]
    grpo = build_config("configs/grpo_llama3_2_1b.py")
    assert grpo.grpo.to_dict() == build_config("configs/stat_paper.py:llama3_2_1b,syn").grpo.to_dict()
    syn = build_config("configs/stat_syn_qwen2_5_3b.py")
    assert syn.workdir == "runs/stat_syn_qwen2_5_3b" and "syn" in syn.stat.stages and "sel" not in syn.stat.stages


@pytest.mark.parametrize("method, stages", [
    ("math_train", ["data", "math_train", "sft", "eval"]),
    ("math_hard", ["data", "math_hard", "sft", "eval"]),
    ("embed_sel", ["data", "rollout", "hard", "embed_sel", "sft", "eval"]),
])
def test_paper_baselines_are_variants_at_the_same_budget(method, stages, tmp_path, capsys):
    from stat_jax.stat.baselines import budget

    c = build_config(f"configs/stat_paper.py:qwen2_5_3b,{method}")
    assert c.stat.method == method and list(c.stat.stages) == stages
    assert budget(c) == 9500  # "Stage 3": every set is 9.5k pairs, as STAT-Sel's
    assert (c.stat.math_hard_top_levels, c.stat.embed_per_question) == (2, 5)  # Level 4-5; 5 neighbours
    assert _figures(c)["sft"] == PAPER["sft"]  # trained with the same recipe
    assert cli.main(["run", f"--config=configs/stat_paper.py:qwen2_5_3b,{method}",
                     f"--config.workdir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f'"{stage}"' in out for stage in stages)


@pytest.mark.parametrize("variant", ["llama3_2_8b,sel", "qwen2_5_3b,grpo", "qwen2_5_3b"])
def test_unknown_variant_names_the_choices(variant):
    with pytest.raises(ConfigError, match=r"STUDENT,METHOD with STUDENT one of \['llama3_2_1b'"):
        build_config(f"configs/stat_paper.py:{variant}")


@pytest.mark.skipif(not MATH_TEST.is_file(), reason=f"{MATH_TEST} (the real MATH test set) is not on this machine")
def test_the_split_is_1k_validation_and_4k_test_of_math_test():
    from stat_jax.data.math_datasets import read_benchmark
    from stat_jax.data.splits import validation_split

    c = build_config("configs/stat_sel_llama3_2_1b.py")
    problems = read_benchmark(c.stat.heldout_benchmark, str(MATH_TEST)).problems
    heldout, rest = validation_split(problems, c.stat.heldout_size, c.stat.heldout_seed)
    assert (len(problems), len(heldout), len(rest)) == (5000, 1000, 4000)
    assert not {p.id for p in heldout} & {p.id for p in rest}
    # Every subject is profiled: the random split draws from all seven.
    assert len({p.subject for p in heldout}) == 7

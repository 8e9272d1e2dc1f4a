"""The paper's data-selection baselines as pipeline stages, each at STAT-Sel's budget (PAPER.md "Stage 3").

- math_train: the original training questions with their dataset solutions.
- math_hard: the training questions rated hardest (`stat.math_hard_rating`): by MATH's levels (Level 4-5: the top
  `stat.math_hard_top_levels` levels present), by the teacher's 1-5 difficulty rating (the same top ratings), or
  by the PRM (the `stat.math_hard_share` of questions whose dataset solution gets the lowest step score).
- embed_sel: for each difficult held-out question its `stat.embed_per_question` nearest training questions by
  cosine similarity of embeddings: the student's own mean-pooled final hidden states by default, or the
  mean-pooled last hidden states of any Hugging Face encoder directory (`stat.embed_model`; the paper used
  gte-Qwen2-7B-instruct).
- embed_syn: STAT-Syn seeded by embedding instead of by skill: for each difficult question
  `stat.embed_syn_requests_per_question` synthesis requests (STAT-Syn's 2-3 (question, skill) pairs), each
  showing the next `stat.syn_reference_questions` nearest training questions; new questions are solved
  `stat.syn_solutions` times and kept when `stat.syn_min_agree` final answers agree, as in STAT-Syn.

MATH-Hard and Embed-Sel answer as STAT-Sel does (stat.sel_answer_source, stat.sel_answers_per_question, through
`sel.build_sel`), so they differ from it only in which questions are trained on; MATH-Train answers with the
dataset's solutions, as in the paper. Every set has exactly `budget(config)` pairs: a larger set is subsampled
(seeded) before any teacher answer is paid for, a smaller one is repeated in whole passes plus a seeded part
(the repeats are counted in the stage's stats).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stat_jax.data.records import MathProblem, SFTExample
from stat_jax.errors import ConfigError
from stat_jax.stat import io
from stat_jax.stat import sel as sel_mod

log = logging.getLogger(__name__)

# stat.method -> the training file its stage writes (the sft stage trains on it).
METHOD_FILES = {"math_train": "math_train/math_train.jsonl", "math_hard": "math_hard/math_hard.jsonl",
                "embed_sel": "embed_sel/embed_sel.jsonl", "embed_syn": "embed_syn/embed_syn.jsonl"}
# The stages each baseline needs (stat.stages); Embed-Sel needs the difficult questions, so the student's rollouts.
METHOD_STAGES = {"math_train": ("data", "math_train", "sft", "eval"),
                 "math_hard": ("data", "math_hard", "sft", "eval"),
                 "embed_sel": ("data", "rollout", "hard", "embed_sel", "sft", "eval"),
                 "embed_syn": ("data", "rollout", "hard", "embed_syn", "sft", "eval")}
MATH_HARD_RATINGS = ("level", "teacher", "prm")
_LEVEL = re.compile(r"(\d+)\s*$")


# ----- choosing questions --------------------------------------------------------------------------------------
def level_number(level: str | int | None) -> int | None:
    """MATH's "Level 5" (or a bare 5) as 5; None for rows without a usable level (MATH train has "Level ?")."""
    if level is None:
        return None
    m = _LEVEL.search(str(level))
    return int(m.group(1)) if m else None


def hardest_levels(problems: Sequence[MathProblem], top_levels: int = 1) -> list[MathProblem]:
    """The problems whose level is among the `top_levels` highest levels present (input order kept)."""
    if not problems:
        raise ValueError("MATH-Hard: no training questions to choose from")
    present = sorted({n for n in map(level_number, (p.level for p in problems)) if n is not None}, reverse=True)
    if not present:
        raise ValueError(f"MATH-Hard: none of the {len(problems)} training questions has a level (field 'level', "
                         f"e.g. 'Level 5'; first id: {problems[0].id}); MATH-Hard needs a dataset with levels")
    levels = set(present[:top_levels])
    return [p for p in problems if level_number(p.level) in levels]


def nearest(queries: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """Indices [n_queries, k] of the `k` pool rows with the highest cosine similarity to each query row."""
    if queries.ndim != 2 or pool.ndim != 2 or queries.shape[1] != pool.shape[1]:
        raise ValueError(f"embeddings must be [n, d] with one d; got queries {queries.shape}, pool {pool.shape}")
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    p = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    sims = q @ p.T
    k = min(k, pool.shape[0])
    # argsort of -sims with a stable sort: ties go to the lower pool index, so the choice is deterministic
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def embed_sel(hard: Sequence[MathProblem], hard_vecs: np.ndarray, pool: Sequence[MathProblem],
              pool_vecs: np.ndarray, per_question: int) -> list[dict]:
    """[{hard_id, problem}] : per hard question its `per_question` nearest pool questions (pairs in order)."""
    if len(hard) != len(hard_vecs) or len(pool) != len(pool_vecs):
        raise ValueError(f"{len(hard)} hard questions with {len(hard_vecs)} embeddings, "
                         f"{len(pool)} pool questions with {len(pool_vecs)} embeddings")
    idx = nearest(hard_vecs, pool_vecs, per_question)
    return [{"hard_id": h.id, "problem": pool[j]} for h, row in zip(hard, idx) for j in row]


# ----- embeddings ----------------------------------------------------------------------------------------------
def _bucket(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def mean_pooled_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 256, *,
                           max_tokens: int = 0, length_buckets: bool = False) -> np.ndarray:
    """The model's final-norm hidden states averaged over each text's tokens, float32 [len(texts), hidden].

    max_tokens > 0 keeps each text's first max_tokens tokens. length_buckets: batches of similar length, each
    padded to a power of two (one compilation per bucket) instead of every batch to the longest text, which
    matters for real data (MATH questions run from 10 to 1,000+ tokens). Padding never changes a text's vector.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_tokens > 0:
        ids = [row[:max_tokens] for row in ids]
    if not ids:
        return np.zeros((0, model.config.hidden_size), np.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, tokens, mask):
        m = nnx.merge(graphdef, state)
        h = m.hidden_states(tokens, attention_mask=mask).astype(jnp.float32)
        w = mask.astype(jnp.float32)[..., None]
        return (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)

    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if length_buckets else list(range(len(ids)))
    longest = max(map(len, ids))
    out = np.zeros((len(ids), model.config.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = _bucket(max(len(ids[i]) for i in chunk)) if length_buckets else longest
        rows = min(batch_size, _bucket(len(chunk))) if length_buckets else batch_size
        tokens = np.zeros((rows, length), np.int32)  # one shape per bucket: one compilation each
        mask = np.zeros((rows, length), np.int32)
        for r, i in enumerate(chunk):
            tokens[r, :len(ids[i])] = ids[i]
            mask[r, :len(ids[i])] = 1
        out[chunk] = np.asarray(pooled(state, tokens, mask))[:len(chunk)]
    return out


def encoder_embeddings(model_dir: str, texts: Sequence[str], batch_size: int = 16, *,
                       max_tokens: int = 512) -> np.ndarray:
    """Mean-pooled last hidden states of a Hugging Face encoder directory (transformers, on the CPU), float32."""
    import torch
    import transformers

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stat.embed_model={model_dir!r}: no config.json there; give a Hugging Face model "
                                "directory, or leave stat.embed_model empty to embed with the student")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModel.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_tokens, return_tensors="pt")
            h = model(**batch).last_hidden_state.float()
            w = batch["attention_mask"].unsqueeze(-1).float()
            out.append(((h * w).sum(1) / w.sum(1).clamp(min=1.0)).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.config.hidden_size), np.float32)


def student_embeddings(ctx, texts: Sequence[str]) -> np.ndarray:
    """`texts` embedded by the run's student (config.model.path), loaded on this process's devices only.

    The baseline stages run on process 0 alone (they call the teacher), so on a multi-host job the student is
    loaded on process 0's local devices, not on the global mesh the other processes would have to join.
    """
    import jax

    from stat_jax import sharding
    from stat_jax.models import load_hf_checkpoint
    from stat_jax.models.hub import resolve_model_path

    c, s = ctx.config, ctx.config.stat
    if not c.model.path:
        raise ValueError("stage embed_sel embeds with the student: set --config.model.path=/path/to/hf_checkpoint, "
                         "or --config.stat.embed_model=/path/to/hf_encoder to embed with another model")
    tokenizer = ctx.student_tokenizer()
    mesh = (sharding.make_mesh(1, -1, 1, devices=jax.local_devices()) if jax.process_count() > 1
            else sharding.mesh_from_config(c.mesh))
    model = load_hf_checkpoint(resolve_model_path(c.model.path), mesh, dtype=c.model.dtype,
                               param_dtype=c.model.param_dtype)
    return mean_pooled_embeddings(model, tokenizer, texts, int(s.embed_batch_size),
                                  max_tokens=int(s.embed_max_tokens), length_buckets=True)


# ----- budget --------------------------------------------------------------------------------------------------
def budget(config) -> int:
    """Pairs every baseline set has: stat.baseline_size, or stat.sel_target_size (STAT-Sel's, the paper's 9.5k);
    0 (every chosen pair) when neither is set and the sft stage sizes sets by tokens (stat.token_budget)."""
    s = config.stat
    size = int(s.get("baseline_size", 0)) or int(s.sel_target_size)
    if size <= 0 and int(s.get("token_budget", 0)) > 0:
        return 0
    if size <= 0:
        raise ConfigError(f"stat.baseline_size={s.get('baseline_size', 0)} and stat.sel_target_size="
                          f"{s.sel_target_size}: a baseline set needs a number of pairs to match; set "
                          "stat.baseline_size (e.g. the size of sel/stat_sel.jsonl) or stat.sel_target_size")
    return size


def fill_budget(examples: Sequence[Any], size: int, seed: int) -> tuple[list[Any], int]:
    """(exactly `size` items, how many are repeats): a seeded subset when there are more, else whole passes
    over `examples` plus a seeded subset of them."""
    if not examples:
        raise ValueError("cannot fill a budget of training pairs from an empty set")
    if len(examples) >= size:
        return sel_mod.subsample(examples, size, seed), 0
    passes, rest = divmod(size, len(examples))
    return list(examples) * passes + sel_mod.subsample(examples, rest, seed + passes), size - len(examples)


def build_baseline(ctx, method: str, selected: Sequence[dict[str, Any]], *, answer_source: str
                   ) -> tuple[list[SFTExample], dict[str, Any]]:
    """The budget-matched examples for `selected` ([{problem, hard_id?}]), answered as `answer_source` says."""
    s, seed = ctx.config.stat, ctx.stat_seed
    size = budget(ctx.config)
    rows = [{"hard_id": r.get("hard_id", ""), "skill": "", "problem": r["problem"]} for r in selected]
    examples, stats = sel_mod.build_sel(
        ctx.teacher if answer_source != "dataset" else None, rows, source=answer_source,
        answers_per_question=int(s.sel_answers_per_question), target_size=size, seed=seed,
        instruction=ctx.instruction, system_prompt=ctx.config.eval.system_prompt, grade_workers=s.grade_workers,
        answer_filter=s.sel_answer_filter if answer_source != "dataset" else "none")
    if not examples:
        raise ValueError(f"stage {method}: none of the {len(rows)} chosen questions gave a training pair "
                         f"(answer source {answer_source!r}; stats {stats})")
    filled, repeats = fill_budget(examples, size, seed) if size else (list(examples), 0)
    for e in filled:
        e.meta = {k: v for k, v in {**(e.meta or {}), "method": method.replace("_", "-")}.items() if v != ""}
    sel_file = ctx.path("sel/stat_sel.jsonl")
    stats.update({"budget": size, "examples": len(filled), "repeated_examples": repeats,
                  "stat_sel_examples": sum(1 for _ in io.read_jsonl(sel_file)) if sel_file.exists() else None})
    if repeats:
        log.warning("stage %s: %d distinct pairs for a budget of %d; %d are repeats", method, len(examples), size,
                    repeats)
    return filled, stats


def _write(ctx, method: str, examples: Sequence[SFTExample], stats: dict[str, Any]) -> dict[str, Any]:
    io.write_jsonl(ctx.path(METHOD_FILES[method]), (e.to_dict() for e in examples))
    io.write_json(ctx.path(f"{method}/stats.json"), stats)
    return stats


# ----- stages (registered in stat_jax.stat.pipeline.STAGES) ------------------------------------------------------
def stage_math_train(ctx) -> dict[str, Any]:
    """MATH-Train: the run's training questions with their dataset solutions, at the budget."""
    train = io.read_problems(ctx.path("data/train.jsonl"))
    examples, stats = build_baseline(ctx, "math_train", [{"problem": p} for p in train], answer_source="dataset")
    return _write(ctx, "math_train", examples, {"pool": len(train), **stats})


def hardest_rated(problems: Sequence[MathProblem], ratings: Sequence[int], top: int) -> list[MathProblem]:
    """The problems whose rating is among the `top` highest ratings given (input order kept)."""
    levels = set(sorted(set(ratings), reverse=True)[:top])
    return [p for p, r in zip(problems, ratings) if r in levels]


def lowest_scored(problems: Sequence[MathProblem], scores: Sequence[float], share: float) -> list[MathProblem]:
    """The ceil(share * n) problems with the lowest scores (ties to the earlier one), in input order."""
    if not 0 < share <= 1:
        raise ConfigError(f"stat.math_hard_share={share}: a share of the training questions in (0, 1]")
    n = math.ceil(share * len(problems))
    keep = set(sorted(range(len(problems)), key=lambda i: (scores[i], i))[:n])
    return [p for i, p in enumerate(problems) if i in keep]


def teacher_difficulty(teacher, problems: Sequence[MathProblem]) -> list[dict[str, Any]]:
    """[{id, difficulty (1-5), reason}]: the teacher's rating of each question with its dataset solution."""
    from stat_jax.stat.skills import subject_of
    from stat_jax.teacher import prompts

    answers = teacher.ask_many([prompts.rate_difficulty(p.problem, p.solution, subject_of(p)) for p in problems],
                               desc="math_hard: difficulty ratings")
    return [{"id": p.id, "difficulty": int(a["difficulty"]), "reason": a["reason"]} for p, a in zip(problems, answers)]


def prm_solution_scores(step_scorer, problems: Sequence[MathProblem]) -> list[dict[str, Any]]:
    """[{id, score, step_scores}]: the PRM's lowest step score on each question's dataset solution.

    A PRM is least sure of the steps of the hardest questions' (correct) solutions, so the lowest step score
    ranks difficulty without a student or a label. Questions without a solution score 1.0 (never chosen first).
    """
    from stat_jax.models.prm import split_steps

    with_solution = [p for p in problems if p.solution]
    flat = iter(step_scorer.score_many([(p.problem, split_steps(p.solution)) for p in with_solution]))
    rows = []
    for p in problems:
        steps = next(flat) if p.solution else []
        rows.append({"id": p.id, "score": min(steps) if steps else 1.0, "step_scores": steps})
    return rows


def _prm_step_scorer(ctx):
    if ctx.scorer is not None and hasattr(ctx.scorer, "step_scorer"):
        return ctx.scorer.step_scorer  # an injected PRMScorer (tests)
    from stat_jax import sharding
    from stat_jax.stat.hard import PRMScorer

    return PRMScorer.from_config(ctx.config.stat, sharding.mesh_from_config(ctx.config.mesh)).step_scorer


def stage_math_hard(ctx) -> dict[str, Any]:
    """MATH-Hard: the training questions rated hardest (stat.math_hard_rating), answered as STAT-Sel is."""
    s = ctx.config.stat
    train = io.read_problems(ctx.path("data/train.jsonl"))
    rating = s.math_hard_rating
    if rating not in MATH_HARD_RATINGS:
        raise ConfigError(f"stat.math_hard_rating={rating!r}: choose one of {MATH_HARD_RATINGS}")
    if rating == "level":
        chosen = hardest_levels(train, int(s.math_hard_top_levels))
        ratings = [{"id": p.id, "level": p.level} for p in train]
        rule = f"MATH's levels: the top stat.math_hard_top_levels={s.math_hard_top_levels} present"
    elif rating == "teacher":
        ratings = teacher_difficulty(ctx.teacher, train)
        chosen = hardest_rated(train, [r["difficulty"] for r in ratings], int(s.math_hard_top_levels))
        rule = f"the teacher's 1-5 difficulty: the top stat.math_hard_top_levels={s.math_hard_top_levels} given"
    else:
        ratings = prm_solution_scores(_prm_step_scorer(ctx), train)
        chosen = lowest_scored(train, [r["score"] for r in ratings], float(s.math_hard_share))
        rule = (f"the PRM's lowest step score on the dataset solution: the lowest stat.math_hard_share="
                f"{s.math_hard_share}")
    io.write_jsonl(ctx.path("math_hard/ratings.jsonl"), ratings)
    examples, stats = build_baseline(ctx, "math_hard", [{"problem": p} for p in chosen],
                                     answer_source=s.sel_answer_source)
    return _write(ctx, "math_hard", examples, {
        "pool": len(train), "rating": rating, "rule": rule, "chosen": len(chosen),
        "levels": sorted({p.level for p in chosen if p.level}),
        "no_level": sum(level_number(p.level) is None for p in train), **stats})


def _embeddings(ctx, texts: Sequence[str]) -> np.ndarray:
    s = ctx.config.stat
    if s.embed_model:
        return encoder_embeddings(s.embed_model, texts, int(s.embed_batch_size),
                                  max_tokens=int(s.embed_max_tokens) or 512)
    return student_embeddings(ctx, texts)


def _hard_rows(ctx, stage: str) -> list[MathProblem]:
    hard = io.read_problems(ctx.path("hard/hard.jsonl"))  # rows: the problem's fields + its scores
    if not hard:
        raise ValueError(f"stage {stage}: {ctx.path('hard/hard.jsonl')} holds no difficult question; re-run "
                         "the hard stage (or check stat.num_hard / the rollouts)")
    return hard


def embed_syn_jobs(hard: Sequence[MathProblem], hard_vecs: np.ndarray, pool: Sequence[MathProblem],
                   pool_vecs: np.ndarray, *, requests_per_question: int, num_references: int, num_new: int,
                   temperature: float) -> list[tuple[dict[str, Any], Any]]:
    """Per difficult question `requests_per_question` synthesize requests, request j showing its nearest
    training questions j*num_references .. (j+1)*num_references - 1 (fewer when the pool runs out)."""
    from stat_jax.stat.skills import subject_of
    from stat_jax.teacher import prompts

    idx = nearest(hard_vecs, pool_vecs, requests_per_question * num_references)
    jobs = []
    for h, row in zip(hard, idx):
        for j in range(requests_per_question):
            refs = [pool[i] for i in row[j * num_references:(j + 1) * num_references]]
            if not refs:
                break
            request = prompts.synthesize("", "", [{"problem": p.problem, "solution": p.solution} for p in refs],
                                         subject_of(h), n=num_new, temperature=temperature)
            jobs.append(({"id": f"embed_syn/{h.id}/{j}", "hard_id": h.id, "skill": "", "subject": subject_of(h),
                          "references": [p.id for p in refs]}, request))
    return jobs


def stage_embed_syn(ctx) -> dict[str, Any]:
    """Embed-Syn: teacher-written questions modelled on each difficult question's nearest training questions,
    kept when their solutions agree (STAT-Syn's filter), at the budget."""
    from stat_jax.stat import syn as syn_mod

    s, seed = ctx.config.stat, ctx.stat_seed
    train, hard = io.read_problems(ctx.path("data/train.jsonl")), _hard_rows(ctx, "embed_syn")
    vecs = _embeddings(ctx, [p.problem for p in hard + train])
    jobs = embed_syn_jobs(hard, vecs[:len(hard)], train, vecs[len(hard):],
                          requests_per_question=int(s.embed_syn_requests_per_question),
                          num_references=int(s.syn_reference_questions), num_new=int(s.syn_new_questions),
                          temperature=float(ctx.config.teacher.temperature))
    examples, questions, stats = syn_mod.write_and_solve(
        ctx.teacher, jobs, num_solutions=int(s.syn_solutions), min_agree=int(s.syn_min_agree),
        temperature=float(ctx.config.teacher.temperature), instruction=ctx.instruction,
        system_prompt=ctx.config.eval.system_prompt, method="embed-syn")
    if not examples:
        raise ValueError(f"stage embed_syn: none of the {len(questions)} new questions had {s.syn_min_agree} "
                         f"agreeing solutions; see {ctx.path('embed_syn/questions.jsonl')}")
    io.write_jsonl(ctx.path("embed_syn/questions.jsonl"), questions)
    size = budget(ctx.config)
    filled, repeats = fill_budget(examples, size, seed) if size else (list(examples), 0)
    if repeats:
        log.warning("stage embed_syn: %d distinct pairs for a budget of %d; %d are repeats", len(examples), size,
                    repeats)
    return _write(ctx, "embed_syn", filled, {
        "embedding": s.embed_model or f"student {ctx.config.model.path} (mean-pooled hidden states)",
        "hard": len(hard), **stats, "distinct_examples": len(examples), "budget": size, "examples": len(filled),
        "repeated_examples": repeats})


def stage_embed_sel(ctx) -> dict[str, Any]:
    """Embed-Sel: per difficult question its nearest training questions by embedding, answered as STAT-Sel is."""
    s = ctx.config.stat
    train = io.read_problems(ctx.path("data/train.jsonl"))
    hard = _hard_rows(ctx, "embed_sel")
    vecs = _embeddings(ctx, [p.problem for p in hard + train])
    picked = embed_sel(hard, vecs[:len(hard)], train, vecs[len(hard):], int(s.embed_per_question))
    examples, stats = build_baseline(ctx, "embed_sel", picked, answer_source=s.sel_answer_source)
    return _write(ctx, "embed_sel", examples, {
        "embedding": s.embed_model or f"student {ctx.config.model.path} (mean-pooled hidden states)",
        "embedding_dim": int(vecs.shape[1]), "hard": len(hard), "picked": len(picked),
        "unique_questions": len({r["problem"].id for r in picked}), **stats})

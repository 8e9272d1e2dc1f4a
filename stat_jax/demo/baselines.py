"""The paper's data-selection baselines for the demo, at the same token budget as STAT (PAPER.md, Stage 3).

- MATH-Hard: the training questions of the highest difficulty levels (the paper takes MATH Level 4-5); the demo
  task's level is its number of steps, so the analogue is the training questions with the most steps.
- Embed-Sel: for each difficult held-out question, the `per_question` training questions nearest to it by
  embedding (the paper uses gte-Qwen2-7B; here the student's own mean-pooled final hidden states, cosine).

Both answer with the dataset's reference solution: the offline teacher's slip-free solution of a demo question
is the same text, so "3 teacher answers, wrong ones dropped" would only repeat it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stat_jax.data.records import MathProblem


def hardest_levels(problems: Sequence[MathProblem], top_levels: int = 1) -> list[MathProblem]:
    """The problems whose level is among the `top_levels` highest levels present (input order kept)."""
    if not problems:
        raise ValueError("MATH-Hard: no training questions to choose from")
    levels = sorted({int(p.level) for p in problems}, reverse=True)[:top_levels]
    return [p for p in problems if int(p.level) in levels]


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


def mean_pooled_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """The model's final-norm hidden states averaged over each text's tokens, float32 [len(texts), hidden]."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not ids:
        return np.zeros((0, model.config.hidden_size), np.float32)
    length = max(map(len, ids))
    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, tokens, mask):
        m = nnx.merge(graphdef, state)
        h = m.hidden_states(tokens, attention_mask=mask).astype(jnp.float32)
        w = mask.astype(jnp.float32)[..., None]
        return (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)

    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        tokens = np.zeros((batch_size, length), np.int32)  # one shape for every batch: one compilation
        mask = np.zeros((batch_size, length), np.int32)
        for i, row in enumerate(chunk):
            tokens[i, :len(row)] = row
            mask[i, :len(row)] = 1
        out.append(np.asarray(pooled(state, tokens, mask))[:len(chunk)])
    return np.concatenate(out).astype(np.float32)

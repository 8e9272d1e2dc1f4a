"""The paper's data-selection baselines for the demo, at the same token budget as STAT (PAPER.md, Stage 3).

The demo uses the pipeline's own baseline code (stat_jax/stat/baselines.py), so both choose questions the same way:
- MATH-Hard: the training questions of the highest difficulty levels (the paper takes MATH Level 4-5); the demo
  task's level is its number of steps, so the analogue is the training questions with the most steps.
- Embed-Sel: for each difficult held-out question, the `per_question` training questions nearest to it by
  embedding (the paper uses gte-Qwen2-7B; here the student's own mean-pooled final hidden states, cosine).

The demo answers both with the dataset's reference solution: the offline teacher's slip-free solution of a demo
question is the same text, so "3 teacher answers, wrong ones dropped" would only repeat it.
"""

from stat_jax.stat.baselines import embed_sel, hardest_levels, mean_pooled_embeddings, nearest

__all__ = ["embed_sel", "hardest_levels", "mean_pooled_embeddings", "nearest"]

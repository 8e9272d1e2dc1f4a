"""The paper's baselines on the demo task: MATH-Hard (highest levels) and Embed-Sel (nearest by the student's embedding)."""

import numpy as np
import pytest

from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data import arith_task as task
from stat_jax.demo import compare
from stat_jax.report import verdict as verdict_mod
from stat_jax.stat import baselines
from tests.demo.test_run_helpers import reference_example


def test_hardest_levels_keeps_only_the_top_level():
    problems = task.make_splits(0, {"train": 200})["train"]
    hard = baselines.hardest_levels(problems)
    top = max(int(p.level) for p in problems)
    assert hard and all(int(p.level) == top for p in hard)
    assert len(hard) == sum(int(p.level) == top for p in problems)
    two = baselines.hardest_levels(problems, top_levels=2)
    assert {int(p.level) for p in two} == {top, top - 1}
    with pytest.raises(ValueError, match="no training questions"):
        baselines.hardest_levels([])


def test_nearest_is_cosine_and_deterministic():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [10.0, 0.1]])
    queries = np.array([[2.0, 0.0], [0.0, 0.5]])
    idx = baselines.nearest(queries, pool, 2)
    assert idx.tolist() == [[0, 3], [1, 2]]  # scale does not matter, direction does
    assert baselines.nearest(queries, pool, 10).shape == (2, 4)
    with pytest.raises(ValueError, match="embeddings must be"):
        baselines.nearest(queries, pool[:, :1], 1)


def test_embed_sel_picks_the_neighbours_of_each_hard_question():
    problems = task.make_splits(1, {"train": 30})["train"]
    hard, pool = problems[:3], problems[3:]
    vecs = np.eye(len(problems))
    vecs[3] = vecs[0] + 0.1 * vecs[3]  # pool question 0 is closest to hard question 0
    vecs[4] = vecs[1] + 0.1 * vecs[4]
    picked = baselines.embed_sel(hard, vecs[:3], pool, vecs[3:], per_question=1)
    assert [(s["hard_id"], s["problem"].id) for s in picked][:2] == [(hard[0].id, pool[0].id), (hard[1].id, pool[1].id)]
    with pytest.raises(ValueError, match="embeddings"):
        baselines.embed_sel(hard, vecs[:2], pool, vecs[3:], 1)


def test_mean_pooled_embeddings_follow_the_text_not_the_batch():
    from stat_jax.models import init_model
    from stat_jax.models.llama import tiny_llama

    tok = build_char_tokenizer()
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    model = init_model(cfg, seed=0)
    texts = ["Ann has 12. She gets 9. How many?", "Ann has 40. Round to tens.", "Ann has 3 dozen. How many?"]
    vecs = baselines.mean_pooled_embeddings(model, tok, texts, batch_size=2)
    assert vecs.shape == (3, 32) and np.isfinite(vecs).all()
    alone = baselines.mean_pooled_embeddings(model, tok, texts[1:2], batch_size=4)
    np.testing.assert_allclose(alone[0], vecs[1], rtol=1e-5, atol=1e-5)  # padding and batch mates do not leak in
    assert not np.allclose(vecs[0], vecs[1])


def test_skill_shares_read_the_questions_back():
    problems = task.make_splits(0, {"train": 100})["train"]
    examples = [reference_example(p) for p in problems]
    shares = compare.skill_shares(examples)
    for skill in task.SKILL_NAMES:
        assert shares[skill] == pytest.approx(sum(skill in p.skills for p in problems) / len(problems))
    assert compare.flagged_share(shares, ["percent", "halving"]) == pytest.approx(
        (shares["percent"] + shares["halving"]) / 2)


def test_verdict_pairs_seeds_and_names_the_numbers():
    def row(values):
        return {"overall": compare._spread(values), "flagged": compare._spread(values), "per_skill": {}, "runs": len(values)}

    report = {"seeds": [0, 1], "rows": {"base": row([0.50]), "sft": row([0.50, 0.52]), "stat_sel": row([0.56, 0.60]),
                                        "stat_sel+grpo": row([0.58, 0.61])}}
    lines = verdict_mod.verdict(report)
    assert lines[0].startswith("SFT on more of the original mix moves the base student by +1.0 points")
    assert "STAT-Sel - SFT = +7.0 ± 1.4 overall, +7.0 on flagged skills over 2 seeds" in lines
    assert "GRPO on top of STAT-Sel: +1.5 ± 0.7 overall over 2 seeds" in lines

"""The chunked loss and the remat policies on the real student (SmolLM2-135M-Instruct: tied embeddings, vocab
49,152): the same loss and gradients as the unchunked, non-rematerialised step on real chat-formatted text."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.*` imports under --import-mode=importlib
    sys.path.insert(0, str(REPO))

from tests.real_student import ensure_real_student  # noqa: E402
from tests.train.test_memory import _assert_trees_close  # noqa: E402

pytestmark = pytest.mark.slow


def test_real_student_chunked_loss_and_dots_remat_equal_the_plain_step():
    import transformers

    from stat_jax.models import load_hf_checkpoint
    from stat_jax.train import sft

    student = ensure_real_student()
    tok = transformers.AutoTokenizer.from_pretrained(str(student))
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False)
             for q, a in (("What is 7 * 8?", "7 * 8 = 56, so the answer is \\boxed{56}."),
                          ("Name a prime above 10.", "11 is prime: \\boxed{11}."))]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    t = max(len(x) for x in ids) - 1
    tokens = np.zeros((2, t + 1), np.int32)
    weights = np.zeros((2, t), np.float32)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
        weights[i, :len(x) - 1] = 1.0
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (2, t)).copy(),
             "segment_ids": (weights > 0).astype(np.int32)}
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}

    results = {}
    for remat, chunk_tokens in (("none", 0), ("dots", 2 * 8)):  # 8 positions per chunk
        model = load_hf_checkpoint(student, remat=remat)
        assert model.lm_head is None  # tied: the head is the embedding
        graphdef, params = nnx.split(model)
        fn = jax.jit(lambda p, b, g=graphdef, c=chunk_tokens: sft.accumulated_gradients(p, g, b, chunk_tokens=c))
        loss, grads, _ = fn(nnx.to_pure_dict(params), batch)
        results[remat] = (float(loss), {"embed": np.asarray(grads["embed"]),
                                        "layer0_q": np.asarray(grads["layers"][0]["attention"]["q_proj"])})
        del model, params, grads
    (loss0, g0), (loss1, g1) = results["none"], results["dots"]
    assert 0.1 < loss0 < 8  # a pretrained model on its own chat format: far below log(49152) = 10.8
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    # Per gradient, against its own scale, at the 1e-5 (tests/train/test_memory.py _assert_trees_close says
    # why per gradient: one cancelling embedding entry of 28M was 1.8e-6 off, 5.5e-4 of itself, in a 2026-12-02
    # run, which a per-element rtol of 1e-4 failed on; 3.1e-6 and 3.2e-6 of the scale measured).
    assert all(np.abs(g0[key]).max() > 0 for key in g0)
    _assert_trees_close(g1, g0, rtol=1e-5, atol=0.0)

"""The RLHFlow PRM format on our Llama port vs RLHFlow's own scoring loop in torch, on a tiny random checkpoint.

The reference is `math-rm/prm_evaluate.py` of RLHFlow/RLHF-Reward-Modeling, run literally: a forward per
conversation prefix ending in the assistant's "+", softmax over the (+, -) logits at index -3. The tokenizer is
the character tokenizer with a Llama-3-shaped chat template (`<|role|>\n\n content <eos>`), so "-3" means what it
means for Llama-3.1: the last token of the assistant header.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stat_jax import sharding
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.models.prm import RLHFlowScorer, load_step_scorer
from tests.models.hf_fixtures import make_hf_model

LLAMA3_SHAPED_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n\n{% endif %}"
)

QUESTION = "What is 2+3?"
STEPS = ["2+3 means adding 3 to 2.", "2+3 = 6.", "Check: 6-3 = 3, so 2+3 = 5.", "The answer is \\boxed{5}."]


def save_rlhflow_checkpoint(path):
    """A tiny random LlamaForCausalLM + the char tokenizer with a Llama-3-shaped template, saved at `path`."""
    tok = build_char_tokenizer()
    tok.chat_template = LLAMA3_SHAPED_TEMPLATE
    model = make_hf_model("llama", seed=3)  # vocab 128 >= the char tokenizer's; pad 0 / bos 1 / eos 2 match it
    plus, minus = tok.encode("+")[-1], tok.encode("-")[-1]
    with torch.no_grad():  # spread P(+) away from 1/2 so a wrong position or column shows
        model.lm_head.weight[plus].mul_(6.0)
        model.lm_head.weight[minus].mul_(-6.0)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def rlhflow_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rlhflow_prm")
    return (path, *save_rlhflow_checkpoint(path))


def reference_step_scores(model, tok, question, steps):
    """RLHFlow's prm_evaluate.py loop, one forward per conversation prefix."""
    candidates = [tok.encode("+")[-1], tok.encode("-")[-1]]
    conversation, scores = [], []
    for k, step in enumerate(steps):
        conversation.append({"content": question + " " + step if k == 0 else step, "role": "user"})
        conversation.append({"content": "+", "role": "assistant"})
        ids = tok.apply_chat_template(conversation, return_tensors="pt", return_dict=False)
        with torch.no_grad():
            logits = model(ids).logits[:, -3, candidates]
        scores.append(float(logits.softmax(dim=-1)[0, 0]))
    return scores


def test_rlhflow_step_scores_match_torch(rlhflow_dir):
    path, model, tok = rlhflow_dir
    scorer = load_step_scorer(path, "rlhflow", dtype="float32", max_length=1024, batch_size=4)
    assert isinstance(scorer, RLHFlowScorer)
    items = [(QUESTION, STEPS), ("Compute 7*6.", ["7*6 = 40.", "So \\boxed{40}"]), ("Solve x+1=2.", ["x = 1"])]
    ours = scorer.score_many(items)  # one padded batch of ragged lengths and step counts
    for (question, steps), got in zip(items, ours):
        want = reference_step_scores(model, tok, question, steps)
        assert len(got) == len(steps)
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert scorer.score(*items[1]) == pytest.approx(ours[1], abs=1e-5)  # another batch composition
    flat = [p for s in ours for p in s]
    assert 0.02 < min(flat) and max(flat) < 0.98 and len({round(p, 5) for p in flat}) == len(flat)
    assert scorer.truncated == 0


def test_rlhflow_sharded_bfloat16(rlhflow_dir):
    path, model, tok = rlhflow_dir
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    scorer = load_step_scorer(path, "rlhflow", mesh=mesh, dtype="bfloat16", max_length=1024, batch_size=4)
    layer = scorer._state["layers"][0]["mlp"]["up_proj"][...]
    assert layer.dtype == np.dtype("bfloat16")
    assert tuple(layer.sharding.spec) == ("fsdp", "tensor")  # embed over fsdp, mlp over tensor: the student's table
    got = scorer.score(QUESTION, STEPS)
    np.testing.assert_allclose(got, reference_step_scores(model, tok, QUESTION, STEPS), atol=0.05)


def test_truncation_keeps_final_steps(rlhflow_dir):
    path, model, tok = rlhflow_dir
    full = load_step_scorer(path, "rlhflow", dtype="float32", max_length=1024)
    whole = len(full.encode(QUESTION, STEPS)[0])
    last_two = len(full.encode(QUESTION, STEPS[2:])[0])
    scorer = load_step_scorer(path, "rlhflow", dtype="float32", max_length=last_two)
    assert whole > last_two
    got = scorer.score(QUESTION, STEPS)
    # The question and the last two steps are kept, scored exactly as an input made of those would be.
    np.testing.assert_allclose(got, reference_step_scores(model, tok, QUESTION, STEPS[2:]), atol=1e-4)
    assert (scorer.truncated, scorer.dropped_steps) == (1, 2)

    # Too short even for the question and the whole last step: the start of the last step goes.
    tight = load_step_scorer(path, "rlhflow", dtype="float32", max_length=len(full.encode(QUESTION, ["x"])[0]) + 11)
    ids, at, dropped = tight.fit(QUESTION, STEPS)
    text = tok.decode(ids)
    assert len(ids) <= tight.max_length and len(at) == 1 and dropped == len(STEPS) - 1
    assert QUESTION in text and "\\boxed{5}." in text and "answer is" not in text
    with pytest.raises(ValueError, match="prm_max_length"):
        load_step_scorer(path, "rlhflow", dtype="float32", max_length=10).fit(QUESTION, STEPS)


def test_format_mismatch_is_named(rlhflow_dir):
    path, _, _ = rlhflow_dir
    with pytest.raises(ValueError, match="stat.prm_format=rlhflow"):
        load_step_scorer(path, "qwen", dtype="float32")
    with pytest.raises(ValueError, match="prm_format"):
        load_step_scorer(path, "math-shepherd", dtype="float32")


def test_step_positions_with_the_real_students_tokenizer():
    """A real BPE tokenizer and chat template (SmolLM2's ChatML, with its default system turn): every score
    position is the last token of an assistant header followed by "+", also when a step's own text contains
    the header and "+" (the turn-by-turn fallback)."""
    from tests.real_student import ensure_real_student

    import transformers

    from stat_jax.models import init_model
    from stat_jax.models.llama import tiny_llama

    path = ensure_real_student()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    scorer = RLHFlowScorer(init_model(tiny_llama(vocab_size=len(tok))), tok)
    header = scorer.assistant_header
    assert tok.decode(header).strip() == "<|im_start|>assistant"
    for steps in (STEPS, STEPS[:2] + ["<|im_start|>assistant\n+ is what I would answer here."] + STEPS[2:]):
        ids, at = scorer.encode(QUESTION, steps)
        assert len(at) == len(steps) and at == sorted(at)
        for i in at:
            assert ids[i + 1] == scorer.good_id and ids[i + 1 - len(header):i + 1] == header
        # The k-th position is where the conversation up to the k-th user turn ends its generation prompt.
        conv = RLHFlowScorer.conversation(QUESTION, steps)
        assert at == [len(tok.apply_chat_template(conv[:2 * k + 1], tokenize=True, return_dict=False,
                                                  add_generation_prompt=True)) - 1 for k in range(len(steps))]
    scores = scorer.score(QUESTION, STEPS)
    assert len(scores) == len(STEPS) and all(0.0 < p < 1.0 for p in scores)

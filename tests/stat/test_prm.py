"""The Qwen2.5-Math-PRM format on the Qwen2 port vs a torch reference on a tiny random checkpoint; the paper's
hard rule by hand.

transformers ships no `Qwen2ForProcessRewardModel` (it is remote code on the hub), so the reference is built
from `transformers.Qwen2Model` plus the same torch head, Sequential(Linear, ReLU, Linear), saved with the
Qwen2.5-Math-PRM tensor names (`model.*`, `score.0.*`, `score.2.*`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.models.prm import STEP_SEPARATOR, QwenScorer, is_hard_by_step_scores, load_step_scorer, split_steps


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("prm")
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [STEP_SEPARATOR]})
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok) + (-len(tok)) % 8, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=False)
    backbone = transformers.Qwen2Model(cfg).eval()
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).eval()
    with torch.no_grad():
        for name, p in backbone.named_parameters():  # non-trivial norms and biases
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
        head[0].weight.mul_(3.0)  # spread the step probabilities so the comparison means something
    tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors |= {f"score.{k}": v.contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict() | {"architectures": ["Qwen2ForProcessRewardModel"], "model_type": "qwen2"}
    (path / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(path)
    return path, backbone, head, tok


def torch_step_probs(backbone, head, ids, sep_id):
    with torch.no_grad():
        hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state
        probs = torch.softmax(head(hidden), dim=-1)[0, :, 1].numpy()
    return [float(probs[j]) for j, t in enumerate(ids) if t == sep_id]


PAIRS = [("What is 2+3?", "2+3 = 5.\n\nSo the answer is \\boxed{5}."),
         ("Compute 7*6.", "7*6 = 40.\n\nCheck: 40/6 is not 7.\n\nAnswer: \\boxed{40}"),
         ("Solve x+1=2.", "x = 1 \\boxed{1}")]


def test_qwen_step_probabilities_match_torch(prm_dir):
    path, backbone, head, tok = prm_dir
    prm = load_step_scorer(path, "qwen", dtype="float32", max_length=512, batch_size=4)
    assert isinstance(prm, QwenScorer)
    items = [(q, split_steps(r)) for q, r in PAIRS]
    ours = prm.score_many(items)  # one padded batch of ragged lengths
    for (q, steps), got in zip(items, ours):
        want = torch_step_probs(backbone, head, prm.encode(q, steps)[0], prm.separator_id)
        assert len(got) == len(want) == len(steps)
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert [len(s) for s in ours] == [2, 3, 1]
    np.testing.assert_allclose(prm.score(*items[1]), ours[1], atol=1e-5)  # another batch composition
    flat = [p for s in ours for p in s]
    # Unsaturated and distinct per step, so a wrong position or a wrong head would show.
    assert 1e-3 < min(flat) and max(flat) < 1 - 1e-3 and len({round(p, 6) for p in flat}) == len(flat)


def test_qwen_sharded_bfloat16(prm_dir):
    from stat_jax import sharding

    path, backbone, head, tok = prm_dir
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    prm = load_step_scorer(path, "qwen", mesh=mesh, dtype="bfloat16", max_length=512, batch_size=4)
    up = prm._state["layers"][0]["mlp"]["up_proj"][...]
    assert up.dtype == np.dtype("bfloat16") and tuple(up.sharding.spec) == ("fsdp", "tensor")
    q, steps = PAIRS[1][0], split_steps(PAIRS[1][1])
    want = torch_step_probs(backbone, head, prm.encode(q, steps)[0], prm.separator_id)
    np.testing.assert_allclose(prm.score(q, steps), want, atol=0.05)


def test_qwen_truncation_keeps_the_last_step(prm_dir):
    path, backbone, head, tok = prm_dir
    q, steps = PAIRS[1][0], split_steps(PAIRS[1][1])
    full = load_step_scorer(path, "qwen", dtype="float32", max_length=512)
    short = load_step_scorer(path, "qwen", dtype="float32", max_length=len(full.encode(q, steps[1:])[0]))
    got = short.score(q, steps)
    assert len(got) == 2 and (short.truncated, short.dropped_steps) == (1, 1)
    kept_ids = short.encode(q, steps[1:])[0]
    assert "boxed{40}" in tok.decode(kept_ids) and "7*6 = 40." not in tok.decode(kept_ids)
    np.testing.assert_allclose(got, torch_step_probs(backbone, head, kept_ids, short.separator_id), atol=1e-4)


def test_paper_hard_rule_by_hand():
    # Defaults: bad if last <= 0.85, or mean <= 0.85, or any earlier step <= 0.7.
    assert not is_hard_by_step_scores([0.9, 0.95, 0.9])  # last 0.9, mean 0.917, earlier >= 0.9
    assert is_hard_by_step_scores([0.99, 0.99, 0.85])  # the last step exactly at 0.85
    assert not is_hard_by_step_scores([0.99, 0.99, 0.86])  # mean 0.947
    assert is_hard_by_step_scores([0.72, 0.88, 0.9])  # by the mean only: 2.5 / 3 = 0.833
    assert not is_hard_by_step_scores([0.71, 0.99, 0.99])  # mean 0.897, earliest 0.71 > 0.7
    assert is_hard_by_step_scores([0.70, 0.99, 0.99])  # by an earlier step only (mean 0.893, last 0.99)
    assert is_hard_by_step_scores([0.8]) and not is_hard_by_step_scores([0.95])  # one step: last = mean
    # The last step is not an "earlier" one: 0.6 passes last <= 0.5 and mean (0.75) <= 0.5, and is not held to 0.7.
    assert not is_hard_by_step_scores([0.9, 0.6], last=0.5, mean=0.5, earlier=0.7)
    assert is_hard_by_step_scores([0.6, 0.9], last=0.5, mean=0.5, earlier=0.7)
    assert is_hard_by_step_scores([0.9, 0.9], last=0.95)  # thresholds come from the arguments (config)
    with pytest.raises(ValueError, match="no step scores"):
        is_hard_by_step_scores([])


def test_hard_stage_flags_responses_by_the_paper_rule(tmp_path):
    from stat_jax.config import load_config_file
    from stat_jax.stat import io
    from stat_jax.stat.pipeline import StageContext, stage_hard
    from tests.models.test_prm_formats import reference_step_scores, save_rlhflow_checkpoint

    prm_path = tmp_path / "prm"
    model, tok = save_rlhflow_checkpoint(prm_path)
    questions = {f"q{i}": f"What is {i}+{i + 1}?" for i in range(4)}
    responses = {"q0": "0+1 = 1.\n\nSo \\boxed{1}.", "q1": "1+2 = 4.\n\nNo: 1+2 = 3.\n\nSo \\boxed{3}.",
                 "q2": "2+3 = 5.", "q3": "3+4 = 8.\n\nCheck: 8-4 = 4, not 3.\n\nSo 3+4 = 7.\n\nAnswer \\boxed{7}."}
    run_dir = tmp_path / "run"
    io.write_jsonl(run_dir / "data/heldout.jsonl",
                   [{"id": k, "problem": q, "answer": "?"} for k, q in questions.items()])
    io.write_jsonl(run_dir / "rollout/responses.jsonl", [{"id": k, "prompt": q, "responses": [responses[k]],
                                                          "finish_reasons": ["stop"]} for k, q in questions.items()])
    c = load_config_file("configs/base.py")
    c.stat.scorer, c.stat.prm_path, c.stat.prm_format, c.stat.prm_dtype = "prm", str(prm_path), "rlhflow", "float32"
    assert c.stat.prm_rule == "paper"
    kept = {k: split_steps(r) for k, r in responses.items()}
    # q3 is longer than the PRM input: its first step goes, the last three are scored.
    full = load_step_scorer(prm_path, "rlhflow", dtype="float32")
    c.stat.prm_max_length = len(full.encode(questions["q3"], kept["q3"][1:])[0])
    assert all(len(full.encode(questions[k], kept[k])[0]) <= c.stat.prm_max_length for k in ("q0", "q1", "q2"))
    kept["q3"] = kept["q3"][1:]
    ref = {k: reference_step_scores(model, tok, questions[k], kept[k]) for k in questions}
    # Thresholds from the scores themselves so that the rule flags some questions and passes others.
    c.stat.prm_last_step_threshold = sorted(s[-1] for s in ref.values())[1]
    c.stat.prm_mean_threshold, c.stat.prm_earlier_step_threshold = 0.0, 0.0
    want_hard = {k for k, s in ref.items() if is_hard_by_step_scores(s, last=c.stat.prm_last_step_threshold,
                                                                    mean=0.0, earlier=0.0)}
    assert 0 < len(want_hard) < len(questions)

    stats = stage_hard(StageContext(c, run_dir))
    hard = io.read_jsonl(run_dir / "hard/hard.jsonl")
    assert {r["id"] for r in hard} == want_hard
    scores = {r["id"]: r["scores"] for r in io.read_jsonl(run_dir / "hard/scores.jsonl")}
    assert scores == {k: [0.0 if k in want_hard else 1.0] for k in questions}
    assert (stats["prm_format"], stats["prm_rule"], stats["truncated"], stats["truncated_steps_dropped"]) == \
        ("rlhflow", "paper", 1, 1)

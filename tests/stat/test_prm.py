"""PRM head on the Qwen2 port vs a torch reference on a tiny random checkpoint.

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
from stat_jax.models.prm import STEP_SEPARATOR, ProcessRewardModel, aggregate_steps


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


def test_prm_step_probabilities_match_torch(prm_dir):
    path, backbone, head, tok = prm_dir
    prm = ProcessRewardModel.from_pretrained(path, aggregate="min", max_length=512)
    pairs = [("What is 2+3?", "2+3 = 5.\n\nSo the answer is \\boxed{5}."),
             ("Compute 7*6.", "7*6 = 40.\n\nCheck: 40/6 is not 7.\n\nAnswer: \\boxed{40}"),
             ("Solve x+1=2.", "x = 1 \\boxed{1}")]
    ids = [prm.tokenizer(prm.render(q, r), add_special_tokens=False)["input_ids"] for q, r in pairs]
    ours = prm.step_scores(ids)  # one padded batch of ragged lengths
    for seq, got in zip(ids, ours):
        want = torch_step_probs(backbone, head, seq, prm.separator_id)
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [len(s) for s in ours] == [2, 3, 1]
    mins = prm.score_responses(pairs, batch_size=2)
    np.testing.assert_allclose(mins, [min(s) for s in ours], atol=1e-5)  # other batch composition
    prm.aggregate = "product"
    np.testing.assert_allclose(prm.score_responses(pairs), [np.prod(s) for s in ours], atol=1e-5)
    flat = [p for s in ours for p in s]
    # Unsaturated and distinct per step, so a wrong position or a wrong head would show.
    assert 1e-3 < min(flat) and max(flat) < 1 - 1e-3 and len({round(p, 6) for p in flat}) == len(flat)


def test_aggregate_steps():
    assert aggregate_steps([0.9, 0.5, 0.8], "min") == 0.5
    assert aggregate_steps([0.9, 0.5, 0.8], "product") == pytest.approx(0.36)
    assert aggregate_steps([], "min") == 1.0
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_steps([0.5], "mean")

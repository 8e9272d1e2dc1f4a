"""Stop tokens = tokenizer EOS ∪ config.json ∪ generation_config.json EOS ids ∪ the chat template's end of turn,
with the real Llama-3.x and Qwen2.5 templates (tests/templates/chat_templates.py), and every consumer uses them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.*` imports under --import-mode=importlib

from stat_jax.data.records import SFTExample  # noqa: E402
from stat_jax.data.sft_data import SFTDataError, tokenize_examples  # noqa: E402
from stat_jax.data.stop_tokens import end_token_id, stop_token_ids, template_end_of_turn_id  # noqa: E402
from stat_jax.models.config import ModelConfig, generation_eos_ids  # noqa: E402
from tests.templates.chat_templates import ids, llama3_tokenizer, qwen2_5_tokenizer, save_student_files  # noqa: E402

RESPONSE = "We add: 1 + 1 = 2.\n\nThe answer is $\\boxed{2}$."


def _load(path: Path):
    """Tokenizer and model config exactly as the package loads a student directory."""
    return transformers.AutoTokenizer.from_pretrained(str(path)), ModelConfig.from_hf_dir(path)


def test_template_end_of_turn_is_found_by_rendering_not_by_name():
    llama, qwen = llama3_tokenizer(instruct=False), qwen2_5_tokenizer(instruct=False)
    assert template_end_of_turn_id(llama) == ids(llama, "<|eot_id|>")[0]
    assert template_end_of_turn_id(qwen) == ids(qwen, "<|im_end|>")[0]
    # A template that ends turns with a plain newline has no end-of-turn token.
    plain = qwen2_5_tokenizer()
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert template_end_of_turn_id(plain) is None
    assert stop_token_ids(plain) == ids(plain, "<|endoftext|>")


def test_qwen2_5_base_stops_at_im_end_which_no_config_file_lists(tmp_path):
    """The paper's third student: eos <|endoftext|> everywhere, but its template ends turns with <|im_end|>."""
    tok = qwen2_5_tokenizer(instruct=False)
    (endoftext,), (im_end,) = ids(tok, "<|endoftext|>"), ids(tok, "<|im_end|>")
    d = save_student_files(tmp_path, tok, config_eos=endoftext, generation_eos=endoftext, architecture="qwen2")
    tok, cfg = _load(d)
    assert cfg.eos_token_ids == (endoftext,) and tok.eos_token_id == endoftext
    assert stop_token_ids(tok, cfg.eos_token_ids) == (im_end, endoftext)
    assert end_token_id(tok, cfg.eos_token_ids) == im_end


def test_qwen2_5_instruct_generation_config_adds_endoftext(tmp_path):
    """Qwen2.5-Instruct: config.json says 151645 (<|im_end|>), generation_config.json [151645, 151643]."""
    tok = qwen2_5_tokenizer(instruct=True)
    (endoftext,), (im_end,) = ids(tok, "<|endoftext|>"), ids(tok, "<|im_end|>")
    d = save_student_files(tmp_path, tok, config_eos=im_end, generation_eos=[im_end, endoftext],
                           architecture="qwen2")
    tok, cfg = _load(d)
    assert generation_eos_ids(d) == (im_end, endoftext)
    assert cfg.eos_token_ids == (im_end, endoftext)  # config.json's first, then generation_config.json's
    assert stop_token_ids(tok, cfg.eos_token_ids) == (im_end, endoftext)
    # Without generation_config.json the <|endoftext|> id comes from nowhere: the file is what adds it.
    (d / "generation_config.json").unlink()
    tok, cfg = _load(d)
    assert stop_token_ids(tok, cfg.eos_token_ids) == (im_end,)


@pytest.mark.parametrize("instruct", [False, True])
def test_llama3_stop_ids(tmp_path, instruct):
    tok = llama3_tokenizer(instruct=instruct)
    end_of_text, eom, eot = ids(tok, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    # Released files: base Llama-3.2-1B lists only <|end_of_text|>; Instruct lists all three in both files.
    eos = [end_of_text, eom, eot] if instruct else end_of_text
    d = save_student_files(tmp_path, tok, config_eos=eos, generation_eos=eos)
    tok, cfg = _load(d)
    stops = stop_token_ids(tok, cfg.eos_token_ids)
    assert stops[0] == eot  # the template's end of turn first: the end token SFT appends and GRPO scores
    assert set(stops) == ({end_of_text, eom, eot} if instruct else {end_of_text, eot})


def test_generation_config_errors_name_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be an int"):
        generation_eos_ids(tmp_path)
    (tmp_path / "generation_config.json").write_text("{nope")
    with pytest.raises(ValueError, match="generation_config.json: not a JSON object"):
        generation_eos_ids(tmp_path)
    assert generation_eos_ids(tmp_path / "absent") == ()


def test_no_stop_token_anywhere_is_an_error():
    tok = qwen2_5_tokenizer()
    tok.chat_template = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="no stop token anywhere"):
        stop_token_ids(tok, ())
    with pytest.raises(SFTDataError, match="no stop token anywhere"):
        tokenize_examples(tok, [SFTExample(response="x", prompt="y")])


@pytest.mark.parametrize("family", ["llama3_base", "qwen2_5_base"])
def test_sft_response_ends_with_the_templates_end_of_turn(family):
    """Masked tokens decode to exactly the response + the end-of-turn token the template wrote (not an EOS the
    template never writes, not the template's trailing newline)."""
    tok = llama3_tokenizer(instruct=False) if family == "llama3_base" else qwen2_5_tokenizer(instruct=False)
    end = "<|eot_id|>" if family == "llama3_base" else "<|im_end|>"
    data = tokenize_examples(tok, [SFTExample(response=RESPONSE, prompt="What is 1 + 1?")],
                             ids(tok, "<|end_of_text|>" if family == "llama3_base" else "<|endoftext|>"))
    token_ids, mask = data.ids[0], data.loss_mask[0]
    assert tok.decode(token_ids[mask].tolist()) == RESPONSE + end
    assert int(token_ids[-1]) == ids(tok, end)[0]
    # Everything before the mask is the generation prompt, byte for byte.
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 1?"}], tokenize=False,
                                     add_generation_prompt=True, date_string="26 Jul 2024")
    assert tok.decode(token_ids[~mask].tolist()) == prompt
    assert np.all(mask[np.argmax(mask):])  # one contiguous masked tail


def test_rollout_backends_stop_at_the_union(tmp_path):
    """The in-process JetStream backend (rollouts, eval, GRPO) and `stat-jax serve`'s engine get the union."""
    from stat_jax.config import load_config_file
    from stat_jax.models import export_hf_checkpoint, init_model, load_hf_checkpoint
    from stat_jax.models.qwen import tiny_qwen2
    from stat_jax.rollout.factory import make_rollout_backend
    from stat_jax.rollout.factory import build_engine

    tok = qwen2_5_tokenizer(instruct=True)
    (endoftext,), (im_end,) = ids(tok, "<|endoftext|>"), ids(tok, "<|im_end|>")
    d = save_student_files(tmp_path, tok, config_eos=endoftext, generation_eos=[endoftext], architecture="qwen2")
    tok.eos_token = "<|endoftext|>"  # base-model tokenizer: EOS is not the template's end of turn
    export_hf_checkpoint(init_model(tiny_qwen2(vocab_size=len(tok), eos_token_ids=(endoftext,)), seed=0), d)
    model = load_hf_checkpoint(d)
    config = load_config_file("configs/base.py")
    config.rollout.update(max_concurrent_decodes=2, max_prefill_length=16, max_target_length=32)
    with make_rollout_backend(config, model, tok) as backend:
        assert backend.engine.tokenizer.stop_tokens == {im_end, endoftext}
    assert build_engine(config, model, tok).tokenizer.stop_tokens == {im_end, endoftext}

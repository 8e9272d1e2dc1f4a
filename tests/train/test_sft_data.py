"""SFT data: response-only loss masks from the chat template, packing, deterministic resumable batches."""

import json

import numpy as np
import pytest

from stat_jax.data import sft_data
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.records import SFTExample


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_loss_mask_covers_response_and_eos_only(tok):
    ex = SFTExample(prompt="rev abc", response="cba")
    data = sft_data.tokenize_examples(tok, [ex])
    ids, mask = data.ids[0], data.loss_mask[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": "rev abc"}], tokenize=False,
                                     add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    expected_response = tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # The template's "\n" after the EOS is not part of the example at all.
    assert ids.tolist() == prompt_ids + expected_response
    assert mask.tolist() == [False] * len(prompt_ids) + [True] * len(expected_response)


def test_messages_records_use_all_turns(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    data = sft_data.tokenize_examples(tok, [SFTExample(messages=msgs, response="yo")])
    text = tok.decode(data.ids[0][~data.loss_mask[0]])
    assert "be brief" in text and "hi" in text and text.endswith("<|assistant|>\n")
    assert tok.decode(data.ids[0][data.loss_mask[0]]) == "yo<|end|>"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q"}', "'response' must be a non-empty string"),
    ('{"prompt": "q", "messages": [], "response": "a"}', "exactly one of 'prompt'"),
    ('{"messages": [{"role": "user"}], "response": "a"}', "messages[0]"),
    ('{"prompt": "q", "response": "a"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(sft_data.SFTDataError) as err:
        sft_data.load_sft_examples([path])
    assert f"{path}:3" in str(err.value) and message in str(err.value)


def test_json_list_and_datasets_dir(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    got = sft_data.load_sft_examples([tmp_path / "a.json"], dataset=str(tmp_path / "ds"))
    assert [e.prompt for e in got] == ["q0", "q1", "q2"] * 2
    with pytest.raises(sft_data.SFTDataError, match="not found"):
        sft_data.load_sft_examples([tmp_path / "missing.jsonl"])


def _toy_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for i in range(n):
        length = int(rng.integers(3, 12))
        ids.append(np.arange(length, dtype=np.int32) + 10 * i)
        mask = np.zeros(length, bool)
        mask[length // 2:] = True
        masks.append(mask)
    return sft_data.TokenizedExamples(ids, masks)


def test_packed_rows_keep_examples_separate():
    data = _toy_data()
    batches = sft_data.SFTBatches(data, batch_size=4, seq_len=24, seed=0)
    b = next(batches)
    seen = 0
    for r in range(4):
        for seg in range(1, b["segment_ids"][r].max() + 1):
            sel = b["segment_ids"][r] == seg
            tokens, targets, pos = b["tokens"][r][sel], b["targets"][r][sel], b["positions"][r][sel]
            assert pos.tolist() == list(range(len(tokens)))  # positions restart per example
            assert targets.tolist() == (tokens + 1).tolist()  # next token within the same example
            seen += 1
        pad = b["segment_ids"][r] == 0
        assert not b["weights"][r][pad].any()
    assert seen > 4  # several examples per row: packing happened


def test_iterator_is_deterministic_and_resumes():
    data = _toy_data()
    a = sft_data.SFTBatches(data, batch_size=2, seq_len=24, seed=3)
    first = [next(a) for _ in range(5)]
    state = a.state()
    rest = [next(a) for _ in range(30)]  # crosses epoch boundaries
    assert a.epoch >= 1
    b = sft_data.SFTBatches(data, batch_size=2, seq_len=24, seed=3)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, [next(b) for _ in range(5)]))
    c = sft_data.SFTBatches(data, batch_size=2, seq_len=24, seed=3)
    c.restore(json.loads(json.dumps(state)))
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(rest, [next(c) for _ in range(30)]))
    other_seed = sft_data.SFTBatches(data, batch_size=2, seq_len=24, seed=4)
    assert not np.array_equal(next(other_seed)["tokens"], first[0]["tokens"])
    with pytest.raises(sft_data.SFTDataError, match="different SFT data"):
        sft_data.SFTBatches(_toy_data(seed=1), batch_size=2, seq_len=24, seed=3).restore(state)


def test_too_long_examples_are_dropped_not_truncated():
    data = _toy_data()
    kept, dropped = sft_data.drop_too_long(data, seq_len=6)
    assert dropped == sum(len(x) > 7 for x in data.ids) and all(len(x) <= 7 for x in kept.ids)

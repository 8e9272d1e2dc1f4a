"""The SFT trainer: masked loss by hand, accumulation equivalence, learning, kill -9 / SIGTERM / mesh-change resume."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
from flax import nnx

from stat_jax import cli
from stat_jax.config import build_config
from stat_jax.data import sft_data
from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.records import SFTExample
from stat_jax.models import init_model, load_hf_checkpoint
from stat_jax.models.llama import tiny_llama
from stat_jax.train import loop, sft
from stat_jax.train.metrics import read_metrics
from tests.train.sft_fixtures import reverse_examples, sft_cli, sft_overrides, sft_run_setup, start_and_wait

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 24, 4


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tok):
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                     head_dim=8, eos_token_ids=(tok.eos_token_id,))
    return init_model(cfg, seed=1)


def _row_batch(tok, examples, *, batch_size, seq_len, packing, micro=1):
    data = sft_data.tokenize_examples(tok, [SFTExample(**e) for e in examples])
    host = next(sft_data.SFTBatches(data, batch_size=batch_size, seq_len=seq_len, seed=0, packing=packing))
    return data, {k: v.reshape(micro, batch_size // micro, seq_len) for k, v in host.items()}


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_masked_loss_of_a_packed_row_matches_hand_computation(tok, tiny_model):
    examples = [{"prompt": "rev abcd", "response": "dcba"}, {"prompt": "rev ab", "response": "ba"}]
    data, batch = _row_batch(tok, examples, batch_size=1, seq_len=64, packing=True)
    assert batch["segment_ids"].max() == 2  # both examples share one row
    graphdef, params = nnx.split(tiny_model)
    loss, _, tokens = sft.accumulated_gradients(nnx.to_pure_dict(params), graphdef, batch)

    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    total, count = 0.0, 0
    for ids, mask in zip(data.ids, data.loss_mask):  # each example alone, unpacked, in float64
        logp = _log_softmax(forward(params, ids[None, :-1])[0])
        for j in range(len(ids) - 1):
            if mask[j + 1]:  # the target token is a response token (or the closing EOS)
                total -= logp[j, ids[j + 1]]
                count += 1
    assert count == len("dcba") + 1 + len("ba") + 1 == int(tokens)
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_grad_accumulation_equals_one_large_batch(tok, tiny_model):
    examples = reverse_examples(8, seed=3, min_len=2, max_len=9)
    _, big = _row_batch(tok, examples, batch_size=8, seq_len=32, packing=False, micro=1)
    _, small = _row_batch(tok, examples, batch_size=8, seq_len=32, packing=False, micro=4)
    per_micro = small["weights"].sum(axis=(1, 2))
    assert len(set(per_micro.tolist())) > 1  # unequal token counts: a mean of micro-batch means would differ
    graphdef, params = nnx.split(tiny_model)
    params = nnx.to_pure_dict(params)
    loss1, grads1, tokens1 = jax.jit(sft.accumulated_gradients, static_argnums=1)(params, graphdef, big)
    loss4, grads4, tokens4 = jax.jit(sft.accumulated_gradients, static_argnums=1)(params, graphdef, small)
    assert float(tokens1) == float(tokens4)
    np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-6)
    for g1, g4 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads4)):
        np.testing.assert_allclose(np.asarray(g4), np.asarray(g1), rtol=1e-4, atol=1e-7)


# ----- whole runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sft_run_setup(tmp_path_factory.mktemp("sft"), 240)


def _overrides(student, data, workdir, **extra):
    return sft_overrides(student, data, workdir, steps=STEPS, every=EVERY, **extra)


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run on the default mesh (8-way fsdp)."""
    root, student, data = setup
    config = build_config(str(REPO / "configs/sft_tiny.py"), _overrides(student, data, root / "reference"))
    result = sft.train_sft(config)
    return result, read_metrics(result["metrics_path"])


def _curve(rows, first_step=1):
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in rows if r["step"] >= first_step}


def test_loss_decreases_and_export_loads(reference):
    result, rows = reference
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.6 * first, (first, last)
    assert all(r["tokens_per_s"] > 0 and r["loss_tokens"] > 0 for r in rows)
    export = Path(result["export_dir"])
    assert (export / "tokenizer.json").exists() and (export / "config.json").exists()
    model = load_hf_checkpoint(export)
    assert model.config.vocab_size == len(build_char_tokenizer())


def _cli(student, data, workdir, *flags):
    return sft_cli(_overrides(student, data, workdir), *flags)


def test_kill9_then_resume_reproduces_the_uninterrupted_run(setup, reference, tmp_path):
    root, student, data = setup
    workdir = tmp_path / "run"
    proc = start_and_wait(_cli(student, data, workdir), workdir, min_step=EVERY + 1, need_checkpoint=EVERY)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    killed_at = read_metrics(workdir / "metrics.jsonl")[-1]["step"]
    assert killed_at < STEPS and not (workdir / "sft_result.json").exists()

    done = subprocess.run(_cli(student, data, workdir, "--resume"), cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # replayed steps are not duplicated
    got, want = _curve(rows), _curve(reference[1])
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")


def test_sigterm_saves_a_checkpoint_and_exits(setup, tmp_path):
    root, student, data = setup
    workdir = tmp_path / "run"
    proc = start_and_wait(_cli(student, data, workdir), workdir, min_step=2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == loop.PREEMPTED_STATUS, out[-3000:]
    last = read_metrics(workdir / "metrics.jsonl")[-1]["step"]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert last < STEPS and steps[-1] == last  # the checkpoint is the step the signal stopped at
    assert not (workdir / "sft_result.json").exists()


def test_resume_onto_a_different_mesh(setup, reference, tmp_path):
    root, student, data = setup
    workdir = tmp_path / "run"
    shutil.copytree(Path(reference[0]["checkpoint_dir"]).parent, workdir)
    resume_from = STEPS - 2 * EVERY
    for step in range(resume_from + 1, STEPS + 1):
        shutil.rmtree(workdir / "checkpoints" / str(step), ignore_errors=True)
    (workdir / "sft_result.json").unlink()
    overrides = _overrides(student, data, workdir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    config = build_config(str(REPO / "configs/sft_tiny.py"), overrides)
    result = sft.train_sft(config, resume=True)
    assert result["steps"] == STEPS
    got, want = _curve(read_metrics(result["metrics_path"]), resume_from + 1), _curve(reference[1], resume_from + 1)
    assert sorted(got) == list(range(resume_from + 1, STEPS + 1))
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-4, err_msg=f"step {step}")


def test_resume_reuses_a_run_only_over_the_same_rows(setup, reference, tmp_path):
    """The data file keeps its path and loses a row: the finished run is neither returned nor continued."""
    root, student, data = setup
    workdir, rows_file = tmp_path / "run", tmp_path / "train.jsonl"
    shutil.copytree(Path(reference[0]["checkpoint_dir"]).parent, workdir)
    shutil.copy(data, rows_file)
    config = build_config(str(REPO / "configs/sft_tiny.py"), _overrides(student, rows_file, workdir))
    # The same rows under another path: the checkpoints continue (nothing is left to train).
    assert sft.train_sft(config, resume=True)["steps"] == STEPS
    saved = json.loads((workdir / "sft_result.json").read_text())
    assert sft.train_sft(config, resume=True) == saved  # nothing changed: the finished run is reused
    lines = rows_file.read_text().splitlines()
    rows_file.write_text("\n".join(lines[1:]) + "\n")
    # Refused from the checkpoint's meta, before the step is compiled or a weight is read.
    with mock.patch.object(sft, "fit_train_step", side_effect=AssertionError("compiled before refusing")), \
            pytest.raises(sft.loop.ChangedDataError, match="trained on other rows") as caught:
        sft.train_sft(config, resume=True)
    assert "new workdir" in caught.value.hint
    assert json.loads((workdir / "sft_result.json").read_text()) == saved  # left as it was


def test_rows_hash_follows_every_row_and_their_order():
    rows = [SFTExample(prompt="rev ab", response="ba"), SFTExample(prompt="rev abc", response="cba")]
    same = [SFTExample(prompt="rev ab", response="ba"), SFTExample(prompt="rev abc", response="cba")]
    assert sft.loop.rows_hash(rows) == sft.loop.rows_hash(same)
    assert sft.loop.rows_hash(rows) != sft.loop.rows_hash(rows[::-1])
    assert sft.loop.rows_hash(rows) != sft.loop.rows_hash([rows[0], SFTExample(prompt="rev abc", response="cbb")])
    assert sft.loop.rows_hash([{"problem": "1+1", "answer": "2"}]) != sft.loop.rows_hash([{"problem": "1+1",
                                                                                           "answer": "3"}])


def test_bad_config_fails_fast(capsys, setup):
    root, student, data = setup
    assert cli.main(["sft", "--config=configs/sft_tiny.py", "--config.train.learnin_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "learnin_rate" in err and "learning_rate" in err
    assert cli.main(["sft", "--config=configs/sft_tiny.py", "--config.train.steps=ten"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    config = build_config(str(REPO / "configs/sft_tiny.py"),
                          _overrides(student, data, root / "bad", **{"train.grad_accum_steps": 3}))
    with pytest.raises(ValueError, match="multiple of train.grad_accum_steps=3"):
        sft.train_sft(config)
    assert not (root / "bad").exists()  # nothing was started


def test_restart_without_resume_refuses_to_overwrite(setup, reference):
    root, student, data = setup
    config = build_config(str(REPO / "configs/sft_tiny.py"),
                          _overrides(student, data, Path(reference[0]["checkpoint_dir"]).parent))
    with pytest.raises(FileExistsError, match="--resume"):
        sft.train_sft(config)

"""A real user's files (issue 41): a copy of a small model directory broken in every way we could find ends
`stat-jax eval` in one line per problem, with the model (5) or tokenizer (6) exit status, before any weight is
loaded; none prints a traceback, and none goes on to evaluate a wrong model.

Each case runs the real command in-process (`stat_jax.cli.main`): the input checks stop it before it would load
anything, so a case costs milliseconds. A case the checks missed would go on to evaluate a tiny local benchmark,
which the `evaluated` assertion catches.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from stat_jax import cli, errors
from stat_jax.models.checkpoint import write_safetensors
from stat_jax.models.dir_check import expected_hf_tensors, model_dir_problems, safetensors_header

MODEL, TOKENIZER = errors.EXIT_MODEL, errors.EXIT_TOKENIZER


# ----- ways to break a file ------------------------------------------------------------------------------
def truncate(at: float | int):
    def apply(f: Path):
        size = f.stat().st_size
        keep = at if isinstance(at, int) else int(size * at)
        f.write_bytes(f.read_bytes()[:keep])
    return apply


def delete(f: Path):
    f.unlink()


def not_json(f: Path):
    f.write_text('{"looks like": json, but is not')


def edit_header(change):
    """Rewrites a safetensors header in place (same data bytes), after `change(header)`."""
    def apply(f: Path):
        header, start = safetensors_header(f)
        raw = f.read_bytes()
        meta = json.loads(raw[8:start]).get("__metadata__")
        change(header)
        blob = json.dumps({**({"__metadata__": meta} if meta else {}), **header}).encode()
        f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[start:])
    return apply


def swap_shapes(a: str, b: str):
    def change(h):
        h[a]["shape"], h[b]["shape"] = h[b]["shape"], h[a]["shape"]
    return edit_header(change)


def set_dtype(key: str, dtype: str):
    def change(h):
        h[key]["dtype"] = dtype
    return edit_header(change)


def drop_tensor(key: str):
    def apply(f: Path):
        from stat_jax.models.checkpoint import SafetensorsFile

        st = SafetensorsFile(f)
        tensors = {k: st.get(k).copy() for k in st.keys() if k != key}
        del st
        write_safetensors(f, tensors)
    return apply


def edit_config(**changes):
    def apply(f: Path):
        d = json.loads(f.read_text())
        d.update(changes)
        f.write_text(json.dumps(d))
    return apply


def index_moves(key: str):
    """The shard index names the wrong file for `key`."""
    def apply(f: Path):
        d = json.loads(f.read_text())
        files = sorted(set(d["weight_map"].values()))
        d["weight_map"][key] = next(x for x in files if x != d["weight_map"][key])
        f.write_text(json.dumps(d))
    return apply


def _first_shard(f: Path) -> str:
    return sorted(set(json.loads(f.read_text())["weight_map"].values()))[0]


def delete_first_shard(f: Path):
    (f.parent / _first_shard(f)).unlink()


def truncate_first_shard(f: Path):
    truncate(0.5)(f.parent / _first_shard(f))


L0 = "model.layers.0."
# (case id, file, how it breaks, expected exit status, a fragment of the message)
CASES = [
    *[(f"delete-{name}", name, delete, code, frag) for name, code, frag in (
        ("config.json", MODEL, "no config.json"), ("model.safetensors", MODEL, "no *.safetensors"),
        ("tokenizer.json", TOKENIZER, "holds no tokenizer"), ("chat_template.jinja", TOKENIZER, "no chat template"))],
    *[(f"truncate-model-{at}", "model.safetensors", truncate(at), MODEL, frag) for at, frag in (
        (0, "too short"), (7, "too short"), (20, "cut short"), (0.5, "cut short"), (0.999, "cut short"))],
    *[(f"truncate-{name}-{at}", name, truncate(at), code, "not valid JSON") for name, code in (
        ("config.json", MODEL), ("tokenizer.json", TOKENIZER), ("tokenizer_config.json", TOKENIZER))
      for at in (0, 0.3, 0.9)],
    *[(f"truncate-chat_template-{at}", "chat_template.jinja", truncate(at), TOKENIZER, frag)
      for at, frag in ((0, "no chat template"), (0.5, "does not render"))],
    *[(f"not-json-{name}", name, not_json, code, "not valid JSON") for name, code in (
        ("config.json", MODEL), ("tokenizer.json", TOKENIZER), ("tokenizer_config.json", TOKENIZER))],
    ("header-garbage", "model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:8] + b"\xff" * 64
                                                                     + f.read_bytes()[72:]), MODEL, "corrupt"),
    ("swap-shapes", "model.safetensors", swap_shapes(L0 + "mlp.gate_proj.weight", L0 + "mlp.down_proj.weight"),
     MODEL, "wrong shape"),
    ("dtype-int", "model.safetensors", set_dtype(L0 + "mlp.up_proj.weight", "I32"), MODEL, "floating point"),
    ("dtype-half", "model.safetensors", set_dtype(L0 + "mlp.up_proj.weight", "F16"), MODEL, "needs"),
    ("missing-tensor", "model.safetensors", drop_tensor(L0 + "self_attn.k_proj.weight"), MODEL, "missing"),
    ("missing-lm-head", "model.safetensors", drop_tensor("lm_head.weight"), MODEL, "no lm_head.weight"),
    ("config-heads", "config.json", edit_config(hidden_size=66), MODEL, "not a multiple of num_attention_heads"),
    ("config-kv-heads", "config.json", edit_config(num_key_value_heads=3), MODEL, "num_key_value_heads=3"),
    ("config-head-dim", "config.json", edit_config(head_dim=15), MODEL, "head_dim=15"),
    ("config-vocab", "config.json", edit_config(vocab_size=200), MODEL, "vocab_size=200"),
    # the embeddings and the tokenizer both disagree: two kinds of problem, so the several-problems status
    ("config-small-vocab", "config.json", edit_config(vocab_size=50), errors.EXIT_INPUTS, "the tokenizer has 104"),
    ("config-tied", "config.json", edit_config(tie_word_embeddings=True), MODEL, "tie_word_embeddings=true"),
    ("config-layers", "config.json", edit_config(num_hidden_layers=3), MODEL, "missing"),
    ("config-eos", "config.json", edit_config(eos_token_id=500), MODEL, "outside the vocabulary"),
    ("config-string-size", "config.json", edit_config(hidden_size="64"), MODEL, "positive integers"),
    ("config-architecture", "config.json", edit_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     MODEL, "not supported"),
]
SHARDED_CASES = [
    ("delete-shard", "model.safetensors.index.json", delete_first_shard, MODEL, "missing"),
    ("truncate-shard", "model.safetensors.index.json", truncate_first_shard, MODEL, "cut short"),
    ("truncate-index", "model.safetensors.index.json", truncate(0.5), MODEL, "not a valid safetensors index"),
    ("index-wrong-file", "model.safetensors.index.json", index_moves("model.norm.weight"), MODEL,
     "not in their file"),
]


@pytest.fixture(scope="module")
def sharded(student, tmp_path_factory):
    """The student re-exported in several shards with an index."""
    from stat_jax.models import load_hf_checkpoint
    from stat_jax.models.checkpoint import export_hf_checkpoint

    path = tmp_path_factory.mktemp("sharded")
    export_hf_checkpoint(load_hf_checkpoint(student), path, tokenizer_source=student, max_shard_bytes=100_000)
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("bench") / "tiny.jsonl"
    f.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2", "unique_id": "q0"}) + "\n")
    return f


def _eval(model_dir: Path, benchmark: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    code = cli.main(["eval", "--config=configs/eval_tiny.py", f"--config.model.path={model_dir}",
                     f"--config.eval.paths.math500={benchmark}", f"--config.workdir={tmp_path / 'run'}",
                     "--config.eval.num_samples=0"])
    return code, capsys.readouterr().err


def _assert_one_line_per_problem(code: int, err: str, expected: int, fragment: str, tmp_path: Path) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert code == expected, f"exit {code}: {err[-2000:]}"
    lines = [line for line in err.strip().splitlines() if line.startswith(("stat-jax eval:", "  - "))]
    assert lines and lines[0].startswith("stat-jax eval: ") and " — " in lines[0], err[-2000:]
    assert fragment in err, (fragment, err[-2000:])
    assert not (tmp_path / "run" / "eval").exists(), "the command went on to evaluate the broken model"


@pytest.mark.parametrize("case,name,corrupt,expected,fragment", CASES, ids=[c[0] for c in CASES])
def test_a_broken_model_dir_is_one_line_per_problem_before_any_work(case, name, corrupt, expected, fragment,
                                                                      student, benchmark, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(student, broken)
    corrupt(broken / name)
    code, err = _eval(broken, benchmark, tmp_path, capsys)
    _assert_one_line_per_problem(code, err, expected, fragment, tmp_path)


@pytest.mark.parametrize("case,name,corrupt,expected,fragment", SHARDED_CASES, ids=[c[0] for c in SHARDED_CASES])
def test_a_broken_sharded_checkpoint_is_one_line(case, name, corrupt, expected, fragment, sharded, benchmark,
                                                  tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(sharded, broken)
    corrupt(broken / name)
    code, err = _eval(broken, benchmark, tmp_path, capsys)
    _assert_one_line_per_problem(code, err, expected, fragment, tmp_path)


def test_several_problems_are_listed_at_once_each_on_its_line(student, benchmark, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(student, broken)
    truncate(0.5)(broken / "model.safetensors")
    delete(broken / "chat_template.jinja")
    code, err = _eval(broken, benchmark, tmp_path, capsys)
    assert "Traceback" not in err and code == errors.EXIT_INPUTS, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-3].startswith("stat-jax eval: 2 problems") and "cut short" in lines[-2]
    assert "no chat template" in lines[-1]


def test_the_sound_directory_passes_and_the_expected_tensors_are_the_exported_ones(student, sharded):
    from stat_jax.models.config import ModelConfig

    assert model_dir_problems(student, chat_template=True) == []
    assert model_dir_problems(sharded, chat_template=True) == []
    header, _ = safetensors_header(student / "model.safetensors")
    expected = expected_hf_tensors(ModelConfig.from_hf_dir(student))
    assert {k: tuple(v["shape"]) for k, v in header.items()} == expected


def test_the_loader_refuses_a_truncated_file_with_the_same_error(student, tmp_path):
    """Code that loads without the command's checks (a stage, the library) gets the one-line error too."""
    from stat_jax.models import load_hf_checkpoint
    from stat_jax.models.dir_check import CorruptWeightsError

    broken = tmp_path / "model"
    shutil.copytree(student, broken)
    truncate(0.5)(broken / "model.safetensors")
    with pytest.raises(CorruptWeightsError, match="cut short"):
        load_hf_checkpoint(broken)

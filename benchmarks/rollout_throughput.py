"""Decode throughput: stat-jax's JetStream backend vs `transformers.generate` (torch) on the same weights.

One run, one JSON line: generated tokens/s for both, their ratio, and whether the greedy tokens agree.
A small random Llama (default hidden 256, 4 layers, vocab 8192) is exported to an HF directory, so both sides
load identical weights; prompts are ragged random token ids; decoding is greedy.

  .venv/bin/python benchmarks/rollout_throughput.py                          # 64 prompts x 256 new tokens
  .venv/bin/python benchmarks/rollout_throughput.py --new-tokens 64 --out runs/bench/rollout.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    p.add_argument("--slots", type=int, default=64, help="JetStream decode slots (rollout.max_concurrent_decodes)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--skip-hf", action="store_true", help="only stat-jax (e.g. large shapes on an accelerator)")
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def build_student(args, out_dir: Path):
    """A random Llama of the requested shape, exported to an HF dir with a matching char tokenizer."""
    from stat_jax.data.char_tokenizer import build_char_tokenizer
    from stat_jax.models import export_hf_checkpoint, init_model
    from stat_jax.models.llama import tiny_llama

    alphabet = "".join(chr(0x4E00 + i) for i in range(args.vocab - 7))  # one CJK character per id
    tok = build_char_tokenizer(alphabet)
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                     head_dim=args.hidden // args.heads, max_position_embeddings=4096, initializer_range=0.1)
    export_hf_checkpoint(init_model(cfg, seed=0), out_dir)
    tok.save_pretrained(out_dir)
    return tok, cfg


def ragged_prompts(args, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.prompt_len[0], args.prompt_len[1] + 1, size=args.prompts)
    return [[1] + rng.integers(7, vocab, size=n - 1).tolist() for n in lengths]  # BOS + ordinary tokens


def run_stat_jax(args, model_dir: Path, tok, prompts) -> dict:
    from stat_jax.models import load_hf_checkpoint
    from stat_jax.rollout.base import SamplingParams
    from stat_jax.rollout.engine import EngineSettings
    from stat_jax.rollout.inprocess import JetStreamBackend

    model = load_hf_checkpoint(model_dir, dtype=args.dtype, param_dtype=args.dtype)
    bucket = 16
    while bucket < args.prompt_len[1]:
        bucket *= 2
    settings = EngineSettings(max_concurrent_decodes=args.slots, max_prefill_length=bucket,
                              max_target_length=bucket + args.new_tokens + 8)
    sampling = SamplingParams(max_new_tokens=args.new_tokens)
    with JetStreamBackend(model, tok, settings) as backend:
        t0 = time.perf_counter()
        # Warm-up compiles every bucket the timed prompts use, and the generate step.
        backend.generate(prompts[: min(len(prompts), 8)], SamplingParams(max_new_tokens=4), progress=False)
        backend.generate([[1] * n for n in range(1, args.prompt_len[1] + 1, 8)], SamplingParams(max_new_tokens=2),
                         progress=False)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = backend.generate(prompts, sampling, progress=True)
        wall = time.perf_counter() - t0
        compiles = backend.compilation_counts()
    tokens = [row[0].token_ids for row in out]
    n = sum(map(len, tokens))
    return {"tokens": n, "wall_s": round(wall, 3), "tokens_per_s": round(n / wall, 1),
            "warmup_compile_s": round(compile_s, 2), "compilations": compiles}, tokens


def run_hf(args, model_dir: Path, tok, prompts) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF batched generation requires
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.generate(ids[:8], attention_mask=mask[:8], max_new_tokens=4, **kwargs)  # warm-up
        t0 = time.perf_counter()
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, **kwargs)
        wall = time.perf_counter() - t0
    tokens = []
    for row in gen[:, width:].tolist():
        tokens.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    n = sum(map(len, tokens))
    return {"tokens": n, "wall_s": round(wall, 3), "tokens_per_s": round(n / wall, 1),
            "torch_threads": torch.get_num_threads()}, tokens


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    from stat_jax.rollout.jetstream_compat import jetstream_info

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        tok, cfg = build_student(args, model_dir)
        prompts = ragged_prompts(args, cfg.vocab_size)
        ours, our_tokens = run_stat_jax(args, model_dir, tok, prompts)
        result = {
            "benchmark": "rollout_throughput",
            "config": {"prompts": args.prompts, "new_tokens": args.new_tokens, "prompt_len": list(args.prompt_len),
                       "slots": args.slots, "dtype": args.dtype, "hidden": args.hidden, "layers": args.layers,
                       "heads": args.heads, "kv_heads": args.kv_heads, "intermediate": args.intermediate,
                       "vocab": cfg.vocab_size, "params": cfg.num_params},
            "stat_jax_jetstream": ours,
            "machine": {"jax_backend": jax.default_backend(), "devices": len(jax.devices()),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(), **jetstream_info()},
        }
        if not args.skip_hf:
            hf, hf_tokens = run_hf(args, model_dir, tok, prompts)
            result["transformers_generate"] = hf
            result["speedup"] = round(ours["tokens_per_s"] / hf["tokens_per_s"], 2)
            result["greedy_sequences_identical"] = f"{sum(a == b for a, b in zip(our_tokens, hf_tokens))}/{len(prompts)}"
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()

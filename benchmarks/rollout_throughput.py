"""Decode throughput: stat-jax's in-process JetStream backend vs `transformers.generate` (torch), same weights.

One run, one JSON line. By default the real student (.cache/smollm2-135m-instruct, when it exists) on the first
64 GSM8K test questions (chat template with its default system prompt) x 256 new tokens, greedy, float32:
- stat-jax with the SHIPPED rollout settings (configs/base.py, auto slots and cache length resolved on this
  machine), and again with `max_target_length=512`: a decode step should cost the same at either cache length;
- `transformers.generate`, one batch, left padding, float32, in the same process;
- tokens/s, their ratio, whether the greedy token ids agree, time to first token, compile seconds (XLA's own
  compile-time events) and peak resident memory;
- `decode_floor`: tokens/s of a cache-free one-token forward at the shipped slot count (only the model's own
  products), the bound no decode engine on this machine can pass, and its ratio to transformers.
Without the real student (or with --model-path=random) a small random Llama is exported to an HF directory and
prompts are ragged random token ids.

  .venv/bin/python benchmarks/rollout_throughput.py
  .venv/bin/python benchmarks/rollout_throughput.py --model-path=DIR --prompts 32 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_STUDENT = REPO / ".cache" / "smollm2-135m-instruct"
GSM8K = Path("/work/shared/data/gsm8k_test.jsonl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=str(REAL_STUDENT) if REAL_STUDENT.exists() else "random",
                   help="an HF checkpoint directory, or 'random' (a small random Llama)")
    p.add_argument("--data", default=str(GSM8K), help="JSONL with a 'question' field (for a real checkpoint)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--compare-length", type=int, default=512,
                   help="second stat-jax run with this max_target_length (0 = skip)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a rollout setting, e.g. --set max_concurrent_decodes=32")
    p.add_argument("--skip-hf", action="store_true", help="only stat-jax (e.g. large shapes on an accelerator)")
    p.add_argument("--out", default="", help="also write the JSON here")
    # the random model's shape
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    return p.parse_args(argv)


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # ru_maxrss is KiB on Linux


class CompileClock:
    """Seconds XLA spends compiling, from JAX's own monitoring events (not inferred from wall times)."""

    def __init__(self):
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.seconds += duration


def random_student(args, out_dir: Path):
    """A random Llama of the requested shape, exported to an HF dir with a matching char tokenizer."""
    from stat_jax.data.char_tokenizer import build_char_tokenizer
    from stat_jax.models import export_hf_checkpoint, init_model
    from stat_jax.models.llama import tiny_llama

    tok = build_char_tokenizer("".join(chr(0x4E00 + i) for i in range(args.vocab - 7)))  # one CJK char per id
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                     num_layers=args.layers, num_heads=8, num_kv_heads=4, head_dim=args.hidden // 8,
                     max_position_embeddings=4096, initializer_range=0.1)
    export_hf_checkpoint(init_model(cfg, seed=0), out_dir)
    tok.save_pretrained(out_dir)
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(7, len(tok), size=n - 1).tolist() for n in rng.integers(16, 49, args.prompts)]
    return prompts


def chat_prompts(tokenizer, data: Path, count: int) -> list[list[int]]:
    """The first `count` questions, chat-rendered with the template's default system prompt, as token ids."""
    questions = [json.loads(line)["question"] for line in data.read_text().splitlines()[:count]]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def shipped_settings(overrides: dict):
    """The rollout section of configs/base.py (with overrides) as EngineSettings."""
    sys.path.insert(0, str(REPO))
    from configs.base import get_config
    from stat_jax.rollout.factory import engine_settings

    rollout = get_config().rollout
    for key, value in overrides.items():
        rollout[key] = type(rollout[key])(value)
    return engine_settings(rollout)


def run_stat_jax(model, tokenizer, settings, prompts, new_tokens: int, clock: CompileClock) -> tuple[dict, list]:
    from stat_jax.rollout.base import SamplingParams
    from stat_jax.rollout.inprocess import JetStreamBackend

    sampling = SamplingParams(max_new_tokens=new_tokens)
    with JetStreamBackend(model, tokenizer, settings) as backend:
        # Warm-up on the same workload compiles every prefill bucket and cache-length bucket the timed run uses.
        compile_before, t0 = clock.seconds, time.perf_counter()
        backend.generate(prompts, sampling, progress=False)
        warmup_s = time.perf_counter() - t0
        compile_s = clock.seconds - compile_before
        t0 = time.perf_counter()
        out = backend.generate(prompts, sampling, progress=False)
        wall = time.perf_counter() - t0
        stats = dict(backend.scheduler.stats)
        engine = backend.engine
        resolved = engine.settings
        note = engine.memory_note
        compiles = backend.compilation_counts()
    tokens = [row[0].token_ids for row in out]
    n = sum(map(len, tokens))
    return {"tokens": n, "wall_s": round(wall, 2), "tokens_per_s": round(n / wall, 1),
            "time_to_first_token_s": round(stats.get("first_token_s", float("nan")), 3),
            "slots_used": stats.get("slots"), "decode_steps": stats.get("steps"), "prefill_calls": stats.get("prefill_calls"),
            "cache_resizes": stats.get("resizes", 0), "max_cache_length_used": stats.get("max_cache_length"),
            "warmup_wall_s": round(warmup_s, 2), "compile_s": round(compile_s, 2), "compilations": compiles,
            "settings": {"max_concurrent_decodes": resolved.max_concurrent_decodes,
                         "max_prefill_length": resolved.max_prefill_length,
                         "max_target_length": resolved.max_target_length,
                         "cache_dtype": str(engine.cache_dtype.__name__ if hasattr(engine.cache_dtype, "__name__")
                                            else engine.cache_dtype),
                         "prefill_batch_tokens": resolved.prefill_batch_tokens},
            "memory_note": note}, tokens


def run_hf(model_dir: Path, tokenizer, prompts, new_tokens: int, dtype: str) -> tuple[dict, list]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32 if dtype == "float32" else torch.bfloat16).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF batched generation requires
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(do_sample=False, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad():
        model.generate(ids[:4], attention_mask=mask[:4], max_new_tokens=4, **kwargs)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, **kwargs)  # the whole batch's first token
        first_token_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **kwargs)
        wall = time.perf_counter() - t0
    tokens = [row[: row.index(eos)] if eos in row else row for row in gen[:, width:].tolist()]
    n = sum(map(len, tokens))
    return {"tokens": n, "wall_s": round(wall, 2), "tokens_per_s": round(n / wall, 1),
            "time_to_first_token_s": round(first_token_s, 3), "batch": len(prompts),
            "torch_threads": torch.get_num_threads()}, tokens


def decode_floor(model, slots: int, steps: int = 8) -> dict:
    """Tokens/s if a decode step cost only the model's own products for `slots` one-token rows: a jitted
    cache-free forward (every weight read once, the vocabulary product included, no attention over a cache).
    No engine can beat it on this machine, so it bounds what any speed-up over transformers can reach."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[:, -1].argmax(-1))
    tokens = jnp.zeros((slots, 1), jnp.int32)
    forward(state, tokens).block_until_ready()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        forward(state, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    return {"slots": slots, "step_s": round(step, 4), "tokens_per_s": round(slots / step, 1)}


def _report(result: dict, part: str, out: str) -> None:
    """Each part takes minutes at the real shape: say which one ended, and keep what is measured so far."""
    print(f"rollout_throughput: {part} done", file=sys.stderr, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**result, "partial": True}) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import transformers

    from stat_jax.models import load_hf_checkpoint
    from stat_jax.rollout.jetstream_compat import jetstream_info

    clock = CompileClock()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path == "random":
            model_dir = Path(tmp)
            prompts = random_student(args, model_dir)
        else:
            model_dir = Path(args.model_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        if args.model_path != "random":
            prompts = chat_prompts(tokenizer, Path(args.data), args.prompts)
        model = load_hf_checkpoint(model_dir, dtype=args.dtype, param_dtype=args.dtype)
        shipped, our_tokens = run_stat_jax(model, tokenizer, shipped_settings(overrides), prompts,
                                           args.new_tokens, clock)
        result = {
            "benchmark": "rollout_throughput",
            "config": {"model": str(model_dir) if args.model_path != "random" else "random",
                       "params": model.config.num_params, "layers": model.config.num_layers,
                       "vocab": model.config.vocab_size, "prompts": len(prompts),
                       "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                       "new_tokens": args.new_tokens, "dtype": args.dtype, "greedy": True, "overrides": overrides},
            "stat_jax_shipped_defaults": shipped,
        }
        _report(result, "stat-jax, shipped settings", args.out)
        if args.compare_length:
            # The largest prompt bucket must stay below the cache: the smallest one holding these prompts.
            bucket = 16
            while bucket < max(map(len, prompts)):
                bucket *= 2
            short_overrides = {**overrides, "max_target_length": args.compare_length, "max_prefill_length": bucket}
            short, short_tokens = run_stat_jax(model, tokenizer, shipped_settings(short_overrides), prompts,
                                               args.new_tokens, clock)
            result[f"stat_jax_max_target_length_{args.compare_length}"] = short
            result["cache_length_ratio"] = {
                "tokens_per_s_at_shipped_over_short": round(shipped["tokens_per_s"] / short["tokens_per_s"], 3),
                "outputs_identical": short_tokens == our_tokens}
            _report(result, f"stat-jax, max_target_length={args.compare_length}", args.out)
        result["peak_rss_gb_stat_jax"] = peak_rss_gb()
        result["decode_floor"] = decode_floor(model, shipped["slots_used"])
        if not args.skip_hf:
            hf, hf_tokens = run_hf(model_dir, tokenizer, prompts, args.new_tokens, args.dtype)
            result["transformers_generate"] = hf
            result["speedup_vs_transformers"] = round(shipped["tokens_per_s"] / hf["tokens_per_s"], 2)
            result["decode_floor"]["over_transformers"] = round(result["decode_floor"]["tokens_per_s"]
                                                                / hf["tokens_per_s"], 2)
            same = sum(a == b for a, b in zip(our_tokens, hf_tokens))
            result["greedy_sequences_identical"] = f"{same}/{len(prompts)}"
            result["peak_rss_gb_process"] = peak_rss_gb()
        result["machine"] = {"jax_backend": jax.default_backend(), "devices": len(jax.devices()),
                             "cpu_count": os.cpu_count(), "python": platform.python_version(), **jetstream_info()}
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()

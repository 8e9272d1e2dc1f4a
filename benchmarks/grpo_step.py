"""Time split of a GRPO step between rollout (JetStream) and update, at a real model's shape or a small Llama.

    python benchmarks/grpo_step.py [--model-path DIR] [--steps 4] [--prompts 8] [--samples 8]
                                   [--max-new-tokens 64] [--iterations 1] [--beta 0] [--hidden 256] [--layers 4]

--model-path: an HF directory (the real student, .cache/smollm2-135m-instruct, by default when it exists;
"random" = a random char-tokenizer Llama of --hidden/--layers) trained on real GSM8K train questions with the
shipped chat prompt, its reward the math grader.

Prints JSON: per-step rollout and update seconds (the first step, which compiles, reported separately),
their shares, and rollout/train tokens per second with their ratio. "update" is everything after the rewards:
host->device batch, old-policy log-probs (only when --iterations > 1), reference log-probs (only when
--beta > 0) and the `iterations` jitted optimizer steps. "hidden_overhead_s" is a steady step's wall time (a whole loop
iteration, from the metrics rows' times; needs >= 3 steps, else the step's own step_s) minus rollout + update:
rewards, batch building, logging, checkpointing; "in_step_overhead_s" is the part inside the step.
"rollout_only" times the same generate calls on a fresh engine outside the trainer, as the in-run reference.

--mismatch: instead, the engine/trainer mismatch GRPO logs (issue 42) for three cases at the shape, each a short
run (--steps, default 2 here) with grpo.rollout_correction as given (--correction, default token_tis):
float32 engine + float32 trainer (model.dtype=float32), bfloat16 engine + float32 masters (model.dtype=bfloat16,
the shipped default: both compute in bfloat16, the engine through its KV cache), and adapters on an NF4 base
(train.lora.rank=16, base_quant=nf4: the engine serves the merged, dequantized weights, the trainer dequantizes per
projection). Per case: mean/max |log p_trainer - log p_engine|, KL(engine || trainer) and the share of tokens
the correction caps (token_tis) or drops with their answer (sequence_mask) at grpo.tis_cap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
REAL_STUDENT = REPO / ".cache" / "smollm2-135m-instruct"
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=str(REAL_STUDENT) if REAL_STUDENT.exists() else "random")
    p.add_argument("--data", default=str(GSM8K_TRAIN), help="JSONL of GSM8K-style questions (for a real model)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--iterations", type=int, default=1, help="grpo.num_iterations (mu)")
    p.add_argument("--beta", type=float, default=0.0, help="grpo.beta; > 0 adds the reference forward pass")
    p.add_argument("--mismatch", action="store_true", help="the engine/trainer mismatch of three cases instead")
    p.add_argument("--correction", default="token_tis", help="grpo.rollout_correction for --mismatch")
    args = p.parse_args()
    if args.mismatch:
        print(json.dumps(mismatch_cases(args), indent=2))
        return

    import jax
    import numpy as np

    from stat_jax import sharding
    from stat_jax.config import load_config_file
    from stat_jax.data.char_tokenizer import save_char_tokenizer
    from stat_jax.data.records import MathProblem
    from stat_jax.models import export_hf_checkpoint, init_model
    from stat_jax.models.llama import tiny_llama
    from stat_jax.train.grpo import train_grpo
    from stat_jax.train.metrics import read_metrics

    root = Path(tempfile.mkdtemp(prefix="grpo_bench_"))
    c = load_config_file(str(REPO / "configs" / "grpo_tiny.py"))
    if args.model_path == "random":
        tok = save_char_tokenizer(root / "student")
        cfg = tiny_llama(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_layers=args.layers, num_heads=max(1, args.hidden // 64),
                         num_kv_heads=max(1, args.hidden // 128), head_dim=64, eos_token_ids=(tok.eos_token_id,),
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        export_hf_checkpoint(init_model(cfg, seed=0), root / "student")
        c.model.path = str(root / "student")
        c.grpo.instruction = "{problem}"
        problems = [MathProblem(id=str(i), problem=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(64)]
        prefill = 64
    else:
        from stat_jax.data.math_datasets import load_benchmark
        from stat_jax.models import ModelConfig

        c.model.path = args.model_path
        cfg = ModelConfig.from_hf_dir(args.model_path)
        problems = load_benchmark("gsm8k", args.data, split="train")[: 4 * args.prompts * args.steps]
        prefill = 256  # GSM8K questions in the shipped chat prompt: <= 256 tokens
    c.workdir = str(root / "run")
    c.grpo.steps = args.steps
    c.grpo.prompts_per_step = args.prompts
    c.grpo.num_generations = args.samples
    c.grpo.max_new_tokens = args.max_new_tokens
    c.grpo.num_iterations = args.iterations
    c.grpo.beta = args.beta
    c.rollout.max_concurrent_decodes = args.prompts * args.samples
    c.rollout.max_prefill_length = prefill
    c.rollout.max_target_length = prefill + args.max_new_tokens + 8
    c.grpo.max_length = prefill + args.max_new_tokens
    c.grpo.checkpoint_every = 10**6
    mesh = sharding.make_mesh(devices=jax.devices()[:1])

    start = time.perf_counter()
    result = train_grpo(c, problems, mesh=mesh)
    wall = time.perf_counter() - start
    rows = read_metrics(result["metrics_path"])
    steady = rows[1:] or rows
    rollout = float(np.mean([r["rollout_s"] for r in steady]))
    train = float(np.mean([r["train_s"] for r in steady]))
    report = {
        "model": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "params": cfg.num_params},
        "prompts_per_step": args.prompts, "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens,
        "num_iterations": args.iterations, "beta": args.beta,
        "steps": len(rows), "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "first_step": {"rollout_s": rows[0]["rollout_s"], "train_s": rows[0]["train_s"]},
        "steady_step": {"rollout_s": rollout, "train_s": train,
                        "rollout_share": rollout / (rollout + train), "train_share": train / (rollout + train)},
        "rollout_tokens_per_s": float(np.mean([r["rollout_tokens_per_s"] for r in steady])),
        "train_tokens_per_s": float(np.mean([r["train_tokens_per_s"] for r in steady])),
        "mean_response_length": float(np.mean([r["response_length"] for r in steady])),
        "wall_s": wall,
    }
    report["rollout_over_train_tokens_per_s"] = report["rollout_tokens_per_s"] / report["train_tokens_per_s"]
    # A metrics row is written one step late (when the next step has run) and the last right after the one before
    # it, so the time between rows k and k+1 is step k+2's whole loop iteration (checkpoint and logging included)
    # for every pair but the last. Within the step, step_s covers rollout, rewards, batch building and update.
    walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])][:-1]  # steps 3..n
    timed = rows[2:] if walls else steady  # the steps those walls are of, so both sides are the same steps
    parts = float(np.mean([r["rollout_s"] + r["train_s"] for r in timed]))
    step_s = float(np.mean([r["step_s"] for r in timed]))
    step_wall = float(np.mean(walls)) if walls else step_s
    report["steady_step"].update({
        "step_s": step_s, "wall_s": step_wall, "wall_measured_between_rows": bool(walls),
        "hidden_overhead_s": step_wall - parts, "in_step_overhead_s": step_s - parts,
        "wall_over_rollout_plus_update": step_wall / parts})
    report["rollout_only"] = rollout_only(c, problems, args, report["rollout_tokens_per_s"])
    report["model"]["path"] = args.model_path
    print(json.dumps(report, indent=2))


MISMATCH_CASES = {  # name -> config overrides
    "float32_engine_float32_trainer": {"model.dtype": "float32"},
    "bfloat16_engine_float32_masters": {"model.dtype": "bfloat16"},
    "lora_on_nf4_base": {"model.dtype": "float32", "train.lora.rank": 16, "train.lora.base_quant": "nf4",
                         "train.lora.dropout": 0.0},
}
MISMATCH_KEYS = ("mismatch_abs_mean", "mismatch_abs_max", "mismatch_kl", "correction_capped")


def mismatch_cases(args) -> dict:
    """Each case's mismatch metrics, per step and averaged, from short GRPO runs at the shape."""
    import numpy as np

    from stat_jax import sharding
    from stat_jax.config import apply_overrides, load_config_file
    from stat_jax.data.math_datasets import load_benchmark
    from stat_jax.train.grpo import train_grpo
    from stat_jax.train.metrics import read_metrics

    import jax

    steps = args.steps if "--steps" in sys.argv else 2
    problems = load_benchmark("gsm8k", args.data, split="train")[: args.prompts * steps]
    report = {"model": args.model_path, "prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
              "max_new_tokens": args.max_new_tokens, "steps": steps, "rollout_correction": args.correction,
              "backend": jax.default_backend(), "cases": {}}
    for name, overrides in MISMATCH_CASES.items():
        root = Path(tempfile.mkdtemp(prefix=f"grpo_mismatch_{name}_"))
        c = load_config_file(str(REPO / "configs" / "grpo_tiny.py"))
        c = apply_overrides(c, [(k, str(v)) for k, v in overrides.items()])
        c.model.path, c.workdir = args.model_path, str(root / "run")
        c.grpo.steps, c.grpo.prompts_per_step, c.grpo.num_generations = steps, args.prompts, args.samples
        c.grpo.max_new_tokens, c.grpo.rollout_correction, c.grpo.learning_rate = args.max_new_tokens, args.correction, 1e-6
        c.rollout.max_concurrent_decodes = args.prompts * args.samples
        c.rollout.max_prefill_length, c.rollout.max_target_length = 256, 256 + args.max_new_tokens + 8
        c.grpo.max_length, c.grpo.checkpoint_every = 256 + args.max_new_tokens, 10**6
        start = time.perf_counter()
        result = train_grpo(c, problems, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
        rows = read_metrics(result["metrics_path"])
        report["cases"][name] = {
            "overrides": overrides, "wall_s": time.perf_counter() - start,
            "per_step": [{k: r[k] for k in MISMATCH_KEYS + ("reward_mean", "response_length")} for r in rows],
            **{k: float(np.mean([r[k] for r in rows])) for k in MISMATCH_KEYS},
            "mismatch_abs_max": float(max(r["mismatch_abs_max"] for r in rows))}
    return report


def rollout_only(c, problems, args, in_step_tokens_per_s: float) -> dict:
    """The steps' generate calls again on a fresh engine of the same settings, prompts and sampling, outside
    the trainer (the start model's weights, so the tokens differ from the trained steps': compare tokens/s)."""
    import numpy as np
    import transformers

    from stat_jax.models import load_hf_checkpoint
    from stat_jax.rollout.factory import make_rollout_backend
    from stat_jax.train.grpo import grpo_prompt_ids, prompts_for_step, step_sampling

    tokenizer = transformers.AutoTokenizer.from_pretrained(c.model.path)
    model = load_hf_checkpoint(c.model.path, dtype=c.model.dtype)
    ids = grpo_prompt_ids(c, tokenizer, problems)
    seconds, tokens = [], []
    with make_rollout_backend(c, model, tokenizer) as backend:
        for step in range(1, args.steps + 1):
            chosen = prompts_for_step(len(problems), args.prompts, step, int(c.seed))
            sampling = step_sampling(c, step)  # as the trainer samples (its log-probabilities included)
            t0 = time.perf_counter()
            out = backend.generate([ids[i] for i in chosen], sampling, args.samples, progress=False)
            seconds.append(time.perf_counter() - t0)
            tokens.append(sum(len(comp.token_ids) for group in out for comp in group))
    steady = slice(1, None) if len(seconds) > 1 else slice(None)
    rate = sum(tokens[steady]) / sum(seconds[steady])
    return {"steady_s": float(np.mean(seconds[steady])), "first_s": seconds[0], "tokens_per_s": rate,
            "in_step_over_rollout_only_tokens_per_s": in_step_tokens_per_s / rate}


if __name__ == "__main__":
    main()

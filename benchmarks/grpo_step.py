"""Time split of a GRPO step between rollout (JetStream) and update, for a small Llama on this machine.

    python benchmarks/grpo_step.py [--steps 4] [--hidden 256] [--layers 4] [--prompts 8] [--samples 8]
                                   [--iterations 1] [--beta 0]

Prints JSON: per-step rollout and update seconds (the first step, which compiles, reported separately),
their shares, and rollout/train tokens per second with their ratio. "update" is everything after the rewards:
host->device batch, old-policy log-probs (only when --iterations > 1), reference log-probs (only when
--beta > 0) and the `iterations` jitted optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--iterations", type=int, default=1, help="grpo.num_iterations (mu)")
    p.add_argument("--beta", type=float, default=0.0, help="grpo.beta; > 0 adds the reference forward pass")
    args = p.parse_args()

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
    tok = save_char_tokenizer(root / "student")
    cfg = tiny_llama(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                     num_layers=args.layers, num_heads=max(1, args.hidden // 64),
                     num_kv_heads=max(1, args.hidden // 128), head_dim=64, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id)
    export_hf_checkpoint(init_model(cfg, seed=0), root / "student")

    c = load_config_file(str(Path(__file__).resolve().parent.parent / "configs" / "grpo_tiny.py"))
    c.model.path = str(root / "student")
    c.workdir = str(root / "run")
    c.grpo.steps = args.steps
    c.grpo.prompts_per_step = args.prompts
    c.grpo.num_generations = args.samples
    c.grpo.max_new_tokens = args.max_new_tokens
    c.grpo.num_iterations = args.iterations
    c.grpo.beta = args.beta
    c.grpo.instruction = "{problem}"
    c.rollout.max_concurrent_decodes = args.prompts * args.samples
    c.rollout.max_prefill_length = 64
    c.rollout.max_target_length = 64 + args.max_new_tokens + 8
    c.grpo.max_length = 64 + args.max_new_tokens
    c.grpo.checkpoint_every = 10**6
    problems = [MathProblem(id=str(i), problem=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(64)]
    mesh = sharding.make_mesh(devices=jax.devices()[:1])

    start = time.perf_counter()
    result = train_grpo(c, problems, mesh=mesh)
    wall = time.perf_counter() - start
    rows = read_metrics(result["metrics_path"])
    steady = rows[1:] or rows
    rollout = float(np.mean([r["rollout_s"] for r in steady]))
    train = float(np.mean([r["train_s"] for r in steady]))
    report = {
        "model": {"hidden": args.hidden, "layers": args.layers, "params": cfg.num_params},
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
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

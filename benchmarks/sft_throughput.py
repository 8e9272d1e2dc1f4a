"""SFT training throughput: stat-jax's jitted step vs a plain transformers + torch loop, same model and batch.

Prints one JSON object: tokens/s of each, their ratio, and stat-jax's model-FLOPs utilisation against a
jitted matmul peak measured in the same run (`ModelConfig.flops_per_token` counts the model's FLOPs).
The timed rounds interleave (matmul peak, stat-jax step, torch step), so load from other processes on a shared
machine hits all three alike. Reported: medians (the ratio is the median of per-round ratios) and the best
round of each (least disturbed); compare the spread of `step_s_all` and the load averages before trusting either.

    .venv/bin/python benchmarks/sft_throughput.py                      # ~35M-param Llama, seq 512 (CPU default)
    .venv/bin/python benchmarks/sft_throughput.py --dtype=bfloat16     # bf16 compute vs torch.autocast(bf16)
    .venv/bin/python benchmarks/sft_throughput.py --model=llama3_2_1b --dtype=bfloat16 --batch=8 --no-torch  # GPU
    .venv/bin/python benchmarks/sft_throughput.py --model-path=.cache/smollm2-135m-instruct --seq=1024 --rounds=3

`--model-path` takes the shape (not the weights: throughput does not depend on them) from an HF directory,
e.g. the real student at the issue's shape (seq 1,024, batch 4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


WARMUP_STEPS = 2  # untimed steps of each framework before the timed rounds


def small_llama(vocab: int = 8192):
    """~35M parameters: 8 layers, width 512, untied embeddings."""
    from stat_jax.models.llama import tiny_llama

    return tiny_llama(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                      num_kv_heads=8, head_dim=64, max_position_embeddings=2048, bos_token_id=1,
                      eos_token_ids=(2,), pad_token_id=0)


def model_config(name: str, model_path: str = ""):
    from stat_jax.models import llama, qwen
    from stat_jax.models.config import ModelConfig

    if model_path:
        return ModelConfig.from_hf_dir(model_path)
    if name == "small":
        return small_llama()
    for module in (llama, qwen):
        if hasattr(module, name):
            return getattr(module, name)()
    raise SystemExit(f"--model={name!r}: use 'small' or a released shape such as llama3_2_1b")


def random_batch(cfg, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, size=(batch, seq + 1), dtype=np.int32)


def train_settings():
    """The optimizer both frameworks use (AdamW, clipping at 1.0, constant lr after no warmup)."""
    from ml_collections import ConfigDict

    return ConfigDict(dict(learning_rate=1e-4, lr_schedule="constant", warmup_steps=0, warmup_ratio=0.0,
                           min_lr_ratio=0.0, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----- stat-jax --------------------------------------------------------------------------------------------
def stat_jax_step(cfg, tokens: np.ndarray, *, dtype: str, remat: bool, total_steps: int):
    """(one training step as a blocking closure, info dict); the first call compiles."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from stat_jax import sharding
    from stat_jax.models import init_model
    from stat_jax.train import loop, sft
    from stat_jax.train.optim import build_optimizer

    mesh = sharding.make_mesh(1, -1, 1)
    model = init_model(cfg, mesh, seed=0, dtype=dtype, param_dtype="float32", remat=remat)
    graphdef, params = nnx.split(model)
    shapes = jax.eval_shape(lambda: nnx.to_pure_dict(params))
    param_sh = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
    tx, schedule = build_optimizer(train_settings(), total_steps=total_steps)
    state_sh = loop.state_shardings_for(shapes, param_sh, tx, mesh)
    b, t = tokens.shape[0], tokens.shape[1] - 1
    batch_sh = sft.batch_layout(b, t).shardings(mesh, 1)
    pure = nnx.to_pure_dict(params)
    # Placed exactly as the trainer places it: an unplaced state would make the first timed step recompile.
    state = jax.device_put({"step": jnp.int32(0), "params": pure,
                            "opt_state": jax.jit(tx.init, out_shardings=state_sh["opt_state"])(pure)}, state_sh)
    host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)), "segment_ids": np.ones((b, t), np.int32)}
    batch = loop.to_device_batch(host, 1, batch_sh)
    step_fn = loop.run_on_mesh(loop.jit_train_step(sft.make_train_step(graphdef, tx, schedule), state_sh, batch_sh, mesh),
                            mesh)
    holder = {"state": state}
    losses = []

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done

    return step, {"losses": losses, "devices": len(jax.devices()), "backend": jax.default_backend()}


def matmul_peak_step(dtype: str, n: int = 2048, chain: int = 4):
    """(closure running a jitted chain of n x n matmuls, its FLOPs): the hardware reference for MFU."""
    import jax

    from stat_jax.models import as_dtype
    from stat_jax.models.layers import matmul

    dt = as_dtype(dtype)
    keys = jax.random.split(jax.random.key(0), chain + 1)
    x = jax.random.normal(keys[0], (n, n), dt)
    ws = [jax.random.normal(k, (n, n), dt) / np.sqrt(n) for k in keys[1:]]

    @jax.jit
    def f(x, ws):
        for w in ws:
            x = matmul("ij,jk->ik", x, w)  # the model's own product, so both pick the same kernel
        return x

    f(x, ws).block_until_ready()
    return (lambda: f(x, ws).block_until_ready()), 2 * n**3 * chain


# ----- transformers + torch --------------------------------------------------------------------------------
def torch_step(cfg, tokens: np.ndarray, *, dtype: str = "float32"):
    """(one plain-loop training step of transformers' Llama with torch AdamW, info dict).

    A low-precision `dtype` runs the forward under `torch.autocast` (float32 master weights), the torch
    counterpart of stat-jax's compute dtype with float32 params.
    """
    import contextlib

    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaConfig.from_dict(cfg.to_hf_dict(torch_dtype="float32"))
    model = transformers.LlamaForCausalLM(hf).train()
    s = train_settings()
    opt = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, betas=(s.b1, s.b2), eps=s.eps,
                            weight_decay=s.weight_decay)
    inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    targets = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    losses = []

    autocast = (contextlib.nullcontext() if dtype == "float32"
                else torch.autocast("cpu", dtype=getattr(torch, dtype)))

    def step():
        with autocast:
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step, {"losses": losses, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "autocast": None if dtype == "float32" else dtype,
                  "transformers": transformers.__version__, "attn_implementation": hf._attn_implementation}


def _summary(times: list[float], tokens_per_step: int, flops_per_token: float, peaks: list[float]) -> dict:
    """Median over rounds, and the best round (least disturbed by other processes) against the best peak."""
    tps = [tokens_per_step / t for t in times]
    return {"tokens_per_s": statistics.median(tps),
            "mfu": statistics.median(x * flops_per_token / p for x, p in zip(tps, peaks)),
            "tokens_per_s_best": max(tps), "mfu_best": max(tps) * flops_per_token / max(peaks),
            "step_s": statistics.median(times), "step_s_all": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="'small' (~35M Llama) or a released shape, e.g. llama3_2_1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5,
                   help="timed rounds; each round runs matmul peak, a stat-jax step, a torch step (medians reported)")
    p.add_argument("--dtype", default="float32",
                   help="compute dtype of both frameworks (params stay float32; torch uses autocast)")
    p.add_argument("--model-path", default="", help="an HF directory whose shape to train (overrides --model)")
    p.add_argument("--remat", default="none", help="stat-jax's model.remat policy: none | full | dots "
                   "(torch runs without checkpointing, so none is the like-for-like figure)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch reference (large models, GPU runs)")
    args = p.parse_args()

    cfg = model_config(args.model, args.model_path)
    tokens = random_batch(cfg, args.batch, args.seq)
    load_at_start = os.getloadavg()[0]  # other processes on the machine make every figure noisy: report it
    tokens_per_step = args.batch * args.seq
    flops_per_token = cfg.flops_per_token(args.seq)

    peak_fn, peak_flops = matmul_peak_step(args.dtype)
    jax_fn, jax_info = stat_jax_step(cfg, tokens, dtype=args.dtype, remat=args.remat,
                                     total_steps=args.rounds + 1 + WARMUP_STEPS)
    compile_s = _seconds(jax_fn)
    for _ in range(WARMUP_STEPS):  # the first steps after compiling pay for fresh buffers' page faults
        jax_fn()
    torch_fn, torch_info = (None, {}) if args.no_torch else torch_step(cfg, tokens, dtype=args.dtype)
    if torch_fn:
        for _ in range(WARMUP_STEPS):  # allocator, thread pool
            torch_fn()
    # Interleaved rounds: load from other processes hits both frameworks (and the peak) alike.
    peaks, jax_times, torch_times = [], [], []
    for _ in range(args.rounds):
        peaks.append(peak_flops / _seconds(peak_fn))
        jax_times.append(_seconds(jax_fn))
        if torch_fn:
            torch_times.append(_seconds(torch_fn))
    out = {
        "model": args.model_path or args.model, "remat": args.remat, "params": cfg.num_params, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "flops_per_token": flops_per_token, "matmul_peak_tflops": statistics.median(peaks) / 1e12,
        "matmul_peak_tflops_all": [x / 1e12 for x in peaks],
        "stat_jax": {**_summary(jax_times, tokens_per_step, flops_per_token, peaks), "compile_s": compile_s,
                     **jax_info},
    }
    if torch_fn:
        out["torch"] = {**_summary(torch_times, tokens_per_step, flops_per_token, peaks), **torch_info}
        out["ratio_stat_jax_over_torch"] = statistics.median(t / j for j, t in zip(jax_times, torch_times))
        out["ratio_best_over_best"] = min(torch_times) / min(jax_times)
    out.update(cpu_count=os.cpu_count(), load_avg_1m_at_start=load_at_start, load_avg_1m_at_end=os.getloadavg()[0])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

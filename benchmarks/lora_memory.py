"""Per-device training-state memory of full fine-tuning vs low-rank adapters, from abstract arrays (no weights).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/lora_memory.py [--rank=16] [--fsdp=8]

For the Llama-3.2-1B and Qwen2.5-3B shapes on a v5e-8-sized mesh (8 devices, fsdp=8 by default), each array
is placed by the trainer's own shardings (`sharding.state_shardings`, the optimizer of `train.optim`) and
counted at its per-device shard size: parameters + gradients + AdamW state. Full fine-tuning (the reference,
in the same run) differentiates and optimizes every parameter; adapters keep the base frozen (no gradient, no
optimizer state) and train rank-r A/B matrices on q,k,v,o,gate,up,down. The frozen base is counted in float32
(the configs' master dtype), in bfloat16 (what a frozen base needs, since it is never updated), and with its
projection kernels quantized (`train.lora.base_quant`, models/quant.py) to int8 and to 4 bits (NF4; int4 has
the same size), the rest of it in bfloat16; 4-bit values count half a byte, as XLA stores them packed.
Activations and XLA temporaries are not included (benchmarks/train_memory.py measures those).

`--real-student=DIR` (e.g. .cache/smollm2-135m-instruct) adds, at that checkpoint's shape on this machine's first
device, the SFT step (`sft.make_train_step`, remat full) for full fine-tuning, for adapters and for adapters on an
int8 base (`--real-quant`) in the same run:
median step time over `--steps` timed steps after a warm-up one, and XLA's peak estimate of the compiled step
(arguments + outputs - donated + temporaries, `train.memory.StepMemory`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from stat_jax import sharding  # noqa: E402
from stat_jax.models import abstract_model, lora, quant  # noqa: E402
from stat_jax.models.llama import llama3_2_1b  # noqa: E402
from stat_jax.models.qwen import qwen2_5_3b  # noqa: E402
from stat_jax.train.optim import build_optimizer, optimizer_shardings  # noqa: E402

SHAPES = {"llama3_2_1b": llama3_2_1b, "qwen2_5_3b": qwen2_5_3b}
V5E_HBM = 16 * 2**30


def per_device_bytes(shapes, shardings) -> int:
    """Bytes on the most loaded device: every leaf at its shard shape (replicated leaves count whole)."""
    total = 0
    for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * quant.stored_bits(x.dtype)
    return total // 8


def _state_bytes(abstract_state: nnx.State, mesh, tx) -> dict[str, int]:
    """(param, gradient, optimizer) bytes per device of training `abstract_state` with `tx`."""
    shapes = nnx.to_pure_dict(abstract_state)
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh))
    opt = jax.eval_shape(tx.init, shapes)
    opt_sh = optimizer_shardings(tx, shapes, shardings, sharding.replicated(mesh))
    params = per_device_bytes(shapes, shardings)
    return {"params": params, "grads": params, "optimizer": per_device_bytes(opt, opt_sh)}


def measure(name: str, rank: int, mesh) -> dict:
    cfg = SHAPES[name]()
    tx, _ = build_optimizer({"learning_rate": 1e-5}, 100)  # AdamW (two float32 moments) + clipping, as trained
    _, full_state = nnx.split(abstract_model(cfg, param_dtype="float32"))
    full = _state_bytes(full_state, mesh, tx)
    full["total"] = sum(full.values())

    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=tuple(lora.TARGETS))
    out = {"model": name, "mesh": dict(mesh.shape), "full_finetune": full}
    for base_dtype, base_quant in (("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"),
                                   ("bfloat16", "nf4")):
        lcfg = dataclasses.replace(lcfg, base_quant=base_quant)
        _, adapters, base = lora.adapter_shapes(cfg, lcfg, param_dtype=base_dtype)
        # Adapters are trained in float32 whatever the base's dtype (as PEFT keeps them).
        adapters = jax.tree.map(lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, jnp.float32)), adapters,
                                is_leaf=lambda v: isinstance(v, nnx.Variable))
        trained = _state_bytes(adapters, mesh, tx)
        frozen = per_device_bytes(nnx.to_pure_dict(base),
                                  nnx.to_pure_dict(sharding.state_shardings(base, mesh)))
        entry = {"frozen_base": frozen, "adapter_params": trained["params"], "adapter_grads": trained["grads"],
                 "optimizer": trained["optimizer"],
                 "adapter_param_count": lora.adapter_param_count(nnx.to_pure_dict(adapters))}
        entry["total"] = frozen + sum(trained.values())
        entry["vs_full_finetune"] = round(entry["total"] / full["total"], 4)
        entry["margin_to_v5e_hbm"] = V5E_HBM - entry["total"]
        out[f"lora_r{rank}_base_{base_dtype if base_quant == 'none' else base_quant}"] = entry
    out["full_finetune"]["margin_to_v5e_hbm"] = V5E_HBM - full["total"]
    out["param_count"] = sum(int(x.size) for x in jax.tree.leaves(nnx.to_pure_dict(full_state)))
    return out


def real_student_steps(model_dir: str, rank: int, rows: int, length: int, steps: int, base_quant: str) -> dict:
    """Step time and XLA's step peak of full vs adapter vs quantized-base adapter SFT on the checkpoint at
    `model_dir` (one device)."""
    import numpy as np

    from stat_jax.models import load_hf_checkpoint
    from stat_jax.train import sft
    from stat_jax.train.memory import StepMemory

    tx, schedule = build_optimizer({"learning_rate": 1e-5}, 100)
    rng = np.random.default_rng(0)
    out = {"model_dir": model_dir, "rows": rows, "length": length, "rank": rank, "device": str(jax.devices()[0])}
    modes = {"full_finetune": None, f"lora_r{rank}": "none", f"lora_r{rank}_base_{base_quant}": base_quant}
    for mode, quantized in modes.items():
        model = load_hf_checkpoint(model_dir, remat="full")
        vocab = model.config.vocab_size
        batch = {"tokens": rng.integers(3, vocab, (1, rows, length)), "targets": rng.integers(3, vocab, (1, rows, length)),
                 "positions": np.broadcast_to(np.arange(length), (1, rows, length)),
                 "segment_ids": np.ones((1, rows, length)), "weights": np.ones((1, rows, length))}
        batch = {k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32) for k, v in batch.items()}
        if mode == "full_finetune":
            graphdef, params = nnx.split(model)
            params, frozen = nnx.to_pure_dict(params), None
        else:
            lora.add_adapters(model, lora.LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.05, base_quant=quantized),
                              seed=0)
            graphdef, params, frozen = lora.split_adapters(model)
            params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
        del model
        state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}
        dropout = None if frozen is None else 0
        args = (state, batch) if frozen is None else (state, batch, frozen)
        compiled = jax.jit(sft.make_train_step(graphdef, tx, schedule, dropout_seed=dropout),
                           donate_argnums=0).lower(*args).compile()
        memory = StepMemory.of(compiled)
        times = []
        for i in range(steps + 1):
            start = time.perf_counter()
            state, metrics = compiled(state, batch, *(() if frozen is None else (frozen,)))
            jax.block_until_ready(metrics)
            if i:  # the first call pays one-off allocation
                times.append(time.perf_counter() - start)
        out[mode] = {"step_s": float(np.median(times)), "step_peak_bytes": memory.peak,
                     "arguments_bytes": memory.arguments, "temporaries_bytes": memory.temporaries,
                     "trained_params": sum(int(x.size) for x in jax.tree.leaves(params)),
                     "final_loss": float(metrics["loss"])}
        del state, params, frozen, compiled
    full = out["full_finetune"]
    for mode in list(modes)[1:]:
        out[f"{mode}_vs_full"] = {"step_time": round(out[mode]["step_s"] / full["step_s"], 3),
                                  "step_peak": round(out[mode]["step_peak_bytes"] / full["step_peak_bytes"], 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--fsdp", type=int, default=8)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--real-student", default="", help="an HF checkpoint dir: also time full vs adapter SFT")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--real-quant", default="int8", choices=quant.BASE_QUANT[1:],
                        help="the quantized base of the third real-student row")
    args = parser.parse_args()
    mesh = sharding.make_mesh(data=1, fsdp=args.fsdp, tensor=args.tensor)
    results = [measure(name, args.rank, mesh) for name in args.models.split(",")]
    report = {"benchmark": "lora_memory", "unit": "bytes per device", "rank": args.rank,
              "devices": len(jax.devices()), "results": results}
    if args.real_student:
        report["real_student"] = real_student_steps(args.real_student, args.rank, args.rows, args.length, args.steps,
                                                    args.real_quant)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

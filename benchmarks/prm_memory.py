"""The paper's PRM (RLHFlow/Llama3.1-8B-PRM-Mistral-Data, a Llama-3.1-8B) on a v5e-8-sized mesh, from abstract arrays.

    python benchmarks/prm_memory.py [--batch=8] [--length=4096] [--steps=64] [--no-compile]

No weights are made: the model is `jax.eval_shape`d in bfloat16, every parameter gets its sharding from
`sharding.LOGICAL_AXIS_RULES` on the configured mesh (default the student's: fsdp over all 8 devices, from
XLA_FLAGS=--xla_force_host_platform_device_count=8), and the per-device bytes are each parameter's shard shape
times its item size. Unless `--no-compile`, the scorer's three programs (embed, one decoder layer, run once per
layer, and the +/- head: `prm.embed_program`, `layer_program`, `final_hidden_at` + `rlhflow_probabilities`) are
compiled for `--batch` x `--length` tokens, and XLA's memory analysis gives each one's per-device arguments,
outputs and temporaries (XLA CPU's buffer assignment of the same programs; TPU fuses more). The peak is the
resident weights plus the largest program's activations. A single program for the whole stack was measured at
35 GB per device (XLA gathered every layer's weights at once); that is why the scorer runs layer by layer.
In-run reference: the same tree as the previous port loaded it, float32 on one device without the mesh.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GB = 1e9
V5E_HBM = 16 * 2**30  # bytes per v5e chip


def llama3_1_8b():
    """Llama-3.1-8B's shape (the RLHFlow PRM's config.json): hidden 4096, 32 layers, 32 / 8 heads, mlp 14336."""
    from stat_jax.models.config import ModelConfig, RopeScaling

    return ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009))


def parameter_table(abstract_state, mesh) -> tuple[dict, int, int]:
    """Per-parameter sharding and bytes on one device (layer 0 stands for all layers), and the totals."""
    import numpy as np
    from flax import nnx

    from stat_jax import sharding

    shardings = dict(nnx.to_flat_state(sharding.state_shardings(abstract_state, mesh)))
    table, total, per_device = {}, 0, 0
    for path, var in nnx.to_flat_state(abstract_state):
        named = shardings[path].get_value()
        itemsize = np.dtype(var.dtype).itemsize
        shard = named.shard_shape(tuple(var.shape))
        total += int(np.prod(var.shape)) * itemsize
        per_device += int(np.prod(shard)) * itemsize
        name = "/".join(map(str, path))
        if "layers" not in path or path[1] == 0:
            table[name] = {"shape": list(var.shape), "spec": str(named.spec), "per_device_shape": list(shard),
                           "per_device_mb": round(int(np.prod(shard)) * itemsize / 1e6, 2)}
    return table, total, per_device


def compile_programs(graphdef, abstract_state, mesh, args, params_per_device: int) -> dict:
    """XLA's memory analysis of the scorer's three programs (embed, one layer, head) and the per-device peak:
    the resident weights plus the largest program's non-weight arguments, outputs and temporaries."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from stat_jax import sharding
    from stat_jax.models.prm import embed_program, final_hidden_at, layer_program, rlhflow_probabilities
    from stat_jax.train.memory import StepMemory

    def placed(state):
        shardings = sharding.state_shardings(state, mesh)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))

    def shard_bytes(tree) -> int:
        return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree))

    def batch(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), shape))

    model = nnx.merge(graphdef, abstract_state)
    state = placed(abstract_state)
    layer_graphdef, layer_state = nnx.split(model.layers[0])
    layer_state = placed(layer_state)
    b, t, e = args.batch, args.length, model.config.hidden_size
    tokens, mask, score_at = batch((b, t)), batch((b, t)), batch((b, args.steps))
    x = batch((b, t, e), jnp.bfloat16)
    candidates = jnp.asarray([10, 12], jnp.int32)  # Llama-3's "+" and "-"

    def finish(params, x, score_at):
        m = nnx.merge(graphdef, nnx.State(params))
        return rlhflow_probabilities(m, final_hidden_at(m, x, score_at), candidates)

    programs = {
        "embed": (lambda p, tok: embed_program(graphdef, nnx.State(p), tok), (state, tokens)),
        "layer": (lambda p, x, m: layer_program(layer_graphdef, nnx.State(p), x, m), (layer_state, x, mask)),
        "head": (finish, (state, x, score_at)),
    }
    report, worst = {}, 0
    t0 = time.perf_counter()
    for name, (fn, inputs) in programs.items():
        with jax.set_mesh(mesh):
            memory = StepMemory.of(jax.jit(fn).lower(*inputs).compile())
        # The weights are resident anyway (counted once, below); XLA drops the ones a program does not read.
        transient = shard_bytes(inputs[1:]) + memory.outputs + memory.temporaries
        worst = max(worst, transient)
        report[name] = {"arguments_gb": memory.arguments / GB, "outputs_gb": memory.outputs / GB,
                        "temporaries_gb": memory.temporaries / GB, "beyond_resident_weights_gb": transient / GB}
    peak = params_per_device + worst
    return {"batch": b, "length": t, "steps": args.steps, "programs": report,
            "per_device_peak_gb": peak / GB, "margin_vs_16GiB_gb": (V5E_HBM - peak) / GB,
            "fits_v5e": peak <= V5E_HBM, "compile_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="stat.prm_batch_size")
    p.add_argument("--length", type=int, default=4096, help="stat.prm_max_length")
    p.add_argument("--steps", type=int, default=64, help="scored steps per sequence (padded)")
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor (default: the student's fsdp over 8)")
    p.add_argument("--layers", type=int, default=0, help="override the layer count (0 = the 8B's 32): per-layer slopes")
    p.add_argument("--no-compile", action="store_true", help="only the parameter shardings and bytes")
    args = p.parse_args()

    import jax
    from flax import nnx

    from stat_jax import sharding
    from stat_jax.models.build import abstract_model

    cfg = llama3_1_8b()
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = sharding.make_mesh(data, fsdp, tensor)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype="bfloat16", param_dtype="bfloat16"))
    table, total, per_device = parameter_table(abstract_state, mesh)
    _, ref_state = nnx.split(abstract_model(cfg, dtype="float32", param_dtype="float32"))
    _, ref_total, ref_per_device = parameter_table(ref_state, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    out = {
        "model": "Llama-3.1-8B shape (RLHFlow/Llama3.1-8B-PRM-Mistral-Data)", "params": cfg.num_params,
        "devices": len(jax.devices()), "mesh": dict(mesh.shape), "dtype": "bfloat16",
        "params_total_gb": total / GB, "params_per_device_gb": per_device / GB,
        "reference_float32_one_device_gb": ref_per_device / GB,
        "reference_fits_v5e": ref_per_device <= V5E_HBM, "shardings": table,
    }
    if not args.no_compile:
        out["forward"] = compile_programs(graphdef, abstract_state, mesh, args, per_device)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

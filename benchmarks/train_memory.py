"""Training memory: measured peak RSS of SFT and GRPO update steps on the real student, and XLA's compiled
memory analysis of the paper's shapes on a v5e-8-sized mesh (from abstract arrays: no weights).

    python benchmarks/train_memory.py [--model-path=DIR] [--runs=default|blocks|all] [--skip-paper] [--only-paper]

Real shape (default: the SmolLM2-135M-Instruct student under .cache/, float32, one CPU device): each measured
config runs in its own subprocess, which loads the checkpoint, builds the trainer's state and compiles the
trainer's own step (`sft.fit_train_step` / `grpo.fit_train_step`) on synthetic rows and runs
`--steps` timed steps (compiled ahead of time, so the first one does not compile); the parent reads the child's peak RSS (`ru_maxrss` via os.wait4). Printed per config:
peak RSS, the RSS before the first step (process + weights + optimizer state + compiled program), step time,
time per token, and XLA's estimate for the step, so the estimate is checked against the measurement.
The in-run reference is the pre-issue-19 computation in the same run: remat none and unchunked logits
("now"), at a small token count (it needs ~4 MB per token); `vs_now` ratios compare per-token time and the
per-token memory slope. `*_prevattn_*` runs use the autodiff block attention the chunked one replaced
(model.attention_block=0; in float32 exactly the code before it), for step time and memory of the same policy
(`vs_prevattn`). The fixed part (params + grads + AdamW's two moments) is counted from the parameter
tree; the per-token remainder is the slope of peak RSS between two token counts of one policy.

Paper shapes (`--only-paper`): Llama-3.2-1B and Qwen2.5-3B with the configs' recipe (bfloat16 compute, float32
master weights), mesh fsdp=8 over 8 fake CPU devices (XLA_FLAGS), SFT 8 x 2,048 and GRPO 64 rows x 2,048 per
micro-batch; per-device arguments / temporaries / peak of the compiled update and the margin to 16 GiB
(a v5e chip's HBM), at --paper-attention-block (default: configs/base.py's model.attention_block). This is XLA
CPU's buffer assignment of the same program; TPU's fusion differs somewhat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GB = 1e9
V5E_HBM = 16 * 2**30  # bytes per v5e chip

# (name, kind, rows, length, remat, loss_chunk_tokens[, attention_block]); "now" = the computation before
# issue 19 (its attention too), "prevattn" = the default policy with the attention before the chunked one.
REAL_RUNS = {
    "default": [  # the default policy (configs/base.py: full) against "now", and dots at the small shape
        ("sft_now_1x512", "sft", 1, 512, "none", 0, 0),
        ("sft_now_2x512", "sft", 2, 512, "none", 0, 0),
        ("sft_full_2x512", "sft", 2, 512, "full", 2048),
        ("sft_dots_2x512", "sft", 2, 512, "dots", 2048),
        ("sft_full_8x512", "sft", 8, 512, "full", 2048),
        ("sft_prevattn_8x512", "sft", 8, 512, "full", 2048, 0),
        ("grpo_now_2x512", "grpo", 2, 512, "none", 0, 0),
        ("grpo_full_2x512", "grpo", 2, 512, "full", 2048),
        ("grpo_full_16x512", "grpo", 16, 512, "full", 2048),
        ("grpo_prevattn_16x512", "grpo", 16, 512, "full", 2048, 0),
    ],
}
# The query block of the chunked attention, where attention is a real share of the step (2,048 tokens a row).
REAL_RUNS["blocks"] = [(f"sft_full_1x2048_block{b}", "sft", 1, 2048, "full", 2048, b) for b in (0, 64, 128, 256, 512)]
REAL_RUNS["all"] = REAL_RUNS["default"] + [
    ("sft_dots_8x512", "sft", 8, 512, "dots", 2048),
    ("grpo_dots_2x512", "grpo", 2, 512, "dots", 2048),
    ("grpo_dots_16x512", "grpo", 16, 512, "dots", 2048),  # ~9 GB by XLA's estimate
]


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ----- one measured config (child process) -------------------------------------------------------------------
def _base_config(model_path: str, remat: str, chunk_tokens: int, rows: int, length: int, attention_block: int):
    from stat_jax.config import load_config_file

    c = load_config_file(str(REPO / "configs" / "base.py"))
    c.model.path = model_path
    c.model.dtype = "float32"
    c.model.remat = remat
    c.model.attention_block = attention_block
    c.mesh.fsdp = -1
    c.train.batch_size, c.data.max_length, c.train.steps = rows, length, 10
    c.train.grad_accum_steps = 1  # measured as one micro-batch: the per-token figures are per micro-batch
    c.train.memory_budget_gb = 1e6  # only measuring: never refuse
    c.train.loss_chunk_tokens = chunk_tokens
    c.grpo.prompts_per_step, c.grpo.num_generations, c.grpo.max_length = rows // 2, 2, length
    c.grpo.micro_batches, c.grpo.memory_budget_gb, c.grpo.loss_chunk_tokens = 1, 1e6, chunk_tokens
    return c


def _synthetic_rows(kind: str, rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    if kind == "sft":
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((rows, length), np.float32),
                "positions": positions, "segment_ids": np.ones((rows, length), np.int32)}
    from stat_jax.train import grpo

    mask = (np.arange(length)[None, :] >= 128).astype(np.float32).repeat(rows, 0)  # 128-token prompts
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "attention_mask": np.ones((rows, length), np.int32), "weights": grpo.token_weights(mask, "token"),
            "advantages": rng.normal(0, 1, rows).astype(np.float32)}


def measure_child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from stat_jax import sharding
    from stat_jax.models import abstract_model, load_hf_checkpoint
    from stat_jax.models.config import ModelConfig
    from stat_jax.train import grpo, loop, sft
    from stat_jax.train.checkpointing import abstract_state
    from stat_jax.train.optim import build_optimizer

    rss_start = _rss_now()
    kind, rows, length = spec["kind"], spec["rows"], spec["length"]
    c = _base_config(spec["model_path"], spec["remat"], spec["chunk_tokens"], rows, length, spec["attention_block"])
    mesh = sharding.mesh_from_config(c.mesh)
    model_cfg = ModelConfig.from_hf_dir(spec["model_path"])
    kw = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
              attention_block=c.model.attention_block)
    graphdef, abstract_params = nnx.split(abstract_model(model_cfg, **kw))
    shapes = nnx.to_pure_dict(abstract_params)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
    section = c.train if kind == "sft" else c.grpo
    tx, schedule = build_optimizer(section, 10)
    state_sh = loop.state_shardings_for(shapes, param_sh, tx, mesh)
    full_shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes,
                   "opt_state": jax.eval_shape(tx.init, shapes)}
    t0 = time.perf_counter()
    if kind == "sft":
        k, batch_sh, compiled, memory = sft.fit_train_step(c, graphdef, tx, schedule, state_sh,
                                                           abstract_state(full_shapes, state_sh), mesh)
        run = loop.run_on_mesh(compiled, mesh)
        batch = loop.to_device_batch(_synthetic_rows(kind, rows, length, model_cfg.vocab_size), k, batch_sh)
    else:
        step_impl = grpo.make_train_step(graphdef, tx, schedule, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                                         temperature=0.7, chunk_tokens=spec["chunk_tokens"])
        k, batch_sh, compiled, memory = grpo.fit_train_step(c.grpo, step_impl, state_sh,
                                                            abstract_state(full_shapes, state_sh), mesh,
                                                            old_logp=False, ref_logp=False)
        run = loop.run_on_mesh(compiled, mesh)
        host = _synthetic_rows(kind, rows, length, model_cfg.vocab_size)
        batch = {key: jax.device_put(x.reshape(k, rows // k, *x.shape[1:]), batch_sh[key]) for key, x in host.items()}
    compile_s = time.perf_counter() - t0
    model = load_hf_checkpoint(spec["model_path"], mesh, **kw)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    del model
    state = {"step": jax.device_put(jnp.int32(0), state_sh["step"]), "params": params,
             "opt_state": jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)}
    del params
    fixed = 4 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(full_shapes["params"]))
    rss_before_step = _rss_now()
    times, losses = [], []
    for _ in range(max(1, spec["steps"])):  # compiled ahead of time above: the first step does not compile
        t = time.perf_counter()
        state, metrics = run(state, batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done
        times.append(time.perf_counter() - t)
    tokens = rows * length
    step_s = sum(times) / len(times)
    return {"micro_batches": k, "tokens": tokens, "compile_s": round(compile_s, 1), "step_s": round(step_s, 3),
            "ms_per_token": round(1e3 * step_s / tokens, 4), "losses": [round(x, 4) for x in losses],
            "rss_start_gb": rss_start / GB, "rss_before_step_gb": rss_before_step / GB,
            "fixed_params_grads_adam_gb": fixed / GB, "xla_estimate_gb": memory.peak / GB,
            "xla_arguments_gb": memory.arguments / GB, "xla_temporaries_gb": memory.temporaries / GB}


def run_child(spec: dict, env: dict | None = None) -> dict:
    """Runs one config in a fresh process; its peak RSS is the child's own high-water mark (ru_maxrss at exit)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or os.environ.copy())
    out, err = proc.communicate()
    sys.stderr.write(err[-4000:])
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {err[-2000:]}"}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = result.pop("_peak_rss_kb") * 1024 / GB
    return result


def child_main(spec_json: str) -> None:
    import resource

    spec = json.loads(spec_json)
    result = measure_paper_child(spec) if spec.get("paper") else measure_child(spec)
    result["_peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps(result))


# ----- the paper's shapes from abstract arrays -----------------------------------------------------------------
def measure_paper_child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from stat_jax import sharding
    from stat_jax.config import load_config_file
    from stat_jax.models import abstract_model, llama, qwen
    from stat_jax.train import grpo, loop, sft
    from stat_jax.train.checkpointing import abstract_state
    from stat_jax.train.optim import build_optimizer

    shapes_of = {"llama3_2_1b": llama.llama3_2_1b, "qwen2_5_3b": qwen.qwen2_5_3b}
    c = load_config_file(str(REPO / "configs" / "sft_llama3_2_1b.py"))  # the recipe: bf16 compute, f32 masters
    c.model.remat = spec["remat"]
    c.model.attention_block = spec["attention_block"]
    mesh = sharding.make_mesh(1, 8, 1)
    out = {"devices": len(jax.devices()), "mesh": dict(mesh.shape), "dtype": c.model.dtype,
           "param_dtype": c.model.param_dtype, "remat": c.model.remat, "attention_block": c.model.attention_block}
    only = set(filter(None, spec.get("only", "").split(",")))
    for name, make in shapes_of.items():
        if only and not any(key.startswith(name) for key in only):
            continue
        cfg = make()
        graphdef, abstract_params = nnx.split(abstract_model(cfg, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                                                             remat=c.model.remat,
                                                             attention_block=c.model.attention_block))
        shapes = nnx.to_pure_dict(abstract_params)
        param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
        for kind, rows, length in (("sft", 8, 2048), ("grpo", 64, 2048)):
            if only and f"{name}_{kind}_{rows}x{length}" not in only:
                continue
            section = c.train if kind == "sft" else c.grpo
            tx, schedule = build_optimizer(section, 100)
            state_sh = loop.state_shardings_for(shapes, param_sh, tx, mesh)
            abstract = abstract_state({"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes,
                                       "opt_state": jax.eval_shape(tx.init, shapes)}, state_sh)
            t0 = time.perf_counter()
            if kind == "sft":
                c.train.batch_size, c.data.max_length, c.train.grad_accum_steps = rows, length, 1
                c.train.memory_budget_gb = 1e6
                _, _, _, memory = sft.fit_train_step(c, graphdef, tx, schedule, state_sh, abstract, mesh)
            else:
                c.grpo.prompts_per_step, c.grpo.num_generations, c.grpo.max_length = rows // 8, 8, length
                c.grpo.micro_batches, c.grpo.memory_budget_gb = 1, 1e6
                step_impl = grpo.make_train_step(graphdef, tx, schedule, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                                                 temperature=1.0, chunk_tokens=int(c.grpo.loss_chunk_tokens))
                _, _, _, memory = grpo.fit_train_step(c.grpo, step_impl, state_sh, abstract, mesh,
                                                      old_logp=False, ref_logp=False)
            out[f"{name}_{kind}_{rows}x{length}"] = {
                "per_device_peak_gb": memory.peak / GB, "arguments_gb": memory.arguments / GB,
                "temporaries_gb": memory.temporaries / GB, "outputs_gb": memory.outputs / GB,
                "donated_gb": memory.aliased / GB, "margin_vs_16GiB_gb": (V5E_HBM - memory.peak) / GB,
                "fits_v5e": memory.peak <= V5E_HBM, "compile_s": round(time.perf_counter() - t0, 1)}
            print(json.dumps({f"{name}_{kind}_{rows}x{length}": out[f"{name}_{kind}_{rows}x{length}"]}),
                  file=sys.stderr, flush=True)  # each compile takes minutes on CPU: show results as they come
    return out


# ----- the report ---------------------------------------------------------------------------------------------
def summarise(real: dict) -> dict:
    """Per-token slopes and the comparisons against the pre-issue computation ("now")."""
    def slope(a, b):
        ra, rb = real.get(a, {}), real.get(b, {})
        if "peak_rss_gb" not in ra or "peak_rss_gb" not in rb:
            return None
        return (rb["peak_rss_gb"] - ra["peak_rss_gb"]) * GB / (rb["tokens"] - ra["tokens"]) / 1e6  # MB per token

    s = {"sft_now_mb_per_token": slope("sft_now_1x512", "sft_now_2x512"),
         "sft_full_mb_per_token": slope("sft_full_2x512", "sft_full_8x512"),
         "grpo_full_mb_per_token": slope("grpo_full_2x512", "grpo_full_16x512"),
         "sft_dots_mb_per_token": slope("sft_dots_2x512", "sft_dots_8x512"),
         "grpo_dots_mb_per_token": slope("grpo_dots_2x512", "grpo_dots_16x512")}
    for kind, rows in (("sft", 8), ("grpo", 16)):
        prev, new = real.get(f"{kind}_prevattn_{rows}x512", {}), real.get(f"{kind}_full_{rows}x512", {})
        if "ms_per_token" in prev and "ms_per_token" in new:
            s[f"{kind}_full_{rows}x512_time_vs_prevattn"] = round(new["ms_per_token"] / prev["ms_per_token"], 3)
        if "peak_rss_gb" in prev and "peak_rss_gb" in new:
            s[f"{kind}_full_{rows}x512_peak_rss_gb_vs_prevattn"] = (new["peak_rss_gb"], prev["peak_rss_gb"])
    for kind in ("sft", "grpo"):  # at the same shape only: time per token falls with the batch on its own
        now = real.get(f"{kind}_now_2x512", {})
        for name, r in real.items():
            if (name.startswith(kind) and name.endswith("_2x512") and name != f"{kind}_now_2x512"
                    and "ms_per_token" in r and "ms_per_token" in now):
                s[f"{name}_time_vs_now"] = round(r["ms_per_token"] / now["ms_per_token"], 3)
    if s["sft_now_mb_per_token"] and s["sft_full_mb_per_token"]:
        s["sft_memory_per_token_vs_now"] = round(s["sft_full_mb_per_token"] / s["sft_now_mb_per_token"], 3)
    g = real.get("grpo_full_16x512", {})
    if "peak_rss_gb" in g:
        s["grpo_16x512_peak_rss_gb"] = g["peak_rss_gb"]
        s["grpo_16x512_within_8gb"] = g["peak_rss_gb"] <= 8.0
    base = real.get("sft_full_1x2048_block0", {})
    for name, r in real.items():  # the query-block sweep against the autodiff blocks (block 0), same run
        if name.startswith("sft_full_1x2048_block") and "ms_per_token" in r and "ms_per_token" in base:
            s[f"{name}_time_vs_block0"] = round(r["ms_per_token"] / base["ms_per_token"], 3)
            s[f"{name}_peak_rss_gb"] = round(r["peak_rss_gb"], 3)
            s[f"{name}_xla_temporaries_gb"] = round(r["xla_temporaries_gb"], 3)
    for name, r in real.items():  # the estimate against the measurement
        if "xla_estimate_gb" in r and "peak_rss_gb" in r:
            r["measured_step_gb"] = r["peak_rss_gb"] - r["rss_start_gb"]  # all the step's buffers, weights included
            r["estimate_over_measured"] = round(r["xla_estimate_gb"] / max(r["measured_step_gb"], 1e-9), 3)
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=str(REPO / ".cache" / "smollm2-135m-instruct"))
    p.add_argument("--runs", default="default", choices=sorted(REAL_RUNS))
    p.add_argument("--only", default="", help="comma-separated run names (default: all of --runs)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per config (the step is compiled before)")
    p.add_argument("--paper-remat", default="full", help="the configs' (and base.py's) default")
    p.add_argument("--paper-attention-block", type=int, default=None,
                   help="model.attention_block of the paper shapes (default: configs/base.py's)")
    p.add_argument("--paper-only", default="", help="comma-separated paper runs, e.g. qwen2_5_3b_grpo_64x2048")
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--only-paper", action="store_true")
    p.add_argument("--child", default="")
    args = p.parse_args()
    if args.child:
        child_main(args.child)
        return

    from stat_jax.config import load_config_file

    default_block = int(load_config_file(str(REPO / "configs" / "base.py")).model.attention_block)
    report = {"model_path": args.model_path}
    if not args.only_paper:
        if not (Path(args.model_path) / "config.json").exists():
            sys.exit(f"--model-path={args.model_path}: no config.json there; build the student with `make student`")
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
        env["JAX_PLATFORMS"] = "cpu"
        wanted = set(filter(None, args.only.split(",")))
        real = {}
        for name, kind, rows, length, remat, chunk, *block in REAL_RUNS[args.runs]:
            if wanted and name not in wanted:
                continue
            block = block[0] if block else default_block
            spec = {"kind": kind, "rows": rows, "length": length, "remat": remat, "chunk_tokens": chunk,
                    "attention_block": block, "model_path": args.model_path, "steps": args.steps}
            real[name] = {"remat": remat, "loss_chunk_tokens": chunk, "attention_block": block,
                          **run_child(spec, env)}
            print(json.dumps({name: real[name]}), file=sys.stderr, flush=True)
        report["real_shape"] = real
        report["summary"] = summarise(real)
    if not args.skip_paper:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        block = default_block if args.paper_attention_block is None else args.paper_attention_block
        report["paper_shapes_v5e8"] = run_child({"paper": True, "remat": args.paper_remat, "attention_block": block,
                                                 "only": args.paper_only}, env)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""`stat-jax <command> --config=configs/x.py --config.a.b=value [flags]`.

Each command lives in its own module and exposes `main(config, args) -> int`; this file only parses the
command line, builds and validates the config (before any heavy import), and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from stat_jax.config import CONFIG_DIR, ConfigError, build_config, split_override_args
from stat_jax.distributed import DistributedConfigError, maybe_initialize_distributed

# command -> (module, default config file, help)
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "sft": ("stat_jax.train.sft", None, "supervised fine-tuning of a student"),
    "grpo": ("stat_jax.train.grpo", None, "GRPO with rollouts and a verifiable math reward"),
    "eval": ("stat_jax.eval.evaluate", None, "evaluate a student on math benchmarks"),
    "serve": ("stat_jax.rollout.server", None, "serve a student over JetStream gRPC"),
    "run": ("stat_jax.stat.pipeline", None, "run the STAT pipeline (or one stage with --only)"),
    "demo": ("stat_jax.demo.run", "demo.py", "the complete offline STAT experiment on a built-in task"),
    "smoke": ("stat_jax.smoke", "smoke.py", "forward pass of a tiny random model (installation check)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stat-jax", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[2]}" for k, v in COMMANDS.items()))
    p.add_argument("--config", help="config file (Python with get_config()), optionally path.py:arg")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint / finished stages")
    p.add_argument("--only", default=None, help="run: a single stage (or comma-separated stages)")
    p.add_argument("--quick", action="store_true", help="demo: the small variant used by the test suite")
    p.add_argument("--dry-run", action="store_true", help="print what would run, do nothing")
    p.add_argument("--log-level", default="INFO")
    # Multi-process JAX (several hosts or GPUs); also read from JAX_*/SLURM_*/OMPI_* env, see stat_jax/distributed.py.
    p.add_argument("--coordinator-address", default=None, help="multi-process: process 0's HOST:PORT")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's index")
    p.add_argument("--distributed", action="store_true", help="multi-process: let JAX detect the cluster (TPU pod)")
    return p


def _import_gguf(argv: list[str]) -> int:
    """`stat-jax import-gguf FILE OUT_DIR`: takes no config, so it is parsed on its own."""
    p = argparse.ArgumentParser(prog="stat-jax import-gguf",
                                description="convert a GGUF model file into a Hugging Face checkpoint directory")
    p.add_argument("gguf_file")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from stat_jax.models.gguf import GGUFImportError, import_gguf

    try:
        out = import_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
    except GGUFImportError as e:
        print(f"stat-jax import-gguf: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import-gguf"]:
        return _import_gguf(argv[1:])
    try:
        overrides, rest = split_override_args(argv)
    except ConfigError as e:
        print(f"stat-jax: error: {e}", file=sys.stderr)
        return 2
    args = _parser().parse_args(rest)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, default_config, _ = COMMANDS[args.command]
    spec = args.config or (str(CONFIG_DIR / default_config) if default_config else None)
    if spec is None:
        print(f"stat-jax {args.command}: error: --config=FILE is required (see {CONFIG_DIR})", file=sys.stderr)
        return 2
    try:
        config = build_config(spec, overrides)
    except ConfigError as e:
        print(f"stat-jax {args.command}: config error: {e}", file=sys.stderr)
        return 2
    try:  # before the command touches JAX's devices
        maybe_initialize_distributed(args)
    except DistributedConfigError as e:
        print(f"stat-jax {args.command}: distributed setup error: {e}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    return int(module.main(config, args) or 0)


if __name__ == "__main__":
    sys.exit(main())

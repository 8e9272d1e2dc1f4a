"""`stat-jax <command> --config=configs/x.py --config.a.b=value [flags]`.

Each command lives in its own module and exposes `main(config, args) -> int`; this file only parses the
command line, builds and validates the config and checks the command's inputs (before any heavy import),
writes the resolved config into the workdir, and dispatches. Errors stat-jax raises on purpose
(`stat_jax.errors.StatJaxError`) end the command with one line and their own exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import traceback
from pathlib import Path

from stat_jax import __version__
from stat_jax.config import (CONFIG_DIR, build_config, config_to_dict, split_override_args, with_variant,
                              write_resolved_config)
from stat_jax.errors import ConfigError, InputProblems, StatJaxError, format_error
from stat_jax.progress import silence_other_bars


@dataclasses.dataclass(frozen=True)
class Command:
    module: str  # holds main(config, args) -> int
    help: str
    sections: tuple[str, ...]  # the config sections the command reads (listed by --help)
    flags: tuple[str, ...] = ()  # its own flags, beyond the common ones
    default_config: str | None = None  # under configs/; None: --config is required
    example: str = ""


COMMANDS: dict[str, Command] = {
    "sft": Command("stat_jax.train.sft", "supervised fine-tuning of a student",
                   ("seed", "workdir", "model", "mesh", "data", "train"), ("resume",),
                   example="stat-jax sft --config=configs/sft_tiny.py --config.model.path=DIR "
                           "--config.data.train_files=train.jsonl"),
    "grpo": Command("stat_jax.train.grpo", "GRPO with rollouts and a verifiable math reward",
                    ("seed", "workdir", "model", "mesh", "rollout", "grpo", "eval (instruction, system_prompt)"),
                    ("resume",),
                    example="stat-jax grpo --config=configs/grpo_tiny.py --config.model.path=DIR "
                            "--config.grpo.train_files=problems.jsonl"),
    "eval": Command("stat_jax.eval.evaluate", "evaluate a student on math benchmarks",
                    ("seed", "workdir", "model", "mesh", "rollout", "eval"), ("resume", "dry_run"),
                    example="stat-jax eval --config=configs/eval_tiny.py --config.model.path=DIR "
                            "--config.eval.paths.math500=math500.jsonl"),
    "serve": Command("stat_jax.rollout.server", "serve a student over JetStream gRPC",
                     ("workdir", "model", "mesh", "rollout"),
                     example="stat-jax serve --config=configs/serve_tiny.py --config.model.path=DIR"),
    "run": Command("stat_jax.stat.pipeline", "run the STAT pipeline (or one stage with --only)",
                   ("seed", "workdir", "model", "mesh", "data", "train", "rollout", "eval", "teacher", "stat", "grpo"),
                   ("resume", "only", "dry_run"),
                   example="stat-jax run --config=configs/stat_sel_llama3_2_1b.py --only=profile"),
    "demo": Command("stat_jax.demo.run", "the complete offline STAT experiment on a built-in task",
                    ("demo", "seed", "workdir", "model", "mesh", "data", "train", "rollout", "eval", "stat", "grpo"),
                    ("quick", "dry_run"), "demo.py", example="stat-jax demo --quick"),
    "smoke": Command("stat_jax.smoke", "forward pass of a tiny random model (installation check)",
                     ("seed", "batch_size", "seq_len", "mesh"), (), "smoke.py", example="stat-jax smoke"),
}
# Commands whose config has no workdir to write into (they write nothing).
NO_WORKDIR = ("smoke",)

_FLAGS = {  # the per-command flags: name -> (argparse kwargs)
    "resume": dict(action="store_true", help="continue from the latest checkpoint / finished stages"),
    "only": dict(default=None, metavar="STAGE[,STAGE]", help="run just these stages (in pipeline order)"),
    "quick": dict(action="store_true", help="the small variant the test suite runs"),
    "dry_run": dict(action="store_true", help="print what would run, do nothing"),
}


def _common_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common flags")
    g.add_argument("--config", metavar="FILE[:ARG]", help="config file (Python with get_config()); "
                   "then any number of --config.SECTION.KEY=VALUE overrides")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (after overrides) as JSON and exit")
    g.add_argument("--log-level", default="INFO", help="DEBUG also shows the traceback of an error")
    # Multi-process JAX (several hosts or GPUs); also read from JAX_*/SLURM_*/OMPI_* env, see stat_jax/distributed.py.
    d = p.add_argument_group("multi-process")
    d.add_argument("--coordinator-address", default=None, help="process 0's HOST:PORT")
    d.add_argument("--num-processes", type=int, default=None, help="number of processes")
    d.add_argument("--process-id", type=int, default=None, help="this process's index")
    d.add_argument("--distributed", action="store_true", help="let JAX detect the cluster (TPU pod)")
    return p


def _command_epilog(name: str, cmd: Command) -> str:
    config = f"default config: configs/{cmd.default_config}" if cmd.default_config else \
        f"--config is required (files in {CONFIG_DIR})"
    return (f"config sections read: {', '.join(cmd.sections)}\n{config}\n"
            f"example: {cmd.example}\n"
            f"exit status: 0 ok; 2 config; 3 teacher budget spent (resumable); 4 data; 5 model; 6 tokenizer; "
            f"7 teacher; 8 rollout; 9 workdir state; 10 several input problems; 143 stopped by SIGTERM")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stat-jax", description=__doc__.splitlines()[0],
                                epilog="`stat-jax COMMAND --help` lists a command's flags and config sections.")
    p.add_argument("--version", action="version", version=f"stat-jax {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_flags()
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help, parents=[common], epilog=_command_epilog(name, cmd),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        for flag in cmd.flags:
            sp.add_argument("--" + flag.replace("_", "-"), **_FLAGS[flag])
        sp.set_defaults(**{flag: _FLAGS[flag].get("default", False) for flag in _FLAGS if flag not in cmd.flags})
    sub.add_parser("import-gguf", help="convert a GGUF model file into a Hugging Face checkpoint directory",
                   add_help=False)
    sub.add_parser("report", help="one self-contained HTML page of STAT runs: `stat-jax report RUN_DIR [...]`",
                   add_help=False)
    return p


def _import_gguf(argv: list[str]) -> int:
    """`stat-jax import-gguf FILE OUT_DIR`: takes no config, so it is parsed on its own."""
    p = argparse.ArgumentParser(prog="stat-jax import-gguf",
                                description="convert a GGUF model file into a Hugging Face checkpoint directory")
    p.add_argument("gguf_file")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--log-level", default="INFO", help="DEBUG also shows the traceback of an error")
    args = p.parse_args(argv)
    _setup_logging(args.log_level)
    from stat_jax.models.gguf import import_gguf

    out = import_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
    print(out)
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _log_level(argv: list[str]) -> str:
    """--log-level's value, read before argparse so errors while parsing honour it too."""
    for i, a in enumerate(argv):
        if a.startswith("--log-level="):
            return a.split("=", 1)[1]
        if a == "--log-level" and i + 1 < len(argv):
            return argv[i + 1]
    return "INFO"


def _refuse_multi_process_serve(args) -> None:
    from stat_jax.distributed import DistributedConfigError, resolve_distributed

    if resolve_distributed(args) is not None:
        raise DistributedConfigError(
            "stat-jax serve is a single-host server: it answers gRPC requests in the order they arrive, which "
            "several processes cannot agree on, so it refuses a multi-process job",
            hint="run it as one process on one host (unset JAX_PROCESS_COUNT/JAX_COORDINATOR_ADDRESS, or "
                 "STAT_JAX_DISTRIBUTED=0 under SLURM/mpirun); `stat-jax eval`, `grpo` and `run` generate on "
                 "every process of a multi-host job in-process (rollout.backend=jetstream)")


def _run(argv: list[str]) -> int:
    silence_other_bars()  # before transformers/datasets are imported
    if argv[:1] == ["import-gguf"]:
        return _import_gguf(argv[1:])
    if argv[:1] == ["report"]:
        from stat_jax.report import main as report_main  # takes run directories, no config

        return report_main(argv[1:])
    overrides, rest = split_override_args(argv)
    args = _parser().parse_args(rest)
    _setup_logging(args.log_level)
    cmd = COMMANDS[args.command]
    spec = args.config or (str(CONFIG_DIR / cmd.default_config) if cmd.default_config else None)
    if spec is None:
        raise ConfigError("--config=FILE is required",
                          hint=f"e.g. {cmd.example} (config files are in {CONFIG_DIR})")
    if args.command == "demo" and args.quick:
        spec = with_variant(spec, "quick")  # the file's quick variant; the overrides apply on top
    config = build_config(spec, overrides)
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2, sort_keys=True, default=str))
        return 0
    if args.command == "serve":
        _refuse_multi_process_serve(args)
    if not args.dry_run:
        from stat_jax.preflight import check_inputs

        problems = check_inputs(args.command, config, args)
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise InputProblems(problems)

    from stat_jax.distributed import DistributedConfigError, is_coordinator, maybe_initialize_distributed

    try:  # before the command touches JAX's devices
        maybe_initialize_distributed(args, settings=config.get("distributed"))
    except DistributedConfigError as e:
        e.args = (f"distributed setup error: {e}",)
        raise
    if not args.dry_run and args.command not in NO_WORKDIR and "workdir" in config and is_coordinator():
        write_resolved_config(config, Path(config.workdir))
        write_command(argv, Path(config.workdir))
    module = importlib.import_module(cmd.module)
    return int(module.main(config, args) or 0)


def write_command(argv: list[str], workdir: Path) -> None:
    """<workdir>/command.json: the command line that produced the run (the report's "reproduce" line)."""
    import shlex

    (workdir / "command.json").write_text(json.dumps({"command": shlex.join(["stat-jax", *argv]),
                                                      "cwd": str(Path.cwd())}, indent=2) + "\n")


def _command_name(argv: list[str]) -> str:
    return argv[0] if argv and (argv[0] in COMMANDS or argv[0] in ("import-gguf", "report")) else ""


def _wants_supervisor(argv: list[str]) -> bool:
    """A multi-process command (not serve, not --print-config) runs under stat_jax.supervisor's parent process,
    unless STAT_JAX_SUPERVISOR=0 (e.g. under a debugger); a command line that does not parse runs as it is."""
    import os

    from stat_jax import supervisor
    from stat_jax.distributed import resolve_distributed

    if supervisor.is_supervised() or os.environ.get("STAT_JAX_SUPERVISOR", "1") == "0":
        return False
    import contextlib
    import io

    try:  # quietly: --help, --version and usage errors print when the command itself parses them
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            _, rest = split_override_args(argv)
            args = _parser().parse_args(rest)
        return args.command != "serve" and not args.print_config and resolve_distributed(args) is not None
    except (Exception, SystemExit):  # noqa: BLE001 -- the command itself reports it
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _wants_supervisor(argv):
        from stat_jax import supervisor

        return supervisor.supervise(argv, format_error)
    try:
        return _run(argv)
    except StatJaxError as e:
        if _log_level(argv).upper() == "DEBUG":
            traceback.print_exc()
        print(format_error(_command_name(argv), e), file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(format_error(_command_name(argv), StatJaxError("interrupted", hint="re-run with --resume to continue")),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

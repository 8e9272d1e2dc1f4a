"""A seconds-long eval of a tiny random student on local files (plumbing check; used by the tests)."""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/eval_tiny"
    c.model.dtype = "float32"
    c.eval.benchmarks = ("math500",)
    c.eval.max_new_tokens = 8
    c.eval.num_samples = 2
    c.eval.temperature = 1.0
    c.eval.grade_workers = 1
    c.eval.chunk_size = 2
    c.rollout.max_concurrent_decodes = 8
    c.rollout.max_prefill_length = 256  # the default instruction makes ~150-character prompts
    c.rollout.max_target_length = 288
    return c

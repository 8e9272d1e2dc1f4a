"""Math benchmark evaluation: generate, grade with math-verify, report pass@1 / avg@k / pass@k.

The entry points live in `stat_jax.eval.evaluate` (`evaluate(...)` and the command's `main`); this package
deliberately does not re-export the function `evaluate`, so `from stat_jax.eval import evaluate` is the module.
"""

from stat_jax.eval.evaluate import EvalSettings, format_table, load_eval_benchmarks
from stat_jax.eval.metrics import pass_at_k, question_metrics

__all__ = ["EvalSettings", "format_table", "load_eval_benchmarks", "pass_at_k", "question_metrics"]

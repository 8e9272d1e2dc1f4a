"""Math benchmark evaluation: generate, grade with math-verify, report pass@1 / avg@k / pass@k.

The entry points live in `stat_jax.eval.evaluate` (`evaluate(...)` and the command's `main`).
"""

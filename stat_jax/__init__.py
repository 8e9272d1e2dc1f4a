"""stat-jax: Skill-Targeted Adaptive Training (He, Panigrahi, Lin, Arora, 2025) in JAX."""

__version__ = "0.1.0"

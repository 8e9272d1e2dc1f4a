"""Student rollouts: the `RolloutBackend` interface (base.py) and its JetStream implementations.

`stat_jax.rollout.factory.make_rollout_backend(config, model, tokenizer)` builds the backend `config.rollout`
names; import it where a backend is built (it loads JetStream).
"""

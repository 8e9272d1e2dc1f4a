"""A process reward model (Qwen2.5-Math-PRM family) as a head on the Qwen2 port.

The HF checkpoint (`Qwen2ForProcessRewardModel`, remote code on the hub) is a Qwen2 backbone (`model.*`, no
`lm_head`) plus `score = Sequential(Linear(h, h), ReLU(), Linear(h, 2))`. Steps of a response are separated
by the `<extra_0>` token; the probability that a step is correct is softmax(score(hidden))[..., 1] at each
separator position. A response's score is the min (default) or product of its step probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stat_jax.models.checkpoint import CheckpointError, _open_checkpoint, load_hf_checkpoint
from stat_jax.models.config import ModelConfig
from stat_jax.models.transformer import DecoderLM

PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"
STEP_SEPARATOR = "<extra_0>"
PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
AGGREGATES = ("min", "product")


class PRMHead(nnx.Module):
    """`score`: Linear(hidden, hidden) -> ReLU -> Linear(hidden, 2); logits of (bad step, good step)."""

    def __init__(self, hidden: int, *, num_labels: int = 2, rngs: nnx.Rngs):
        self.dense = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_labels, rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.dense(hidden)))


def step_probabilities(backbone: DecoderLM, head: PRMHead, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """P(step correct) at every position [b, t] (meaningful at separator positions only)."""
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    hidden = backbone.hidden_states(tokens, positions, attention_mask)
    logits = head(hidden.astype(jnp.float32))
    return jax.nn.softmax(logits, axis=-1)[..., 1]


def aggregate_steps(probs: Sequence[float], how: str) -> float:
    """Question-level score from step probabilities: min or product (1.0 for a response with no step)."""
    if how not in AGGREGATES:
        raise ValueError(f"PRM aggregate {how!r}: choose one of {AGGREGATES}")
    if len(probs) == 0:
        return 1.0
    return float(np.min(probs)) if how == "min" else float(np.prod(probs))


def _prm_model_config(path: Path) -> ModelConfig:
    d = json.loads((path / "config.json").read_text())
    archs = d.get("architectures") or []
    if PRM_ARCHITECTURE not in archs:
        raise CheckpointError(f"{path}/config.json: architectures={archs}, expected {PRM_ARCHITECTURE!r} "
                              "(a Qwen2.5-Math-PRM-style checkpoint)")
    # The backbone is a plain Qwen2 decoder; the PRM has no lm_head, so load it as tied (logits are unused).
    return ModelConfig.from_hf_dict({**d, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
                                    source=f"{path}/config.json")


def load_prm_head(path: Path, hidden: int) -> PRMHead:
    """The `score.0` / `score.2` tensors of the checkpoint as a PRMHead (torch Linear [out, in] -> kernel [in, out])."""
    tensors = _open_checkpoint(path)
    head = PRMHead(hidden, rngs=nnx.Rngs(0))
    for layer, prefix in ((head.dense, "score.0"), (head.out, "score.2")):
        for ours, theirs, fix in (("kernel", "weight", np.transpose), ("bias", "bias", lambda a: a)):
            key = f"{prefix}.{theirs}"
            if key not in tensors:
                raise CheckpointError(f"{path}: PRM head tensor {key!r} is missing")
            value = np.asarray(fix(tensors[key].get(key)), np.float32)
            target = getattr(layer, ours)
            if value.shape != target[...].shape:
                raise CheckpointError(f"{path}: {key} has shape {value.shape}, expected {target[...].shape}")
            target[...] = jnp.asarray(value)
    return head


class ProcessRewardModel:
    """Scores (question, response) pairs with a Qwen2 PRM checkpoint in HF format."""

    def __init__(self, backbone: DecoderLM, head: PRMHead, tokenizer, *, aggregate: str = "min",
                 max_length: int = 4096, bucket: int = 128):
        if aggregate not in AGGREGATES:
            raise ValueError(f"PRM aggregate {aggregate!r}: choose one of {AGGREGATES}")
        self.tokenizer = tokenizer
        self.aggregate = aggregate
        self.max_length = max_length
        self.bucket = bucket
        self.separator_id = tokenizer.convert_tokens_to_ids(STEP_SEPARATOR)
        if self.separator_id is None or self.separator_id == tokenizer.unk_token_id:
            raise ValueError(f"the PRM tokenizer has no {STEP_SEPARATOR!r} token; is this a Qwen2.5-Math-PRM tokenizer?")
        graphdef, state = nnx.split((backbone, head))
        self._state = state
        self._forward = jax.jit(lambda st, tok, mask: step_probabilities(*nnx.merge(graphdef, st), tok, mask))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, aggregate: str = "min", max_length: int = 4096,
                        dtype: str = "float32") -> ProcessRewardModel:
        import transformers

        path = Path(path)
        cfg = _prm_model_config(path)
        backbone = load_hf_checkpoint(path, dtype=dtype, param_dtype=dtype, config=cfg, other_prefixes=("score.",))
        head = load_prm_head(path, cfg.hidden_size)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        return cls(backbone, head, tokenizer, aggregate=aggregate, max_length=max_length)

    def render(self, question: str, response: str) -> str:
        """The PRM input: system/user/assistant turns, steps (split on blank lines) each ended by the separator."""
        steps = [s.strip() for s in response.split("\n\n") if s.strip()] or [response.strip()]
        messages = [{"role": "system", "content": PRM_SYSTEM_PROMPT}, {"role": "user", "content": question},
                    {"role": "assistant", "content": STEP_SEPARATOR.join(steps) + STEP_SEPARATOR}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def step_scores(self, token_batches: Sequence[Sequence[int]]) -> list[list[float]]:
        """P(step correct) at each separator of each (already tokenized) sequence."""
        longest = max(len(t) for t in token_batches)
        width = -(-longest // self.bucket) * self.bucket  # few distinct shapes, few compilations
        tokens = np.zeros((len(token_batches), width), np.int32)
        mask = np.zeros_like(tokens)
        for i, ids in enumerate(token_batches):
            tokens[i, :len(ids)] = ids
            mask[i, :len(ids)] = 1
        probs = np.asarray(self._forward(self._state, jnp.asarray(tokens), jnp.asarray(mask)))
        return [[float(probs[i, j]) for j, t in enumerate(ids) if t == self.separator_id]
                for i, ids in enumerate(token_batches)]

    def score_responses(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8) -> list[float]:
        """One aggregated score per (question, response)."""
        from stat_jax.progress import progress_bar

        scores = []
        for start in progress_bar(range(0, len(pairs), batch_size), desc="PRM", leave=False):
            batch = pairs[start:start + batch_size]
            ids = [self.tokenizer(self.render(q, r), add_special_tokens=False)["input_ids"] for q, r in batch]
            too_long = [i for i, x in enumerate(ids) if len(x) > self.max_length]
            for i in too_long:  # keep the question and the first steps; later separators are lost
                ids[i] = ids[i][:self.max_length]
            for probs in self.step_scores(ids):
                scores.append(aggregate_steps(probs, self.aggregate))
        return scores

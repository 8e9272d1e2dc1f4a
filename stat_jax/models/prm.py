"""Process reward models behind one interface: `StepScorer.score(question, steps) -> P(step correct) per step`.

Two checkpoint formats (`stat.prm_format`), each run on our own decoder port, sharded on the mesh:

- `rlhflow`, the paper's PRM, RLHFlow/Llama3.1-8B-PRM-Mistral-Data: a plain `LlamaForCausalLM` fine-tuned to
  answer `+` or `-` after each step of a chat. Format from RLHFlow/RLHF-Reward-Modeling, `math-rm/README.md`
  ("Process Reward Evaluation") and `math-rm/prm_evaluate.py` (commit 5b2a281): one user turn per step, the
  first being `question + " " + step_1`, each followed by an assistant turn `"+"`, rendered with the
  tokenizer's own chat template; the step score is softmax over the logits of the `+` and `-` tokens
  (`tokenizer.encode("+")[-1]`, likewise `-`) at the position that predicts that assistant turn's `+`
  (their `logits[:, -3]` of each conversation prefix, i.e. the last token of the assistant header), taking
  the `+` probability. One forward over the whole conversation gives the same logits at every step's position
  as their forward per prefix, because attention is causal.
- `qwen`, Qwen2.5-Math-PRM (`Qwen2ForProcessRewardModel`, remote code on the hub): a Qwen2 backbone (`model.*`,
  no `lm_head`) plus `score = Sequential(Linear(h, h), ReLU(), Linear(h, 2))`; steps are joined and ended by
  `<extra_0>` in the assistant turn after a fixed system prompt, and the step score is
  softmax(score(hidden))[..., 1] at each separator (the model card's usage example).

Over-long inputs keep the question and the final steps: the earliest steps are dropped (and, if the last step
alone is still too long, the start of its text), so the last-step score the hard rule reads is never lost.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from stat_jax import sharding
from stat_jax.models.checkpoint import CheckpointError, _open_checkpoint, load_hf_checkpoint
from stat_jax.models.config import ModelConfig
from stat_jax.models.transformer import DecoderLM

PRM_FORMATS = ("rlhflow", "qwen")
QWEN_ARCHITECTURE = "Qwen2ForProcessRewardModel"
STEP_SEPARATOR = "<extra_0>"
QWEN_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
GOOD_TOKEN, BAD_TOKEN = "+", "-"  # RLHFlow's assistant answers


def split_steps(response: str) -> list[str]:
    """A response's steps: its blank-line-separated paragraphs (how RLHFlow's Deepseek data and Qwen's PRM split)."""
    steps = [s.strip() for s in response.split("\n\n") if s.strip()]
    return steps or [response.strip()]


def is_hard_by_step_scores(scores: Sequence[float], *, last: float = 0.85, mean: float = 0.85,
                           earlier: float = 0.7) -> bool:
    """The paper's rule: bad if the last step <= `last`, the mean <= `mean`, or any earlier step <= `earlier`."""
    if len(scores) == 0:
        raise ValueError("no step scores: a PRM scores at least one step per response")
    return (scores[-1] <= last or sum(scores) / len(scores) <= mean
            or any(s <= earlier for s in scores[:-1]))


# ----- heads ------------------------------------------------------------------------------------------------
class QwenPRMHead(nnx.Module):
    """`score`: Linear(hidden, hidden) -> ReLU -> Linear(hidden, 2); logits of (bad step, good step).

    Kept in float32 and replicated on every device: it is one h x h matrix, read only at the step positions.
    """

    def __init__(self, hidden: int, *, num_labels: int = 2):
        def param(*shape):
            return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=(None,) * len(shape))

        self.dense_kernel, self.dense_bias = param(hidden, hidden), param(hidden)
        self.out_kernel, self.out_bias = param(hidden, num_labels), param(num_labels)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        x = jax.nn.relu(hidden @ self.dense_kernel[...] + self.dense_bias[...])
        return x @ self.out_kernel[...] + self.out_bias[...]


def rlhflow_probabilities(model: DecoderLM, hidden_at: jax.Array, candidates: jax.Array) -> jax.Array:
    """P(`+`) against `-` [b, s] from final hidden states at the step positions [b, s, e] (float32).

    Only the two candidate columns of the vocabulary product are computed.
    """
    weights = model.embed[...].T if model.lm_head is None else model.lm_head[...]  # [e, vocab]
    columns = jnp.take(weights, candidates, axis=1).astype(jnp.float32)  # [e, 2]: (+, -)
    return jax.nn.softmax(hidden_at @ columns, axis=-1)[..., 0]


def qwen_probabilities(head: QwenPRMHead, hidden_at: jax.Array) -> jax.Array:
    """P(good step) [b, s] from the score head at the separator positions."""
    return jax.nn.softmax(head(hidden_at), axis=-1)[..., 1]


# ----- the forward, one layer per program ---------------------------------------------------------------------
# One jitted program for the whole 32-layer stack let XLA all-gather every layer's FSDP-sharded weights at once
# (measured on the 8B shape over 8 devices: 0.87 GB of temporaries per layer, 35 GB per device in all). One
# program per layer, the same compiled program for every layer, keeps only one layer's gathered weights alive
# and compiles once per input shape instead of once per 32-layer graph.
def embed_program(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed_tokens(tokens)


def layer_program(graphdef, state, x, attention_mask):
    """One decoder layer over right-padded rows (causal + padding mask, positions from the mask)."""
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    t = x.shape[1]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None] & attention_mask.astype(bool)[:, None, :]
    return nnx.merge(graphdef, state)(x, positions, mask)[0]


def final_hidden_at(model: DecoderLM, x: jax.Array, score_at: jax.Array) -> jax.Array:
    """The final norm's output [b, s, e] (float32) at token indices `score_at` [b, s]."""
    x = jnp.take_along_axis(x, score_at[..., None], axis=1)  # norm after the gather: s positions, not t
    return model.final_norm(x).astype(jnp.float32)


# ----- the scorer -------------------------------------------------------------------------------------------
class StepScorer:
    """`score(question, steps)` -> one probability per (kept) step; batches, pads and truncates from the start.

    `truncated` counts the responses cut to fit `max_length` and `dropped_steps` the steps they lost.
    """

    format = ""

    def __init__(self, backbone: DecoderLM, tokenizer, *, head: nnx.Module | None = None, mesh: Mesh | None = None,
                 max_length: int = 4096, batch_size: int = 8, bucket: int = 128):
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.bucket = int(bucket)
        self.truncated = 0
        self.dropped_steps = 0
        graphdef, self._state = nnx.split(backbone)
        layer_graphdef = nnx.graphdef(backbone.layers[0])  # every layer has the same structure
        self._layer_states = [nnx.state(layer) for layer in backbone.layers]
        head_graphdef, self._head_state = nnx.split(head) if head is not None else (None, None)
        self._embed = jax.jit(functools.partial(embed_program, graphdef))
        self._layer = jax.jit(functools.partial(layer_program, layer_graphdef))

        def finish(state, head_state, x, score_at):
            model = nnx.merge(graphdef, state)
            head_module = None if head_graphdef is None else nnx.merge(head_graphdef, head_state)
            return self._probabilities(model, head_module, final_hidden_at(model, x, score_at))

        self._finish = jax.jit(finish)

    # format-specific ------------------------------------------------------------------------------------------
    def encode(self, question: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """Token ids of the PRM input and, per step, the index whose output scores that step."""
        raise NotImplementedError

    def _probabilities(self, model: DecoderLM, head: nnx.Module | None, hidden_at: jax.Array) -> jax.Array:
        """P(step correct) [b, s] from the final hidden states at the step positions."""
        raise NotImplementedError

    # shared ---------------------------------------------------------------------------------------------------
    def fit(self, question: str, steps: Sequence[str]) -> tuple[list[int], list[int], int]:
        """`encode` within `max_length`: drops the earliest steps, then the start of the last step's text.

        Returns ids, score indices and how many of the earliest steps were dropped.
        """
        steps = [s.strip() for s in steps if s.strip()] or [""]
        ids, at = self.encode(question, steps)
        if len(ids) <= self.max_length:
            return ids, at, 0
        self.truncated += 1
        lo, hi = 1, len(steps) - 1  # smallest start index whose suffix of steps fits (lengths fall as it grows)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.encode(question, steps[mid:])[0]) <= self.max_length:
                hi = mid
            else:
                lo = mid + 1
        start = lo if len(steps) > 1 else 0
        ids, at = self.encode(question, steps[start:])
        self.dropped_steps += start
        last = steps[-1]
        while len(ids) > self.max_length:  # the question and the last step alone are too long: cut the step's start
            step_ids = self.tokenizer(last, add_special_tokens=False)["input_ids"]
            over = len(ids) - self.max_length
            if over >= len(step_ids):
                raise ValueError(f"stat.prm_max_length={self.max_length} tokens cannot hold the question plus any "
                                 f"of its last step (question starts {question[:60]!r}); raise stat.prm_max_length")
            last = self.tokenizer.decode(step_ids[over + 1:])  # one spare token: re-tokenizing may merge differently
            ids, at = self.encode(question, [last])
        return ids, at, start

    def score(self, question: str, steps: Sequence[str]) -> list[float]:
        """P(step correct) for each step the input kept (the last ones when it had to be truncated)."""
        return self.score_many([(question, steps)])[0]

    def score_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        """`score` of each (question, steps), `batch_size` sequences per forward pass."""
        from stat_jax.progress import progress_bar

        out: list[list[float]] = []
        for begin in progress_bar(range(0, len(items), self.batch_size), desc=f"PRM ({self.format})", leave=False):
            encoded = [self.fit(q, s)[:2] for q, s in items[begin:begin + self.batch_size]]
            out.extend(self._score_encoded(encoded))
        return out

    def _score_encoded(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[list[float]]:
        # Fixed rows and bucketed widths: few distinct shapes, so few compilations.
        width = -(-max(len(ids) for ids, _ in encoded) // self.bucket) * self.bucket
        num_steps = -(-max(len(at) for _, at in encoded) // 8) * 8
        rows = max(self.batch_size, len(encoded))
        tokens = np.zeros((rows, width), np.int32)
        mask = np.zeros_like(tokens)
        score_at = np.zeros((rows, num_steps), np.int32)
        for i, (ids, at) in enumerate(encoded):
            tokens[i, :len(ids)], mask[i, :len(ids)], score_at[i, :len(at)] = ids, 1, at
        probs = np.asarray(self._run(tokens, mask, score_at))
        return [[float(p) for p in probs[i, :len(at)]] for i, (_, at) in enumerate(encoded)]

    def _run(self, tokens: np.ndarray, mask: np.ndarray, score_at: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return self._forward(*(jnp.asarray(a) for a in (tokens, mask, score_at)))
        placed = [jax.device_put(a, sharding.batch_sharding(self.mesh, 2, a.shape)) for a in (tokens, mask, score_at)]
        with jax.set_mesh(self.mesh):  # so the model's `constrain` hints see the mesh
            return self._forward(*placed)

    def _forward(self, tokens: jax.Array, mask: jax.Array, score_at: jax.Array) -> jax.Array:
        x = self._embed(self._state, tokens)
        for layer_state in self._layer_states:
            x = self._layer(layer_state, x, mask)
        return self._finish(self._state, self._head_state, x, score_at)


class RLHFlowScorer(StepScorer):
    """RLHFlow/Llama3.1-8B-PRM-*: a causal LM that answers `+` / `-` after each user turn (one per step)."""

    format = "rlhflow"

    def __init__(self, model: DecoderLM, tokenizer, **kwargs):
        self.good_id = tokenizer.encode(GOOD_TOKEN)[-1]
        self.bad_id = tokenizer.encode(BAD_TOKEN)[-1]
        if self.good_id == self.bad_id:
            raise ValueError(f"the PRM tokenizer encodes {GOOD_TOKEN!r} and {BAD_TOKEN!r} to the same id "
                             f"{self.good_id}; is this the RLHFlow PRM's tokenizer?")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the PRM tokenizer has no chat template; the RLHFlow format is a chat (copy the "
                             "checkpoint's tokenizer_config.json)")
        probe = [{"role": "user", "content": "x"}]
        with_header = self._chat(tokenizer, probe, add_generation_prompt=True)
        without = self._chat(tokenizer, probe, add_generation_prompt=False)
        if with_header[:len(without)] != without or len(with_header) == len(without):
            raise ValueError("the PRM tokenizer's chat template gives no assistant header as a generation prompt; "
                             "the RLHFlow format needs a Llama-3-style template")
        self.assistant_header = with_header[len(without):]
        self._candidates = jnp.asarray([self.good_id, self.bad_id], jnp.int32)
        super().__init__(model, tokenizer, **kwargs)

    @staticmethod
    def _chat(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                  add_generation_prompt=add_generation_prompt))

    @staticmethod
    def conversation(question: str, steps: Sequence[str]) -> list[dict[str, str]]:
        messages = []
        for k, step in enumerate(steps):
            messages.append({"role": "user", "content": f"{question} {step}" if k == 0 else step})
            messages.append({"role": "assistant", "content": GOOD_TOKEN})
        return messages

    def encode(self, question: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        messages = self.conversation(question, steps)
        ids = self._chat(self.tokenizer, messages, add_generation_prompt=False)
        h = self.assistant_header
        at = [i - 1 for i in range(len(h), len(ids)) if ids[i] == self.good_id and ids[i - len(h):i] == h]
        if len(at) != len(steps):  # a step's own text renders as a header and "+": locate each turn by its prefix
            at = [len(self._chat(self.tokenizer, messages[:2 * k + 1], add_generation_prompt=True)) - 1
                  for k in range(len(steps))]
            if any(i + 1 >= len(ids) or ids[i + 1] != self.good_id for i in at):
                raise ValueError(f"the PRM tokenizer's chat template does not render each assistant answer as the "
                                 f"single token {GOOD_TOKEN!r} after the assistant header (question starts "
                                 f"{question[:60]!r}); the RLHFlow format needs the checkpoint's own tokenizer")
        return ids, at

    def _probabilities(self, model, head, hidden_at):
        return rlhflow_probabilities(model, hidden_at, self._candidates)


class QwenScorer(StepScorer):
    """Qwen2.5-Math-PRM: steps ended by `<extra_0>`, scored by a two-way head at each separator."""

    format = "qwen"

    def __init__(self, backbone: DecoderLM, head: QwenPRMHead, tokenizer, **kwargs):
        self.separator_id = tokenizer.convert_tokens_to_ids(STEP_SEPARATOR)
        if self.separator_id is None or self.separator_id == tokenizer.unk_token_id:
            raise ValueError(f"the PRM tokenizer has no {STEP_SEPARATOR!r} token; is this a Qwen2.5-Math-PRM "
                             "tokenizer? (set stat.prm_format=rlhflow for RLHFlow checkpoints)")
        super().__init__(backbone, tokenizer, head=head, **kwargs)

    def render(self, question: str, steps: Sequence[str]) -> str:
        steps = [s.replace(STEP_SEPARATOR, "") for s in steps]  # a stray separator would score a non-step
        messages = [{"role": "system", "content": QWEN_SYSTEM_PROMPT}, {"role": "user", "content": question},
                    {"role": "assistant", "content": STEP_SEPARATOR.join(steps) + STEP_SEPARATOR}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode(self, question: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        ids = self.tokenizer(self.render(question, steps), add_special_tokens=False)["input_ids"]
        return ids, [i for i, t in enumerate(ids) if t == self.separator_id]

    def _probabilities(self, model, head, hidden_at):
        return qwen_probabilities(head, hidden_at)


# ----- loading ----------------------------------------------------------------------------------------------
def _qwen_model_config(path: Path) -> ModelConfig:
    d = json.loads((path / "config.json").read_text())
    # The backbone is a plain Qwen2 decoder; the PRM has no lm_head, so load it as tied (logits are unused).
    return ModelConfig.from_hf_dict({**d, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
                                    source=f"{path}/config.json")


def load_qwen_head(path: Path, hidden: int, mesh: Mesh | None = None) -> QwenPRMHead:
    """The `score.0` / `score.2` tensors as a QwenPRMHead (torch Linear [out, in] -> kernel [in, out])."""
    tensors = _open_checkpoint(path)
    head = QwenPRMHead(hidden)
    for ours, theirs in (("dense_kernel", "score.0.weight"), ("dense_bias", "score.0.bias"),
                         ("out_kernel", "score.2.weight"), ("out_bias", "score.2.bias")):
        if theirs not in tensors:
            raise CheckpointError(f"{path}: PRM head tensor {theirs!r} is missing")
        value = np.asarray(tensors[theirs].get(theirs), np.float32)
        value = value.T if value.ndim == 2 else value
        target = getattr(head, ours)
        if value.shape != target[...].shape:
            raise CheckpointError(f"{path}: {theirs} has shape {value.shape}, expected {target[...].shape}")
        target[...] = jnp.asarray(value) if mesh is None else jax.device_put(value, sharding.replicated(mesh))
    return head


def _architectures(path: Path) -> list[str]:
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config} does not exist; stat.prm_path must be a Hugging Face checkpoint directory")
    return json.loads(config.read_text()).get("architectures") or []


def load_step_scorer(path: str | Path, prm_format: str, *, mesh: Mesh | None = None, dtype: str = "bfloat16",
                     max_length: int = 4096, batch_size: int = 8) -> StepScorer:
    """The PRM at `path` in `prm_format` ("rlhflow" | "qwen"), its weights sharded on `mesh` in `dtype`."""
    import transformers

    path = Path(path)
    archs = _architectures(path)
    kwargs = dict(mesh=mesh, max_length=max_length, batch_size=batch_size)
    if prm_format == "rlhflow":
        if "LlamaForCausalLM" not in archs:
            raise CheckpointError(f"{path}/config.json: architectures={archs}, but stat.prm_format=rlhflow expects "
                                  "LlamaForCausalLM (RLHFlow/Llama3.1-8B-PRM-*); set stat.prm_format=qwen for "
                                  "Qwen2.5-Math-PRM checkpoints")
        model = load_hf_checkpoint(path, mesh, dtype=dtype, param_dtype=dtype)
        return RLHFlowScorer(model, transformers.AutoTokenizer.from_pretrained(str(path)), **kwargs)
    if prm_format == "qwen":
        if QWEN_ARCHITECTURE not in archs:
            raise CheckpointError(f"{path}/config.json: architectures={archs}, but stat.prm_format=qwen expects "
                                  f"{QWEN_ARCHITECTURE!r} (Qwen2.5-Math-PRM); set stat.prm_format=rlhflow for "
                                  "RLHFlow checkpoints")
        cfg = _qwen_model_config(path)
        backbone = load_hf_checkpoint(path, mesh, dtype=dtype, param_dtype=dtype, config=cfg,
                                      other_prefixes=("score.",))
        head = load_qwen_head(path, cfg.hidden_size, mesh)
        return QwenScorer(backbone, head, transformers.AutoTokenizer.from_pretrained(str(path)), **kwargs)
    raise ValueError(f"stat.prm_format={prm_format!r}: choose one of {PRM_FORMATS}")

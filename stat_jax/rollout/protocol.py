"""What a stat-jax request carries besides its tokens, and how it crosses JetStream's gRPC proto.

JetStream 0.2.2's DecodeRequest has no sampling fields. stat-jax clients put a request's sampling and its
(prompt index, sample index) as JSON in `session_cache`, a string 0.2.2 only uses to decide whether to add a
BOS token, which stat-jax's driver never does (prompts arrive complete). Requests from other JetStream
clients carry none and get the server's configured default sampling.
"""

from __future__ import annotations

import dataclasses
import json

from stat_jax.rollout.base import SamplingParams

SESSION_SAMPLING_PREFIX = "stat-jax-sampling:"


@dataclasses.dataclass(frozen=True)
class RequestSampling:
    """A request's sampling settings and identity; its random key derives from (seed, prompt, sample)."""

    sampling: SamplingParams
    prompt_index: int
    sample_index: int


def sampling_to_session(req: RequestSampling) -> str:
    """Encodes a request's sampling for `DecodeRequest.session_cache`."""
    return SESSION_SAMPLING_PREFIX + json.dumps(
        {"sampling": dataclasses.asdict(req.sampling), "prompt_index": req.prompt_index,
         "sample_index": req.sample_index}, sort_keys=True)


def sampling_from_session(session: str | None) -> RequestSampling | None:
    """Inverse of `sampling_to_session`; None for requests from other JetStream clients."""
    if not session or not session.startswith(SESSION_SAMPLING_PREFIX):
        return None
    try:
        payload = json.loads(session[len(SESSION_SAMPLING_PREFIX):])
        fields = dict(payload["sampling"])
        fields["stop_token_ids"] = tuple(fields.get("stop_token_ids", ()))
        return RequestSampling(SamplingParams(**fields), int(payload["prompt_index"]), int(payload["sample_index"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed stat-jax sampling in DecodeRequest.session_cache ({e}): {session[:200]!r}") from e

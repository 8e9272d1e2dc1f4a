"""THE stop tokens of a student: the one place that decides where a generated answer ends.

A student's checkpoint names its end in up to four places, and they disagree on real models:
  - the tokenizer's `eos_token` (Qwen2.5 base: `<|endoftext|>`; Llama-3.2 base: `<|end_of_text|>`),
  - `config.json` `eos_token_id` and `generation_config.json` `eos_token_id` (folded into
    `ModelConfig.eos_token_ids` by `ModelConfig.from_hf_dir`),
  - the chat template's end-of-turn token, which ends every assistant turn the template renders
    (`<|im_end|>` for ChatML/Qwen, `<|eot_id|>` for Llama-3.x) and which none of the files above may list.
A model prompted through its chat template ends its answer with the template's end-of-turn token, so a stop
set without it lets a base Qwen2.5 run on into invented turns. `stop_token_ids` is their union, end-of-turn
first: rollouts (JetStream backend and `stat-jax serve`), eval, GRPO and the SFT data all call it, so the
token SFT teaches a response to end with is the token generation stops at.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

# Rendered as an assistant turn to find what the template writes after a response. Plain ASCII letters, so no
# template rewrites it (Llama-3.x `| trim`s content; none upper/lower-cases it).
_PROBE = "StatJaxEndOfTurnProbe"

# The date a probe rendering passes to templates that read one (Llama-3.x): the probe must not call strftime_now.
_PROBE_DATE = "26 Jul 2024"


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones and every added token flagged special."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def template_end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant turn's content, or None.

    Found by rendering [user, assistant=probe] and tokenizing what follows the probe, so it works for any
    template (ChatML `<|im_end|>`, Llama-3.x `<|eot_id|>`, Gemma `<end_of_turn>`, `{{ eos_token }}`) without a
    table of known names. None when there is no template, it writes no special token after the turn, or it
    cannot render an assistant turn (then prompts still render; only the end marker is unknown).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, date_string=_PROBE_DATE)
    except Exception as e:  # a generation-only template: eval works, SFT will fail with its own message
        log.warning("tokenizer %r: its chat template cannot render an assistant turn (%s: %s); the template's "
                    "end-of-turn token is unknown, stopping at the EOS ids only",
                    getattr(tokenizer, "name_or_path", ""), type(e).__name__, e)
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    after = tokenizer(text[at + len(_PROBE):], add_special_tokens=False)["input_ids"]
    special = special_token_ids(tokenizer)
    return next((int(t) for t in after if int(t) in special), None)


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [int(v) for v in value]
    return [int(value)]


def stop_token_ids(tokenizer, model_eos_ids: Iterable[int] = ()) -> tuple[int, ...]:
    """End-of-turn token, then the tokenizer's EOS, then the model's EOS ids (config.json + generation_config).

    Deduplicated, in that order: element 0 is THE end token (what SFT appends to a response whose rendering
    carries none, and what GRPO scores at the end of a finished completion). Raises ValueError when all four
    sources are empty, since generation could then never stop.
    """
    ids = _as_ids(template_end_of_turn_id(tokenizer)) + _as_ids(getattr(tokenizer, "eos_token_id", None))
    ids += _as_ids(tuple(model_eos_ids))
    if not ids:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: no stop token anywhere: no eos_token, no "
            "eos_token_id in config.json / generation_config.json, and no end-of-turn token in the chat template; "
            "set eos_token in tokenizer_config.json")
    return tuple(dict.fromkeys(ids))


def end_token_id(tokenizer, model_eos_ids: Iterable[int] = ()) -> int:
    """The token that ends an assistant turn: `stop_token_ids(...)[0]`."""
    return stop_token_ids(tokenizer, model_eos_ids)[0]

"""Math prompts rendered with the student's own chat template (optionally few-shot).

The rendered string already holds the template's special tokens (BOS, role markers): whoever tokenizes it
must use `add_special_tokens=False`, or the BOS is doubled.

Every rendering goes through `apply_chat_template` here, which passes a fixed `date_string`: Llama-3.x templates
otherwise write today's date (`strftime_now`) into the system turn, so the same question would be a different
prompt after midnight (a resumed rollout loses its partial rows; SFT and eval prompts drift apart).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stat_jax.data.grader import last_boxed
from stat_jax.data.records import MathProblem
from stat_jax.errors import TokenizerError

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The date templates that read one are given (config `eval.date_string`): Llama-3.x's own fallback when
# `strftime_now` is unavailable, so a prompt is exactly what the released template renders offline.
DEFAULT_DATE_STRING = "26 Jul 2024"


def apply_chat_template(tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool,
                        date_string: str = DEFAULT_DATE_STRING) -> str:
    """The template's text for `messages`, with `date_string` fixed (templates that read no date ignore it)."""
    if not date_string:
        raise ValueError("date_string is empty: set eval.date_string to a fixed date such as "
                         f"{DEFAULT_DATE_STRING!r}, so prompts do not change from day to day")
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt, date_string=date_string)


def user_message(problem: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user turn: `instruction` with `{problem}` filled in if it has that placeholder, else problem + instruction."""
    if "{problem}" in instruction:
        return instruction.replace("{problem}", problem)
    return f"{problem}\n\n{instruction}" if instruction else problem


def worked_solution(example: MathProblem) -> str:
    """A few-shot answer turn: the reference solution, ending in `\\boxed{answer}` like the requested format."""
    solution = example.solution or ""
    if "####" in solution:  # GSM8K: drop calculator annotations and the '#### n' line
        solution = re.sub(r"<<[^>]*>>", "", solution.rsplit("####", 1)[0]).strip()
    if last_boxed(solution) is None:
        solution = f"{solution}\nThe final answer is $\\boxed{{{example.answer}}}$.".strip()
    return solution


def build_messages(
    problem: str,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    system_prompt: str = "",
    few_shot: Sequence[MathProblem] = (),
) -> list[dict[str, str]]:
    """Chat turns: optional system prompt, few-shot (user, assistant) pairs, then the question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for example in few_shot:
        messages.append({"role": "user", "content": user_message(example.problem, instruction)})
        messages.append({"role": "assistant", "content": worked_solution(example)})
    messages.append({"role": "user", "content": user_message(problem, instruction)})
    return messages


def render_plain(messages: Sequence[dict[str, str]]) -> str:
    """A template-free rendering for base models without a chat template."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(f"Question: {m['content']}")
        else:
            parts.append(f"Answer: {m['content']}")
    return "\n\n".join(parts) + "\n\nAnswer:"


def render_prompt(
    tokenizer,
    problem: str,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    system_prompt: str = "",
    few_shot: Sequence[MathProblem] = (),
    use_chat_template: bool = True,
    date_string: str = DEFAULT_DATE_STRING,
) -> str:
    """The generation prompt for one problem (chat template with add_generation_prompt=True)."""
    messages = build_messages(problem, instruction=instruction, system_prompt=system_prompt, few_shot=few_shot)
    if not use_chat_template:
        return render_plain(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat template; "
            "use an instruct checkpoint, or render plain 'Question:/Answer:' prompts with "
            "--config.eval.use_chat_template=false"
        )
    return apply_chat_template(tokenizer, messages, add_generation_prompt=True, date_string=date_string)


class NoChatTemplateError(TokenizerError, ValueError):
    """The tokenizer has no chat template and the prompts are to be rendered with one."""


def render_prompts(tokenizer, problems: Sequence[MathProblem], **kwargs) -> list[str]:
    """`render_prompt` for each problem, same options."""
    return [render_prompt(tokenizer, p.problem, **kwargs) for p in problems]

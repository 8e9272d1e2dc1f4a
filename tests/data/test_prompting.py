"""Prompts go through the student's chat template with the instruction and optional few-shot turns."""

import pytest

from stat_jax.data.char_tokenizer import build_char_tokenizer
from stat_jax.data.prompting import (
    DEFAULT_INSTRUCTION,
    build_messages,
    render_prompt,
    render_prompts,
    user_message,
    worked_solution,
)
from stat_jax.data.records import MathProblem


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_default_prompt_is_the_chat_template_with_generation_prompt(tok):
    prompt = render_prompt(tok, "What is 1+1?")
    assert prompt == f"<bos><|user|>\nWhat is 1+1?\n\n{DEFAULT_INSTRUCTION}<|end|>\n<|assistant|>\n"
    assert "\\boxed{}" in DEFAULT_INSTRUCTION


def test_instruction_placeholder_and_system_prompt(tok):
    prompt = render_prompt(tok, "2+2?", instruction="Solve: {problem} Box it.", system_prompt="Be brief.")
    assert prompt == "<bos><|system|>\nBe brief.<|end|>\n<|user|>\nSolve: 2+2? Box it.<|end|>\n<|assistant|>\n"
    assert user_message("p", "") == "p"


def test_few_shot_turns_precede_the_question(tok):
    shots = [
        MathProblem(id="a", problem="1+2?", answer="3", solution="$1+2=\\boxed{3}$."),
        MathProblem(id="b", problem="Eggs?", answer="26", solution="16-3 = <<16-3=13>>13\n13*2 = <<13*2=26>>26\n#### 26"),
    ]
    messages = build_messages("5+5?", few_shot=shots)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "$1+2=\\boxed{3}$."
    # GSM8K solution: calculator annotations and '####' replaced by the boxed final answer
    assert messages[3]["content"] == "16-3 = 13\n13*2 = 26\nThe final answer is $\\boxed{26}$."
    prompt = render_prompt(tok, "5+5?", few_shot=shots)
    assert prompt.index("1+2?") < prompt.index("Eggs?") < prompt.index("5+5?")
    assert prompt.endswith("<|assistant|>\n")


def test_worked_solution_without_solution_uses_answer():
    assert worked_solution(MathProblem(id="x", problem="p", answer="7")) == "The final answer is $\\boxed{7}$."


def test_missing_chat_template_error_and_plain_fallback(tok):
    bare = build_char_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*use_chat_template=false"):
        render_prompt(bare, "q")
    plain = render_prompt(bare, "q", use_chat_template=False)
    assert plain == f"Question: q\n\n{DEFAULT_INSTRUCTION}\n\nAnswer:"


def test_render_prompts_keeps_order(tok):
    problems = [MathProblem(id=str(i), problem=f"q{i}", answer="1") for i in range(3)]
    prompts = render_prompts(tok, problems, instruction="")
    assert [p.split("\n")[1] for p in prompts] == ["q0<|end|>", "q1<|end|>", "q2<|end|>"]

"""A fixed `date_string` (config `eval.date_string`) for templates that read the date: the Llama-3.x template
writes `strftime_now("%d %b %Y")` into every system turn, so without it the same question is another prompt
tomorrow. The clock the template reads is patched to two different days."""

from __future__ import annotations

import datetime as real_datetime
import sys
from pathlib import Path

import pytest
from transformers.utils import chat_template_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.*` imports under --import-mode=importlib

from stat_jax.data.prompting import DEFAULT_DATE_STRING, render_prompt  # noqa: E402
from stat_jax.data.records import SFTExample  # noqa: E402
from stat_jax.data.sft_data import render_example, tokenize_examples  # noqa: E402
from tests.templates.chat_templates import llama3_tokenizer  # noqa: E402

QUESTION = "What is 1 + 1?"
DAYS = (real_datetime.datetime(2025, 3, 14, 23, 59), real_datetime.datetime(2025, 3, 15, 0, 1))


def _on_day(monkeypatch, day: real_datetime.datetime) -> None:
    """The template's `strftime_now` reads `datetime.now()` of transformers' chat_template_utils: make it `day`."""

    class Frozen(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return day

    monkeypatch.setattr(chat_template_utils, "datetime", Frozen)


@pytest.fixture(scope="module")
def tok():
    return llama3_tokenizer(instruct=True)


def test_without_a_fixed_date_the_prompt_changes_at_midnight(tok, monkeypatch):
    messages = [{"role": "user", "content": QUESTION}]
    rendered = []
    for day in DAYS:
        _on_day(monkeypatch, day)
        rendered.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert "Today Date: 14 Mar 2025" in rendered[0] and "Today Date: 15 Mar 2025" in rendered[1]
    assert rendered[0] != rendered[1]


def test_prompts_are_the_same_on_both_days(tok, monkeypatch):
    prompts, sft = [], []
    for day in DAYS:
        _on_day(monkeypatch, day)
        prompts.append(render_prompt(tok, QUESTION))
        sft.append(render_example(tok, SFTExample(response="2", prompt=QUESTION)))
    assert prompts[0] == prompts[1]
    assert f"Today Date: {DEFAULT_DATE_STRING}\n" in prompts[0]
    assert sft[0] == sft[1]
    # SFT trains on the very prompt rollouts and eval generate from (same instruction-less question here).
    assert sft[0][0] == render_prompt(tok, QUESTION, instruction="")


def test_date_string_is_configurable_and_reaches_every_renderer(tok, monkeypatch):
    _on_day(monkeypatch, DAYS[0])
    assert "Today Date: 01 Jan 2025\n" in render_prompt(tok, QUESTION, date_string="01 Jan 2025")
    a = tokenize_examples(tok, [SFTExample(response="2", prompt=QUESTION)], date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025\n" in tok.decode(a.ids[0].tolist())
    with pytest.raises(ValueError, match="eval.date_string"):
        render_prompt(tok, QUESTION, date_string="")


def test_config_default_is_the_constant_and_eval_reads_it():
    from stat_jax.config import load_config_file
    from stat_jax.eval.evaluate import EvalSettings

    config = load_config_file("configs/base.py")
    assert config.eval.date_string == DEFAULT_DATE_STRING
    config.eval.date_string = "02 Feb 2025"
    assert EvalSettings.from_config(config).date_string == "02 Feb 2025"

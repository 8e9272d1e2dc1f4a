"""A character-level Hugging Face tokenizer with a chat template, built locally (no download).

Used by the offline demo (arithmetic text is naturally character-level) and by tests, which need a real
`PreTrainedTokenizerFast` with a chat template and special tokens, saved in HF format beside a model.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<|end|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS = "<pad>", "<bos>", "<|end|>"
DEFAULT_ALPHABET = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, pad_to_multiple_of: int = 8) -> PreTrainedTokenizerFast:
    """Special tokens get ids 0..6 (<pad>=0, <bos>=1, <|end|>=2 is EOS), then one id per character."""
    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    # Unused filler ids keep the vocabulary a multiple of 8 (friendlier matmul shapes).
    while len(vocab) % pad_to_multiple_of:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[4:]})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def save_char_tokenizer(out_dir: str | Path, alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    tok = build_char_tokenizer(alphabet)
    tok.save_pretrained(str(out_dir))
    return tok

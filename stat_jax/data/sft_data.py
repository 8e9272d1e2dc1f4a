"""SFT data: records -> chat-rendered token ids with a response-only loss mask -> packed, shuffled batches.

Records are `{"prompt": str | "messages": [{"role", "content"}...], "response": str}` (see
`records.SFTExample`) from JSON/JSONL files or a `datasets` dataset (hub name, or a local directory written by
`save_to_disk` / loadable by `load_dataset`).

Each example is rendered with the student tokenizer's chat template (prompt turns + the assistant response);
the loss covers the response tokens up to and including the EOS that ends the assistant turn, never the
prompt or the template's trailing text.

Batching packs several examples into each row of `seq_len` tokens (sequential greedy packing in shuffled
order) instead of padding one example per row. STAT's training sets are short math solutions, so padding to
the longest example would waste most of every row; packing keeps rows nearly full. Each packed example keeps
its own positions (restarting at 0) and its own `segment_ids` value, and the model attends only within a
segment, so packing changes throughput but not the loss of any example. `packing=False` gives one example
per row (padded), which is the reference the packed path is tested against.

The iterator is deterministic: epoch e visits the examples in `permutation(seed, e)`; its position
`{"epoch", "batch"}` is saved in each checkpoint and restored on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stat_jax.data.prompting import DEFAULT_DATE_STRING, apply_chat_template
from stat_jax.data.records import SFTExample
from stat_jax.data.stop_tokens import stop_token_ids
from stat_jax.errors import DataError

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


class SFTDataError(DataError, ValueError):
    """A malformed SFT record or data source; the message names the file and line (or row)."""


# ----- records ---------------------------------------------------------------------------------------------
def parse_record(row: Any, where: str) -> SFTExample:
    """Validates one raw record; `where` (file:line) goes into every error message."""
    if isinstance(row, SFTExample):
        return row
    if not isinstance(row, dict):
        raise SFTDataError(f"{where}: expected a JSON object with 'response' and 'prompt' or 'messages', "
                           f"got {type(row).__name__}")
    response = row.get("response")
    if not isinstance(response, str) or not response.strip():
        raise SFTDataError(f"{where}: 'response' must be a non-empty string (keys present: {sorted(row)})")
    prompt, messages = row.get("prompt"), row.get("messages")
    if (prompt is None) == (messages is None):
        raise SFTDataError(f"{where}: set exactly one of 'prompt' (a string) or 'messages' (chat turns)")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise SFTDataError(f"{where}: 'prompt' must be a non-empty string")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise SFTDataError(f"{where}: messages[{i}] must be {{'role': str, 'content': str}}, got {m!r:.80}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    meta = row.get("meta")
    return SFTExample(response=response, prompt=prompt, messages=messages,
                      meta=meta if isinstance(meta, dict) else None)


def _read_json_file(path: Path) -> list[SFTExample]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            out.append(parse_record(row, f"{path}:{lineno}"))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SFTDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"examples": [...]} or {"data": [...]}
        data = data.get("examples", data.get("data"))
    if not isinstance(data, list):
        raise SFTDataError(f"{path}: expected a JSON list of records (or {{'examples': [...]}})")
    return [parse_record(row, f"{path}: item {i}") for i, row in enumerate(data)]


def _read_hf_dataset(name: str, split: str) -> list[SFTExample]:
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                          or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SFTDataError(f"{name}: no split {split!r} (splits: {sorted(ds)}); set data.dataset_split")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # network, missing split, unknown name: say which and what to do
            raise SFTDataError(
                f"data.dataset={name!r} split={split!r}: could not load ({type(e).__name__}: {e}); "
                f"use a local path (save_to_disk directory or JSON/JSONL via data.train_files) when offline"
            ) from e
    return [parse_record(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(ds)]


def load_sft_examples(files: Sequence[str | Path] = (), dataset: str = "", split: str = "train") -> list[SFTExample]:
    """All records from JSON/JSONL `files` and/or a `datasets` dataset, validated, in order."""
    if isinstance(files, (str, Path)):
        files = [files]
    out: list[SFTExample] = []
    for f in files:
        path = Path(f)
        if path.is_dir():
            out.extend(_read_hf_dataset(str(path), split))
            continue
        if not path.is_file():
            raise SFTDataError(f"{path}: SFT data file not found")
        out.extend(_read_json_file(path))
    if dataset:
        out.extend(_read_hf_dataset(dataset, split))
    if not out:
        raise SFTDataError(f"no SFT examples found (files={list(map(str, files))}, dataset={dataset!r}); "
                           "set data.train_files or data.dataset")
    return out


# ----- tokenization ----------------------------------------------------------------------------------------
def example_tokens(tokenizer, example: SFTExample) -> int:
    """Tokens one example takes in training: its chat-rendered prompt plus the response and EOS."""
    prompt = example.prompt if example.prompt is not None else tokenizer.apply_chat_template(
        example.messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(prompt + example.response, add_special_tokens=False)["input_ids"]) + 1


def equal_budget(examples: Sequence[SFTExample], tokens: Sequence[int], budget: int, seed: int) -> list[SFTExample]:
    """Examples drawn in seeded shuffled passes until `budget` tokens are reached: every set compared at the same
    budget trains on the same number of tokens, whatever its size."""
    if not examples:
        raise SFTDataError("cannot fill a token budget from an empty training set")
    rng = random.Random(seed)
    out, total = [], 0
    while total < budget:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in order:
            out.append(examples[i])
            total += tokens[i]
            if total >= budget:
                break
    return out


@dataclass
class TokenizedExamples:
    """Token ids and loss masks of every example (ragged: `ids[i]`, `loss_mask[i]` of equal length)."""

    ids: list[np.ndarray]
    loss_mask: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """Identifies the exact token data, so a resume on changed data is caught."""
        h = hashlib.sha1()
        for ids, mask in zip(self.ids, self.loss_mask):
            h.update(np.int64(len(ids)).tobytes())
            h.update(ids.tobytes())
            h.update(mask.tobytes())
        return h.hexdigest()[:16]


def _prompt_messages(example: SFTExample) -> list[dict[str, str]]:
    return example.messages if example.messages is not None else [{"role": "user", "content": example.prompt}]


def render_example(tokenizer, example: SFTExample,
                   date_string: str = DEFAULT_DATE_STRING) -> tuple[str, str]:
    """(prompt text incl. the assistant header, the rest of the conversation) from the chat template.

    `date_string` is the date templates that read one get, the same as rollouts and eval use.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SFTDataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                           "SFT renders examples with it (use an instruct tokenizer or set one)")
    messages = _prompt_messages(example)
    prompt = apply_chat_template(tokenizer, messages, add_generation_prompt=True, date_string=date_string)
    full = apply_chat_template(tokenizer, messages + [{"role": "assistant", "content": example.response}],
                               add_generation_prompt=False, date_string=date_string)
    if not full.startswith(prompt):
        raise SFTDataError("the chat template renders the conversation with a different prefix than the prompt "
                           "with add_generation_prompt=True, so response tokens cannot be located")
    return prompt, full[len(prompt):]


def tokenize_examples(tokenizer, examples: Sequence[SFTExample], eos_token_ids: Iterable[int] = (), *,
                      date_string: str = DEFAULT_DATE_STRING) -> TokenizedExamples:
    """Renders and tokenizes every example; the loss mask is 1 on the response through its end token.

    The stop set is `stop_token_ids` (the template's end-of-turn token, the tokenizer's and the model's EOS
    ids): the response ends at the first of them the template writes after it, so SFT teaches the same end
    token generation stops at. A template that writes none gets THE end token (`stop_token_ids(...)[0]`)
    appended.
    """
    try:
        stops = stop_token_ids(tokenizer, eos_token_ids)
    except ValueError as e:
        raise SFTDataError(str(e)) from None
    stop, end_id = set(stops), stops[0]
    rendered = [render_example(tokenizer, ex, date_string) for ex in examples]
    prompts, rests = zip(*rendered) if rendered else ((), ())
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    rest_ids = tokenizer(list(rests), add_special_tokens=False)["input_ids"]
    ids_out, masks = [], []
    for p, r in zip(prompt_ids, rest_ids):
        # Keep the response through the token ending the assistant turn; drop template text after it ("\n").
        end = next((i for i, t in enumerate(r) if t in stop), None)
        response = list(r[: end + 1]) if end is not None else list(r) + [end_id]
        ids = np.asarray(list(p) + response, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(p):] = True
        ids_out.append(ids)
        masks.append(mask)
    return TokenizedExamples(ids_out, masks)


def drop_too_long(data: TokenizedExamples, seq_len: int) -> tuple[TokenizedExamples, int]:
    """Removes examples that need more than `seq_len` positions (n tokens use n-1); returns (kept, dropped).

    Truncating would cut off the answer and its EOS, teaching the model to stop mid-solution, so long
    examples are dropped (and counted) instead.
    """
    keep = [i for i, ids in enumerate(data.ids) if 2 <= len(ids) <= seq_len + 1]
    return TokenizedExamples([data.ids[i] for i in keep], [data.loss_mask[i] for i in keep]), len(data) - len(keep)


# ----- packing and batches ---------------------------------------------------------------------------------
def pack_in_order(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Sequential greedy packing: indices in the given order, a new row when the next one does not fit."""
    rows: list[list[int]] = []
    used = row_len + 1
    for i, n in enumerate(lengths):
        if n > row_len:
            raise ValueError(f"example {i} needs {n} positions > row length {row_len}")
        if used + n > row_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def build_row(data: TokenizedExamples, members: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
    """One training row: inputs, next-token targets, loss weights, per-example positions and segment ids."""
    row = {
        "tokens": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "weights": np.zeros(seq_len, np.float32),
        "positions": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),  # 0 = padding
    }
    at = 0
    for segment, i in enumerate(members, 1):
        ids, mask = data.ids[i], data.loss_mask[i]
        n = len(ids) - 1
        row["tokens"][at:at + n] = ids[:-1]
        row["targets"][at:at + n] = ids[1:]
        row["weights"][at:at + n] = mask[1:]
        row["positions"][at:at + n] = np.arange(n)
        row["segment_ids"][at:at + n] = segment
        at += n
    return row


class SFTBatches:
    """Deterministic, resumable iterator of global-batch-sized row groups; each host yields its own rows.

    `next()` returns numpy arrays [batch_size // process_count, seq_len] for BATCH_KEYS.
    """

    def __init__(self, data: TokenizedExamples, *, batch_size: int, seq_len: int, seed: int, packing: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if len(data) == 0:
            raise SFTDataError("no SFT examples left to train on (all dropped as too long?)")
        if batch_size % process_count:
            raise ValueError(f"train.batch_size={batch_size} must be a multiple of the {process_count} processes")
        self.data, self.batch_size, self.seq_len, self.seed = data, batch_size, seq_len, seed
        self.packing = packing
        self.process_index, self.process_count = process_index, process_count
        self._fingerprint = data.fingerprint()
        self.epoch, self.batch = 0, 0
        self._rows_epoch: int | None = None
        self._rows: list[list[int]] = []

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        if self._rows_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            if self.packing:
                lengths = [len(self.data.ids[i]) - 1 for i in order]
                self._rows = [[int(order[j]) for j in row] for row in pack_in_order(lengths, self.seq_len)]
            else:
                self._rows = [[int(i)] for i in order]
            self._rows_epoch = epoch
        return self._rows

    def batches_in_epoch(self, epoch: int = 0) -> int:
        """Full batches in `epoch` (the tail is dropped; at least one, padded with empty rows if needed)."""
        return max(1, len(self._epoch_rows(epoch)) // self.batch_size)

    def state(self) -> dict[str, Any]:
        """The position (the next batch to yield), for the checkpoint."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "fingerprint": self._fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint or state.get("seed") != self.seed:
            raise SFTDataError(
                "the checkpoint was written while training on different SFT data or seed "
                f"(checkpoint fingerprint {state.get('fingerprint')} seed {state.get('seed')}, now "
                f"{self._fingerprint} seed {self.seed}); resume with the same data, or start a new workdir"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.batches_in_epoch(self.epoch):
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self._epoch_rows(self.epoch)
        group = rows[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
        group = group + [[]] * (self.batch_size - len(group))  # only when an epoch has < batch_size rows
        local = self.batch_size // self.process_count
        group = group[self.process_index * local:(self.process_index + 1) * local]
        self.batch += 1
        built = [build_row(self.data, members, self.seq_len) for members in group]
        return {k: np.stack([r[k] for r in built]) for k in BATCH_KEYS}

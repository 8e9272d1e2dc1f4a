"""Progress for long host loops: tqdm bars on a terminal, periodic one-line summaries in files and CI logs.

A tqdm bar redraws itself with carriage returns; redirected to a file that is hundreds of frames per bar.
`progress_bar(...)` takes tqdm's arguments and, when stderr is not a terminal, gives a tqdm that writes one
plain line (`rollout: 12/64 seq (19%) 0:41 elapsed, eta 2:57, 0.29 seq/s`) at most every
`STAT_JAX_PROGRESS_INTERVAL` seconds (default 30), plus the first and the final state.

`STAT_JAX_PROGRESS=bars|lines|off` overrides the choice.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

MODE_ENV = "STAT_JAX_PROGRESS"
INTERVAL_ENV = "STAT_JAX_PROGRESS_INTERVAL"
MODES = ("bars", "lines", "off")
DEFAULT_INTERVAL_S = 30.0
# No {bar}: a line in a log file is read, not watched.
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) {elapsed} elapsed, eta {remaining}, {rate_fmt}{postfix}"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def progress_mode(stream: TextIO | None = None) -> str:
    """`bars` on a terminal, `lines` otherwise, unless STAT_JAX_PROGRESS says which."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"{MODE_ENV}={forced!r}: use one of {', '.join(MODES)}")
        return forced
    stream = stream or sys.stderr
    try:
        return "bars" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # closed or unusual stream objects
        return "lines"


def line_interval_s() -> float:
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected seconds between progress lines, e.g. 30") from None


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm (same arguments) that suits where stderr goes: a bar, or summary lines, or nothing."""
    mode = progress_mode(kwargs.get("file"))
    if mode == "off":
        kwargs["disable"] = True
    if mode != "lines" or kwargs.get("disable"):
        return tqdm(iterable, **kwargs)
    interval = line_interval_s()
    kwargs.update(
        disable=False,  # explicit: TQDM_DISABLE (silence_other_bars) is only for other libraries' bars
        file=LineStream(kwargs.get("file") or sys.stderr),
        mininterval=interval,
        maxinterval=max(interval, 10.0),
        miniters=1,  # check the clock on every update: lines come by time, not by tqdm's adaptive count
        leave=True,  # the final state is a line too, even for bars that would vanish on a terminal
        dynamic_ncols=False,
        ncols=None,
    )
    if kwargs.get("total") is None and iterable is not None and hasattr(iterable, "__len__"):
        kwargs["total"] = len(iterable)
    if kwargs.get("total") is not None:
        kwargs.setdefault("bar_format", LINE_FORMAT)
    return tqdm(iterable, **kwargs)


def silence_other_bars() -> None:
    """Outside a terminal, turns off the tqdm bars of other libraries (transformers' weight loading, hub
    downloads): frames in a log say nothing. tqdm reads TQDM_DISABLE as its default (ours pass disable=False);
    huggingface_hub and transformers read HF_HUB_DISABLE_PROGRESS_BARS."""
    if progress_mode() != "bars":
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class LineStream:
    """A file for tqdm that turns its redraws (`\\r`, cursor moves) into plain lines, each written once."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self._last = ""

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", _ANSI.sub("", text)):
            part = part.strip()
            if part and part != self._last:  # tqdm redraws the same state on close
                self.stream.write(part + "\n")
                self._last = part
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

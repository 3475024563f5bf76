"""Progress bars for long operations, on a terminal only.

``gpu-fleet simulate``, ``gpu-fleet scenario run`` over several files and the replay benchmark
can run for minutes; a person at a terminal wants to see them move, while a CI log, a pipe and
``-o json`` / ``--json`` output must stay clean (a JSON consumer reads stdout, but a log of
carriage returns helps nobody either).  So a bar is drawn on **stderr** only when
``progress_wanted`` says so: stderr is a terminal, the ``CI`` environment variable is unset (or
``0``/``false``/``no``) and the output is not JSON - unless the user forces it (``--progress``),
in which case a stream that is not a terminal gets one plain line every ``PLAIN_INTERVAL`` s.

On a terminal a bar redraws in place at most every ``TTY_INTERVAL`` s and ends with a newline;
the clock is injected so this is tested without waiting.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

TTY_INTERVAL = 0.1
PLAIN_INTERVAL = 10.0
WIDTH = 30

Tick = Callable[[int, int], None]
"""``tick(done, total)``: report progress; ``done == total`` finishes the bar."""


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    value = (os.environ if env is None else env).get("CI", "").strip().lower()
    return value not in ("", "0", "false", "no")


def progress_wanted(
    *,
    json_output: bool = False,
    force: bool = False,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Draw a bar?  Forced, or: a terminal, not CI, not JSON output."""
    if force:
        return True
    out = sys.stderr if stream is None else stream
    return out.isatty() and not json_output and not in_ci(env)


class ProgressBar:
    """One labelled bar on ``out``; ``tick(done, total)`` as work advances."""

    def __init__(
        self,
        out: TextIO,
        label: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.label = label
        self.clock = clock
        self.tty = out.isatty()
        self.interval = TTY_INTERVAL if self.tty else PLAIN_INTERVAL
        self._last: float | None = None
        self.finished = False
        self._drawn = False  # a partial line is on the terminal

    def clear(self) -> None:
        """Wipe a partly drawn bar, so other output (e.g. a report on stdout) starts clean."""
        if self.tty and self._drawn and not self.finished:
            self.out.write("\r\033[K")
            self.out.flush()
            self._drawn = False

    def tick(self, done: int, total: int) -> None:
        now = self.clock()
        due = self._last is None or now - self._last >= self.interval
        if self.finished or (done < total and not due):
            return
        self._last = now
        self.finished = done >= total
        filled = int(WIDTH * min(done, total) / max(1, total))
        line = f"{self.label:<32} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total}"
        if self.tty:
            self.out.write(f"\r{line}\n" if self.finished else f"\r{line}")
            self._drawn = not self.finished
        else:
            self.out.write(f"{line}\n")
        self.out.flush()


def bars(out: TextIO, clock: Callable[[], float] = time.monotonic) -> Callable[[str], Tick]:
    """A factory of bars on ``out``: ``bars(out)(label)`` is one bar's ``tick``."""
    return lambda label: ProgressBar(out, label, clock).tick


def no_bars(_label: str) -> Tick | None:
    """The factory when no bar is wanted."""
    return None

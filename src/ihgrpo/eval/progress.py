"""The progress of an evaluation, updated while a batch is generated.

Samples done / to do (they count when their batch is in the ledger), tokens generated and
tokens/s, the rows still generating in the current ``generate`` call and its decode step, the
elapsed time and an ETA (from the samples done so far; ``?`` before the first batch ends: the
call's ``step N/M`` then says how far the longest row can still go). A ``rich`` bar on stderr
when it is a terminal; otherwise one plain line on stderr at most every ``PLAIN_INTERVAL_S``
seconds (logs and CI stay readable).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, TextIO

if TYPE_CHECKING:
    from ihgrpo.rollout.generator import GenerateProgress

__all__ = ["EvalProgress", "PLAIN_INTERVAL_S"]

PLAIN_INTERVAL_S = 10.0


def _clock_text(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class EvalProgress:
    """The display of one run: :meth:`start_batch` / :meth:`batch_done` from the runner,
    :meth:`on_generate` as the generator's ``progress`` callback, :meth:`close` at the end.

    ``stream``: where it goes (stderr); ``rich``: a live bar (default: when ``stream`` is a
    terminal); ``clock``: seconds, monotonic (tests pass their own).
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, rich: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.tokens = total, 0, 0
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.bench = ""
        self.call: GenerateProgress | None = None  # the latest report of the running call
        self.t0: float | None = None  # when the first batch started
        self._last_line: float | None = None
        self._bar = self._task = None
        if rich is None:
            rich = bool(getattr(self.stream, "isatty", lambda: False)())
        if rich:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
            from rich.table import Column

            # the details wrap on a narrow terminal instead of cutting the counts short
            info = TextColumn("samples · {task.fields[info]}", table_column=Column(overflow="fold"))
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
                                 MofNCompleteColumn(), info, console=Console(file=self.stream))
            self._task = self._bar.add_task("eval", total=total, info="")
            self._bar.start()

    # ------------------------------------------------------------------ events
    def start_batch(self, bench: str) -> None:
        self.bench = bench
        self.call = None
        if self.t0 is None:
            self.t0 = self._last_line = self.clock()
        self._show()

    def on_generate(self, event: GenerateProgress) -> None:
        self.tokens += event.new_tokens
        self.call = event
        self._show()

    def batch_done(self, samples: int) -> None:
        self.done += samples
        self.call = None
        self._show()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # ------------------------------------------------------------------ text
    def status(self) -> str:
        """All but the counts and the benchmark: ``1,234 tokens · 56 tok/s · 20/32 rows (step
        600/8000) · 1:05 elapsed · ETA 4:12`` (the rows part while a generate call runs)."""
        elapsed = 0.0 if self.t0 is None else self.clock() - self.t0
        parts = [f"{self.tokens:,} tokens", f"{self.tokens / elapsed:,.0f} tok/s" if elapsed >= 1 else "- tok/s"]
        c = self.call
        if c is not None and c.finished < c.rows:
            parts.append(f"{c.rows - c.finished}/{c.rows} rows (step {c.step}/{c.max_steps})")
        left = self.total - self.done
        eta = "0:00" if not left else _clock_text(elapsed / self.done * left) if self.done else "?"
        parts += [f"{_clock_text(elapsed)} elapsed", f"ETA {eta}"]
        return " · ".join(parts)

    def line(self) -> str:
        """The plain line: ``eval: 12/48 samples · aime24 · <status>``."""
        return f"eval: {self.done}/{self.total} samples · {self.bench} · {self.status()}"

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=self.bench, info=self.status())
            return
        now = self.clock()
        if self._last_line is not None and now - self._last_line >= PLAIN_INTERVAL_S:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)

"""Progress lines for long work (calibration, upload, profiling), on the terminal's stderr.

On a terminal a line is redrawn in place; otherwise a few milestones are printed,
so CI logs stay short. Writes to a duplicate of the original stderr, so it still
reaches the user while native libraries' chatter on fd 2 is captured.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional, TextIO


class Progress:
    def __init__(self, enabled: bool = True, stream: Optional[TextIO] = None):
        self.enabled = enabled
        if stream is None and enabled:
            try:
                stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
            except (OSError, ValueError, AttributeError):
                stream = sys.stderr
        self._out = stream
        self._tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
        self._last = 0.0
        self._label = ""

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self._out, flush=True)

    def ticker(self, label: str, unit: str = ""):
        """A callable tick(done, total) drawing 'label  done/total unit'."""
        self._label = label
        shown = set()

        def tick(done: int, total: int, extra: str = "") -> None:
            if not self.enabled:
                return
            now = time.monotonic()
            if self._tty:
                if done == total or now - self._last > 0.1:
                    self._last = now
                    pct = 100.0 * done / total if total else 100.0
                    self._out.write(f"\r  {label}  {done}/{total}{unit} ({pct:3.0f}%) {extra}\x1b[K")
                    self._out.flush()
                    if done == total:
                        self._out.write("\n")
            else:
                q = int(4 * done / total) if total else 4
                if q not in shown and (q > 0 or done == total):
                    shown.add(q)
                    print(f"  {label}  {done}/{total}{unit} {extra}".rstrip(), file=self._out, flush=True)

        return tick

    def timed(self, label: str, unit: str = ""):
        """As ticker, with the rate and the time left (from the mean rate so far) after the count."""
        tick = self.ticker(label, unit)
        t0: List[float] = []   # the clock starts at the first call (the work's start, not the caller's setup)

        def timed_tick(done: int, total: int) -> None:
            if not t0:
                t0.append(time.monotonic())
            el = time.monotonic() - t0[0]
            if done >= total or not done or el <= 0:
                tick(done, total, f"{el:.0f} s" if done else "")
            else:
                tick(done, total, f"{done / el:.2f}/s, {el / done * (total - done):.0f} s left")

        return timed_tick

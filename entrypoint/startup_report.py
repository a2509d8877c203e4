"""What a user reads while the server starts: the phase it is in (logged, and shown on /ping), and one summary
once it is ready: the headline (how long it took, where it listens) and the facts worth knowing, one per line,
with the phases that took the time.

The facts come as a dict (`launch.startup_summary`: configuration, plus whatever the engine's `summary()`
adds); this module only decides how they read, so an engine can add a key without touching it.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any, Callable

#: a phase shorter than this is left out of the summary's timing lines
SHOWN_PHASE_SECONDS = 0.5
#: the summary's width; longer values are wrapped under themselves
WIDTH = 110


class StartupTimeline:
    """The phases of start-up in order, as the loader reports them (fetching, converting, loading weights,
    warming up...), each with the moment it began."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self._phases: list[tuple[str, float]] = []

    def enter(self, phase: str) -> None:
        self._phases.append((phase, self.clock()))

    def elapsed(self) -> float:
        return self.clock() - self.started

    def durations(self) -> list[tuple[str, float]]:
        """(phase, seconds) for every phase so far; the last one lasts until now."""
        moments = [moment for _, moment in self._phases[1:]] + [self.clock()]
        return [(phase, end - begun) for (phase, begun), end in zip(self._phases, moments)]


def render_summary(headline: str, facts: dict[str, Any], timeline: StartupTimeline | None = None) -> str:
    """The headline, then one aligned `name  value` line per fact (long values wrapped under themselves),
    then one line per phase that took the time (its text shortened to the line)."""
    rows = [(name, _show(name, value)) for name, value in facts.items()]
    slow = [] if timeline is None else [
        (phase, seconds) for phase, seconds in timeline.durations() if seconds >= SHOWN_PHASE_SECONDS]
    width = max([len(name) for name, _ in rows] + [len("time")])
    lines = [headline]
    for name, value in rows:
        lines.append(textwrap.fill(value, width=WIDTH, initial_indent=f"  {name:<{width}}  ",
                                   subsequent_indent=" " * (width + 4), break_long_words=False,
                                   break_on_hyphens=False))
    for index, (phase, seconds) in enumerate(slow):
        start = f"  {'time' if index == 0 else '':<{width}}  {seconds:5.1f} s  "
        lines.append(start + textwrap.shorten(phase, width=WIDTH - len(start), placeholder=" ...",
                                                 break_on_hyphens=False))
    return "\n".join(lines)


def _show(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and "bytes" in name:
        return _bytes(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"

"""Stop strings on detokenized text (pure), for ingress: what may be shown now, and whether one was reached."""

from __future__ import annotations


class StopMatcher:
    """Feeds text deltas, returns the text safe to emit; a stop string is never emitted.

    A stop string can span deltas, so the last `longest - 1` characters are held back until the next
    delta shows they do not begin one; text after the earliest match is dropped, as OpenAI does.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._tail = ""  # held back: it may be the start of a stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that can be shown after appending `text`; sets `stopped` on a match."""
        if self.stopped:
            return ""
        buffer = self._tail + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._tail = True, ""
            return buffer[:cut]
        keep = min(self.hold, len(buffer))
        self._tail = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held-back text at the end of the output (no stop string followed it)."""
        tail, self._tail = self._tail, ""
        return "" if self.stopped else tail

"""Degenerate repetition in generated text, detected incrementally.

A small model that has lost the thread repeats itself: the same token, sentence or line
over and over until its output cap (issue 15: the default model answered the README's
question with one line repeated until the slot's context was full). The detector sees the
text as it is generated, as a sequence of tokens — runs of word characters, or runs of
other non-space characters, whitespace dropped — and reports when the tail of that
sequence is one unit of ``p`` tokens repeated: at least ``min_repeats`` copies and at
least ``min_tokens`` tokens in all, for a period ``p`` up to ``max_period``.

Cost: for each new token, one comparison per period (``run[p]`` counts how many of the
latest tokens equal the token ``p`` before them), so a chunk is processed in time
proportional to its own tokens times ``max_period``, never by re-scanning the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Words, or runs of punctuation/symbols ("?<|", "====", "|---|"), whitespace dropped.
_TOKEN = re.compile(r"\w+|[^\w\s]+")
# A token longer than this is cut into pieces of this length: "aaaa…" or "=-=-=-…" with
# no whitespace would otherwise be one token that grows for ever.
PIECE = 16


@dataclass(frozen=True)
class Repetition:
    """A repeated tail: ``period`` tokens repeated over ``tokens`` tokens; the text up to
    ``keep_chars`` holds everything before the repetition and its first copy."""

    period: int
    tokens: int
    keep_chars: int


class RepetitionDetector:
    """Feed generated text chunk by chunk with :meth:`feed`; it returns a
    :class:`Repetition` once the tail is degenerate (and keeps returning it)."""

    def __init__(self, *, min_repeats: int = 3, min_tokens: int = 40, max_period: int = 100) -> None:
        if min_repeats < 2 or max_period < 1:
            raise ValueError("min_repeats must be at least 2 and max_period at least 1")
        self.max_period = max_period
        # need[p]: matches in a row that make the tail ``p``-periodic enough to cut.
        self._need = [0] + [max((min_repeats - 1) * p, min_tokens - p, 1)
                            for p in range(1, max_period + 1)]
        self._runs = [0] * (max_period + 1)
        # Recent tokens and the text offset at which each ends; long enough to locate the
        # start of any repetition that can be reported.
        self._keep = max(self._need) + 2 * max_period
        self._tokens: list[str] = []
        self._ends: list[int] = []
        self._partial = ""  # a token that may continue in the next chunk
        self._offset = 0  # characters fed before ``_partial``
        self.found: Repetition | None = None

    def feed(self, text: str) -> Repetition | None:
        if self.found is not None or not text:
            return self.found
        buf = self._partial + text
        start = self._offset
        last = 0
        for m in _TOKEN.finditer(buf):
            if m.end() == len(buf):
                break  # touches the end: it may go on in the next chunk
            self._token(m.group(), start + m.start())
            if self.found is not None:
                return self.found
            last = m.end()
        else:
            last = len(buf)
        rest = buf[last:]
        # A token still open at the end: emit its complete pieces, keep the remainder.
        lead = len(rest) - len(rest.lstrip())
        while len(rest) - lead > PIECE:
            self._push(rest[lead : lead + PIECE], start + last + lead + PIECE)
            if self.found is not None:
                return self.found
            lead += PIECE
        self._offset = start + last + lead
        self._partial = rest[lead:]
        return None

    def _token(self, token: str, at: int) -> None:
        for i in range(0, len(token), PIECE):
            piece = token[i : i + PIECE]
            self._push(piece, at + i + len(piece))
            if self.found is not None:
                return

    def _push(self, token: str, end: int) -> None:
        tokens, runs, need = self._tokens, self._runs, self._need
        n = len(tokens)
        for p in range(1, min(n, self.max_period) + 1):
            if tokens[n - p] == token:
                run = runs[p] + 1
                runs[p] = run
                if run >= need[p]:
                    span = run + p
                    tokens.append(token)
                    self._ends.append(end)
                    # The first copy ends ``span - p`` tokens before the last one.
                    first_copy_end = self._ends[-(span - p) - 1] if span - p < len(self._ends) else 0
                    self.found = Repetition(p, span, first_copy_end)
                    return
            else:
                runs[p] = 0
        tokens.append(token)
        self._ends.append(end)
        if n + 1 > 2 * self._keep:
            del tokens[: -self._keep]
            del self._ends[: -self._keep]

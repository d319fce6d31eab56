"""The leak guard: an answer never prints its system prompt or a configured canary.

A small model asked to "repeat the text above" may echo the system prompt verbatim, and no
training stops that reliably; so the serving side watches the streamed text instead:

    guard = LeakGuard([system_prompt, *canaries], min_run=24)
    for piece in pieces:
        released = guard.push(piece)       # what may be sent now ("" while it could still become a leak)
        if guard.tripped:
            break                          # the answer ends "filtered"; the held text is never sent
    released = guard.finish()              # end of the answer: the held text is safe after all

A leak is a run of `min_run` characters in a row of a protected text (the whole text when it is
shorter) appearing in the answer. Both sides are compared normalised: NFKC, case-folded, and
only letters and digits kept, so "C a-N.A r Y" is "canary" and full-width ＡＢＣ is abc. The guard
holds back the shortest tail that could still grow into a leak (the longest suffix of the answer
that is a piece of a protected text, at most `min_run - 1` normalised characters) and releases
the rest at once: streaming stays incremental, and when the guard trips, the whole matched run
is among what is held, so none of it was sent. Pure Python: no Django, no torch.
"""

import unicodedata

DEFAULT_MIN_RUN = 24
MIN_CANARY_CHARS = 6  # a canary shorter than this (normalised) would stop ordinary answers


def normalise(text):
    """What the guard compares: NFKC, case-folded, letters and digits only (character by
    character, as the answer arrives, so both sides fold the same way)."""
    return "".join(_fold(char) for char in text)


def _fold(char):
    return "".join(c for c in unicodedata.normalize("NFKC", char).casefold() if c.isalnum())


class LeakGuard:
    def __init__(self, protected, *, min_run=DEFAULT_MIN_RUN):
        if min_run < 1:
            raise ValueError(f"min_run must be at least 1, not {min_run!r}")
        self.min_run = min_run
        # Texts longer than min_run leak by any min_run-long run; shorter ones only whole; a few
        # characters (a system prompt like "简洁回答") are no secret and would stop ordinary answers.
        texts = {normalise(text) for text in protected if text}
        self._long = sorted(t for t in texts if len(t) > min_run)
        self._short = sorted(t for t in texts if min(MIN_CANARY_CHARS, min_run) <= len(t) <= min_run)
        self._runs = {t[i : i + min_run] for t in self._long for i in range(len(t) - min_run + 1)}
        self._raw = ""  # the answer's text not yet released
        self._norm = ""  # _raw normalised: the held tail, then what the current push added
        self._origin = []  # for each char of _norm, its index in _raw
        self.tripped = False

    @property
    def active(self):
        return bool(self._long or self._short)

    def push(self, piece):
        """Take more of the answer; returns the text that may be sent now."""
        if self.tripped:
            return ""
        if not self.active:
            return piece
        for char in piece:
            index = len(self._raw)
            self._raw += char
            for norm in _fold(char):
                self._norm += norm
                self._origin.append(index)
                if self._leaks():
                    self.tripped = True
                    self._raw, self._norm, self._origin = "", "", []
                    return ""
        return self._release()

    def finish(self):
        """The answer ended: release what was held (nothing once tripped)."""
        held, self._raw, self._norm, self._origin = self._raw, "", "", []
        return "" if self.tripped else held

    def _leaks(self):
        tail = self._norm
        if len(tail) >= self.min_run and tail[-self.min_run :] in self._runs:
            return True
        return any(tail.endswith(short) for short in self._short)

    def _held(self):
        """How many normalised characters at the end could still become (part of) a leak."""
        tail = self._norm
        for size in range(min(len(tail), self.min_run - 1), 0, -1):
            suffix = tail[-size:]
            if any(t.startswith(suffix) for t in self._short):
                return size
            if any(suffix in t for t in self._long):
                return size
        return 0

    def _release(self):
        held = self._held()
        start = self._origin[len(self._norm) - held] if held else len(self._raw)
        released, self._raw = self._raw[:start], self._raw[start:]
        self._norm = self._norm[len(self._norm) - held :] if held else ""
        self._origin = [index - start for index in self._origin[len(self._origin) - held :]] if held else []
        return released

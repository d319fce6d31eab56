"""Prompt-lookup drafts: the next tokens of an answer guessed from its own prompt, for one
batched forward to verify instead of one forward per token.

A grounded answer mostly copies spans of the curated answers in its prompt's reference block
(and of the conversation). So when the last few tokens of the answer so far also occur earlier
in prompt + answer, the tokens that followed them there are a good guess of what comes next.
The backend feeds the sequence's last token and the draft in one forward, reads the greedy
token after each of them, and keeps the longest prefix the model agrees with plus the model's
own next token (`LocalEngine._accept_verified`): a greedy answer is token for token the one
decoding without drafts gives, only fewer forwards are spent on it.

    drafter = PromptLookup(prompt_ids, max_draft=8)
    drafter.extend(token)                 # every token the answer takes
    draft = drafter.propose(room=...)     # [] or up to max_draft ids
    drafter.feedback(len(draft), taken)   # how many of them the model confirmed

The draft length adapts: it grows by 2 after a draft that was taken whole and shrinks to one more
than what was taken otherwise. A draft rejected outright makes the drafter sit out the next
steps, twice as many after each miss in a row (1, 2, 4, ... `max_pause`): an answer that stops
copying falls back to one token per step, without paying for drafts that keep failing.

Pure Python over token ids: nothing here imports torch, llama.cpp or Django.
"""

DEFAULT_MAX_DRAFT = 8
MAX_NGRAM = 3  # the longest tail looked up; shorter ones are tried when it is not found
MIN_NGRAM = 1
START_DRAFT = 4
MAX_PAUSE = 32


class PromptLookup:
    """The drafter of one sequence: an index of the n-grams of its prompt and answer so far."""

    def __init__(self, prompt_ids, *, max_draft=DEFAULT_MAX_DRAFT, max_ngram=MAX_NGRAM, min_ngram=MIN_NGRAM):
        if max_draft < 1:
            raise ValueError(f"max_draft must be at least 1, not {max_draft!r}")
        self.max_draft = max_draft
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.length = min(START_DRAFT, max_draft)  # the next draft's length, adapted by feedback
        self.pause = 0  # steps still to sit out
        self.misses = 0  # drafts rejected outright in a row
        self.proposed = 0  # totals, for the engine's counters
        self.accepted = 0
        self.ids = []
        # n-gram -> the position just after its latest occurrence that ends before the last token
        # (the index lags one token behind, so the tail never finds itself)
        self._after = {}
        for token in prompt_ids:
            self.extend(token)

    def extend(self, token):
        """Append a token of the prompt or of the answer."""
        ids = self.ids
        ids.append(token)
        end = len(ids) - 1  # index the n-grams ending at the token before this one
        for n in range(self.min_ngram, self.max_ngram + 1):
            if end - n < 0:
                break
            self._after[tuple(ids[end - n : end])] = end

    def propose(self, room=None):
        """The draft for the next step: the tokens that followed the latest earlier occurrence of
        the answer's tail (its longest tail of max_ngram..min_ngram tokens that occurred), at most
        `room` of them (the tokens the answer may still take after the next one); [] while paused."""
        if self.pause:
            self.pause -= 1
            return []
        limit = self.length if room is None else min(self.length, room)
        if limit <= 0:
            return []
        ids = self.ids
        for n in range(min(self.max_ngram, len(ids)), self.min_ngram - 1, -1):
            start = self._after.get(tuple(ids[-n:]))
            if start is not None:
                return ids[start : start + limit]
        return []

    def feedback(self, proposed, taken):
        """A verify step's result: `taken` of the `proposed` draft tokens matched the model's."""
        if not proposed:
            return
        self.proposed += proposed
        self.accepted += taken
        if taken == proposed:
            self.length = min(self.length + 2, self.max_draft)
        else:
            self.length = max(taken + 1, 1)
        if taken == 0:
            self.misses += 1
            self.pause = min(2 ** (self.misses - 1), MAX_PAUSE)
        else:
            self.misses = 0

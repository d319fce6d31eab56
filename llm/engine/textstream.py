"""Token ids in, complete text deltas out.

Byte-level tokenizers split a Chinese character over two or three tokens; decoding those one by
one yields U+FFFD. The delta is held until the text decodes cleanly, and decoding restarts a
little before the new tokens (vLLM's prefix/read offsets) so that tokenizers which strip a
leading space at the start of a decode do not eat the spaces between words. Leading and trailing
whitespace of the answer is dropped, as `llm.generation.generate_answer` strips it: the
streamed text and the final text are the same string.
"""

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = 0  # decode from here, for context
        self.read = 0  # text up to here has been produced
        self.started = False  # a non-space character has been emitted
        self.pending = ""  # trailing whitespace held until more text follows it
        self.text = ""  # everything emitted

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id):
        """Add one generated id; returns the new complete text (maybe "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._emit(after[len(before) :])

    def finish(self):
        """Flush at the end: a trailing half character and trailing whitespace are dropped."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        delta = after[len(before) :].rstrip(REPLACEMENT) if len(after) > len(before) else ""
        self.read = len(self.ids)
        piece = self._emit(delta)
        self.pending = ""
        return piece

    def _emit(self, delta):
        text = self.pending + delta
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.pending = text[len(body) :]
        if body:
            self.started = True
            self.text += body
        return body


class AnswerText:
    """Generated ids in, the text that may be sent out: the TextStream, then the leak guard
    (llm.engine.guard) when there is one. Once the guard trips nothing more comes out."""

    def __init__(self, tokenizer, guard=None):
        self.stream = TextStream(tokenizer)
        self.guard = guard

    @property
    def ids(self):
        return self.stream.ids

    @property
    def tripped(self):
        return self.guard is not None and self.guard.tripped

    def push(self, token_id):
        """The text that may be sent for one more id ("" maybe; check `tripped` after)."""
        return self._guarded(self.stream.push(token_id))

    def finish(self):
        """The pieces to send at the end: the stream's tail through the guard, then what the guard
        held (it was safe after all); nothing once tripped."""
        tail = self._guarded(self.stream.finish())
        if self.tripped:
            return []
        return [tail, self.guard.finish() if self.guard is not None else ""]

    def _guarded(self, piece):
        if self.guard is None:
            return piece
        if self.guard.tripped:
            return ""
        return self.guard.push(piece)

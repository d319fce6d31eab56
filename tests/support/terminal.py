"""A stand-in for a terminal: what a management command writes to it, kept as text."""

import io


class Terminal(io.StringIO):
    """stdout as a command sees it in a terminal (isatty), so that it draws its progress bars."""

    def isatty(self):
        return True


def looks_like_a_bar(text):
    """Whether text holds something a progress bar writes: a carriage return or tqdm's `%|`."""
    return "\r" in text or "%|" in text

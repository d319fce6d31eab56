"""Progress bars of the long management commands (train --wait, prepare_base_model, import_qa,
export_gguf_adapters).

A bar is drawn only where someone watches it: the command's stdout is a terminal and its
verbosity is at least 1 (`-v 0` silences it). Elsewhere (cron, a pipe, a log file, the tests'
captured output) the bars are tqdm's disabled ones, which print nothing, so the commands' output
there is what it was without them.
"""

import os
import threading
from contextlib import contextmanager

from django.db import connections
from tqdm import tqdm

POLL_SECONDS = 0.5
FALLBACK_WIDTH = 80


def shows_progress(stdout, verbosity):
    """Whether a command writing to stdout (its OutputWrapper) with this verbosity draws bars."""
    return verbosity >= 1 and stdout.isatty()


class Progress(tqdm):
    """A tqdm bar on a management command's stdout, or a silent one (see shows_progress).

    Driven like any tqdm (over an iterable, or with update()), or from polled values with show().
    Lines the command prints while the bar is drawn go through above(), so that they do not land
    in the middle of the bar's line.
    """

    def __init__(self, stdout, verbosity, iterable=None, **kwargs):
        shown = shows_progress(stdout, verbosity)
        if shown:
            kwargs.setdefault("ncols", terminal_width(stdout))
        super().__init__(iterable, file=_Unterminated(stdout), disable=not shown, **kwargs)

    def show(self, n, total=None, **postfix):
        """Move the bar to n of total (None: keep the total), with postfix as key=value after it."""
        self.n = n
        if total is not None:
            self.total = total
        if postfix:
            self.set_postfix(postfix, refresh=False)
        self.refresh()

    @contextmanager
    def above(self):
        """Lines written inside go above the bar: it is cleared first and drawn again below them."""
        with self.get_lock():
            self.clear(nolock=True)
            yield
            self.refresh(nolock=True)


def terminal_width(stdout):
    """The width of the terminal stdout writes to, measured when a bar starts; 80 where it has none.

    A pseudo-terminal that was never given a size (`script`, some `docker exec -t`) says 0
    columns; tqdm's own measure (dynamic_ncols) then draws every bar as an empty line.
    """
    try:
        return os.get_terminal_size(stdout.fileno()).columns or FALLBACK_WIDTH
    except (OSError, ValueError):  # not a real terminal's file descriptor (a test's stand-in)
        return FALLBACK_WIDTH


class _Unterminated:
    """A command's stdout (an OutputWrapper) for tqdm: it writes carriage returns and unfinished
    lines, which OutputWrapper.write would end with a newline each."""

    def __init__(self, stdout):
        self.stdout = stdout

    def write(self, text):
        self.stdout.write(text, ending="")

    def __getattr__(self, name):
        # flush, and encoding: tqdm draws block characters where it is UTF-8
        return getattr(self.stdout, name)


@contextmanager
def polling(function, seconds=POLL_SECONDS):
    """Call function every `seconds` from a side thread while the block runs, and once more after it.

    For a bar drawn from what another piece of code records as it works (a training run's row),
    or one whose elapsed time must tick while a single long call runs. The thread's database
    connection, if function opened one, is closed when it ends.
    """
    stopped = threading.Event()

    def loop():
        try:
            while not stopped.wait(seconds):
                function()
            function()
        finally:
            connections.close_all()

    thread = threading.Thread(target=loop, daemon=True, name="progress")
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()

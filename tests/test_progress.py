"""csplatform.progress: bars on a command's stdout only where someone watches it."""

import fcntl
import io
import os
import select
import struct
import termios
import threading

import pytest
from django.core.management.base import OutputWrapper

from csplatform.progress import FALLBACK_WIDTH, Progress, polling, shows_progress, terminal_width
from tests.support.terminal import Terminal, looks_like_a_bar


def test_a_bar_on_a_terminal_shows_n_of_total_and_its_postfix():
    terminal = Terminal()
    bar = Progress(OutputWrapper(terminal), 1, total=10, desc="Training")

    bar.show(3, 12, loss="0.1234")
    bar.close()

    text = terminal.getvalue()
    assert "Training:  25%|" in text and "3/12" in text and "loss=0.1234" in text
    assert text.endswith("\n")  # the finished bar stays as a line of its own


@pytest.mark.parametrize(("stream", "verbosity"), [(io.StringIO, 1), (io.StringIO, 2), (Terminal, 0)])
def test_no_bar_is_drawn_where_stdout_is_not_a_terminal_or_verbosity_is_0(stream, verbosity):
    out = stream()
    stdout = OutputWrapper(out)
    bar = Progress(stdout, verbosity, range(5), total=5, desc="Rows")

    assert list(bar) == [0, 1, 2, 3, 4]  # it still hands the items over
    bar.show(5, 5, loss="1.0")
    with bar.above():
        stdout.write("a line")
    bar.close()

    assert not shows_progress(stdout, verbosity)
    assert out.getvalue() == "a line\n"


def test_a_line_written_above_a_bar_stands_alone_and_the_bar_is_drawn_again_below_it():
    terminal = Terminal()
    stdout = OutputWrapper(terminal)
    bar = Progress(stdout, 1, total=4, desc="Adapters")
    bar.show(1)

    with bar.above():
        stdout.write("v1: wrote adapter.gguf")
    drawn_again = terminal.getvalue().split("v1: wrote adapter.gguf\n")[1]
    bar.close()

    before = terminal.getvalue().split("v1: wrote adapter.gguf")[0]
    assert before.endswith("\r")  # the bar's line was blanked out, then the cursor went back
    assert "1/4" in drawn_again


def test_a_terminal_that_was_never_given_a_size_still_gets_a_bar_as_wide_as_the_fallback():
    main, side = os.openpty()  # a new pseudo-terminal says 0 columns, as under `script`
    with os.fdopen(side, "w", encoding="utf-8") as tty:
        stdout = OutputWrapper(tty)
        assert terminal_width(stdout) == FALLBACK_WIDTH
        bar = Progress(stdout, 1, total=12, desc="Training")
        bar.show(3)
        tty.flush()
        drawn = b""
        while b"3/12" not in drawn and select.select([main], [], [], 10)[0]:
            drawn += os.read(main, 4096)

        fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 50, 0, 0))  # rows, columns
        assert terminal_width(stdout) == 50
        bar.close()
    os.close(main)

    assert b"Training:  25%|" in drawn and b"3/12" in drawn


def test_polling_calls_the_function_while_the_block_runs_and_once_after_it():
    block_over = threading.Event()
    called_during_block = threading.Event()
    calls = []

    def record():
        calls.append(block_over.is_set())
        if not block_over.is_set():
            called_during_block.set()

    with polling(record, seconds=0.01):
        assert called_during_block.wait(timeout=60)
        block_over.set()

    assert calls[0] is False and calls[-1] is True
    assert not any(thread.name == "progress" for thread in threading.enumerate())  # the thread has ended

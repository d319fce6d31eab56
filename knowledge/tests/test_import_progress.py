"""import_qa's progress bar: over the rows as they are saved, on a terminal only."""

import io
import json

import pytest
from django.core.management import call_command
from django.utils import translation

from knowledge.models import QAPair
from tests.support.terminal import Terminal, looks_like_a_bar

pytestmark = [pytest.mark.django_db, pytest.mark.services]


@pytest.fixture
def faq_file(tmp_path):
    path = tmp_path / "faq.json"
    rows = [{"instruction": f"用户问：{n}号商品几天发货？", "output": f"{n % 3 + 1}天内发货。"} for n in range(30)]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def test_import_qa_on_a_terminal_shows_a_bar_over_the_rows_saved_then_only_the_summary(faq_file):
    terminal = Terminal()

    with translation.override("en"):
        call_command("import_qa", str(faq_file), stdout=terminal)

    text = terminal.getvalue()
    assert text.startswith("\rSaving:   0%|") and "| 0/30 [" in text
    bar, summary = text.rsplit("\r", 1)  # the bar's line is blanked out and the cursor goes back
    assert bar.endswith(" " * 20) and "\n" not in bar
    assert summary == f"{faq_file}: imported: created 30, updated 0, skipped 0, rejected 0.\n"
    assert QAPair.objects.count() == 30


@pytest.mark.parametrize(("stream", "verbosity", "args"), [(io.StringIO, 1, []), (Terminal, 0, []), (Terminal, 1, ["--dry-run"])])
def test_import_qa_draws_no_bar_off_a_terminal_with_v0_or_when_it_saves_nothing(faq_file, stream, verbosity, args):
    out = stream()

    call_command("import_qa", str(faq_file), *args, verbosity=verbosity, stdout=out)

    assert not looks_like_a_bar(out.getvalue())
    verb = "checked (dry run, nothing saved)" if args else "imported"
    assert out.getvalue() == f"{faq_file}: {verb}: created 30, updated 0, skipped 0, rejected 0.\n"

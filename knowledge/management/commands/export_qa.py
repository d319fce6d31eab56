"""Export Q&A pairs to a JSON / JSONL / CSV file (format from the file name).

    python manage.py export_qa approved.json --status approved
    python manage.py export_qa - --format jsonl     # to standard output
"""

import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from knowledge import services
from knowledge.formats import FORMATS, FileFormatError, detect_format
from knowledge.models import QAPair


class Command(BaseCommand):
    help = "Export Q&A pairs in the seed's alpaca format (JSON, JSONL or CSV)."

    def add_arguments(self, parser):
        parser.add_argument("file", help="Output path, or - for standard output.")
        parser.add_argument("--format", choices=FORMATS, help="Default: from the file name.")
        parser.add_argument("--status", choices=QAPair.Status.values, action="append", help="Only these statuses (repeatable).")
        parser.add_argument("--split", choices=QAPair.Split.values, action="append", help="Only these splits (repeatable).")
        parser.add_argument("--category", action="append", help="Only these category names (repeatable).")

    def handle(self, *args, **options):
        target = options["file"]
        try:
            file_format = options["format"] or detect_format("out.json" if target == "-" else target)
        except FileFormatError as exc:
            raise CommandError(str(exc)) from None
        pairs = QAPair.objects.all()
        if options["status"]:
            pairs = pairs.filter(status__in=options["status"])
        if options["split"]:
            pairs = pairs.filter(split__in=options["split"])
        if options["category"]:
            pairs = pairs.filter(category__name__in=options["category"])
        content = services.qa_export(pairs=pairs, file_format=file_format)
        if target == "-":
            sys.stdout.buffer.write(content)
            return
        try:
            Path(target).write_bytes(content)
        except OSError as exc:
            raise CommandError(f"Cannot write {target}: {exc.strerror}") from None
        self.stdout.write(self.style.SUCCESS(f"Wrote {pairs.count()} pairs to {target}."))

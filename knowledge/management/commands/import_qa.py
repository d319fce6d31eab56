"""Import Q&A pairs from a JSON / JSONL / CSV file, all or nothing.

    python manage.py import_qa data/train.json --status approved --split train
    python manage.py import_qa faq.csv --dry-run

Same code as the admin's import page; prints the per-row report. On a terminal a bar counts the
rows as they are saved, whatever the file's size, and is gone when they are (`-v 0` hides it).
Exits non-zero when the file or any row is rejected (and then saves nothing).
"""

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

from csplatform.progress import Progress

from knowledge import services
from knowledge.formats import FORMATS
from knowledge.models import QAPair


class Command(BaseCommand):
    help = "Import Q&A pairs from a JSON, JSONL or CSV file in the seed's alpaca format (all or nothing)."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--format", choices=FORMATS, help="Default: from the file name.")
        parser.add_argument("--status", choices=QAPair.Status.values, help="Status for every pair (default: the file's, else draft).")
        parser.add_argument("--split", choices=QAPair.Split.values, help="Split for every pair (default: the file's, else auto).")
        parser.add_argument("--user", help="Username recorded in the admin history (default: the first superuser).")
        parser.add_argument("--dry-run", action="store_true", help="Check the file and print the report; save nothing.")

    def handle(self, *args, **options):
        path = options["file"]
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc.strerror}") from None
        report = services.qa_import(
            content=content,
            filename=path.name,
            file_format=options["format"],
            status=options["status"],
            split=options["split"],
            user=self._user(options["user"]),
            dry_run=options["dry_run"],
            track=lambda rows: Progress(self.stdout, options["verbosity"], rows, desc=_("Saving"), unit=_("row"), leave=False),
        )
        for row in report.rows:
            if row.action == services.RowAction.REJECTED or options["verbosity"] > 1:
                details = "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in row.errors.items())
                self.stdout.write(f"row {row.row}: {row.action} {row.reason} {details}".rstrip())
            for field, msgs in row.warnings.items():
                self.stdout.write(self.style.WARNING(f"row {row.row}: warning: {field}: {' '.join(msgs)}"))
        if report.file_error:
            raise CommandError(f"{path}: {report.file_error} Nothing was imported.")
        counts = report.counts
        summary = "created {created}, updated {updated}, skipped {skipped}, rejected {rejected}".format(**counts)
        if not report.ok:
            raise CommandError(f"{path}: {summary}. Nothing was imported; fix the rejected rows.")
        verb = "checked (dry run, nothing saved)" if report.dry_run else "imported"
        self.stdout.write(self.style.SUCCESS(f"{path}: {verb}: {summary}."))

    def _user(self, username):
        users = get_user_model().objects
        if username:
            try:
                return users.get(username=username)
            except users.model.DoesNotExist:
                raise CommandError(f"--user {username}: no such user.") from None
        return users.filter(is_superuser=True).order_by("pk").first()

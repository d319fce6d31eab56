"""First-run setup, safe to repeat: sample Q&A, a superuser and a first training run, only
where missing.

    python manage.py bootstrap

`make run` calls it after `migrate` and `prepare_base_model`. The superuser is CSP_ADMIN_USER
(default "admin") with CSP_ADMIN_PASSWORD; without one, a password is generated and printed this
once. When no training run exists yet, one is queued on the approved sample pairs, so that a
newcomer sees a real run in the admin within minutes (`--no-training` skips it).
"""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from knowledge import services
from knowledge.models import QAPair
from training.models import TrainingRun
from training.services import TrainingRefused, training_run_start


class Command(BaseCommand):
    help = "Load the sample Q&A (when the knowledge base is empty) and create the superuser (when missing)."

    def add_arguments(self, parser):
        parser.add_argument("--no-training", action="store_true", help="Do not queue the first training run.")

    def handle(self, *args, no_training=False, **options):
        user = self._superuser()
        self._sample_data(user)
        if not no_training and not TrainingRun.objects.exists():
            self._first_run(user)

    def _sample_data(self, user):
        if QAPair.objects.exists():
            self.stdout.write(f"Knowledge base: {QAPair.objects.count()} Q&A pairs (sample data not reloaded).")
            return
        for path, split in zip(settings.CSP_SAMPLE_DATA, ("train", "dev")):
            report = services.qa_import(
                content=path.read_bytes(), filename=path.name, status="approved", split=split, user=user
            )
            if not report.committed:
                raise CommandError(f"Sample data {path} did not import: {report.file_error or report.counts}")
            self.stdout.write(f"Loaded {report.counts['created']} approved {split} pairs from {path.name}.")

    def _first_run(self, user):
        try:
            run = training_run_start(user=user)
        except TrainingRefused as exc:
            self.stdout.write(self.style.WARNING(f"No first training run: {exc}"))
            return
        self.stdout.write(f"Queued training run #{run.pk} on the approved pairs; watch it under Training runs in the admin.")

    def _superuser(self):
        users = get_user_model().objects
        username = settings.CSP_ADMIN_USER
        existing = users.filter(username=username).first()
        if existing is not None:
            return existing
        password = settings.CSP_ADMIN_PASSWORD
        generated = not password
        if generated:
            password = secrets.token_urlsafe(12)
        user = users.create_superuser(username=username, email="", password=password)
        if generated:
            self.stdout.write(self.style.WARNING(
                f"Created superuser {username!r} with password {password!r}. It is shown only this once; "
                f"change it with `python manage.py changepassword {username}`."
            ))
        else:
            self.stdout.write(f"Created superuser {username!r} (password from CSP_ADMIN_PASSWORD).")
        return user

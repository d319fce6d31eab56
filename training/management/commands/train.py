"""Start a training run on the approved Q&A pairs, like the admin button and the API.

    python manage.py train                       # queue it; the q2 cluster (make run) trains it
    python manage.py train --epochs 5 --lora-r 16
    python manage.py train --wait                # train in this process and print progress

Exits non-zero with the reason when the run is refused (another run active, checks failed,
no base model).
"""

from django.core.management.base import BaseCommand, CommandError

from training import services, tasks
from training.models import TrainingRun


class Command(BaseCommand):
    help = "Freeze the approved Q&A pairs and start a LoRA training run on them."

    def add_arguments(self, parser):
        for name in services.HYPERPARAMETER_BOUNDS:
            low, high = services.HYPERPARAMETER_BOUNDS[name]
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(low), help=f"{low} … {high}")
        parser.add_argument("--target-modules", dest="target_modules")
        parser.add_argument("--wait", action="store_true", help="Train here, in the foreground, instead of in the q2 cluster.")

    def handle(self, *args, wait, **options):
        params = {name: options.get(name) for name in [*services.HYPERPARAMETER_BOUNDS, "target_modules"]}
        try:
            run = services.training_run_start(hyperparameters=params, enqueue=not wait)
        except services.TrainingRefused as exc:
            details = exc.details.get("errors") if exc.code == "checks" else exc.details
            raise CommandError(f"{exc} {details or ''}".strip()) from None
        self.stdout.write(f"Training run #{run.pk} queued on snapshot {run.snapshot.sha256[:12]} "
                          f"({run.snapshot.train_count} train / {run.snapshot.dev_count} dev pairs).")
        if not wait:
            self.stdout.write("The q2 cluster trains it; watch it in the admin under Training runs.")
            return
        result = tasks.run_training(run.pk)
        run.refresh_from_db()
        if run.status != TrainingRun.Status.SUCCEEDED:
            raise CommandError(f"Run #{run.pk} {run.status}: {run.error.splitlines()[0] if run.error else ''}")
        self.stdout.write(self.style.SUCCESS(f"Run #{run.pk} succeeded: adapter version {result}."))

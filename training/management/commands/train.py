"""Start a training run on the approved Q&A pairs, like the admin button and the API.

    python manage.py train                       # queue it; the q2 cluster (make run) trains it
    python manage.py train --epochs 5 --lora-r 16
    python manage.py train --wait                # train in this process and show its progress

With --wait on a terminal, bars show the training steps (with the loss and the run's ETA) and
then the evaluation's answers, read from the run's row as its admin page reads them; `-v 0` or
an output that is not a terminal prints none (csplatform.progress).

Exits non-zero with the reason when the run is refused (another run active, checks failed,
no base model).
"""

import re
from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from django.utils.translation import gettext as _
from tqdm import tqdm

from csplatform.progress import Progress, polling, shows_progress
from training import services, tasks
from training.models import TrainingRun

# training.grounding.evaluate_served logs every tenth answer of each question set like this.
ANSWERED = re.compile(r"answered (\d+)/(\d+) (.+) questions as served$", re.MULTILINE)
# The run's own ETA (it knows the steps still to come, a resumed run's too) instead of tqdm's.
STEPS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
# No time: the bar starts at the set's first logged tenth, so its rate and time would be wrong.
ANSWERS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt}"


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
        with run_progress(self.stdout, options["verbosity"], run.pk):
            result = tasks.run_training(run.pk)
        run.refresh_from_db()
        if run.status != TrainingRun.Status.SUCCEEDED:
            raise CommandError(f"Run #{run.pk} {run.status}: {run.error.splitlines()[0] if run.error else ''}")
        self.stdout.write(self.style.SUCCESS(f"Run #{run.pk} succeeded: adapter version {result}."))


@contextmanager
def run_progress(stdout, verbosity, run_id):
    """While the block trains run_id in this thread, a side thread polls the run's row and draws
    its bars (RunBars); nothing at all where no bars are shown."""
    if not shows_progress(stdout, verbosity):
        yield
        return
    bars = RunBars(stdout, verbosity)

    def poll():
        try:
            run = TrainingRun.objects.only("step", "total_steps", "loss", "eta_seconds", "log").get(pk=run_id)
        except DatabaseError:
            return  # a database busy with the run's own writes: the next poll draws it
        bars.show(run)

    try:
        with polling(poll):
            yield
    finally:
        bars.close()


class RunBars:
    """The bars of one run, drawn from what it records: its steps until the evaluation starts, then
    one bar per question set answered (dev, out-of-scope), which moves by the ten answers the
    evaluation logs at a time."""

    def __init__(self, stdout, verbosity):
        self.stdout, self.verbosity = stdout, verbosity
        # Translated here, in the command's thread: the polling thread that draws has no language of its own.
        self.training_title = _("Training")
        self.answering_title = _("Answering %(set)s questions")
        self.steps = None
        self.answers = None  # the bar of the question set being answered
        self.answering = None  # its label, as the log names it

    def show(self, run):
        if run.total_steps and self.answering is None:
            if self.steps is None:
                self.steps = Progress(
                    self.stdout, self.verbosity, total=run.total_steps, desc=self.training_title, bar_format=STEPS_FORMAT
                )
            postfix = {"loss": f"{run.loss:.4f}"} if run.loss is not None else {}
            if run.eta_seconds is not None:
                postfix["ETA"] = tqdm.format_interval(run.eta_seconds)
            self.steps.show(run.step, run.total_steps, **postfix)
        answered = list(ANSWERED.finditer(run.log))
        if answered:
            self.show_answers(answered[-1], finished=bool(run.log[answered[-1].end():].strip()))

    def show_answers(self, line, finished):
        """line: the run's latest "answered" log line; finished: the log went on after it, so that
        question set is all answered (the rest of it after the last tenth)."""
        done, total, label = int(line[1]), int(line[2]), line[3]
        if label != self.answering:
            if self.answers is not None:
                self.answers.show(self.answers.total)  # the log went on to the next set: this one is all answered
            self.close()
            self.answering = label
            self.answers = Progress(
                self.stdout, self.verbosity, total=total, desc=self.answering_title % {"set": label},
                bar_format=ANSWERS_FORMAT,
            )
        self.answers.show(total if finished else done, total)

    def close(self):
        for bar in (self.steps, self.answers):
            if bar is not None:
                bar.close()
        self.steps = self.answers = None

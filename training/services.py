"""Training workflows: start, cancel and reconcile runs; activate and roll back adapter versions.

The admin action, the runs page button, the REST API and `manage.py train` all call
`training_run_start`; the django-q2 task (tasks.py) does the work.
"""

import logging
import math
import os
import shutil
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django_q.models import Schedule, Task

from csplatform.stored_text import stored
from llm.basemodel import BaseModelError, describe_checkpoint
from llm.finetune.config import FinetuneConfig
from training.models import AdapterVersion, BaseModel, TrainingRun
from training.snapshots import snapshot_create

log = logging.getLogger(__name__)

# Hyper-parameters staff may set (the rest of FinetuneConfig comes from settings), with bounds
# that keep a typo from asking for a week of training or a 100k-token context.
HYPERPARAMETER_BOUNDS = {
    "lora_r": (1, 256),
    "lora_alpha": (1, 1024),
    "lora_dropout": (0.0, 0.5),
    "learning_rate": (1e-6, 1e-1),
    "batch_size": (1, 64),
    "grad_accum": (1, 64),
    "epochs": (1, 100),
    "max_length": (32, 8192),
}


class TrainingRefused(Exception):
    """The run cannot start; `code` says why ("busy", "checks", "base_model", "invalid", "storage").

    message: the text, or a callable that renders it in the active language: str() renders it when
    it is read, so a refusal met in a worker (scheduled retraining, in the server's language) reads
    in the language of whoever is shown it (csplatform.stored_text saves it in each).
    """

    def __init__(self, message, *, code, details=None):
        super().__init__(message)
        self.code = code
        self.details = details or {}

    def __str__(self):
        message = self.args[0]
        return str(message() if callable(message) else message)


def _busy_text():
    return _("A training run is already queued or running; wait for it or cancel it.")


def default_hyperparameters():
    config = FinetuneConfig()
    return {name: getattr(config, name) for name in HYPERPARAMETER_BOUNDS} | {"target_modules": config.target_modules}


def clean_hyperparameters(values):
    """Merge staff-supplied values over the defaults; raise TrainingRefused on a bad one."""
    cleaned = default_hyperparameters()
    errors = {}
    for name, value in (values or {}).items():
        if value in (None, ""):
            continue
        if name == "target_modules":
            cleaned[name] = str(value).strip() or cleaned[name]
            continue
        if name not in HYPERPARAMETER_BOUNDS:
            errors[name] = _("Unknown hyper-parameter.")
            continue
        low, high = HYPERPARAMETER_BOUNDS[name]
        kind = float if isinstance(low, float) else int
        try:
            number = kind(value)
            if isinstance(value, bool) or (kind is int and number != float(value)) or not math.isfinite(number):
                raise ValueError
        except (TypeError, ValueError):
            errors[name] = _("Must be a number.")
            continue
        if not low <= number <= high:
            errors[name] = _("Must be between %(low)s and %(high)s.") % {"low": low, "high": high}
            continue
        cleaned[name] = number
    if errors:
        raise TrainingRefused(lambda: _("Some hyper-parameters are invalid."), code="invalid", details=errors)
    return cleaned


def finetune_config(run):
    """The full FinetuneConfig of a run: its hyper-parameters plus the deployment's settings."""
    return FinetuneConfig.from_dict(
        {
            **run.hyperparameters,
            "checkpoint_every": settings.CSP_CHECKPOINT_EVERY,
            "checkpoint_seconds": settings.CSP_CHECKPOINT_SECONDS,
            "quantization": settings.CSP_TRAINING_QUANTIZATION,
            "device": settings.CSP_TRAINING_DEVICE,
            "trust_remote_code": settings.CSP_TRUST_REMOTE_CODE,
        }
    )


def base_model_current():
    """The BaseModel row for CSP_BASE_MODEL, registered (and described) on first use."""
    path = Path(settings.CSP_BASE_MODEL)
    existing = BaseModel.objects.filter(path=str(path)).first()
    if existing is not None and (path / "config.json").is_file():
        return existing
    try:
        info = describe_checkpoint(path)
    except BaseModelError as exc:
        raise TrainingRefused(
            lambda error=exc: _("CSP_BASE_MODEL: %(error)s. Run `manage.py prepare_base_model` for the embedded model.") % {"error": error},
            code="base_model",
        ) from None
    fields = {
        "name": info.get("name") or path.name,
        "architecture": info.get("architecture") or "",
        "parameter_count": info.get("parameter_count"),
        "dtype": info.get("dtype") or "",
        "has_chat_template": bool(info.get("has_chat_template")),
        "gguf_path": str(info.get("gguf_path") or ""),
    }
    base, _created = BaseModel.objects.update_or_create(path=str(path), defaults=fields)
    return base


def run_dir(run_id):
    return Path(settings.DATA_DIR) / "runs" / str(run_id)


def adapters_root():
    return Path(settings.DATA_DIR) / "adapters"


def training_run_start(*, user=None, hyperparameters=None, enqueue=True, trigger=TrainingRun.Trigger.MANUAL):
    """Freeze the approved pairs, check them, and queue a run. Raises TrainingRefused.

    enqueue=False leaves the queued run for the caller to execute (`manage.py train --wait`).
    """
    training_runs_reconcile()
    params = clean_hyperparameters(hyperparameters)
    base = base_model_current()
    if TrainingRun.objects.filter(base_model=base, status__in=TrainingRun.ACTIVE_STATUSES).exists():
        raise TrainingRefused(_busy_text, code="busy")
    try:
        snapshot = snapshot_create(
            max_length=params["max_length"], epochs=params["epochs"], batch_size=params["batch_size"], grad_accum=params["grad_accum"]
        )
    except OSError as exc:  # a full or read-only disk: staff need the cause, not a server error
        raise TrainingRefused(
            lambda error=exc: _("The approved pairs could not be frozen into a snapshot: %(error)s") % {"error": error}, code="storage"
        ) from exc
    if not snapshot.checks.get("ok", False):
        raise TrainingRefused(
            lambda: _("The approved pairs did not pass the checks; fix the errors listed."), code="checks", details=snapshot.checks
        )
    try:
        with transaction.atomic():
            run = TrainingRun.objects.create(
                base_model=base, snapshot=snapshot, hyperparameters=params, created_by=user, status=TrainingRun.Status.QUEUED,
                trigger=trigger,
            )
            run_id = run.pk
            if enqueue:
                transaction.on_commit(lambda: _enqueue(run_id))
    except IntegrityError:
        # Another request queued a run between our check and our insert: the constraint won.
        raise TrainingRefused(_busy_text, code="busy") from None
    return run


def _enqueue(run_id):
    from django_q.tasks import async_task

    async_task("training.tasks.run_training", run_id, task_name=f"training-run-{run_id}", group="training")


def training_run_cancel(*, run):
    """Ask a queued or running run to stop. A queued run stops at once; a running one within a step."""
    if not run.is_active:
        return False
    updated = TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.CANCELLED, cancel_requested=True, finished_at=timezone.now()
    )
    if not updated:
        TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(cancel_requested=True)
    run.refresh_from_db()
    return True


def training_run_resume(*, run):
    """Queue a failed or interrupted run again; it continues from its last complete checkpoint.

    Returns False when there is nothing to resume from (no checkpoint survived).
    Raises TrainingRefused when another run is active.
    """
    from llm.finetune.checkpoints import list_checkpoints  # noqa: PLC0415  (torch: web processes stay torch-free)

    if run.status not in TrainingRun.RESUMABLE_STATUSES or not list_checkpoints(run_dir(run.pk)):
        return False
    try:
        with transaction.atomic():
            updated = TrainingRun.objects.filter(pk=run.pk, status__in=TrainingRun.RESUMABLE_STATUSES).update(
                status=TrainingRun.Status.QUEUED, error="", finished_at=None, cancel_requested=False
            )
            if updated:
                run_id = run.pk
                transaction.on_commit(lambda: _enqueue(run_id))
    except IntegrityError:
        raise TrainingRefused(_busy_text, code="busy") from None
    run.refresh_from_db()
    return bool(updated)


def training_runs_reconcile():
    """Mark runs failed whose worker stopped sending heartbeats (killed, out of memory, host gone)."""
    cutoff = timezone.now() - timedelta(seconds=settings.CSP_HEARTBEAT_TIMEOUT)
    stale = TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING, heartbeat_at__lt=cutoff)
    count = 0
    for run in stale:
        stopped = run.heartbeat_at.isoformat(timespec="seconds")
        # saved in every language: the run page shows it in the language of whoever reads it
        message = stored(
            lambda: _("The training worker stopped sending heartbeats (killed, out of memory or restarted) at %(time)s.")
            % {"time": stopped}
        )
        count += TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(
            status=TrainingRun.Status.FAILED, error=message, finished_at=timezone.now()
        )
        log.warning("training run %s marked failed: %s", run.pk, message)
    return count


def queued_schedules_hold():
    """Keep every schedule whose last task still waits in the queue from queueing another.

    The one q2 worker trains for minutes to hours, and the reconcilers scheduled every minute
    queued behind it one task a minute (25 after a 25-minute run), to run back to back for nothing
    once it was free. A training run's heartbeat calls this: a schedule whose last task has no
    result yet gets its next run put past the next two beats. Once the worker is free (or dead:
    no more beats), the task that waited runs and the schedule fires as before. Returns how many
    schedules it held.
    """
    hold_until = timezone.now() + timedelta(seconds=2 * settings.CSP_HEARTBEAT_SECONDS)
    held = 0
    due = Schedule.objects.exclude(repeats=0).exclude(task__isnull=True).exclude(task="").filter(next_run__lt=hold_until)
    for schedule in due:
        if not Task.objects.filter(id=schedule.task).exists():
            held += Schedule.objects.filter(pk=schedule.pk, task=schedule.task).update(next_run=hold_until)
    return held


def next_version_name():
    numbers = [int(name[1:]) for name in AdapterVersion.objects.values_list("name", flat=True) if name[1:].isdecimal()]
    return f"v{max(numbers, default=0) + 1}"


def adapter_version_create(*, run, adapter_dir, metrics, calibration=None):
    """Move a finished adapter into the versions folder and record it; the first one is activated.

    calibration (llm.calibration.Calibration): the thresholds the run calibrated, stored on the version.

    The row is inserted first and the folder renamed into place before the commit, so that the
    unique name is held while the folder is touched. A worker killed between the rename and the
    commit leaves a complete folder that no row names; whoever holds that name next replaces it.
    """
    adapter_dir = Path(adapter_dir)
    root = adapters_root()
    root.mkdir(parents=True, exist_ok=True)
    size = sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file())
    with transaction.atomic():
        name = next_version_name()
        target = root / name
        version = AdapterVersion.objects.create(
            name=name, run=run, base_model=run.base_model, path=str(target), metrics=metrics, size_bytes=size,
            **(
                {
                    "curated_threshold": calibration.thresholds.curated,
                    "fallback_threshold": calibration.thresholds.fallback,
                    "calibration": calibration.report,
                }
                if calibration is not None
                else {}
            ),
        )
        if target.exists():
            shutil.rmtree(target)
        # A rename on one filesystem: the folder appears complete or not at all. (shutil.move
        # would put it inside a folder already there, the killed save's, and serve the wrong weights.)
        os.rename(adapter_dir, target)
        if not AdapterVersion.objects.filter(is_active=True).exists():
            _make_active(version)
    return version


# Lower is better for these; higher for the scores.
LOWER_IS_BETTER = ("dev_loss", "invented_number_share")


def compare_metrics(new, old):
    """Names of the metrics on which `new` is worse than `old`: a lower score, a higher dev loss,
    or more answers stating an invented number (invented_number_share, over the dev and
    out-of-scope questions answered as served). A metric either side lacks (None: not measured,
    e.g. versions evaluated before invented numbers were counted) is not compared."""

    def both(name):
        return new.get(name) is not None and old.get(name) is not None

    worse = [
        name for name in ("key_fact_recall", "rouge_l_char", "rouge_l_word", "exact_match", "bleu4")
        if both(name) and new[name] < old[name]
    ]
    worse += [name for name in LOWER_IS_BETTER if both(name) and new[name] > old[name]]
    return worse


class ActivationRefused(Exception):
    pass


def adapter_version_activate(*, version, force=False):
    """Make `version` the one chats are served from. Returns the metric names it is worse on.

    With CSP_EVAL_GATE=strict a worse version is refused unless force is set (a rollback to a
    version that served before is always allowed).
    """
    current = AdapterVersion.objects.filter(is_active=True).first()
    if current is not None and current.pk == version.pk:
        return []
    worse = compare_metrics(version.metrics.get("eval", {}), current.metrics.get("eval", {})) if current else []
    if worse and settings.CSP_EVAL_GATE == "strict" and not force and version.activated_at is None:
        raise ActivationRefused(
            _("%(new)s is worse than the active %(old)s on: %(metrics)s (CSP_EVAL_GATE=strict).")
            % {"new": version.name, "old": current.name, "metrics": ", ".join(worse)}
        )
    with transaction.atomic():
        _make_active(version)
    return worse


def _make_active(version):
    # Any activation ends the canary (training.canary): promoted, rolled back past, or overtaken.
    AdapterVersion.objects.filter(is_canary=True).update(is_canary=False)
    version.is_canary = False
    AdapterVersion.objects.filter(is_active=True).exclude(pk=version.pk).update(is_active=False)
    version.is_active = True
    version.activated_at = timezone.now()
    version.save(update_fields=["is_active", "activated_at", "is_canary"])


def adapter_version_rollback():
    """Activate the version that was active before the current one. Returns it, or None."""
    current = AdapterVersion.objects.filter(is_active=True).first()
    previous = (
        AdapterVersion.objects.filter(activated_at__isnull=False).exclude(pk=getattr(current, "pk", None)).order_by("-activated_at").first()
    )
    if previous is None:
        return None
    adapter_version_activate(version=previous, force=True)
    return previous

from django.conf import settings
from django.core.validators import MaxValueValidator
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from csplatform.stored_text import StoredTextField


class BaseModel(models.Model):
    """A local Hugging Face checkpoint that adapters are trained on."""

    name = models.CharField(_("name"), max_length=200)
    path = models.CharField(_("path"), max_length=500, unique=True)
    architecture = models.CharField(_("architecture"), max_length=100, blank=True)
    parameter_count = models.BigIntegerField(_("parameters"), null=True, blank=True)
    dtype = models.CharField(_("dtype"), max_length=20, blank=True)
    has_chat_template = models.BooleanField(_("has chat template"), default=False)
    gguf_path = models.CharField(_("GGUF file"), max_length=500, blank=True)
    created_at = models.DateTimeField(_("registered at"), auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = _("base model")
        verbose_name_plural = _("base models")

    def __str__(self):
        return self.name


class DatasetSnapshot(models.Model):
    """Approved pairs frozen into train.jsonl / dev.jsonl at the start of a run."""

    sha256 = models.CharField(_("SHA-256"), max_length=64, db_index=True)
    path = models.CharField(_("folder"), max_length=500)
    train_count = models.PositiveIntegerField(_("train pairs"))
    dev_count = models.PositiveIntegerField(_("dev pairs"))
    manifest = models.JSONField(_("manifest"), default=dict)
    checks = models.JSONField(_("check report"), default=dict)
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("dataset snapshot")
        verbose_name_plural = _("dataset snapshots")

    def __str__(self):
        return f"{self.sha256[:12]} ({self.train_count}+{self.dev_count})"


class TrainingRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        RUNNING = "running", _("Running")
        SUCCEEDED = "succeeded", _("Succeeded")
        FAILED = "failed", _("Failed")
        CANCELLED = "cancelled", _("Cancelled")
        # Stopped by SIGTERM (a deploy, a host shutdown) after saving a checkpoint at the step it had reached.
        INTERRUPTED = "interrupted", _("Interrupted")

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
    # Ended without an adapter but with its checkpoints kept: staff may queue it again.
    RESUMABLE_STATUSES = (Status.FAILED, Status.INTERRUPTED)

    class Trigger(models.TextChoices):
        MANUAL = "manual", _("Staff")
        SCHEDULE = "schedule", _("Retraining schedule")

    status = models.CharField(_("status"), max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    base_model = models.ForeignKey(BaseModel, verbose_name=_("base model"), on_delete=models.PROTECT, related_name="runs")
    snapshot = models.ForeignKey(
        DatasetSnapshot, verbose_name=_("dataset snapshot"), on_delete=models.PROTECT, related_name="runs"
    )
    hyperparameters = models.JSONField(_("hyper-parameters"), default=dict)
    step = models.PositiveIntegerField(_("step"), default=0)
    total_steps = models.PositiveIntegerField(_("total steps"), default=0)
    eta_seconds = models.PositiveIntegerField(_("ETA (s)"), null=True, blank=True)
    loss = models.FloatField(_("loss"), null=True, blank=True)
    loss_history = models.JSONField(_("loss history"), default=list, help_text=_("[step, loss] per step."))
    dev_loss_history = models.JSONField(_("dev loss history"), default=list, help_text=_("[step, dev loss] per epoch."))
    eval_results = models.JSONField(_("evaluation"), default=dict)
    log = models.TextField(_("log"), blank=True)
    # Texts the worker writes in the server's language are stored in every language (stored_text).
    error = StoredTextField(_("error"), blank=True)
    cancel_requested = models.BooleanField(_("cancel requested"), default=False)
    heartbeat_at = models.DateTimeField(_("heartbeat"), null=True, blank=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, verbose_name=_("started by"), null=True, blank=True, on_delete=models.SET_NULL
    )
    trigger = models.CharField(
        _("trigger"), max_length=10, choices=Trigger.choices, default=Trigger.MANUAL,
        help_text=_("Scheduled runs are compared with the active version and may activate themselves."),
    )
    activation_decision = StoredTextField(
        _("activation decision"), blank=True,
        help_text=_("For a scheduled run: whether its version was activated, and why."),
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("training run")
        verbose_name_plural = _("training runs")
        constraints = [
            # One run trains at a time: the database refuses a second queued/running row.
            models.UniqueConstraint(
                fields=["base_model"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_run_per_base_model",
            )
        ]

    def __str__(self):
        return f"#{self.pk} {self.get_status_display()}"

    @property
    def progress_percent(self):
        return round(100 * self.step / self.total_steps, 1) if self.total_steps else 0.0

    @property
    def is_active(self):
        return self.status in self.ACTIVE_STATUSES


class AdapterVersion(models.Model):
    name = models.CharField(_("name"), max_length=50, unique=True)
    run = models.OneToOneField(TrainingRun, verbose_name=_("training run"), on_delete=models.PROTECT, related_name="adapter")
    base_model = models.ForeignKey(BaseModel, verbose_name=_("base model"), on_delete=models.PROTECT, related_name="adapters")
    path = models.CharField(_("path"), max_length=500)
    metrics = models.JSONField(_("metrics"), default=dict)
    size_bytes = models.PositiveBigIntegerField(_("size (bytes)"), default=0)
    # Calibrated by its run on the dev pairs and the out-of-scope questions (llm.calibration);
    # None for versions trained before calibration. CSP_CURATED_THRESHOLD / CSP_FALLBACK_THRESHOLD override them.
    curated_threshold = models.FloatField(
        _("curated threshold"), null=True, blank=True,
        help_text=_("A top match scoring at least this gets its curated answer verbatim."),
    )
    fallback_threshold = models.FloatField(
        _("fallback threshold"), null=True, blank=True,
        help_text=_("A top match scoring below this gets the fallback reply and a handoff offer."),
    )
    calibration = models.JSONField(_("calibration"), default=dict, blank=True)
    is_active = models.BooleanField(_("active"), default=False)
    activated_at = models.DateTimeField(_("activated at"), null=True, blank=True)
    # The canary rollout (training.canary): beside the active version, this one answers
    # canary_percent of the new conversations. Kept here, like is_active, so that every process
    # (web, inference worker) reads the same rollout from the database.
    is_canary = models.BooleanField(
        _("canary"), default=False, help_text=_("Answers a share of the new conversations beside the active version."),
    )
    canary_percent = models.PositiveSmallIntegerField(
        _("canary share (%)"), default=0, validators=[MaxValueValidator(100)],
        help_text=_("The share of new conversations the canary answers."),
    )
    canary_started_at = models.DateTimeField(_("canary since"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("adapter version")
        verbose_name_plural = _("adapter versions")
        constraints = [
            models.UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="one_active_adapter"),
            models.UniqueConstraint(fields=["is_canary"], condition=Q(is_canary=True), name="one_canary_adapter"),
            models.CheckConstraint(condition=~Q(is_canary=True, is_active=True), name="canary_is_not_the_active_adapter"),
        ]

    def __str__(self):
        return self.name


class RetrainingPolicy(models.Model):
    """Scheduled retraining: one row, edited in the admin. The django-q2 schedule "Scheduled
    retraining" (its frequency is edited under Django Q → Scheduled tasks) calls the check."""

    class Activation(models.TextChoices):
        AUTO = "auto", _("Activate automatically when not worse than the active version")
        MANUAL = "manual", _("Leave activation to staff")

    enabled = models.BooleanField(_("enabled"), default=False)
    min_new_pairs = models.PositiveIntegerField(
        _("new approved pairs needed"), default=20,
        help_text=_("A run starts when at least this many approved pairs are not in the last snapshot."),
    )
    activation = models.CharField(_("activation"), max_length=10, choices=Activation.choices, default=Activation.AUTO)
    last_checked_at = models.DateTimeField(_("last checked at"), null=True, blank=True)
    last_decision = StoredTextField(_("last decision"), blank=True)

    class Meta:
        verbose_name = _("retraining policy")
        verbose_name_plural = _("retraining policy")

    def __str__(self):
        return str(_("Retraining policy"))

    @classmethod
    def load(cls):
        policy, _created = cls.objects.get_or_create(pk=1)
        return policy

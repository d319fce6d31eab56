from django.contrib import admin, messages
from django.http import HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from csplatform.stored_text import shown
from knowledge.admin import QAPairAdmin
from knowledge.models import QAPair
from training import canary_views, compare_views, lineage, services
from training.charts import loss_chart_svg
from training.evaluation_help import METRIC_HELP, MODE_LABELS
from llm.finetune.raft import read_grounding
from training.forms import TrainingRunForm
from training.models import AdapterVersion, BaseModel, DatasetSnapshot, RetrainingPolicy, TrainingRun


def _figure(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def mode_rows(results):
    """Per set (dev, out-of-scope) and mode: share of answers, key-fact recall, invented numbers."""
    rows = []
    for label, report in ((_("dev pairs"), results), (_("out-of-scope questions"), results.get("out_of_scope") or {})):
        for mode, figures in (report.get("modes") or {}).items():
            rows.append({
                "set": label,
                "mode": MODE_LABELS.get(mode, mode),
                "share": f"{_figure(figures.get('share'), 2)} ({figures.get('count', 0)})",
                "key_fact_recall": _figure(figures.get("key_fact_recall")),
                "invented": _figure(figures.get("invented_number_share")),
            })
    return rows


def evaluation_html(results):
    rows = [(name, results[name], text) for name, text in METRIC_HELP.items() if results.get(name) is not None]
    samples = [{**sample, "mode": MODE_LABELS.get(sample.get("mode"), sample.get("mode"))} for sample in results.get("samples", [])]
    context = {
        "results": results, "rows": rows, "modes": mode_rows(results), "oos": results.get("out_of_scope") or {}, "samples": samples,
    }
    return render_to_string("admin/training/evaluation.html", context)


def calibration_html(version):
    """The version's thresholds with the precision and shares they gave on its run's dev and
    out-of-scope questions."""
    report = version.calibration or {}
    if version.curated_threshold is None:
        return _("Not calibrated (trained before calibration): the settings or the built-in defaults apply.")
    return render_to_string("admin/training/calibration.html", {"version": version, "report": report})


def answering_text(version):
    """How the version reads a question (what its adapter recorded at training)."""
    try:
        grounding = read_grounding(version.path)
    except OSError:
        grounding = None
    if grounding is None:
        return _("Trained on bare questions (before grounding): it answers the question alone, and the fact guard checks its answer.")
    text = _("Answers from the top %(k)s retrieved pairs in its prompt (%(format)s).") % {"k": grounding.k, "format": grounding.format}
    if grounding.select:
        text += " " + _(
            "Before answering it names which of them asks the customer's question: a sure pick is answered with that pair's "
            "curated text, a sure \"none\" with the fallback reply (CSP_RERANK)."
        )
    return text


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records the system writes: staff read them, never edit them by hand."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(BaseModel)
class BaseModelAdmin(ReadOnlyAdmin):
    list_display = ("name", "architecture", "parameters", "dtype", "has_chat_template", "path")

    @admin.display(description=_("parameters"), ordering="parameter_count")
    def parameters(self, obj):
        return f"{obj.parameter_count / 1e6:.1f} M" if obj.parameter_count else "—"


@admin.register(DatasetSnapshot)
class DatasetSnapshotAdmin(ReadOnlyAdmin):
    list_display = ("short_hash", "train_count", "dev_count", "checks_ok", "created_at")
    readonly_fields = ("sha256", "path", "train_count", "dev_count", "versions", "check_report", "rows", "created_at", "manifest")
    exclude = ("checks",)

    @admin.display(description=_("adapter versions trained on it"))
    def versions(self, obj):
        versions = AdapterVersion.objects.filter(run__snapshot=obj).order_by("-created_at")
        if not versions:
            return "—"
        return format_html_join(
            ", ", '<a href="{}">{}</a>', ((reverse("admin:training_adapterversion_change", args=[v.pk]), v.name) for v in versions)
        )

    @admin.display(description=_("Q&A rows as trained"))
    def rows(self, obj):
        try:
            rows = lineage.snapshot_rows(obj)
        except OSError as exc:
            return _("The snapshot's files cannot be read (%(error)s).") % {"error": exc}
        return render_to_string("admin/training/snapshot_rows.html", {"rows": rows})

    @admin.display(description=_("hash"))
    def short_hash(self, obj):
        return obj.sha256[:12]

    @admin.display(description=_("checks passed"), boolean=True)
    def checks_ok(self, obj):
        return obj.checks.get("ok")

    @admin.display(description=_("check report"))
    def check_report(self, obj):
        return render_to_string("admin/training/check_report.html", {"checks": obj.checks})


@admin.register(TrainingRun)
class TrainingRunAdmin(ReadOnlyAdmin):
    list_display = ("id", "status", "progress", "loss_display", "base_model", "snapshot", "trigger", "created_by", "created_at")
    list_filter = ("status", "trigger", "base_model")
    list_select_related = ("base_model", "snapshot", "created_by")
    # error and activation_decision are stored in every language (csplatform.stored_text): loaded
    # in a request, a field's value is the text in the request's language.
    readonly_fields = (
        "status", "live_progress", "hyperparameters", "base_model", "snapshot", "evaluation", "log_text", "error_text",
        "created_by", "created_at", "started_at", "finished_at", "heartbeat_at", "trigger", "activation_decision",
    )
    fieldsets = (
        (None, {"fields": ("status", "live_progress")}),
        (_("Evaluation"), {"fields": ("evaluation", "activation_decision")}),
        (_("Set-up"), {"fields": ("hyperparameters", "base_model", "snapshot", "trigger", "created_by")}),
        (_("Timeline and log"), {"fields": ("created_at", "started_at", "finished_at", "heartbeat_at", "log_text", "error_text")}),
    )
    actions = ("cancel_runs", "resume_runs")

    @admin.display(description=_("progress"))
    def progress(self, obj):
        return format_html('<progress max="100" value="{}"></progress> {}%', obj.progress_percent, obj.progress_percent)

    @admin.display(description=_("loss"), ordering="loss")
    def loss_display(self, obj):
        return f"{obj.loss:.4f}" if obj.loss is not None else "—"

    @admin.display(description=_("progress and loss"))
    def live_progress(self, obj):
        return render_to_string("admin/training/trainingrun/progress.html", self.progress_context(obj))

    @admin.display(description=_("evaluation on the dev pairs"))
    def evaluation(self, obj):
        return evaluation_html(obj.eval_results)

    @admin.display(description=_("log"))
    def log_text(self, obj):
        return format_html('<pre style="white-space:pre-wrap;max-height:20em;overflow:auto">{}</pre>', obj.log or "—")

    @admin.display(description=_("error"))
    def error_text(self, obj):
        return format_html('<pre style="white-space:pre-wrap;color:var(--error-fg)">{}</pre>', shown(obj.error)) if obj.error else "—"

    def progress_context(self, obj):
        return {
            "run": obj,
            "chart": loss_chart_svg(obj.loss_history, obj.dev_loss_history, title=str(_("loss"))),
            "progress_url": reverse("admin:training_trainingrun_progress", args=[obj.pk]),
        }

    @admin.action(description=_("Cancel selected runs"), permissions=["cancel"])
    def cancel_runs(self, request, queryset):
        count = sum(services.training_run_cancel(run=run) for run in queryset)
        self.message_user(request, _("Asked %(n)d run(s) to stop.") % {"n": count}, messages.SUCCESS)

    @admin.action(description=_("Resume selected failed or interrupted runs from their last checkpoint"), permissions=["cancel"])
    def resume_runs(self, request, queryset):
        try:
            resumed = [run.pk for run in queryset if services.training_run_resume(run=run)]
        except services.TrainingRefused as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        if resumed:
            self.message_user(request, _("Queued again: %(ids)s.") % {"ids": ", ".join(f"#{pk}" for pk in resumed)}, messages.SUCCESS)
        else:
            self.message_user(request, _("None of the selected runs has a checkpoint to resume from."), messages.WARNING)

    def has_cancel_permission(self, request):
        return request.user.has_perm("training.change_trainingrun")

    def get_urls(self):
        return [
            path("start/", self.admin_site.admin_view(self.start_view), name="training_trainingrun_start"),
            path("<int:pk>/progress/", self.admin_site.admin_view(self.progress_view), name="training_trainingrun_progress"),
            path("<int:pk>/cancel/", self.admin_site.admin_view(self.cancel_view), name="training_trainingrun_cancel"),
        ] + super().get_urls()

    def progress_view(self, request, pk):
        run = get_object_or_404(TrainingRun, pk=pk)
        if not self.has_view_permission(request, run):
            return JsonResponse({"detail": str(_("You may not view this run."))}, status=403)
        html = render_to_string("admin/training/trainingrun/progress.html", self.progress_context(run))
        return JsonResponse({"status": run.status, "active": run.is_active, "html": html})

    def cancel_view(self, request, pk):
        run = get_object_or_404(TrainingRun, pk=pk)
        if request.method == "POST" and self.has_cancel_permission(request):
            services.training_run_cancel(run=run)
            self.message_user(request, _("Asked run #%(id)s to stop.") % {"id": run.pk}, messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:training_trainingrun_change", args=[pk]))

    def start_view(self, request):
        return start_training(self, request)


def start_training(model_admin, request, *, from_action=False):
    """The hyper-parameter form behind the runs page button and the Q&A admin action."""
    if not request.user.has_perm("training.add_trainingrun"):
        model_admin.message_user(request, _("You may not start training runs."), messages.ERROR)
        return HttpResponseRedirect(reverse("admin:index"))
    form = TrainingRunForm(request.POST if "start_training" in request.POST else None)
    refusal = None
    if form.is_bound and form.is_valid():
        try:
            run = services.training_run_start(user=request.user, hyperparameters=form.cleaned_data)
        except services.TrainingRefused as exc:
            refusal = exc
            model_admin.message_user(request, str(exc), messages.ERROR)
        else:
            model_admin.message_user(request, _("Training run #%(id)s is queued.") % {"id": run.pk}, messages.SUCCESS)
            return HttpResponseRedirect(reverse("admin:training_trainingrun_change", args=[run.pk]))
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": TrainingRun._meta,
        "title": _("Train a new adapter on the approved pairs"),
        "form": form,
        "refusal": refusal,
        "from_action": from_action,
        "approved_count": QAPair.objects.filter(status=QAPair.Status.APPROVED).count(),
    }
    return TemplateResponse(request, "admin/training/trainingrun/start.html", context)


@admin.register(AdapterVersion)
class AdapterVersionAdmin(ReadOnlyAdmin):
    list_display = ("name", "is_active", "canary_share", "key_metrics", "base_model", "run", "size", "created_at", "activated_at")
    list_filter = ("is_active", "is_canary", "base_model")
    list_select_related = ("base_model", "run")
    readonly_fields = (
        "name", "is_active", "run", "base_model", "path", "size", "answering", "thresholds", "evaluation", "created_at",
        "activated_at",
    )
    exclude = ("metrics", "curated_threshold", "fallback_threshold", "calibration")
    actions = ("activate", "rollback", "compare", "canary")

    # What serves the versions (the engine, the inference workers) is chat's, above training:
    # chat.admin adds a function (request) -> context for this page with add_changelist_context().
    changelist_context = ()

    @classmethod
    def add_changelist_context(cls, provider):
        cls.changelist_context = (*cls.changelist_context, provider)

    def changelist_view(self, request, extra_context=None):
        context = dict(extra_context or {})
        for provider in self.changelist_context:
            context.update(provider(request))
        return super().changelist_view(request, context)

    def has_activate_permission(self, request):
        return request.user.has_perm("training.change_adapterversion")

    @admin.display(description=_("size"), ordering="size_bytes")
    def size(self, obj):
        return f"{obj.size_bytes / 1e6:.1f} MB"

    @admin.display(description=_("dev-set metrics"))
    def key_metrics(self, obj):
        results = obj.metrics.get("eval", {})
        if not results:
            return "—"
        return " · ".join(f"{name} {results[name]:.2f}" for name in ("key_fact_recall", "rouge_l_char", "exact_match") if name in results)

    @admin.display(description=_("evaluation on the dev pairs"))
    def evaluation(self, obj):
        return evaluation_html(obj.metrics.get("eval", {}))

    @admin.display(description=_("how it answers"))
    def answering(self, obj):
        return answering_text(obj)

    @admin.display(description=_("calibrated thresholds"))
    def thresholds(self, obj):
        return calibration_html(obj)

    @admin.action(description=_("Activate the selected version (serve it to customers)"), permissions=["activate"])
    def activate(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, _("Select exactly one version to activate."), messages.ERROR)
            return
        version = queryset.get()
        try:
            worse = services.adapter_version_activate(version=version)
        except services.ActivationRefused as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        if worse:
            self.message_user(
                request, _("%(v)s is active, but it is worse than the previous version on: %(m)s.") % {"v": version.name, "m": ", ".join(worse)}, messages.WARNING
            )
        else:
            self.message_user(request, _("%(v)s is now active.") % {"v": version.name}, messages.SUCCESS)

    @admin.action(description=_("Compare the two selected versions"))
    def compare(self, request, queryset):
        if queryset.count() != 2:
            self.message_user(request, _("Select exactly two versions to compare."), messages.ERROR)
            return None
        a, b = queryset.order_by("created_at")
        return HttpResponseRedirect(compare_views.compare_url(a, b))

    def get_urls(self):
        return [
            path("compare/", self.admin_site.admin_view(self.compare_view), name="training_adapterversion_compare"),
            path("canary/promote/", self.admin_site.admin_view(self.canary_promote_view), name="training_adapterversion_canary_promote"),
            path("canary/stop/", self.admin_site.admin_view(self.canary_stop_view), name="training_adapterversion_canary_stop"),
        ] + super().get_urls()

    def compare_view(self, request):
        return compare_views.compare_page(self, request)

    @admin.display(description=_("canary"), ordering="is_canary")
    def canary_share(self, obj):
        return f"{obj.canary_percent}%" if obj.is_canary else "—"

    @admin.action(description=_("Try the selected version on a share of new conversations (canary)"), permissions=["activate"])
    def canary(self, request, queryset):
        return canary_views.start(self, request, queryset)

    def canary_promote_view(self, request):
        return canary_views.promote(self, request)

    def canary_stop_view(self, request):
        return canary_views.stop(self, request)

    @admin.action(description=_("Roll back to the previously active version"), permissions=["activate"])
    def rollback(self, request, queryset):
        previous = services.adapter_version_rollback()
        if previous is None:
            self.message_user(request, _("There is no previously active version."), messages.ERROR)
        else:
            self.message_user(request, _("Rolled back: %(v)s is active again.") % {"v": previous.name}, messages.SUCCESS)


@admin.register(RetrainingPolicy)
class RetrainingPolicyAdmin(admin.ModelAdmin):
    """One policy: the list page opens it directly."""

    fields = ("enabled", "min_new_pairs", "activation", "schedule", "last_checked_at", "last_decision")
    readonly_fields = ("schedule", "last_checked_at", "last_decision")

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        policy = RetrainingPolicy.load()
        return HttpResponseRedirect(reverse("admin:training_retrainingpolicy_change", args=[policy.pk]))

    @admin.display(description=_("schedule"))
    def schedule(self, obj):
        from django_q.models import Schedule

        schedule = Schedule.objects.filter(func="training.tasks.scheduled_retraining").first()
        if schedule is None:
            return _("No django-q2 schedule calls training.tasks.scheduled_retraining: add one under Django Q.")
        return format_html(
            '<a href="{}">{}</a> · {} · {}: {}',
            reverse("admin:django_q_schedule_change", args=[schedule.pk]),
            schedule.name,
            schedule.get_schedule_type_display(),
            _("next run"),
            schedule.next_run,
        )


@admin.display(description=_("adapter versions trained on it"))
def trained_into(pair):
    """The Q&A pair page's link to the versions trained on the pair (knowledge knows no versions)."""
    if pair.pk is None:
        return "—"
    versions = lineage.versions_trained_on(pair)
    if not versions:
        return _("None yet: approved pairs join the next training run's snapshot.")
    return format_html_join(
        ", ", '<a href="{}">{}</a>', ((reverse("admin:training_adapterversion_change", args=[v.pk]), v.name) for v in versions)
    )


QAPairAdmin.add_lineage(trained_into)
AdapterVersionAdmin.add_changelist_context(canary_views.changelist_context)

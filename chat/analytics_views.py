"""The analytics dashboard (/admin/analytics/) and its numbers as JSON (/api/v1/analytics/)."""

import datetime

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import permissions, serializers
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import analytics
from training.charts import series_chart_svg

PERMISSION = "chat.view_conversation"


def _dates(params):
    """(since, until, errors) from ?since=YYYY-MM-DD&until=YYYY-MM-DD."""
    values, errors = {}, {}
    for name in ("since", "until"):
        raw = (params.get(name) or "").strip()
        if not raw:
            values[name] = None
            continue
        try:
            values[name] = datetime.date.fromisoformat(raw)
        except ValueError:
            errors[name] = [_("Enter a date as YYYY-MM-DD.")]
    if not errors:
        try:
            values["since"], values["until"] = analytics.period(values["since"], values["until"])
        except ValueError:
            errors["since"] = [_("The start is after the end.")]
    return values.get("since"), values.get("until"), errors


def _charts(data):
    days = sorted({row["day"] for row in data["days"]})
    versions = [row["version"] for row in data["versions"]]

    def series(metric):
        cells = {(row["day"], row["version"]): row[metric] for row in data["days"]}
        return {version or _("base model"): [cells.get((day, version)) for day in days] for version in versions}

    return [
        (_("Answers per day"), series_chart_svg(days, series("answers"), title=_("Answers per day"))),
        (_("👍 rate per day"), series_chart_svg(days, series("thumbs_up_rate"), title=_("👍 rate per day"), percent=True)),
        (_("p95 response time per day (ms)"), series_chart_svg(days, series("latency_ms_p95"), title=_("p95 response time per day (ms)"))),
    ]


# Lazy: the labels are read in each request's language, not once in the server's at import.
METRICS = [
    ("conversations", gettext_lazy("conversations")),
    ("answers", gettext_lazy("answers")),
    ("thumbs_up", "👍"),
    ("thumbs_down", "👎"),
    ("thumbs_up_rate", gettext_lazy("👍 rate")),
    ("handoff_rate", gettext_lazy("handoff rate")),
    ("latency_ms_median", gettext_lazy("median response time (ms)")),
    ("latency_ms_p95", gettext_lazy("p95 response time (ms)")),
    ("first_token_ms_median", gettext_lazy("median first token (ms)")),
    ("first_token_ms_p95", gettext_lazy("p95 first token (ms)")),
    ("tokens_per_second", gettext_lazy("tokens/s")),
    ("suggestions_offered", gettext_lazy('fallback replies offering "did you mean"')),
    ("suggestions_taken", gettext_lazy("of those, a suggestion taken")),
]
# The page's words for analytics.top_questions' reasons and for the period's fields (the JSON keeps the keys).
REASONS = {"disliked": gettext_lazy("rated 👎"), "cut_short": gettext_lazy("cut short"), "handoff": gettext_lazy("asked for a person")}
FIELDS = {"since": gettext_lazy("From"), "until": gettext_lazy("to")}


def rollout_rows(rollout):
    """(label, active side's cell, canary side's cell) rows of chat.analytics.rollout_report."""
    metrics = [
        ("conversations", _("conversations")),
        ("answers", _("answers")),
        ("thumbs_up_rate", _("👍 rate")),
        ("handoff_rate", _("handoff rate")),
        ("fallback_share", _("fallback replies")),
        ("guard_share", _("generated answers replaced (fact guard or no-answer sentence)")),
        ("latency_ms_median", _("median response time (ms)")),
        ("latency_ms_p95", _("p95 response time (ms)")),
        ("first_token_ms_median", _("median first token (ms)")),
    ]
    rows = []
    for key, label in metrics:
        cells = [side[key] for side in rollout["sides"]]
        if key.endswith(("_rate", "_share")):
            cells = [None if value is None else f"{value:.1%}" for value in cells]
        rows.append((label, *("—" if value is None else value for value in cells)))
    return rows


def analytics_page(request):
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied
    since, until, errors = _dates(request.GET)
    data = analytics.report(since=since, until=until) if not errors else None
    table = []
    if data:
        for key, label in METRICS:
            cells = []
            for row in data["versions"]:
                value = row[key]
                if value is not None and key.endswith("_rate"):
                    value = f"{value:.1%}"
                cells.append("—" if value is None else value)
            table.append((label, cells))
        for group in data["top_questions"]:
            group["reasons"] = {REASONS.get(reason, reason): count for reason, count in group["reasons"].items()}
    rollout = analytics.rollout_report()
    context = {
        **admin.site.each_context(request),
        "title": _("Analytics by adapter version"),
        "rollout": rollout,
        "rollout_rows": rollout_rows(rollout) if rollout else [],
        "may_change_canary": request.user.has_perm("training.change_adapterversion"),
        "data": data,
        "errors": {FIELDS[field]: messages for field, messages in errors.items()},
        "since": request.GET.get("since", since.isoformat() if since else ""),
        "until": request.GET.get("until", until.isoformat() if until else ""),
        "table": table,
        "charts": _charts(data) if data else [],
    }
    return TemplateResponse(request, "admin/chat/analytics.html", context)


class AnalyticsPermission(permissions.BasePermission):
    def has_permission(self, request, view):
        user = request.user
        return bool(user and user.is_authenticated and user.is_staff and user.has_perm(PERMISSION))


class VersionStatsSerializer(serializers.Serializer):
    version = serializers.CharField(help_text="Adapter version name; empty for the base model.")
    conversations = serializers.IntegerField()
    answers = serializers.IntegerField()
    thumbs_up = serializers.IntegerField()
    thumbs_down = serializers.IntegerField()
    thumbs_up_rate = serializers.FloatField(allow_null=True, help_text="👍 / rated answers.")
    handoff_rate = serializers.FloatField(allow_null=True, help_text="Conversations that asked for a person / conversations.")
    latency_ms_median = serializers.IntegerField(allow_null=True)
    latency_ms_p95 = serializers.IntegerField(allow_null=True)
    first_token_ms_median = serializers.IntegerField(allow_null=True)
    first_token_ms_p95 = serializers.IntegerField(allow_null=True)
    tokens_per_second = serializers.FloatField(allow_null=True)
    suggestions_offered = serializers.IntegerField(
        help_text="Fallback replies that offered close curated questions (\"did you mean\", CSP_CHAT_SUGGESTIONS).",
    )
    suggestions_taken = serializers.IntegerField(
        help_text="Of those, the ones whose customer asked one of the offered questions next (a click sends it).",
    )


class DayStatsSerializer(VersionStatsSerializer):
    day = serializers.DateField()


class QuestionGroupSerializer(serializers.Serializer):
    question = serializers.CharField()
    count = serializers.IntegerField()
    reasons = serializers.DictField(child=serializers.IntegerField(), help_text="disliked, cut_short, handoff: counts.")
    examples = serializers.ListField(child=serializers.CharField())


class RolloutSideSerializer(VersionStatsSerializer):
    """One side of a canary rollout: the conversations started on it, with a version row's figures."""

    version = None
    side = serializers.ChoiceField(choices=["active", "canary"])
    versions = serializers.ListField(
        child=serializers.CharField(),
        help_text="The versions that answered the side's conversations: on the active side, each kept the version active "
        "when it started.",
    )
    fallback_share = serializers.FloatField(allow_null=True, help_text="Answers given the fallback reply / answers.")
    guard_share = serializers.FloatField(
        allow_null=True,
        help_text="Generated answers replaced by the curated answer (fact guard) or the fallback reply / answers.",
    )


class RolloutSerializer(serializers.Serializer):
    canary = serializers.CharField(help_text="The canary version's name.")
    running = serializers.BooleanField(help_text="False once it was promoted or stopped: the split stays readable.")
    percent = serializers.IntegerField(help_text="Its share of the new conversations, per cent.")
    since = serializers.DateTimeField(help_text="When it started: the conversations started since count.")
    sides = RolloutSideSerializer(many=True, help_text="The active side, then the canary side.")


class AnalyticsSerializer(serializers.Serializer):
    since = serializers.DateField()
    until = serializers.DateField()
    versions = VersionStatsSerializer(many=True)
    days = DayStatsSerializer(many=True)
    top_questions = QuestionGroupSerializer(many=True)
    rollout = RolloutSerializer(
        allow_null=True,
        help_text="The latest canary rollout's two sides since it started, whatever the period; null when there never was one.",
    )


class AnalyticsView(APIView):
    permission_classes = [AnalyticsPermission]

    @extend_schema(
        tags=["analytics"],
        summary="Per-version chat analytics",
        description="The numbers of the admin's analytics page: per adapter version, per day and in total, "
        "and the questions answered worst. The period defaults to the last 30 days. `rollout` is the latest canary's "
        "split (the conversations started on each side since it started), as the page shows it.",
        parameters=[
            OpenApiParameter("since", datetime.date, description="First day (YYYY-MM-DD)."),
            OpenApiParameter("until", datetime.date, description="Last day (YYYY-MM-DD), default today."),
        ],
        responses={
            200: AnalyticsSerializer,
            400: OpenApiResponse(description="A date is not YYYY-MM-DD, or `since` is after `until`: the field's message."),
        },
    )
    def get(self, request):
        since, until, errors = _dates(request.query_params)
        if errors:
            raise ValidationError(errors)
        report = {**analytics.report(since=since, until=until), "rollout": analytics.rollout_report()}
        return Response(AnalyticsSerializer(report).data)

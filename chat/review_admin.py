"""The review queue in the admin (answers rated 👎 or flagged, turned into draft pairs), and what
chat adds to the knowledge base's Q&A pair page: the answer a pair was drafted from.
"""

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from chat.forms import DraftFromAnswerForm
from chat.models import Citation, DraftedPair, Message, ReviewItem
from chat.review import review_dismiss, review_draft_pair
from knowledge.models import QAPair
from knowledge.services import qa_alternate_add


@admin.display(description=_("drafted from"))
def drafted_from(pair):
    """The answer (or the staff reply) a Q&A pair was drafted from, linked to where it is reviewed."""
    link = DraftedPair.objects.filter(pair_id=pair.pk).select_related("message").first() if pair.pk else None
    if link is None:
        return "—"
    answer = link.message
    if answer.role == Message.Role.ASSISTANT:
        url = reverse("admin:chat_reviewitem_change", args=[answer.pk])
    else:
        url = reverse("admin:chat_conversation_handoff", args=[answer.conversation_id])
    return format_html('<a href="{}">{}</a> ({})', url, answer, answer.get_role_display())


@admin.display(description=_("cited in answers"))
def cited_in(pair):
    """How many answers drew on a pair (chat.Citation), with the latest few linked."""
    if not pair.pk:
        return "—"
    citations = Citation.objects.filter(pair_id=pair.pk, used=True).select_related("message").order_by("-message__created_at")
    count = citations.count()
    if not count:
        return "—"
    links = format_html_join(
        ", ", '<a href="{}">#{}</a>', ((reverse("admin:chat_message_change", args=[c.message_id]), c.message_id) for c in citations[:5])
    )
    return format_html("{} ({})", ngettext("%d answer", "%d answers", count) % count, links)


def teach_alternate(model_admin, request, *, question):
    """The "add as an alternate" button beside a retrieved pair (the review page, the handoff reply
    page): adds the customer's question (a Message) to the pair POST's `alternate` names, so the next
    customer who asks it so gets that pair's curated answer. Says how it went: a refusal is a message
    on the page, not an error page."""
    if not request.user.has_perm("knowledge.change_qapair"):
        raise PermissionDenied
    raw = request.POST.get("alternate", "").strip()
    pair = QAPair.objects.filter(pk=raw).first() if raw.isdecimal() and len(raw) <= 18 else None  # 18: fits a bigint
    if pair is None or question is None:
        model_admin.message_user(request, _("No such pair, or no customer question to add to it."), messages.ERROR)
        return
    before = len(pair.alternates)
    try:
        pair = qa_alternate_add(pair=pair, question=question.text, user=request.user)
    except ValidationError as exc:
        problems = " ".join(exc.messages)
        model_admin.message_user(
            request, _("Nothing was added to pair #%(id)s: %(problems)s") % {"id": pair.pk, "problems": problems}, messages.ERROR
        )
        return
    url = reverse("admin:knowledge_qapair_change", args=[pair.pk])
    text = question.text.strip()
    if len(pair.alternates) > before:
        model_admin.message_user(
            request,
            format_html(_('“{}” is now an alternate question of pair <a href="{}">#{}</a>: the next customer who asks it so gets its answer.'), text, url, pair.pk),
            messages.SUCCESS,
        )
    else:
        model_admin.message_user(
            request, format_html(_('Pair <a href="{}">#{}</a> already asks “{}”; nothing changed.'), url, pair.pk, text), messages.INFO
        )


class ReviewStatusFilter(admin.SimpleListFilter):
    """Waiting answers by default: the queue is the work still to do."""

    title = _("review")
    parameter_name = "review"
    ALL = "all"

    def lookups(self, request, model_admin):
        return [
            (None, _("Waiting for review")),
            (Message.ReviewStatus.DRAFTED, _("Drafted")),
            (Message.ReviewStatus.DISMISSED, _("Dismissed")),
            (self.ALL, _("All")),
        ]

    def choices(self, changelist):
        for value, label in self.lookup_choices:
            yield {
                "selected": self.value() == value,
                "query_string": changelist.get_query_string({self.parameter_name: value} if value else {}, [self.parameter_name]),
                "display": label,
            }

    def queryset(self, request, queryset):
        value = self.value()
        if value == self.ALL:
            return queryset
        if value in (Message.ReviewStatus.DRAFTED, Message.ReviewStatus.DISMISSED):
            return queryset.filter(review_status=value)
        return queryset.filter(review_status=Message.ReviewStatus.PENDING)


class ReviewReasonFilter(admin.SimpleListFilter):
    title = _("reason")
    parameter_name = "reason"

    def lookups(self, request, model_admin):
        return [("disliked", _("Rated 👎 by the customer")), ("flagged", _("Flagged by staff"))]

    def queryset(self, request, queryset):
        if self.value() == "disliked":
            return queryset.filter(rating=-1)
        if self.value() == "flagged":
            return queryset.filter(flagged=True)
        return queryset


@admin.display(description=_("citations"))
def citations(message):
    """The pairs retrieved for an answer's question, linked, with their scores; the ones the answer
    used in bold (chat.grounding stores them)."""
    sources = message.sources or []
    if not sources:
        return "-"
    used = set(message.used or [])
    rows = [
        format_html(
            '<{tag}><a href="{url}">#{pair}</a> {question} ({score})</{tag}>',
            tag="strong" if source["pair"] in used else "span",
            url=reverse("admin:knowledge_qapair_change", args=[source["pair"]]),
            pair=source["pair"], question=Truncator(source.get("question", "")).chars(40), score=f"{source['score']:.2f}",
        )
        for source in sources
    ]
    return format_html_join(mark_safe("<br>"), "{}", ((row,) for row in rows))


class ReviewItemAdmin(admin.ModelAdmin):
    """Open an answer to see its conversation and turn it into a draft pair with a corrected answer."""

    list_display = (
        "created_at", "customer_question", "answer", "mode", citations, "rating", "flagged", "feedback_comment", "adapter_version",
        "review_status",
    )
    list_display_links = ("created_at", "customer_question")
    list_filter = (ReviewStatusFilter, ReviewReasonFilter, "mode", "adapter_version", "conversation__channel")
    list_select_related = ("adapter_version",)
    search_fields = ("text", "feedback_comment")
    date_hierarchy = "created_at"
    list_per_page = 50
    actions = ("dismiss",)

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_question=Message.question_text())

    @admin.display(description=_("customer's question"), ordering="_question")
    def customer_question(self, obj):
        return Truncator(obj._question or "").chars(80)

    @admin.display(description=_("answer"))
    def answer(self, obj):
        return Truncator(obj.text).chars(80)

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description=_("Dismiss selected answers (no pair needed)"), permissions=["change"])
    def dismiss(self, request, queryset):
        changed = review_dismiss(answers=queryset, user=request.user)
        self.message_user(request, ngettext("%d answer dismissed.", "%d answers dismissed.", changed) % changed, messages.SUCCESS)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        item = self.get_object(request, unquote(object_id))
        if item is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_view_or_change_permission(request, item):
            raise PermissionDenied
        can_draft = self.has_change_permission(request, item) and request.user.has_perm("knowledge.add_qapair")
        question = item.question()
        if request.method == "POST" and "alternate" in request.POST:
            teach_alternate(self, request, question=question)
            return HttpResponseRedirect(request.get_full_path())
        if request.method == "POST":
            if not can_draft:
                raise PermissionDenied
            if "dismiss" in request.POST:
                review_dismiss(answers=ReviewItem.objects.filter(pk=item.pk), user=request.user)
                self.message_user(request, _("The answer was dismissed."), messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:chat_reviewitem_changelist"))
            form = DraftFromAnswerForm(request.POST)
            if form.is_valid():
                try:
                    pair = review_draft_pair(answer=item, user=request.user, **form.cleaned_data)
                except ValidationError as exc:
                    for field, errors in exc.message_dict.items():
                        form.add_error(field if field in form.fields else None, errors)
                else:
                    url = reverse("admin:knowledge_qapair_change", args=[pair.pk])
                    self.message_user(
                        request,
                        format_html(_('Draft pair <a href="{}">#{}</a> created; approve it to train on it.'), url, pair.pk),
                        messages.SUCCESS,
                    )
                    return HttpResponseRedirect(reverse("admin:chat_reviewitem_changelist"))
        else:
            form = DraftFromAnswerForm(initial={"instruction": question.text if question else "", "output": item.text})
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": _("Review an answer"),
            "item": item,
            "question": question,
            "conversation": item.conversation.messages.select_related("adapter_version").order_by("created_at", "id"),
            "drafts": item.draft_pairs.all(),
            "form": form,
            "can_draft": can_draft,
            "retrieved": retrieved_pairs(item),
            "can_teach": question is not None and request.user.has_perm("knowledge.change_qapair"),
            "original": item,
            "has_view_permission": True,
        }
        return TemplateResponse(request, "admin/chat/reviewitem/review.html", context)


def retrieved_pairs(answer):
    """The pairs retrieved for an answer's question that still exist: [(source, QAPair)], by rank."""
    sources = [source for source in answer.sources or [] if isinstance(source, dict) and "pair" in source]
    pairs = QAPair.objects.in_bulk([source["pair"] for source in sources])
    return [(source, pairs[source["pair"]]) for source in sources if source["pair"] in pairs]

"""The staff side of the human handoff, mixed into ConversationAdmin: the reply page.

/admin/chat/conversation/<id>/handoff/ shows the conversation and lets staff take it over, reply
(the reply reaches the customer's open socket live), hand it back to the assistant or close it,
and turn any of their replies into a draft Q&A pair (source: handoff) in one click. Above the reply
box it suggests the curated answers retrieved for the customer's last question; a button beside
each adds that question to the pair's alternate questions, so the next customer who asks it so is
answered by the pair.
"""

from django.contrib import messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.translation import gettext as _

from chat import handoff
from chat.models import Conversation, Message
from chat.review import review_draft_pair
from chat.review_admin import teach_alternate
from chat.services import ChatError
from knowledge.models import QAPair
from knowledge.retrieval import serving_index


class HandoffAdminMixin:
    handoff_template = "admin/chat/conversation/handoff.html"

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        return [
            path("<path:object_id>/handoff/", self.admin_site.admin_view(self.handoff_view), name="%s_%s_handoff" % info),
            *super().get_urls(),
        ]

    @staticmethod
    def handoff_url(conversation):
        return reverse("admin:chat_conversation_handoff", args=[conversation.pk])

    def handoff_view(self, request, object_id):
        """The agent's page: the conversation, the curated answers retrieved for the customer's last
        question (each inserted into the reply with one click), and the reply form."""
        conversation = self.get_object(request, unquote(object_id))
        if conversation is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_view_permission(request, conversation):
            raise PermissionDenied
        can_act = request.user.has_perm("chat.change_conversation")
        here = self.handoff_url(conversation)
        if request.method == "POST":
            if not can_act:
                raise PermissionDenied
            try:
                self._handoff_post(request, conversation)
            except ChatError as exc:
                self.message_user(request, exc.detail, messages.ERROR)
            return HttpResponseRedirect(here)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": _("Conversation with the customer"),
            "original": conversation,
            "conversation": conversation,
            "chat_messages": conversation.messages.select_related("sent_by", "adapter_version").prefetch_related("draft_pairs"),
            "can_act": can_act,
            "can_draft": request.user.has_perm("knowledge.add_qapair"),
            "State": Conversation.State,
            "suggestions": suggestions(conversation) if can_act else [],
            # The question the suggestions were retrieved for: the one a button beside each adds to it.
            "suggested_for": conversation.messages.filter(role=Message.Role.USER).order_by("-created_at", "-id").first(),
            "can_teach": request.user.has_perm("knowledge.change_qapair"),
        }
        return TemplateResponse(request, self.handoff_template, context)

    def _handoff_post(self, request, conversation):
        user = request.user
        if "reply" in request.POST:
            handoff.handoff_reply(conversation=conversation, agent=user, text=request.POST.get("text", ""))
            self.message_user(request, _("Reply sent."), messages.SUCCESS)
        elif "take" in request.POST:
            handoff.handoff_take(conversation=conversation, agent=user)
            self.message_user(request, _("You took the conversation over; the assistant no longer answers it."), messages.SUCCESS)
        elif "release" in request.POST:
            handoff.handoff_release(conversation=conversation, agent=user)
            self.message_user(request, _("The assistant answers this conversation again."), messages.SUCCESS)
        elif "close" in request.POST:
            handoff.handoff_close(conversation=conversation, agent=user)
            self.message_user(request, _("The conversation is closed."), messages.SUCCESS)
        elif "draft" in request.POST:
            self._draft(request, conversation)
        elif "alternate" in request.POST:
            # The question the page showed, by id: the customer may have asked another since.
            raw = request.POST.get("question", "").strip()
            question = (
                Message.objects.filter(conversation=conversation, role=Message.Role.USER, pk=raw).first()
                if raw.isdecimal() and len(raw) <= 18  # fits a bigint
                else None
            )
            teach_alternate(self, request, question=question)

    def _draft(self, request, conversation):
        if not request.user.has_perm("knowledge.add_qapair"):
            raise PermissionDenied
        reply_id = request.POST.get("draft", "").strip()
        reply = (
            Message.objects.filter(conversation=conversation, role=Message.Role.AGENT, pk=reply_id).first()
            if reply_id.isdecimal()
            else None
        )
        if reply is None:
            raise ChatError("not_found", _("No such staff reply in this conversation."))
        try:
            pair = review_draft_pair(answer=reply, output=reply.text, user=request.user, source=QAPair.Source.HANDOFF)
        except ValidationError as exc:
            problems = "; ".join(f"{field}: {' '.join(errors)}" for field, errors in exc.message_dict.items())
            raise ChatError("invalid", _("No draft pair was made: %(problems)s") % {"problems": problems}) from None
        url = reverse("admin:knowledge_qapair_change", args=[pair.pk])
        self.message_user(request, format_html(_('Draft pair <a href="{}">#{}</a> created from your reply.'), url, pair.pk), messages.SUCCESS)


# How many curated answers the handoff page suggests for the customer's last question.
SUGGESTIONS = 3


def suggestions(conversation):
    """The top approved pairs for the customer's last question, retrieved with their earlier ones
    (as the assistant retrieves): [(score, QAPair)], best first."""
    questions = list(
        conversation.messages.filter(role=Message.Role.USER).order_by("-created_at", "-id").values_list("text", flat=True)[:3]
    )
    if not questions:
        return []
    hits = serving_index().search(questions[0], k=SUGGESTIONS, context=tuple(reversed(questions[1:])))
    pairs = QAPair.objects.in_bulk([hit.pair_id for hit in hits])
    return [(hit.score, pairs[hit.pair_id]) for hit in hits if hit.pair_id in pairs]


"""The review queue's workflows: an answer rated 👎 or flagged by staff is turned into a draft Q&A
pair linked to it, or dismissed. The admin, the REST API and the handoff reply page call these.

The pair itself is the knowledge base's (`knowledge.services.qa_draft_create` checks and stores
it); what chat adds is the answer's side: the link to the pair and the answer's review state.
"""

from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from chat.models import DraftedPair, Message
from knowledge.models import QAPair
from knowledge.services import qa_draft_create


def review_draft_pair(*, answer, output, instruction=None, input="", category=None, user=None, source=None):
    """Turn a chat answer into a draft QAPair: the customer's question, a corrected answer.

    `instruction` defaults to the customer's message the answer replied to. The pair is linked to
    the answer (`answer.draft_pairs`), which leaves the review queue as "drafted". Raises
    ValidationError (by field: instruction, input, output) and stores nothing when the pair is not
    acceptable, e.g. when the same question is already stored (the error names that pair).
    """
    if instruction is None:
        question = answer.question()
        instruction = question.text if question is not None else ""
    with transaction.atomic():
        pair = qa_draft_create(
            instruction=instruction,
            input=input,
            output=output,
            category=category,
            source=source or QAPair.Source.FEEDBACK,
            user=user,
            note=_("Drafted from chat answer #%(id)s.") % {"id": answer.pk},
        )
        DraftedPair.objects.create(message=answer, pair=pair)
        answer.review_status = Message.ReviewStatus.DRAFTED
        answer.reviewed_by = user
        answer.reviewed_at = timezone.now()
        answer.save(update_fields=["review_status", "reviewed_by", "reviewed_at"])
    return pair


def review_dismiss(*, answers, user=None):
    """Take answers out of the review queue without a pair; returns how many changed."""
    return answers.filter(review_status=Message.ReviewStatus.PENDING).update(
        review_status=Message.ReviewStatus.DISMISSED, reviewed_by=user, reviewed_at=timezone.now()
    )


def review_flag(*, answers, user=None):
    """Put answers into the review queue (staff's own judgement, whatever the customer rated)."""
    return answers.filter(role=Message.Role.ASSISTANT).exclude(flagged=True).update(
        flagged=True, review_status=Message.ReviewStatus.PENDING
    )

"""A database from before the review queue moved from knowledge into chat (the main of 1714ada)
keeps every row through the move: draft links, review states, permissions granted, admin history."""

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from chat.models import DraftedPair, Message, ReviewItem
from knowledge.models import QAPair

# The leaf migrations of both apps before the move.
BEFORE = [("chat", "0003_handoff"), ("knowledge", "0002_review_queue")]


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets or executor.loader.graph.leaf_nodes())
    ContentType.objects.clear_cache()  # ids stay, app labels change under the cache
    return executor


def _rows_from_before(apps):
    """Pairs drafted from answers and a staff reply, answers in every review state, a group and a
    user granted the review permissions, an admin history entry on a reviewed answer."""
    User = apps.get_model("auth", "User")
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    ContentType = apps.get_model("contenttypes", "ContentType")
    LogEntry = apps.get_model("admin", "LogEntry")
    Conversation = apps.get_model("chat", "Conversation")
    Message = apps.get_model("chat", "Message")
    QAPair = apps.get_model("knowledge", "QAPair")

    reviewer = User.objects.create(username="reviewer", password="!", is_staff=True)
    reviewers = Group.objects.create(name="reviewers")
    review_type = ContentType.objects.get(app_label="knowledge", model="reviewitem")
    reviewers.permissions.add(*Permission.objects.filter(content_type=review_type, codename__in=["view_reviewitem", "change_reviewitem"]))
    reviewer.groups.add(reviewers)
    flagger = User.objects.create(username="flagger", password="!", is_staff=True)
    flagger.user_permissions.add(Permission.objects.get(content_type=review_type, codename="change_reviewitem"))

    conversation = Conversation.objects.create(session_key="s", state="closed", agent=reviewer)
    say = lambda role, text, **extra: Message.objects.create(conversation=conversation, role=role, text=text, **extra)  # noqa: E731
    say("user", "用户问：运费险怎么理赔？")
    drafted = say("assistant", "请联系客服。", rating=-1, review_status="drafted", reviewed_by=reviewer)
    flagged = say("assistant", "不知道。", flagged=True)
    dismissed = say("assistant", "嗯。", rating=-1, review_status="dismissed", reviewed_by=reviewer)
    reply = say("agent", "签收后7天内可退。", sent_by=reviewer)

    pair = lambda n, **extra: QAPair.objects.create(instruction=f"问题{n}？", output=f"答案{n}。", question_hash=f"{n}" * 64, **extra)  # noqa: E731
    pairs = {
        "feedback": pair(1, source="feedback", source_message=drafted, created_by=reviewer),
        "feedback, again": pair(2, source="feedback", source_message=drafted),
        "handoff": pair(3, source="handoff", source_message=reply),
        "manual": pair(4),
    }
    entry = LogEntry.objects.create(
        user=reviewer, content_type=review_type, object_id=str(dismissed.pk), object_repr="嗯。", action_flag=2, change_message="Dismissed."
    )
    return {"pairs": pairs, "answers": (drafted, flagged, dismissed, reply), "review_type": review_type.pk, "entry": entry.pk}


@pytest.mark.services  # the PostgreSQL pass migrates a PostgreSQL database the same way
@pytest.mark.django_db(transaction=True)
def test_a_database_from_before_the_move_keeps_every_draft_link_review_state_grant_and_history_entry():
    executor = _migrate(BEFORE)
    try:
        others = [node for node in executor.loader.graph.leaf_nodes() if node[0] not in ("chat", "knowledge")]
        old = _rows_from_before(executor.loader.project_state([*BEFORE, *others]).apps)
        messages_before = list(Message.objects.order_by("pk").values_list("pk", "role", "text", "rating", "flagged", "review_status", "reviewed_by"))
        pairs_before = list(QAPair.objects.order_by("pk").values_list("pk", "instruction", "source", "status", "created_by"))
    finally:
        _migrate(None)

    drafted, flagged, dismissed, reply = old["answers"]
    pairs = old["pairs"]
    assert set(DraftedPair.objects.values_list("pair_id", "message_id")) == {
        (pairs["feedback"].pk, drafted.pk), (pairs["feedback, again"].pk, drafted.pk), (pairs["handoff"].pk, reply.pk),
    }
    assert set(Message.objects.get(pk=drafted.pk).draft_pairs.values_list("pk", flat=True)) == {pairs["feedback"].pk, pairs["feedback, again"].pk}
    assert list(QAPair.objects.get(pk=pairs["handoff"].pk).drafted_from.all()) == [Message.objects.get(pk=reply.pk)]
    assert not QAPair.objects.get(pk=pairs["manual"].pk).drafted_from.exists() and not Message.objects.get(pk=flagged.pk).draft_pairs.exists()
    assert list(Message.objects.order_by("pk").values_list("pk", "role", "text", "rating", "flagged", "review_status", "reviewed_by")) == messages_before
    assert list(QAPair.objects.order_by("pk").values_list("pk", "instruction", "source", "status", "created_by")) == pairs_before
    assert set(ReviewItem.objects.values_list("pk", flat=True)) == {drafted.pk, flagged.pk, dismissed.pk}

    # The content type was renamed, not recreated: grants and history follow it into chat.
    review_type = ContentType.objects.get_for_model(ReviewItem, for_concrete_model=False)
    assert (review_type.pk, review_type.app_label) == (old["review_type"], "chat")
    assert not ContentType.objects.filter(app_label="knowledge", model="reviewitem").exists()
    User = get_user_model()
    reviewer, flagger = User.objects.get(username="reviewer"), User.objects.get(username="flagger")
    assert reviewer.has_perms(["chat.view_reviewitem", "chat.change_reviewitem"]) and not reviewer.has_perm("chat.delete_reviewitem")
    assert flagger.has_perm("chat.change_reviewitem") and not flagger.has_perm("chat.view_reviewitem")
    assert set(Group.objects.get(name="reviewers").permissions.values_list("content_type__app_label", "codename")) == {
        ("chat", "view_reviewitem"), ("chat", "change_reviewitem"),
    }
    entry = LogEntry.objects.get(pk=old["entry"])
    assert entry.content_type_id == review_type.pk and entry.get_admin_url() == f"/admin/chat/reviewitem/{dismissed.pk}/change/"

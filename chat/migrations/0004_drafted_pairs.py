"""The review queue and the answer → draft pair link move from knowledge into chat.

Before: `knowledge.QAPair.source_message` (a foreign key into chat.Message) and the proxy
`knowledge.ReviewItem`. After: `chat.DraftedPair` rows (one per pair that had a source message)
and the proxy `chat.ReviewItem`. This migration copies every link, then knowledge's 0003 drops the
column (run_before, so knowledge's own migrations need not depend on chat's). The review proxy's
content type is renamed, not recreated, so the permissions granted on it and the admin history
that points at it follow it into chat. Reversible: going back copies the links into the column.
"""

import django.db.models.deletion
from django.db import migrations, models

BATCH = 1000


def copy_links_into_chat(apps, schema_editor):
    QAPair = apps.get_model("knowledge", "QAPair")
    DraftedPair = apps.get_model("chat", "DraftedPair")
    links = QAPair.objects.filter(source_message__isnull=False).values_list("pk", "source_message_id")
    DraftedPair.objects.bulk_create(
        (DraftedPair(pair_id=pair, message_id=message) for pair, message in links.iterator()), batch_size=BATCH
    )


def copy_links_back(apps, schema_editor):
    QAPair = apps.get_model("knowledge", "QAPair")
    DraftedPair = apps.get_model("chat", "DraftedPair")
    for pair, message in DraftedPair.objects.values_list("pair_id", "message_id").iterator():
        QAPair.objects.filter(pk=pair).update(source_message_id=message)


def _move_review_content_type(apps, source, target):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    LogEntry = apps.get_model("admin", "LogEntry")
    moving = ContentType.objects.filter(app_label=source, model="reviewitem").first()
    if moving is None:  # a database created after the move, or never given content types
        return
    present = ContentType.objects.filter(app_label=target, model="reviewitem").first()
    if present is None:
        moving.app_label = target
        moving.save(update_fields=["app_label"])
        return
    # Both exist only when the target was created outside this migration (e.g. `migrate --fake`
    # and a post_migrate since): keep the target's rows, give them the source's grants and history.
    for permission in Permission.objects.filter(content_type=moving):
        kept, _created = Permission.objects.get_or_create(
            content_type=present, codename=permission.codename, defaults={"name": permission.name}
        )
        kept.group_set.add(*permission.group_set.all())
        kept.user_set.add(*permission.user_set.all())
        permission.delete()
    LogEntry.objects.filter(content_type=moving).update(content_type=present)
    moving.delete()


def move_review_content_type_into_chat(apps, schema_editor):
    _move_review_content_type(apps, "knowledge", "chat")


def move_review_content_type_back(apps, schema_editor):
    _move_review_content_type(apps, "chat", "knowledge")


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0003_handoff"),
        ("knowledge", "0002_review_queue"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("admin", "0003_logentry_add_action_flag_choices"),
    ]
    run_before = [("knowledge", "0003_source_message_moves_to_chat")]

    operations = [
        migrations.CreateModel(
            name="DraftedPair",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "message",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="chat.message",
                        verbose_name="from answer",
                    ),
                ),
                (
                    "pair",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="knowledge.qapair",
                        verbose_name="Q&A pair",
                    ),
                ),
            ],
            options={
                "verbose_name": "pair drafted from an answer",
                "verbose_name_plural": "pairs drafted from answers",
            },
        ),
        migrations.CreateModel(
            name="ReviewItem",
            fields=[],
            options={
                "verbose_name": "answer to review",
                "verbose_name_plural": "review queue",
                "ordering": ["-created_at", "-id"],
                "proxy": True,
                "indexes": [],
                "constraints": [],
            },
            bases=("chat.message",),
        ),
        migrations.RunPython(copy_links_into_chat, copy_links_back),
        migrations.RunPython(move_review_content_type_into_chat, move_review_content_type_back),
    ]

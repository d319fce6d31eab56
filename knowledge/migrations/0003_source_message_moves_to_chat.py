"""The answer → draft pair link and the review queue now live in chat (chat's 0004 copied every
link into chat.DraftedPair and moved the review proxy's content type before this runs)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("knowledge", "0002_review_queue"),
    ]

    operations = [
        migrations.RemoveField(
            model_name="qapair",
            name="source_message",
        ),
        migrations.DeleteModel(
            name="ReviewItem",
        ),
    ]

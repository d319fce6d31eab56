"""`Message.draft_pairs`, the pairs drafted from a message, through chat.DraftedPair (0004).

A separate step after knowledge's 0003: until that drops `QAPair.source_message`, whose reverse
accessor on Message was also named draft_pairs, the two names would clash. No table changes.
"""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0004_drafted_pairs"),
        ("knowledge", "0003_source_message_moves_to_chat"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="draft_pairs",
            field=models.ManyToManyField(
                blank=True,
                help_text="Q&A pairs drafted from this answer (or from this staff reply in a handoff).",
                related_name="drafted_from",
                through="chat.DraftedPair",
                to="knowledge.qapair",
                verbose_name="draft pairs",
            ),
        ),
    ]

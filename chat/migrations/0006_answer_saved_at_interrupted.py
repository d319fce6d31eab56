"""Answers cut off by a killed web process (issue #16): `Message.saved_at`, the last save of an answer's
text while it streams; the finish reasons as choices, with "interrupted"; an index on the open
answers, which the reconciler looks for every minute. Rows from before were last saved when created."""

import django.utils.timezone
from django.db import migrations, models


def saved_when_created(apps, schema_editor):
    apps.get_model("chat", "Message").objects.update(saved_at=models.F("created_at"))


class Migration(migrations.Migration):

    dependencies = [("chat", "0005_message_draft_pairs")]

    operations = [
        migrations.AddField(
            model_name="message",
            name="saved_at",
            field=models.DateTimeField(
                default=django.utils.timezone.now,
                help_text="While an answer is streamed its text so far is saved at an interval; this is the last save.",
                verbose_name="last saved at",
            ),
        ),
        migrations.RunPython(saved_when_created, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="message",
            name="finish_reason",
            field=models.CharField(
                blank=True,
                choices=[
                    ("stop", "Complete"),
                    ("length", "Cut at the length limit"),
                    ("timeout", "Cut at the time limit"),
                    ("cancelled", "Stopped (the client left or cancelled)"),
                    ("error", "The model failed"),
                    ("filtered", "Stopped by the leak guard"),
                    ("interrupted", "Interrupted (the server stopped mid-answer)"),
                ],
                max_length=20,
                verbose_name="finish reason",
            ),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(
                condition=models.Q(("finish_reason", ""), ("role", "assistant")), fields=["saved_at"], name="chat_open_answers"
            ),
        ),
    ]

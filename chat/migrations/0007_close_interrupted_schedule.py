"""Schedule the closing of interrupted answers: every minute, answers a dead web process left open
are closed "interrupted" with what was streamed (chat.answering.answers_close_interrupted)."""

from django.db import migrations

NAME = "Close interrupted answers"


def add_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.update_or_create(
        name=NAME,
        defaults={"func": "chat.answering.answers_close_interrupted", "schedule_type": "I", "minutes": 1, "repeats": -1},
    )


def remove_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [("chat", "0006_answer_saved_at_interrupted"), ("django_q", "0018_task_success_index")]
    operations = [migrations.RunPython(add_schedule, remove_schedule)]

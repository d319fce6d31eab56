"""Schedule `clearsessions` daily: expired sessions are deleted, not kept for good.

Every browser that opens the chat page gets a session row (the page makes it, so that its
websocket can own a conversation), and so does a cookie-less socket that starts a conversation;
Django deletes none of them by itself once they expire (SESSION_COOKIE_AGE, two weeks).
"""

from django.db import migrations

NAME = "Clear expired sessions"


def add_schedule(apps, schema_editor):
    # Daily by default; staff change the frequency under Django Q → Scheduled tasks.
    apps.get_model("django_q", "Schedule").objects.get_or_create(
        name=NAME,
        defaults={"func": "django.core.management.call_command", "args": "'clearsessions'", "schedule_type": "D", "repeats": -1},
    )


def remove_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [("django_q", "0018_task_success_index"), ("sessions", "0001_initial")]
    operations = [migrations.RunPython(add_schedule, remove_schedule)]

"""`make run`'s setup step: sample data and superuser, created once, never duplicated."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from knowledge.models import QAPair

pytestmark = pytest.mark.django_db


def test_bootstrap_loads_sample_data_and_prints_a_generated_password_once(capsys, settings):
    settings.CSP_ADMIN_PASSWORD = ""
    call_command("bootstrap")
    first = capsys.readouterr().out
    assert "password" in first
    password = first.split("password '")[1].split("'")[0]
    user = get_user_model().objects.get(username=settings.CSP_ADMIN_USER)
    assert user.is_superuser and user.check_password(password)
    assert QAPair.objects.filter(status="approved", split="train").count() >= 100
    assert QAPair.objects.filter(status="approved", split="dev").count() >= 20

    call_command("bootstrap")
    second = capsys.readouterr().out
    assert "password" not in second
    assert get_user_model().objects.count() == 1
    assert QAPair.objects.count() >= 120


def test_bootstrap_uses_the_configured_password(settings):
    settings.CSP_ADMIN_USER, settings.CSP_ADMIN_PASSWORD = "boss", "a-long-chosen-pass"
    call_command("bootstrap")
    assert get_user_model().objects.get(username="boss").check_password("a-long-chosen-pass")



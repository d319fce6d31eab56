"""`make run`'s setup step: sample data and superuser, created once, never duplicated."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from knowledge.models import QAPair

from training.models import TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _isolated(training_env):
    pass


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




def test_bootstrap_queues_one_first_training_run(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        call_command("bootstrap")
    run = TrainingRun.objects.get()
    assert run.status == "queued" and run.snapshot.train_count >= 100 and len(callbacks) == 1
    call_command("bootstrap")
    assert TrainingRun.objects.count() == 1


def test_bootstrap_without_a_base_model_says_why_and_still_sets_up(capsys, settings, tmp_path):
    settings.CSP_BASE_MODEL = tmp_path / "missing"
    call_command("bootstrap")
    assert "CSP_BASE_MODEL" in capsys.readouterr().out
    assert not TrainingRun.objects.exists() and QAPair.objects.exists()

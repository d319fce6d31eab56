"""Scheduled retraining: the schedule starts a run on enough new pairs; the new version goes live
only when it is not worse than the active one on the same dev pairs."""

import json

import pytest
from django.conf import settings as django_settings
from django.urls import reverse
from django_q.models import Schedule

from knowledge.models import QAPair
from training import retraining, services, tasks
from training.models import AdapterVersion, BaseModel, DatasetSnapshot, RetrainingPolicy, TrainingRun

pytestmark = [pytest.mark.django_db, pytest.mark.services]
QUICK = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 1e-2, "epochs": 3, "batch_size": 4}


@pytest.fixture(autouse=True)
def _isolated(training_env, settings):
    settings.CSP_TRAINING_DEVICE = "cpu"


def _approve(records, split="train"):
    return [
        QAPair.objects.create(instruction=r["instruction"], output=r["output"], status="approved", split=split) for r in records
    ]


@pytest.fixture
def records():
    return json.loads(django_settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))


def _policy(**fields):
    policy = RetrainingPolicy.load()
    for name, value in fields.items():
        setattr(policy, name, value)
    policy.save()
    return policy


def test_the_schedule_exists_and_the_policy_starts_off():
    schedule = Schedule.objects.get(func="training.tasks.scheduled_retraining")
    assert schedule.repeats == -1 and schedule.schedule_type == Schedule.DAILY
    assert tasks.scheduled_retraining() == "Retraining is off."
    assert not TrainingRun.objects.exists()


def test_a_run_starts_only_with_enough_new_approved_pairs(records, django_capture_on_commit_callbacks):
    _policy(enabled=True, min_new_pairs=5)
    _approve(records[:4])
    QAPair.objects.create(instruction="用户问：草稿问题？", output="草稿答案，不算。", status="draft")
    decision = retraining.retraining_check()
    assert "4" in decision and "5" in decision and not TrainingRun.objects.exists()

    _approve(records[4:5])
    with django_capture_on_commit_callbacks(execute=False):
        decision = retraining.retraining_check()
    run = TrainingRun.objects.get()
    assert run.trigger == TrainingRun.Trigger.SCHEDULE and f"#{run.pk}" in decision
    assert RetrainingPolicy.load().last_decision == decision

    assert "queued or running" in retraining.retraining_check()  # one at a time
    run.status = TrainingRun.Status.SUCCEEDED
    run.save()
    assert retraining.new_approved_pairs() == 0  # all five are in the run's snapshot now
    assert "0 new approved pairs" in retraining.retraining_check()


def _versions(tmp_path):
    base = BaseModel.objects.create(name="tiny", path=str(tmp_path))
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path=str(tmp_path), train_count=1, dev_count=1)
    runs = [TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded", trigger="schedule") for _ in range(2)]
    old = AdapterVersion.objects.create(name="v1", run=runs[0], base_model=base, path=str(tmp_path / "v1"), is_active=True)
    new = AdapterVersion.objects.create(name="v2", run=runs[1], base_model=base, path=str(tmp_path / "v2"))
    return runs[1], old, new


@pytest.mark.parametrize(
    "new, old, activation, activated, words",
    [
        ({"key_fact_recall": 0.8, "rouge_l_char": 0.6}, {"key_fact_recall": 0.7, "rouge_l_char": 0.6}, "auto", True, "Activated v2"),
        ({"key_fact_recall": 0.8, "rouge_l_char": 0.5}, {"key_fact_recall": 0.7, "rouge_l_char": 0.6}, "auto", False, "worse on ROUGE-L (char)"),
        ({"key_fact_recall": 0.8, "rouge_l_char": 0.6}, {"key_fact_recall": 0.7, "rouge_l_char": 0.6}, "manual", False, "left to staff"),
        ({}, {"key_fact_recall": 0.7}, "auto", False, "no dev pairs"),
        (
            {"key_fact_recall": 0.8, "invented_number_share": 0.1}, {"key_fact_recall": 0.7, "invented_number_share": 0.0},
            "auto", False, "worse on answers with an invented number",
        ),
    ],
)
def test_the_activation_decision_compares_with_the_active_version(tmp_path, new, old, activation, activated, words):
    _policy(activation=activation)
    run, active, version = _versions(tmp_path)
    evaluated = []
    decision = retraining.scheduled_activation(run, version, new, lambda v: evaluated.append(v) or old)
    version.refresh_from_db()
    run.refresh_from_db()
    assert version.is_active is activated and words in decision
    assert run.activation_decision == decision == RetrainingPolicy.load().last_decision
    assert evaluated == ([] if not new else [active])  # the active version is evaluated on this run's dev pairs


@pytest.mark.train
def test_a_scheduled_run_is_trained_compared_and_decided_through_the_q2_task(records, q2_sync, django_capture_on_commit_callbacks):
    _approve(records[:4])
    _approve(records[100:103], split="dev")
    with django_capture_on_commit_callbacks(execute=True):
        first = services.training_run_start(hyperparameters=QUICK)
    first.refresh_from_db()
    assert first.status == "succeeded", first.error
    v1 = AdapterVersion.objects.get(is_active=True)

    _policy(enabled=True, min_new_pairs=3, activation="auto")
    _approve(records[4:8])
    with django_capture_on_commit_callbacks(execute=True):
        decision = tasks.scheduled_retraining()
    run = TrainingRun.objects.get(trigger="schedule")
    assert run.status == "succeeded", run.error
    assert f"#{run.pk}" in decision and run.hyperparameters == first.hyperparameters
    v2 = AdapterVersion.objects.get(run=run)
    log = run.log
    assert "evaluating the active version v1 on the same dev pairs" in log and run.activation_decision in log
    # Whatever the numbers, the decision follows them: live only when not worse on any metric.
    v1.refresh_from_db()
    v2.refresh_from_db()
    if run.activation_decision.startswith("Activated v2"):
        assert v2.is_active and not v1.is_active
    else:
        assert run.activation_decision.startswith("Kept v1") and v1.is_active and not v2.is_active


def test_the_policy_admin_opens_the_one_policy_and_links_the_schedule(superuser, client):
    client.force_login(superuser)
    response = client.get(reverse("admin:training_retrainingpolicy_changelist"))
    assert response.status_code == 302
    page = client.get(response["Location"])
    assert page.status_code == 200 and "Scheduled retraining" in page.content.decode()

"""Starting, refusing, cancelling and reconciling runs; activating and rolling back versions."""

from datetime import timedelta

import pytest
from django.utils import timezone

from knowledge.models import QAPair
from training import services
from training.models import AdapterVersion, TrainingRun

pytestmark = [pytest.mark.django_db, pytest.mark.services]


@pytest.fixture(autouse=True)
def _isolated(training_env):
    pass


@pytest.fixture
def approved_pairs():
    return [
        QAPair.objects.create(instruction=f"用户问：第{n}号问题？", output=f"您好！答案是{n}天。", status="approved", split="train")
        for n in ("一", "二", "三", "四", "五", "六")
    ] + [QAPair.objects.create(instruction="用户问：验证问题？", output="您好！答案是9天。", status="approved", split="dev")]


def test_start_queues_a_run_with_seed_defaults(approved_pairs, staff_user):
    run = services.training_run_start(user=staff_user, enqueue=False)
    assert run.status == TrainingRun.Status.QUEUED and run.created_by == staff_user
    assert run.hyperparameters == {
        "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "learning_rate": 5e-4, "batch_size": 4, "grad_accum": 1,
        "epochs": 3, "max_length": 512, "target_modules": "all-linear",
    }
    assert run.snapshot.train_count == 6 and run.snapshot.dev_count == 1
    assert run.base_model.architecture == "Qwen2ForCausalLM"


def test_start_is_enqueued_only_after_commit(approved_pairs, django_capture_on_commit_callbacks):
    from django_q.models import OrmQ

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.training_run_start()
        assert OrmQ.objects.count() == 0
    assert len(callbacks) == 1


def test_second_start_is_refused_while_one_is_active(approved_pairs):
    services.training_run_start(enqueue=False)
    with pytest.raises(services.TrainingRefused) as refused:
        services.training_run_start(enqueue=False)
    assert refused.value.code == "busy"
    assert TrainingRun.objects.count() == 1


def test_missing_base_model_is_refused_naming_the_setting(approved_pairs, settings, tmp_path):
    settings.CSP_BASE_MODEL = tmp_path / "nowhere"
    with pytest.raises(services.TrainingRefused) as refused:
        services.training_run_start(enqueue=False)
    assert refused.value.code == "base_model" and "CSP_BASE_MODEL" in str(refused.value)


def test_failed_checks_block_the_run(staff_user):
    with pytest.raises(services.TrainingRefused) as refused:
        services.training_run_start(enqueue=False)
    assert refused.value.code == "checks"
    assert refused.value.details["errors"][0]["code"] == "no_train"
    assert TrainingRun.objects.count() == 0


@pytest.mark.parametrize("values, field", [({"epochs": 0}, "epochs"), ({"learning_rate": "fast"}, "learning_rate"), ({"lora_r": 2.5}, "lora_r"), ({"dropout": 1}, "dropout")])
def test_bad_hyperparameters_are_refused_by_name(values, field):
    with pytest.raises(services.TrainingRefused) as refused:
        services.clean_hyperparameters(values)
    assert refused.value.code == "invalid" and field in refused.value.details


def test_cancel_of_a_queued_run_ends_it_at_once(approved_pairs):
    run = services.training_run_start(enqueue=False)
    assert services.training_run_cancel(run=run)
    assert run.status == TrainingRun.Status.CANCELLED
    assert not services.training_run_cancel(run=run)


def test_reconciler_fails_runs_without_heartbeat_only(approved_pairs, settings):
    run = services.training_run_start(enqueue=False)
    TrainingRun.objects.filter(pk=run.pk).update(status="running", heartbeat_at=timezone.now())
    assert services.training_runs_reconcile() == 0
    stale = timezone.now() - timedelta(seconds=settings.CSP_HEARTBEAT_TIMEOUT + 1)
    TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=stale)
    assert services.training_runs_reconcile() == 1
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "heartbeat" in run.error


def _version(name, run_snapshot, **metrics):
    run = TrainingRun.objects.create(base_model=run_snapshot.base_model, snapshot=run_snapshot.snapshot, status="succeeded")
    return AdapterVersion.objects.create(name=name, run=run, base_model=run.base_model, path="/nowhere", metrics={"eval": metrics})


@pytest.fixture
def finished_run(approved_pairs):
    run = services.training_run_start(enqueue=False)
    run.status = "succeeded"
    run.save()
    return run


def test_exactly_one_version_is_active_and_rollback_restores_the_previous(finished_run):
    v1 = _version("v1", finished_run, key_fact_recall=0.5)
    v2 = _version("v2", finished_run, key_fact_recall=0.8)
    services.adapter_version_activate(version=v1)
    services.adapter_version_activate(version=v2)
    assert list(AdapterVersion.objects.filter(is_active=True)) == [v2]
    assert services.adapter_version_rollback() == v1
    assert list(AdapterVersion.objects.filter(is_active=True)) == [v1]


def test_database_refuses_two_active_versions(finished_run):
    from django.db import IntegrityError, transaction

    v1 = _version("v1", finished_run)
    v2 = _version("v2", finished_run)
    AdapterVersion.objects.filter(pk=v1.pk).update(is_active=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        AdapterVersion.objects.filter(pk=v2.pk).update(is_active=True)


def test_worse_version_warns_and_strict_gate_refuses(finished_run, settings):
    good = _version("v1", finished_run, key_fact_recall=0.9, rouge_l_char=0.8)
    worse = _version("v2", finished_run, key_fact_recall=0.4, rouge_l_char=0.8)
    services.adapter_version_activate(version=good)
    settings.CSP_EVAL_GATE = "strict"
    with pytest.raises(services.ActivationRefused):
        services.adapter_version_activate(version=worse)
    settings.CSP_EVAL_GATE = "warn"
    assert services.adapter_version_activate(version=worse) == ["key_fact_recall"]
    assert AdapterVersion.objects.get(is_active=True) == worse


def test_the_strict_gate_refuses_a_version_with_more_answers_stating_an_invented_number(finished_run, settings):
    careful = _version("v1", finished_run, key_fact_recall=0.9, invented_number_share=0.0)
    inventive = _version("v2", finished_run, key_fact_recall=0.95, invented_number_share=0.05)
    services.adapter_version_activate(version=careful)
    settings.CSP_EVAL_GATE = "strict"
    with pytest.raises(services.ActivationRefused, match="invented_number_share"):
        services.adapter_version_activate(version=inventive)
    # a version evaluated before invented numbers were counted is compared on the rest only
    older = _version("v3", finished_run, key_fact_recall=0.9)
    assert services.adapter_version_activate(version=older) == []
    settings.CSP_EVAL_GATE = "warn"
    services.adapter_version_activate(version=careful, force=True)
    assert services.adapter_version_activate(version=inventive) == ["invented_number_share"]


def test_the_reconciler_is_scheduled_every_minute():
    from django.utils.module_loading import import_string
    from django_q.models import Schedule

    schedule = Schedule.objects.get(name="Reconcile training runs")
    assert schedule.schedule_type == Schedule.MINUTES and schedule.minutes == 1 and schedule.repeats == -1
    assert import_string(schedule.func)() == 0

"""A run killed long before its first step-count checkpoint resumes from a time checkpoint
(issue #16, item 2), on a real q2 cluster.

Run it with `pytest training/tests/test_resume_early.py -s` to see its figure.
"""

import signal

import pytest

from llm.finetune.checkpoints import list_checkpoints
from training import services
from training.models import AdapterVersion, TrainingRun
from training.tasks import run_training
from training.tests.test_faults import wait_for
from training.tests.test_training_run import _sample_pairs

STEPS = 45  # pairs trained one at a time for one epoch: fewer steps than CSP_CHECKPOINT_EVERY's 50


@pytest.fixture(autouse=True)
def _isolated(training_env, settings):
    settings.CSP_TRAINING_DEVICE = "cpu"
    settings.CSP_EVAL_MAX_PAIRS = 0  # this test is about the run's life, not its answers


@pytest.mark.django_db(transaction=True)
def test_a_run_sigkilled_before_step_50_resumes_from_its_time_checkpoint_not_from_step_0(qcluster, settings, staff_api):
    _sample_pairs(train=STEPS)
    assert settings.CSP_CHECKPOINT_EVERY == 50  # the default: no step-count checkpoint in this run
    run = services.training_run_start(hyperparameters={"epochs": 1, "batch_size": 1})
    # One epoch: its only end is the last step, so a checkpoint before it can only come from time.
    cluster = qcluster(CSP_CHECKPOINT_SECONDS="1")
    work = services.run_dir(run.pk)

    def checkpointed_or_over():
        return list_checkpoints(work) or not TrainingRun.objects.get(pk=run.pk).is_active

    assert wait_for(checkpointed_or_over, 180, interval=0.05), cluster.log_tail()
    cluster.signal(signal.SIGKILL)  # every process of the cluster: nothing records anything
    cluster.process.wait()
    run.refresh_from_db()
    checkpoints = [step for step, _ in list_checkpoints(work)]
    assert run.status == TrainingRun.Status.RUNNING and checkpoints, f"run {run.status}, checkpoints {checkpoints}\n{cluster.log_tail()}"
    killed_at, checkpoint = run.step, checkpoints[-1]
    assert 0 < checkpoint < STEPS and not (work / "adapter").exists()

    # The reconciler marks it failed as it does any run whose worker died...
    settings.CSP_HEARTBEAT_TIMEOUT = 2
    assert wait_for(lambda: services.training_runs_reconcile() == 1, 30)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "heartbeats" in run.error

    # ...and staff resume it from that checkpoint (before: 409, nothing to resume from).
    response = staff_api.post(f"/api/v1/training-runs/{run.pk}/resume/")
    assert response.status_code == 200 and response.json()["status"] == "queued", response.content
    assert run_training(run.pk) == "v1"
    run.refresh_from_db()
    assert f"resumed from the checkpoint at step {checkpoint}\n" in run.log
    assert run.status == TrainingRun.Status.SUCCEEDED and [p[0] for p in run.loss_history] == list(range(1, STEPS + 1))
    assert AdapterVersion.objects.get().run_id == run.pk
    print(
        f"SIGKILL at step {killed_at} of {STEPS} (CSP_CHECKPOINT_EVERY=50, CSP_CHECKPOINT_SECONDS=1): run failed by the "
        f"reconciler, resumed from the time checkpoint at step {checkpoint} (lost {killed_at - checkpoint} steps), succeeded"
    )

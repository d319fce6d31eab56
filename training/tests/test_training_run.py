"""Approved pairs → django-q2 task → adapter version, end to end with the tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from tests.support.livetest import database_env
from knowledge.models import QAPair
from training import services
from llm.generation import generate_answer
from llm.modeling import load_adapter, load_base
from training.models import AdapterVersion, TrainingRun

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
# Settings that make the tiny model memorise a dozen answers in seconds (see test_finetune.py).
MEMORISE = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "learning_rate": 1e-2, "epochs": 30, "batch_size": 4}


@pytest.fixture(autouse=True)
def _isolated(training_env, settings):
    settings.CSP_TRAINING_DEVICE = "cpu"


def _sample_pairs(train=12, dev=3):
    records = json.loads(django_settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))
    pairs = []
    for index, record in enumerate(records[: train + dev]):
        pairs.append(
            QAPair.objects.create(
                instruction=record["instruction"], output=record["output"], status="approved", split="train" if index < train else "dev"
            )
        )
    return pairs[:train], pairs[train:]


def _reproduced(model, tokenizer, pairs):
    hits = [generate_answer(model, tokenizer, p.instruction, max_new_tokens=200) == p.output for p in pairs]
    return sum(hits) / len(hits)


@pytest.mark.train
@pytest.mark.django_db
def test_approved_pairs_become_an_active_adapter_version_through_the_q2_task(
    q2_sync, django_capture_on_commit_callbacks, staff_user, tiny_model
):
    train_pairs, _dev = _sample_pairs()
    with django_capture_on_commit_callbacks(execute=True):
        run = services.training_run_start(user=staff_user, hyperparameters=MEMORISE)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.step == run.total_steps == 90 and len(run.loss_history) == 90
    assert run.loss_history[-1][1] < run.loss_history[0][1] / 5
    assert len(run.dev_loss_history) == 30
    assert {"exact_match", "rouge_l_char", "bleu4", "key_fact_recall", "dev_loss"} <= set(run.eval_results)

    version = AdapterVersion.objects.get()
    assert version.run == run and version.name == "v1" and version.is_active  # the first version serves at once
    assert version.size_bytes > 0 and not services.run_dir(run.pk).exists()  # work folder cleaned up

    model, tokenizer = load_adapter(tiny_model, version.path)
    assert _reproduced(model, tokenizer, train_pairs) >= 0.9
    base, tokenizer = load_base(tiny_model)
    assert _reproduced(base, tokenizer, train_pairs) == 0


@pytest.mark.django_db
def test_cancel_flag_stops_a_running_task_and_leaves_no_version(q2_sync, django_capture_on_commit_callbacks):
    _sample_pairs()
    run = services.training_run_start(hyperparameters={"epochs": 50}, enqueue=False)
    TrainingRun.objects.filter(pk=run.pk).update(cancel_requested=True)
    from training.tasks import run_training

    assert run_training(run.pk) == "cancelled"
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELLED and run.step == 0
    assert not AdapterVersion.objects.exists() and not services.run_dir(run.pk).exists()


@pytest.mark.django_db
def test_a_redelivered_task_does_not_train_twice(q2_sync):
    _sample_pairs()
    run = services.training_run_start(enqueue=False)
    TrainingRun.objects.filter(pk=run.pk).update(status="failed")
    from training.tasks import run_training

    assert run_training(run.pk) == "skipped"


@pytest.mark.live  # a q2 cluster of its own, killed mid-run
@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_run_fails_the_run_keeps_the_previous_adapter_and_resumes(settings, tmp_path, tiny_model):
    train_pairs, dev_pairs = _sample_pairs()
    # A previous version, trained for real, that must survive the crash.
    first = services.training_run_start(hyperparameters=MEMORISE, enqueue=False)
    from training.tasks import run_training

    assert run_training(first.pk) == "v1"
    previous = AdapterVersion.objects.get(is_active=True)

    settings.CSP_HEARTBEAT_TIMEOUT = 3
    settings.CSP_CHECKPOINT_EVERY = 5
    # 12 pairs one at a time for 30 epochs: 360 steps, long enough to be killed mid-way.
    run = services.training_run_start(hyperparameters={"epochs": 30, "batch_size": 1}, enqueue=True)
    env = {
        **os.environ,
        **database_env(),  # this test's database, and SECRET_KEY: q2 signs tasks, the worker must share it
        "CSP_DATA_DIR": str(tmp_path),
        "CSP_BASE_MODEL": str(tiny_model),
        "CSP_HEARTBEAT_SECONDS": "1",
        "CSP_CHECKPOINT_EVERY": "5",
        "CSP_TRAINING_DEVICE": "cpu",
        "CSP_RAFT": "false",  # 360 steps on the pairs as they are
    }
    worker_log = tmp_path / "qcluster.log"
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=env, start_new_session=True,
        stdout=worker_log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            run.refresh_from_db()
            if run.status == TrainingRun.Status.RUNNING and run.step >= 12:
                break
            time.sleep(0.2)
        assert run.status == TrainingRun.Status.RUNNING and run.step >= 12, worker_log.read_text()[-3000:]
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    killed_at = TrainingRun.objects.get(pk=run.pk).step

    time.sleep(settings.CSP_HEARTBEAT_TIMEOUT + 1)
    assert services.training_runs_reconcile() == 1
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and "heartbeat" in run.error
    assert AdapterVersion.objects.get(is_active=True) == previous
    assert sorted(p.name for p in services.adapters_root().iterdir()) == ["v1"]  # nothing half-written
    model, tokenizer = load_adapter(tiny_model, previous.path)
    assert _reproduced(model, tokenizer, train_pairs) >= 0.9

    # Resume: the run continues from its last checkpoint, losing at most one interval.
    assert services.training_run_resume(run=run)
    assert run_training(run.pk) == "v2"
    run.refresh_from_db()
    resumed_from = int(run.log.split("resumed from the checkpoint at step ")[1].split()[0])
    assert killed_at - 5 <= resumed_from <= killed_at
    assert run.status == TrainingRun.Status.SUCCEEDED and run.step == run.total_steps == 360
    assert [p[0] for p in run.loss_history] == list(range(1, 361))


@pytest.mark.train
@pytest.mark.django_db
def test_a_raft_run_trains_grounded_prompts_calibrates_its_thresholds_and_reports_each_mode(
    q2_sync, django_capture_on_commit_callbacks, settings, tiny_model
):
    settings.CSP_RAFT = True
    settings.CSP_EVAL_MAX_PAIRS = 6
    settings.CSP_EVAL_MAX_NEW_TOKENS = 12
    # No calibration set for these pairs: the run calibrates on its dev split (training/tests/
    # test_grounding.py covers the calibration set's choice).
    settings.CSP_CALIBRATION_DATA = tiny_model / "no-calibration-set.json"
    train_pairs, dev_pairs = _sample_pairs()
    with django_capture_on_commit_callbacks(execute=True):
        run = services.training_run_start(hyperparameters={**MEMORISE, "epochs": 2, "max_length": 1024})
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert "RAFT: " in run.log and "thresholds calibrated: curated" in run.log

    version = AdapterVersion.objects.get()
    # 12 pairs, each asked its question and two more (rewrites: they have no alternates): 36
    # grounded examples, and 24 pick examples (CSP_RERANK: the two others only), 4 a step, 2 epochs
    assert run.total_steps == 30
    record = json.loads((Path(version.path) / "finetune_config.json").read_text())
    assert record["grounding"] == "references-v1" and record["k"] == settings.CSP_GROUNDING_K
    assert record["select"] == "candidates-v1"
    from llm.finetune.raft import read_grounding

    assert read_grounding(version.path).k == settings.CSP_GROUNDING_K

    # thresholds from the dev pairs (against the 12 training pairs only) and the out-of-scope set
    assert 0.0 <= version.fallback_threshold <= version.curated_threshold <= 1.0
    calibration = version.calibration
    assert calibration["dev_count"] == len(dev_pairs) and calibration["out_of_scope_count"] >= 30
    assert calibration["calibrated_on"] == "dev_split"
    # the pick bar, fitted on the same questions' picks (None: its picks decide nothing)
    assert "pick bar calibrated on" in run.log and "pick_min_prob" in calibration
    # the confidence bar, fitted on the questions between the thresholds (None: off)
    assert "confident_threshold" in calibration and calibration["confident_count"] >= calibration["confident_curated"]
    assert calibration["pick_count"] >= calibration["pick_right"] >= 0
    # the fallback threshold keeps >= 95% of dev above it (llm.calibration); the report says what it screens out
    assert calibration["dev_fallback_share"] <= 0.05 and 0.0 <= calibration["out_of_scope_fallback_share"] <= 1.0

    results = run.eval_results
    assert results["thresholds"] == {
        "curated": version.curated_threshold, "fallback": version.fallback_threshold, "confident": calibration["confident_threshold"],
    }
    assert set(results["modes"]) == {"curated", "grounded", "fallback"}
    assert sum(m["count"] for m in results["modes"].values()) == results["count"] == len(dev_pairs)
    assert results["out_of_scope"]["count"] == 6 and "invented_number_share" in results
    assert {"exact_match", "rouge_l_char", "key_fact_recall", "dev_loss"} <= set(results)

"""The admin button, the Q&A admin action and the REST API all start runs through one service."""

import pytest
from django.urls import reverse

from knowledge.models import QAPair
from training.models import TrainingRun

pytestmark = [pytest.mark.django_db, pytest.mark.services]


@pytest.fixture(autouse=True)
def _isolated(training_env):
    pass


@pytest.fixture
def approved(db):
    for n in range(8):
        QAPair.objects.create(instruction=f"用户问：问题{n}号是什么？", output=f"答案：{n}天。", status="approved", split="train")
    QAPair.objects.create(instruction="用户问：验证？", output="答案：9天。", status="approved", split="dev")


def test_qa_admin_action_leads_to_the_hyperparameter_form(staff_client, approved):
    pair = QAPair.objects.first()
    response = staff_client.post(reverse("admin:knowledge_qapair_changelist"), {"action": "train_adapter", "_selected_action": [pair.pk]})
    assert response.status_code == 302 and response["Location"] == reverse("admin:training_trainingrun_start")
    form = staff_client.get(response["Location"]).context["form"]
    assert form["lora_r"].initial == 8 and form["learning_rate"].initial == 5e-4 and form["epochs"].initial == 3


def test_start_form_queues_a_run_and_a_second_start_is_refused(staff_client, staff_user, approved, django_capture_on_commit_callbacks):
    data = {"start_training": "1", "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "learning_rate": 5e-4, "batch_size": 4,
            "grad_accum": 1, "epochs": 3, "max_length": 512, "target_modules": "all-linear"}
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = staff_client.post(reverse("admin:training_trainingrun_start"), data)
    run = TrainingRun.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("admin:training_trainingrun_change", args=[run.pk])
    assert run.created_by == staff_user and len(callbacks) == 1
    response = staff_client.post(reverse("admin:training_trainingrun_start"), data, follow=True)
    assert TrainingRun.objects.count() == 1
    from django.contrib import messages

    assert [m.level for m in response.context["messages"]][-1] == messages.ERROR


def test_api_starts_a_run_and_answers_409_to_a_second(staff_api, approved):
    response = staff_api.post("/api/v1/training-runs/", {"epochs": 2}, format="json")
    assert response.status_code == 201 and response.json()["hyperparameters"]["epochs"] == 2
    assert staff_api.post("/api/v1/training-runs/", {}, format="json").status_code == 409
    assert TrainingRun.objects.count() == 1


def test_api_refuses_bad_hyperparameters_by_field(staff_api, approved):
    response = staff_api.post("/api/v1/training-runs/", {"epochs": 0, "learning_rate": True}, format="json")
    assert response.status_code == 400 and {"epochs", "learning_rate"} <= set(response.json())


def test_api_reports_failed_checks(staff_api):
    response = staff_api.post("/api/v1/training-runs/", {}, format="json")
    assert response.status_code == 400 and response.json()["checks"]["errors"][0]["code"] == "no_train"


def test_customers_cannot_start_runs(customer_api, approved):
    assert customer_api.post("/api/v1/training-runs/", {}, format="json").status_code == 403
    assert not TrainingRun.objects.exists()


def test_api_cancel_of_a_queued_run(staff_api, approved):
    run_id = staff_api.post("/api/v1/training-runs/", {}, format="json").json()["id"]
    response = staff_api.post(f"/api/v1/training-runs/{run_id}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert staff_api.post(f"/api/v1/training-runs/{run_id}/cancel/").status_code == 409


def test_run_page_shows_progress_and_the_progress_endpoint_returns_fresh_html(staff_client, approved):
    from training import services

    run = services.training_run_start(enqueue=False)
    TrainingRun.objects.filter(pk=run.pk).update(status="running", step=5, total_steps=20, loss=1.5, loss_history=[[1, 3.0], [5, 1.5]])
    page = staff_client.get(reverse("admin:training_trainingrun_change", args=[run.pk]), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "<svg" in page and 'value="25.0"' in page and "Cancel run" in page
    data = staff_client.get(reverse("admin:training_trainingrun_progress", args=[run.pk]), HTTP_ACCEPT_LANGUAGE="en").json()
    assert data["active"] and "step 5 of 20" in data["html"]


def test_adapter_versions_api_lists_and_activates(staff_api, approved):
    from training import services
    from training.models import AdapterVersion

    run = services.training_run_start(enqueue=False)
    run.status = "succeeded"
    run.save()
    version = AdapterVersion.objects.create(name="v1", run=run, base_model=run.base_model, path="/x", metrics={})
    assert staff_api.get("/api/v1/adapter-versions/").json()["results"][0]["name"] == "v1"
    response = staff_api.post(f"/api/v1/adapter-versions/{version.pk}/activate/")
    assert response.status_code == 200 and response.json()["is_active"] is True

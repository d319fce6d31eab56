"""The adapter versions page (training's) says what serves the versions: chat supplies it."""

import time

import pytest
from django.core.cache import cache
from django.urls import reverse

from chat.inference.client import WORKERS_KEY

pytestmark = [pytest.mark.django_db, pytest.mark.services]


@pytest.fixture
def worker_mode(settings):
    settings.CSP_INFERENCE_BACKEND = "worker"
    yield
    cache.delete(WORKERS_KEY)


def test_in_worker_mode_the_versions_page_says_when_no_inference_worker_reported(staff_client, worker_mode):
    page = staff_client.get(reverse("admin:training_adapterversion_changelist"), HTTP_ACCEPT_LANGUAGE="en")
    assert 'id="no-inference-worker"' in page.content.decode()


def test_in_worker_mode_the_versions_page_lists_each_worker_and_the_version_it_serves(staff_client, worker_mode):
    metrics = {"backend": "llamacpp", "current_adapter": "v2", "running": 1, "waiting": 0, "requests_finished": 7}
    cache.set(WORKERS_KEY, {"host-a:41": {**metrics, "seen": time.time()}})
    html = staff_client.get(reverse("admin:training_adapterversion_changelist"), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Inference worker host-a:41 (llamacpp): version in use v2, 1 answering, 0 waiting, 7 answered." in html
    assert 'id="no-inference-worker"' not in html

"""Promoting a canary from the admin warns as the activate action does when the canary is worse
than the version it replaces on a dev-set metric."""

import pytest
from django.urls import reverse
from django.utils import timezone

from training import canary
from training.models import AdapterVersion
from training.tests.factories import make_adapter_version

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions(tmp_path):
    v1 = make_adapter_version(
        "v1", path=tmp_path / "v1", is_active=True, activated_at=timezone.now(), metrics={"eval": {"key_fact_recall": 0.9}}
    )
    return v1, make_adapter_version("v2", path=tmp_path / "v2", beside=v1, metrics={"eval": {"key_fact_recall": 0.5}})


def _promote(staff_client):
    response = staff_client.post(reverse("admin:training_adapterversion_canary_promote"), follow=True, HTTP_ACCEPT_LANGUAGE="en")
    return [(message.level_tag, message.message) for message in response.context["messages"]]


def test_a_worse_canary_is_promoted_with_the_metrics_it_is_worse_on(versions, staff_client):
    _v1, v2 = versions
    canary.canary_start(version=v2, percent=10)

    assert _promote(staff_client) == [("warning", "v2 is active, but it is worse than the previous version on: key_fact_recall.")]
    assert AdapterVersion.objects.get(is_active=True) == v2 and canary.current_canary() is None


def test_a_canary_as_good_is_promoted_without_a_warning(versions, staff_client):
    _v1, v2 = versions
    AdapterVersion.objects.filter(pk=v2.pk).update(metrics={"eval": {"key_fact_recall": 0.9}})
    canary.canary_start(version=v2, percent=10)

    assert _promote(staff_client) == [("success", "v2 is now active for every new conversation; the canary has ended.")]

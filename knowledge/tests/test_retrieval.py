"""The knowledge app's side of retrieval: the approved set's stamp, the embeddings cached in the
database, and the serving index every process rebuilds when an approval changes the stamp."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from django.utils import timezone

from knowledge import retrieval, services
from knowledge.models import Embedding, QAPair
from knowledge.tests.factories import make_pair
from tests.support.livetest import ROOT, database_env

pytestmark = [pytest.mark.django_db, pytest.mark.services]

APPROVED = QAPair.Status.APPROVED


def _approve(pair):
    services.qa_set_status(pairs=QAPair.objects.filter(pk=pair.pk), status=APPROVED, user=None)


@pytest.fixture
def shop():
    return [
        make_pair("用户问：如何退货？", "签收后7天内可无理由退货。", status=APPROVED, alternates=["东西不想要了能退吗"]),
        make_pair("用户问：发货需要多久？", "现货24小时内发货。", status=APPROVED, alternates=["几天能发货"]),
        make_pair("用户问：能开发票吗？", "可以开具电子发票。", status=APPROVED),
    ]


def test_the_stamp_changes_when_the_approved_set_or_an_approved_pairs_text_changes(shop):
    stamps = [retrieval.approved_stamp()]

    def changed():
        stamps.append(retrieval.approved_stamp())
        return stamps[-1] != stamps[-2]

    draft = make_pair("用户问：运费多少？", "满99元包邮。")
    assert not changed()  # a draft is not served
    draft.output = "满199元包邮。"
    draft.save()
    assert not changed()
    _approve(draft)
    assert changed()
    shop[0].alternates = [*shop[0].alternates, "怎么退货"]
    shop[0].save()
    assert changed()
    shop[1].output = "现货12小时内发货。"
    shop[1].save()
    assert changed()
    services.qa_set_status(pairs=QAPair.objects.filter(pk=draft.pk), status=QAPair.Status.ARCHIVED, user=None)
    assert changed()
    shop[2].delete()
    assert changed()
    assert len(set(stamps)) == len(stamps) - 2  # the two unchanged ones repeat their predecessor


def test_the_serving_index_holds_every_approved_pair_and_no_draft(fresh_process, shop):
    draft = make_pair("用户问：运费多少？", "满99元包邮。")
    index = retrieval.serving_index()
    assert len(index) == 3 and index.stamp == retrieval.approved_stamp()
    assert index.entry(shop[0].pk).alternates == ("东西不想要了能退吗",)
    with pytest.raises(KeyError):
        index.entry(draft.pk)
    assert retrieval.serving_index() is index  # nothing changed: the same index, not rebuilt


def test_an_approval_rebuilds_the_index_and_embeds_only_the_new_pair(fresh_process, shop):
    before = retrieval.serving_index()
    stored = Embedding.objects.count()
    assert stored == 8  # three questions, two alternates, three answers
    pair = make_pair("用户问：运费谁承担？", "质量问题由商家承担运费。", alternates=["退货运费谁出"])
    _approve(pair)
    after = retrieval.serving_index()
    assert after is not before and len(after) == 4
    assert Embedding.objects.count() - stored == 3  # its question, its alternate, its answer
    assert after.search("退货运费谁出", k=1)[0].pair_id == pair.pk


def test_a_new_process_builds_its_index_from_the_stored_embeddings(fresh_process, shop, monkeypatch):
    retrieval.serving_index()
    stored = set(Embedding.objects.values_list("key", flat=True))
    monkeypatch.setattr(retrieval, "_serving", None)
    monkeypatch.setattr(retrieval, "_serving_cache", None)
    index = retrieval.serving_index()
    assert len(index) == 3 and set(Embedding.objects.values_list("key", flat=True)) == stored


def test_index_for_holds_exactly_the_pairs_it_is_given(shop):
    index = retrieval.index_for(QAPair.objects.filter(pk__in=[shop[0].pk, shop[2].pk]))
    assert len(index) == 2
    assert {hit.pair_id for hit in index.search("东西不想要了能退吗", k=3)} <= {shop[0].pk, shop[2].pk}


def test_the_database_cache_gives_back_the_float32_vectors_it_was_given():
    cache = retrieval.DatabaseEmbeddingCache("test-model")
    vectors = {"a" * 64: np.array([0.25, -1.5, 3.0], dtype=np.float32), "b" * 64: np.zeros(3, dtype=np.float32)}
    cache.set_many(vectors)
    cache.set_many({"a" * 64: vectors["a" * 64]})  # a second process storing the same text again
    found = cache.get_many(["a" * 64, "b" * 64, "c" * 64])
    assert set(found) == {"a" * 64, "b" * 64}
    assert found["a" * 64].dtype == np.float32 and found["a" * 64].tolist() == [0.25, -1.5, 3.0]
    assert Embedding.objects.get(key="a" * 64).model == "test-model"


# The second process: a plain Django script on the same database. It builds its serving index,
# says what it holds, then waits for the first process to approve a pair and name it, and polls
# its serving index until that pair is in it (a stamp query dearer than CHEAP_CHECK_SECONDS, as
# on a busy machine, runs at most once per RECHECK_SECONDS).
SECOND_PROCESS = """
import json, os, sys, time
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "csplatform.settings")
django.setup()
from knowledge.retrieval import serving_index

index = serving_index()
print(json.dumps({"stamp": index.stamp, "size": len(index)}), flush=True)
pair_id = int(sys.stdin.readline())
deadline = time.monotonic() + 60
while len(index) == 3 and time.monotonic() < deadline:
    time.sleep(0.05)
    index = serving_index()
top = index.search("退货运费谁出", k=1)
print(json.dumps({"stamp": index.stamp, "size": len(index), "question": index.entry(pair_id).question,
                  "top": top[0].pair_id if top else None}), flush=True)
"""


@pytest.mark.django_db(transaction=True)
def test_the_index_is_rebuilt_after_an_approval_and_seen_by_a_second_process(shop):
    second = subprocess.Popen(
        [sys.executable, "-c", SECOND_PROCESS],
        cwd=ROOT, env={**os.environ, **database_env(), "OMP_NUM_THREADS": "1"},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(300, second.kill)  # a hung second process fails the test, not the run
    watchdog.start()
    try:
        built = second.stdout.readline()
        assert built, second.stderr.read()
        assert json.loads(built) == {"stamp": retrieval.approved_stamp(), "size": 3}

        pair = make_pair("用户问：运费谁承担？", "质量问题由商家承担运费。", alternates=["退货运费谁出"])
        _approve(pair)
        second.stdin.write(f"{pair.pk}\n")
        second.stdin.flush()
        rebuilt = second.stdout.readline()
        assert rebuilt, second.stderr.read()
        assert json.loads(rebuilt) == {
            "stamp": retrieval.approved_stamp(), "size": 4, "question": "用户问：运费谁承担？", "top": pair.pk,
        }
        assert second.wait(60) == 0
    finally:
        watchdog.cancel()
        if second.poll() is None:
            second.kill()
        second.communicate()


def test_a_dear_stamp_is_checked_at_most_once_a_while_but_at_once_after_a_save_here(fresh_process, shop, monkeypatch):
    monkeypatch.setattr(retrieval, "CHEAP_CHECK_SECONDS", -1.0)  # every check counts as dear
    monkeypatch.setattr(retrieval, "RECHECK_SECONDS", 3600.0)
    elsewhere = make_pair("用户问：运费多少？", "满99元包邮。")
    index = retrieval.serving_index()
    # as another process would approve it: no save() in this process, so no signal here
    QAPair.objects.filter(pk=elsewhere.pk).update(status=APPROVED, updated_at=timezone.now())
    assert retrieval.serving_index() is index  # not checked again yet
    _approve(make_pair("用户问：能用花呗吗？", "可以使用花呗分期。"))  # saved here: the next use checks
    assert len(retrieval.serving_index()) == 5

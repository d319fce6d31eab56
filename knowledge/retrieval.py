"""The approved pairs as the retriever sees them (llm.retrieval), and the one index every process
serves from.

Serving indexes every approved pair; evaluation builds its own index over the pairs it may see
(`index_for`, e.g. the training pairs only, so a dev pair never retrieves itself).

Every process (web, workers, several daphnes) keeps its own index in memory and asks the
database before each use whether the approved set changed (`approved_stamp`, one aggregate
query): a pair approved in one process is retrieved by every other one from its next question.
A rebuild is cheap because embeddings are cached by content in the database (`Embedding`): it
embeds only texts no process has embedded before, i.e. the pair that was approved or edited.
"""

import hashlib
import threading

import numpy as np
from django.db.models import Count, Max, Sum

from knowledge.models import Embedding, QAPair
from llm.prompting import question_text
from llm.retrieval import Entry, Index, default_embedder

_BATCH = 500  # keys per query: SQLite caps the parameters of one statement


def entries(pairs):
    """The index entries of these pairs (a queryset or an iterable of QAPair)."""
    return [
        Entry(
            pair_id=pair.pk,
            question=question_text(pair.instruction, pair.input),
            answer=pair.output,
            alternates=tuple(pair.alternates),
        )
        for pair in pairs
    ]


def approved_stamp():
    """What the approved set is now, the same string in every process.

    The count and the sum of the ids change when a pair is approved, un-approved or deleted;
    the latest `updated_at` changes when an approved pair is saved (its question, alternates or
    answer edited, or just approved: every save goes through `save()`, which stamps it). Edits
    made with `QuerySet.update()` past `updated_at`, or from a machine whose clock runs behind
    the latest stamp, go unseen until the next change: keep the servers' clocks in sync (NTP).
    """
    summary = QAPair.objects.filter(status=QAPair.Status.APPROVED).aggregate(
        count=Count("id"), ids=Sum("id"), last=Max("updated_at")
    )
    last = summary["last"].isoformat() if summary["last"] else "-"
    return f"{summary['count']}:{summary['ids'] or 0}:{last}"


class DatabaseEmbeddingCache:
    """llm.retrieval's EmbeddingCache on the `Embedding` table, shared by every process.

    Vectors are stored as little-endian float32 bytes. Two processes that embed the same new text
    at once both insert it; the second insert is ignored (the vectors are the same).
    """

    def __init__(self, model=""):
        self.model = model  # the embedder's name, kept with each vector for housekeeping

    def get_many(self, keys):
        keys = list(keys)
        found = {}
        for start in range(0, len(keys), _BATCH):
            rows = Embedding.objects.filter(key__in=keys[start : start + _BATCH]).values_list("key", "vector")
            for key, vector in rows:
                found[key] = np.frombuffer(bytes(vector), dtype="<f4").copy()
        return found

    def set_many(self, vectors):
        Embedding.objects.bulk_create(
            [
                Embedding(key=key, model=self.model, vector=np.asarray(vector, dtype="<f4").tobytes())
                for key, vector in vectors.items()
            ],
            batch_size=_BATCH,
            ignore_conflicts=True,
        )


def index_for(pairs, *, stamp=None):
    """An index over exactly these pairs (not cached): evaluation's training-pairs-only index."""
    pairs = list(pairs)
    if stamp is None:
        versions = ",".join(f"{pair.pk}@{pair.updated_at.isoformat() if pair.updated_at else ''}" for pair in pairs)
        stamp = "pairs:" + hashlib.sha256(versions.encode()).hexdigest()[:16]
    embedder = default_embedder()
    return Index(entries(pairs), embedder=embedder, cache=DatabaseEmbeddingCache(embedder.name), stamp=stamp)


_serving = None
_rebuilding = threading.Lock()


def serving_index():
    """The index of every approved pair, as the database has them now.

    Rebuilt in this process when the approved set changed since it was built. One thread
    rebuilds; meanwhile the others keep answering from the index they had (only the very first
    build makes them wait), so an approval never stalls the chats in flight.
    """
    global _serving
    stamp = approved_stamp()  # before the pairs are read: a change in between only rebuilds again
    current = _serving
    if current is not None and current.stamp == stamp:
        return current
    if not _rebuilding.acquire(blocking=current is None):
        return current
    try:
        if _serving is None or _serving.stamp != stamp:
            approved = QAPair.objects.filter(status=QAPair.Status.APPROVED).order_by("id")
            _serving = index_for(approved, stamp=stamp)
        return _serving
    finally:
        _rebuilding.release()

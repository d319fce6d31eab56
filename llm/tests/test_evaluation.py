import pytest

from llm.evaluation import METRIC_HELP, evaluate, key_facts

REFUND = "您好！退款将在1-3个工作日内原路退回。"
RETURN = "您好！支持7天无理由退货，运费99元。"


def test_identical_answers_score_one_everywhere():
    scores = evaluate([REFUND, RETURN], [REFUND, RETURN])
    assert scores["count"] == 2
    assert scores["exact_match"] == 1.0
    assert scores["rouge_l_char"] == pytest.approx(1.0)
    assert scores["rouge_l_word"] == pytest.approx(1.0)
    assert scores["bleu4"] == pytest.approx(1.0)
    assert scores["key_fact_recall"] == 1.0 and scores["key_facts"] == 3


def test_one_exact_answer_of_two_is_half_exact_match_and_missing_facts_are_named():
    scores = evaluate([REFUND, "您好！支持7天无理由退货。"], [REFUND, RETURN])
    assert scores["exact_match"] == 0.5
    assert scores["key_fact_recall"] == pytest.approx(2 / 3)
    assert scores["examples"][0]["missing_facts"] == []
    assert scores["examples"][1]["key_facts"] == ["7天", "99元"]
    assert scores["examples"][1]["missing_facts"] == ["99元"]
    assert 0.5 < scores["rouge_l_char"] < 1.0


def test_rouge_l_char_is_the_lcs_f1_of_characters():
    # LCS of "退款三天到账" and "退款七天到账" is 5 of 6 characters on both sides: F1 = 5/6.
    scores = evaluate(["退款三天到账"], ["退款七天到账"])
    assert scores["rouge_l_char"] == pytest.approx(5 / 6, abs=1e-6)
    assert scores["exact_match"] == 0.0


def test_rouge_l_word_counts_jieba_words_not_characters():
    # jieba: 退款/已经/到/账 against 退款/没有/到/账 share 3 of 4 words, but only 4 of 6 characters.
    scores = evaluate(["退款已经到账"], ["退款没有到账"])
    assert scores["rouge_l_word"] == pytest.approx(3 / 4, abs=1e-6)
    assert scores["rouge_l_char"] == pytest.approx(4 / 6, abs=1e-6)


def test_wrong_number_is_a_missing_fact_even_when_the_text_is_close():
    scores = evaluate(["退款将在1-5个工作日内原路退回。"], [REFUND])
    assert scores["key_fact_recall"] == 0.0
    assert scores["examples"][0]["missing_facts"] == ["1-3"]
    assert scores["rouge_l_char"] > 0.8


def test_empty_prediction_scores_zero_without_crashing():
    scores = evaluate([""], [RETURN])
    assert scores["exact_match"] == 0.0 and scores["rouge_l_char"] == 0.0 and scores["rouge_l_word"] == 0.0
    assert scores["bleu4"] == 0.0 and scores["key_fact_recall"] == 0.0


def test_key_facts_are_days_amounts_ranges_and_phone_numbers_not_list_numbers():
    text = "1. 拨打热线400-820-1234\n2、满９９元包邮，48小时内发货，1～3天送达，退款1-3个工作日，补贴2.5元"
    assert key_facts(text) == ["400-820-1234", "99元", "48小时", "1-3天", "1-3", "2.5元"]


def test_no_numbers_in_the_references_means_recall_is_not_measured():
    scores = evaluate(["您好！可以的。"], ["您好！可以。"])
    assert scores["key_fact_recall"] is None and scores["key_facts"] == 0


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        evaluate(["a"], ["a", "b"])


def test_every_metric_has_one_sentence_of_help():
    scores = evaluate([REFUND], [REFUND])
    for name, text in METRIC_HELP.items():
        assert name in scores
        assert text.endswith(".") and text.count(". ") == 0

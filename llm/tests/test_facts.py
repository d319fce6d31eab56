"""The fact guard (llm.facts): which spans are facts, when a source supports them, and how the
streaming guard holds a fact back until it is checked.

The answer pipeline's side (an answer replaced after a violation) is tested with the chat app.
"""

import json
import random
from pathlib import Path

import pytest

from llm.facts import AMOUNT, DATE, DURATION, EMAIL, NUMBER, PHONE, URL, FactGuard, extract_facts, unsupported

DATA = Path(__file__).resolve().parents[2] / "data"
RETURNS = "您好！星河商城支持7天无理由退货，自签收次日起7天内均可申请。退款审核通过后1-3个工作日内原路退回，运费险最高赔付12元。"


def _keys(text):
    return [(fact.kind, fact.key) for fact in extract_facts(text)]


def _stream(guard, pieces):
    """Feed pieces one by one: (what each feed released, what finish released)."""
    released = [guard.feed(piece) for piece in pieces]
    return released, guard.finish()


def _sample_answers():
    return [record["output"] for record in json.loads((DATA / "train.json").read_text(encoding="utf-8"))]


@pytest.mark.parametrize(
    "written, same_as",
    [
        ("七天", "7天"),
        ("７天", "7天"),
        ("十五天", "15天"),
        ("两个工作日", "2个工作日"),
        ("一百元", "100元"),
        ("三到五天", "3-5天"),
        ("百分之二十", "20%"),
        ("半小时", "0.5小时"),
        ("一个半小时", "1.5小时"),
        ("99.00元", "99元"),
        ("¥99", "99元"),
        ("￥９９", "99块"),
        ("RMB99", "99元"),
        ("1,000元", "1000元"),
        ("2万元", "20000元"),
        ("in 7 days", "7天"),
        ("2026年12月7日", "2026-12-07"),
        ("二〇二六年十二月七日", "2026/12/07"),
        ("12月7号", "12/7"),
        ("400 820 1234", "400-820-1234"),
        ("+86 138-0013-8000", "13800138000"),
        ("https://WWW.XingHe.com/help/", "xinghe.com/help"),
        ("Service@XingHe.com", "service@xinghe.com"),
    ],
)
def test_spellings_of_the_same_fact_share_a_key(written, same_as):
    assert _keys(written) == _keys(same_as) != []


def test_each_kind_is_recognised_in_a_sentence():
    text = "请在7天内寄回，运费8元，截止2026年12月7日18:00，电话400-820-1234，网址www.xinghe.com，邮箱kefu@xinghe.com，共3件。"
    assert [fact.kind for fact in extract_facts(text)] == [DURATION, AMOUNT, DATE, DATE, PHONE, URL, EMAIL, NUMBER]
    assert [fact.text for fact in extract_facts(text)] == [
        "7天", "8元", "2026年12月7日", "18:00", "400-820-1234", "www.xinghe.com", "kefu@xinghe.com", "3",
    ]  # fmt: skip


def test_fact_positions_are_positions_in_the_text():
    text = "您好，退款在１-３个工作日内到账，最高赔付十二元。"
    for fact in extract_facts(text):
        assert text[fact.start : fact.end] == fact.text
    assert [fact.key for fact in extract_facts(text)] == ["1 workday", "3 workday", "12 CNY"]


@pytest.mark.parametrize(
    "text",
    ["一般", "统一", "十分满意", "千万不要", "万一", "一次性付款", "不影响二次销售", "一个订单", "第一时间", "两三天", "一半运费", "半价", "零钱"],
)
def test_words_with_numeral_characters_are_not_facts(text):
    assert extract_facts(text) == []


def test_chinese_numerals_before_a_counter_are_facts_but_a_lone_one_is_an_article():
    assert _keys("可分三期免息，最多修改两次") == [(NUMBER, "3"), (NUMBER, "2")]
    assert _keys("一个订单只能修改一次") == []


def test_list_markers_step_and_reference_numbers_are_not_facts():
    text = "流程如下：1. 进入订单\n2．点击售后\n3、选择原因\n4) 提交\n（5）等待审核\n第6步：寄回\n步骤7：填写单号\n详见[8]。"
    assert extract_facts(text) == []


def test_a_number_at_the_start_of_a_line_that_is_no_marker_is_a_fact():
    assert _keys("1.5倍积分\n12元运费\n3天送达") == [(NUMBER, "1.5"), (AMOUNT, "12 CNY"), (DURATION, "3 day")]
    # after a word, "8." ends a sentence; after the sentence, "2." numbers a step
    assert _keys("The fee is 8. 2. Open the app") == [(NUMBER, "8")]


def test_the_first_sample_answer_states_seven_days_twice_and_no_step_numbers():
    facts = extract_facts(_sample_answers()[0])
    assert [(fact.text, fact.key) for fact in facts] == [("7天", "7 day"), ("7天", "7 day")]


def test_a_duration_is_not_supported_by_the_same_number_as_an_amount():
    assert [fact.text for fact in unsupported("7天内可退货", ["退货运费7元"])] == ["7天"]
    assert [fact.text for fact in unsupported("2个工作日", ["2天"])] == ["2个工作日"]


def test_a_bare_number_and_a_number_with_a_unit_support_each_other():
    assert unsupported("可分7期", ["7天内"]) == []  # a bare number: the same value with any unit
    assert unsupported("7天内", ["订单号末尾是7"]) == []  # a unit on one side only


def test_a_date_without_its_year_is_supported_by_the_full_date_but_not_the_other_way():
    assert unsupported("12月31日前", ["积分将在2025年12月31日过期"]) == []
    assert [fact.text for fact in unsupported("2026年12月31日", ["12月31日前"])] == ["2026年12月31日"]


def test_phones_urls_and_emails_compare_normalised():
    sources = ["客服热线400-820-1234，官网 https://www.xinghe.com/help ，邮箱 Service@XingHe.com"]
    assert unsupported("请拨打4008201234或访问XINGHE.com/help，或写信给service@xinghe.com", sources) == []
    assert [fact.key for fact in unsupported("请拨打400-820-1235，或访问xinghe.cn", sources)] == ["4008201235", "xinghe.cn"]


def test_an_unsupported_number_is_caught_while_streaming_before_it_is_released():
    guard = FactGuard([RETURNS])
    answer = "您好！收到商品后30天内可申请退货。"
    released = []
    for char in answer:
        released.append(guard.feed(char))
        if guard.violation:
            break
    assert guard.violation.text == "30天" and guard.violation.key == "30 day"
    assert "".join(released) == "您好！收到商品后"
    assert "3" not in "".join(released)
    assert guard.feed("请放心") == "" and guard.finish() == ""


def test_a_supported_answer_streams_through_unchanged():
    answer = "您好！签收后七天内可以无理由退货，退款1-3个工作日到账，运费险最多赔12元。"
    released, tail = _stream(FactGuard([RETURNS]), [answer[i : i + 3] for i in range(0, len(answer), 3)])
    assert "".join(released) + tail == answer


def test_a_fact_is_held_until_the_character_after_it_arrives():
    guard = FactGuard(["运费12元"])
    assert guard.feed("运费") == "运费"
    assert guard.feed("1") == ""
    assert guard.feed("2") == ""
    assert guard.feed("元") == ""  # "元" could still be followed by more of the fact
    assert guard.feed("，谢谢") == "12元，谢谢"
    assert guard.finish() == "" and guard.violation is None


def test_finish_checks_the_held_tail():
    supported = FactGuard(["运费12元"])
    assert supported.feed("运费为12元") == "运费为" and supported.finish() == "12元"
    invented = FactGuard(["运费12元"])
    assert invented.feed("运费为15元") == "运费为" and invented.finish() == ""
    assert invented.violation.key == "15 CNY"


def test_a_url_or_email_is_held_until_it_ends():
    guard = FactGuard(["官网 www.xinghe.com"])
    assert guard.feed("请访问 www.xing") == "请访问 "
    assert guard.feed("he.cn 查看") == ""
    assert guard.violation.key == "xinghe.cn"
    guard = FactGuard(["邮箱 kefu@xinghe.com"])
    assert guard.feed("请写信给 kefu") == "请写信给 "  # may be an e-mail's local part
    assert guard.feed("@xinghe.com，") == "kefu@xinghe.com，"
    assert guard.feed("或 vip") == "或 " and guard.feed("@xinghe.com。") == "" and guard.violation.text == "vip@xinghe.com"


def test_chinese_numerals_and_digits_support_each_other_while_streaming():
    released, tail = _stream(FactGuard(["7天无理由退货，十五天内可换货"]), list("七天内退货，15天内换货"))
    assert "".join(released) + tail == "七天内退货，15天内换货"
    guard = FactGuard(["7天无理由退货"])
    _stream(guard, list("三十天内退货"))
    assert guard.violation.key == "30 day"


def test_an_answer_that_renumbers_the_steps_passes():
    source = "退货流程如下：\n1. 进入“我的订单”找到该商品\n2. 点击“申请售后”"
    answer = "您可以这样操作：\n1. 打开App\n2. 进入“我的订单”找到该商品\n3. 点击“申请售后”\n4. 等待审核"
    released, tail = _stream(FactGuard([source]), list(answer))
    assert "".join(released) + tail == answer


def test_numbers_from_the_customer_messages_count_as_sources():
    customer = "我3月5日买的两件衣服，订单号20261207001，能退吗？"
    answer = "您好！您3月5日购买的2件商品（订单20261207001）可在7天内申请退货。"
    guard = FactGuard([RETURNS, customer])
    released, tail = _stream(guard, list(answer))
    assert guard.violation is None and "".join(released) + tail == answer
    without_customer = FactGuard([RETURNS])
    _stream(without_customer, list(answer))
    assert without_customer.violation.text == "3月5日"


def test_a_number_that_never_ends_is_held_and_checked_at_finish():
    guard = FactGuard([RETURNS])
    released, tail = _stream(guard, ["运费", *["1"] * 5000])
    assert released[0] == "运费" and set(released[1:]) == {""}
    assert tail == "" and guard.violation.kind == NUMBER


def test_every_split_of_every_sample_answer_streams_back_unchanged():
    """Property: checked against its own text, a sample answer is released unchanged and without
    a violation however the stream cuts it: one character at a time, at every single cut, and in
    random pieces of 1 to 8 characters."""
    rng = random.Random(13)
    for answer in _sample_answers():
        splits = [list(answer)]
        splits += [[answer[:cut], answer[cut:]] for cut in range(len(answer) + 1)]
        for _ in range(20):
            pieces, rest = [], answer
            while rest:
                size = rng.randint(1, 8)
                pieces.append(rest[:size])
                rest = rest[size:]
            splits.append(pieces)
        for pieces in splits:
            guard = FactGuard([answer])
            released, tail = _stream(guard, pieces)
            assert guard.violation is None, (answer, pieces, guard.violation)
            assert "".join(released) + tail == answer


def test_the_guard_stops_at_the_first_fact_extract_facts_finds_however_the_stream_is_cut():
    """The stream and the whole text are read alike: with no sources, a sample answer's first
    fact (kind, key and position) is the violation, and nothing from it on was released."""
    rng = random.Random(7)
    for answer in _sample_answers():
        facts = extract_facts(answer)
        if not facts:
            continue
        pieces, rest = [], answer
        while rest:
            size = rng.randint(1, 6)
            pieces.append(rest[:size])
            rest = rest[size:]
        guard = FactGuard([])
        released, tail = _stream(guard, pieces)
        assert guard.violation == facts[0]
        assert answer[: facts[0].start].startswith("".join(released) + tail)  # none of it was shown

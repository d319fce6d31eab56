import hashlib

from training.datachecks import check_dataset


def _r(i, question, output="答案：7天内处理。", tokens=None):
    return {"id": i, "question": question, "instruction": question, "output": output, "tokens": tokens}


def _codes(findings):
    return [f.code for f in findings]


def _many(n):
    # Distinct questions: hex digests share little text with each other.
    return [_r(1000 + i, hashlib.sha256(str(i).encode()).hexdigest()[:16], f"答案{i}：{i}天。") for i in range(n)]


def test_clean_dataset_has_no_findings():
    report = check_dataset(_many(100), [_r(1, "完全不同的验证问题")], max_length=512, epochs=3, batch_size=4)
    assert report.ok and report.warnings == []


def test_same_question_with_different_answers_is_an_error():
    report = check_dataset(_many(100) + [_r(1, "如何退货", "7天"), _r(2, "如何退货", "30天")], [], max_length=512, epochs=3, batch_size=4)
    assert _codes(report.errors) == ["conflict"] and report.errors[0].pair_ids == [1, 2]


def test_same_question_with_the_same_answer_is_not_a_conflict():
    report = check_dataset(_many(100) + [_r(1, "如何退货", "7天"), _r(2, "如何退货", "7天")], [_r(3, "别的")], max_length=512, epochs=3, batch_size=4)
    assert report.ok


def test_near_duplicate_questions_with_different_answers_warn():
    train = _many(100) + [_r(1, "会员积分可以抵扣多少钱呢", "100积分抵1元"), _r(2, "会员积分可以抵扣多少钱", "50积分抵1元")]
    report = check_dataset(train, [_r(3, "别的")], max_length=512, epochs=3, batch_size=4)
    assert report.ok and "near_conflict" in _codes(report.warnings)


def test_dev_question_copied_from_train_is_an_error():
    report = check_dataset(_many(100) + [_r(1, "如何退货")], [_r(2, "如何退货")], max_length=512, epochs=3, batch_size=4)
    assert "dev_leak" in _codes(report.errors)


def test_long_pairs_and_tiny_answers_warn():
    train = _many(100) + [_r(1, "很长的问题", tokens=900), _r(2, "短答案的问题", "好")]
    report = check_dataset(train, [_r(3, "别的")], max_length=512, epochs=3, batch_size=4)
    assert report.ok and {"too_long", "tiny_answer"} <= set(_codes(report.warnings))


def test_too_few_steps_warns_with_the_arithmetic():
    report = check_dataset(_many(20), [_r(1, "别的")], max_length=512, epochs=3, batch_size=4)
    assert report.ok
    message = next(f.message for f in report.warnings if f.code == "few_steps")
    assert message.startswith("20 pairs × 3 epochs = 15 steps")


def test_no_training_pairs_is_an_error():
    assert _codes(check_dataset([], [], max_length=512, epochs=3, batch_size=4).errors) == ["no_train"]

import pytest
from django.core.exceptions import ValidationError

from knowledge.models import INSTRUCTION_MAX_LENGTH, QAPair, normalise_question, question_hash

pytestmark = pytest.mark.services


def test_normalised_question_ignores_punctuation_width_case_and_prefix():
    assert normalise_question("用户问：如何退货？") == normalise_question("如何 退货")
    assert normalise_question("ＶＩＰ会员有什么权益?") == normalise_question("vip会员有什么权益")
    assert question_hash("如何退货？") != question_hash("如何换货？")


def test_input_is_part_of_the_question():
    assert question_hash("订单查询", "订单号 123") != question_hash("订单查询", "订单号 456")


@pytest.mark.django_db
def test_save_strips_text_and_sets_hash():
    pair = QAPair.objects.create(instruction="  如何退货？ ", output=" 7天无理由退货。 ")
    assert pair.instruction == "如何退货？"
    assert pair.output == "7天无理由退货。"
    assert pair.question_hash == question_hash("如何退货")


@pytest.mark.django_db
def test_blank_question_and_answer_are_refused_with_field_messages():
    with pytest.raises(ValidationError) as caught:
        QAPair(instruction="  ", output="").full_clean()
    assert set(caught.value.message_dict) >= {"instruction", "output"}


@pytest.mark.django_db
def test_question_of_only_punctuation_is_refused():
    with pytest.raises(ValidationError) as caught:
        QAPair(instruction="？？？", output="答案").full_clean()
    assert "instruction" in caught.value.message_dict


@pytest.mark.django_db
def test_over_long_question_is_refused():
    with pytest.raises(ValidationError) as caught:
        QAPair(instruction="问" * (INSTRUCTION_MAX_LENGTH + 1), output="答").full_clean()
    assert "instruction" in caught.value.message_dict


@pytest.mark.django_db
def test_same_question_is_not_stored_twice():
    first = QAPair.objects.create(instruction="用户问：如何退货？", output="A")
    with pytest.raises(ValidationError) as caught:
        QAPair(instruction="如何退货", output="B").full_clean()
    assert f"#{first.pk}" in caught.value.message_dict["instruction"][0]


@pytest.mark.django_db
def test_editing_a_pair_does_not_clash_with_itself():
    pair = QAPair.objects.create(instruction="如何退货？", output="A")
    pair.output = "B"
    pair.full_clean()


@pytest.mark.django_db
def test_training_text_ends_the_answer_with_end_of_turn():
    pair = QAPair.objects.create(instruction="如何退货？", output="7天无理由退货。")
    assert pair.training_text() == (
        "<start_of_turn>user\n如何退货？<end_of_turn>\n<start_of_turn>model\n7天无理由退货。<end_of_turn>\n"
    )

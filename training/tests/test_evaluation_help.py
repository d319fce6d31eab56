"""The admin's explanations of the evaluation metrics: llm's English, in the request's language."""

from django.utils import translation

from llm.evaluation import INVENTED_HELP, METRIC_HELP as LLM_METRIC_HELP
from training.evaluation_help import METRIC_HELP


def test_the_admin_explains_every_metric_as_llm_does_in_english():
    with translation.override("en"):
        assert {name: str(text) for name, text in METRIC_HELP.items()} == {**LLM_METRIC_HELP, "invented_number_share": INVENTED_HELP}


def test_the_explanations_are_translated_to_chinese():
    with translation.override("zh-hans"):
        chinese = {name: str(text) for name, text in METRIC_HELP.items()}
    assert all(text != (LLM_METRIC_HELP | {"invented_number_share": INVENTED_HELP})[name] for name, text in chinese.items())
    assert chinese["exact_match"].startswith("与参考答案完全相同")

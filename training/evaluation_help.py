"""What each evaluation metric and answer mode is called and means, as the admin shows it: in the
request's language (the stored evaluations and the JSON keep the codes).

llm.evaluation.METRIC_HELP and INVENTED_HELP say the same in English for llm's own users; llm
does not import Django, so the translatable texts live here (training/tests/test_evaluation_help.py
keeps the English of both the same).
"""

from django.utils.translation import gettext_lazy as _

from llm.grounding import CURATED, FALLBACK, GROUNDED

MODE_LABELS = {CURATED: _("curated (verbatim)"), GROUNDED: _("grounded (generated)"), FALLBACK: _("fallback")}

# Short names, where a table names the metric and METRIC_HELP explains it.
METRIC_LABELS = {
    "key_fact_recall": _("key-fact recall"),
    "rouge_l_char": _("ROUGE-L on characters"),
    "rouge_l_word": _("ROUGE-L on words"),
    "exact_match": _("exact match"),
    "bleu4": "BLEU-4",
    "invented_number_share": _("answers with an invented number"),
    "dev_loss": _("dev loss"),
}

METRIC_HELP = {
    "exact_match": _(
        "Share of answers identical to the reference (after trimming spaces); 1.0 means every answer was "
        "reproduced word for word."
    ),
    "rouge_l_char": _(
        "ROUGE-L F1 on characters: how much of the reference appears, in order, in the answer (0-1), "
        "forgiving different word choice."
    ),
    "rouge_l_word": _(
        "ROUGE-L F1 on words cut by jieba: like the character score but counts whole words, so it is stricter"
        " about wording (0-1)."
    ),
    "bleu4": _(
        "BLEU-4 over all answers (sacrebleu, Chinese tokenisation), scaled 0-1: how many 1- to 4-character "
        "runs of the reference the answers share, penalising short answers."
    ),
    "key_fact_recall": _(
        "Share of the numbers in the references (days, amounts, ranges like 1-3, phone numbers) that the "
        "answers state exactly; wrong numbers are the costliest mistakes."
    ),
    "invented_number_share": _(
        "Share of answers that state a number found neither in the reference answer nor in the retrieved "
        "pairs' answers (nor the question): an invented number."
    ),
}

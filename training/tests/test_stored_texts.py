"""Texts the worker saves in the server's language (zh-hans) read in the language of the page or
API request that shows them (csplatform.stored_text); rows saved before read as they were."""

import errno
import html
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone, translation

from csplatform.stored_text import StoredText, shown, stored
from knowledge.models import QAPair
from training import retraining, services, tasks
from training.models import RetrainingPolicy, TrainingRun
from training.tests.factories import make_adapter_version, make_run

pytestmark = pytest.mark.django_db

DISK_FULL = {"en": "The disk is full: no space left where the run writes", "zh-hans": "磁盘已满"}


def _page(client, url, language):
    return html.unescape(client.get(url, HTTP_ACCEPT_LANGUAGE=language).content.decode())


def _in_the_workers_language(work):
    # A q2 worker or a management command: no request, the server's default language.
    with translation.override("zh-hans"):
        return work()


def _disk_full_run():
    run = make_run(status=TrainingRun.Status.RUNNING)

    def fail():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            tasks._finish(run, TrainingRun.Status.FAILED, tasks.failure_reason(exc))

    _in_the_workers_language(fail)
    return run


def test_a_stored_text_is_rendered_in_every_language_and_shown_in_the_active_one():
    text = stored(lambda: translation.gettext("Retraining is off."))
    assert text.texts == {"en": "Retraining is off.", "zh-hans": "重训已关闭。"}
    assert text == "Retraining is off."  # a str in the language active when it was made
    with translation.override("zh-hans"):
        assert shown(text) == "重训已关闭。"
    with translation.override("en-us"):
        assert shown(text) == "Retraining is off."
    assert shown(text, "zh-hans") == "重训已关闭。"


def test_a_plain_string_is_shown_as_it_is():
    assert shown("保存前的旧决定") == "保存前的旧决定"
    assert shown('{"not": "a text by language"}') == '{"not": "a text by language"}'
    assert shown("") == "" and shown(None) == ""


def test_a_stored_text_pickles_and_copies_with_its_languages():
    import copy
    import pickle

    text = StoredText("Retraining is off.", {"en": "Retraining is off.", "zh-hans": "重训已关闭。"})
    for twin in (pickle.loads(pickle.dumps(text)), copy.deepcopy(text)):
        assert twin == text and twin.texts == text.texts


@pytest.mark.parametrize(("language", "words"), [("en", "Retraining is off."), ("zh-hans", "重训已关闭。")])
def test_the_policys_last_decision_reads_in_the_pages_language(staff_client, language, words):
    _in_the_workers_language(retraining.retraining_check)
    page = _page(staff_client, reverse("admin:training_retrainingpolicy_change", args=[RetrainingPolicy.load().pk]), language)
    assert words in page


def test_saving_the_policy_again_keeps_its_decision_in_every_language():
    _in_the_workers_language(retraining.retraining_check)
    policy = RetrainingPolicy.load()  # loaded in English (outside a request)
    policy.min_new_pairs = 7
    policy.save()
    with translation.override("zh-hans"):
        assert RetrainingPolicy.load().last_decision == "重训已关闭。"
    assert RetrainingPolicy.load().last_decision == "Retraining is off."


@pytest.mark.parametrize(("language", "words"), [("en", "Kept v1: v2 is worse on ROUGE-L (char)"), ("zh-hans", "保留 v1：v2 在 ROUGE-L (char) 上更差")])
def test_a_scheduled_runs_activation_decision_reads_in_the_pages_language(staff_client, tmp_path, language, words):
    v1 = make_adapter_version("v1", path=tmp_path / "v1", is_active=True)
    v2 = make_adapter_version("v2", path=tmp_path / "v2", beside=v1)
    _in_the_workers_language(
        lambda: retraining.scheduled_activation(v2.run, v2, {"rouge_l_char": 0.5}, lambda active: {"rouge_l_char": 0.6})
    )
    run_page = _page(staff_client, reverse("admin:training_trainingrun_change", args=[v2.run.pk]), language)
    policy_page = _page(staff_client, reverse("admin:training_retrainingpolicy_change", args=[RetrainingPolicy.load().pk]), language)
    assert words in run_page and words in policy_page


@pytest.mark.parametrize("language", ["en", "zh-hans"])
def test_a_full_disks_reason_reads_in_the_language_of_the_page_and_the_api(staff_client, staff_api, language):
    run = _disk_full_run()
    other = "zh-hans" if language == "en" else "en"
    page = _page(staff_client, reverse("admin:training_trainingrun_change", args=[run.pk]), language)
    start = page.index('color:var(--error-fg)">')  # the error's block (the log beside it is English)
    shown_error = page[start : page.index("</pre>", start)]
    error = staff_api.get(f"/api/v1/training-runs/{run.pk}/", HTTP_ACCEPT_LANGUAGE=language).json()["error"]
    assert DISK_FULL[language] in shown_error and DISK_FULL[other] not in shown_error
    assert error.startswith(DISK_FULL[language]) and "No space left on device" in error and "Traceback" in error


def test_the_run_log_notes_a_full_disk_in_english_as_the_rest_of_the_log():
    run = _disk_full_run()
    run.refresh_from_db()
    assert f"failed: {DISK_FULL['en']}" in run.log and DISK_FULL["zh-hans"] not in run.log


@pytest.mark.parametrize("language", ["en", "zh-hans"])
def test_texts_saved_before_read_as_they_were(staff_client, staff_api, language):
    run = make_run(status=TrainingRun.Status.FAILED, error="训练进程停止发送心跳", activation_decision="Kept v1 (saved before)")
    RetrainingPolicy.objects.filter(pk=RetrainingPolicy.load().pk).update(last_decision="重训已关闭。")
    run_page = _page(staff_client, reverse("admin:training_trainingrun_change", args=[run.pk]), language)
    policy_page = _page(staff_client, reverse("admin:training_retrainingpolicy_change", args=[RetrainingPolicy.load().pk]), language)
    assert "训练进程停止发送心跳" in run_page and "Kept v1 (saved before)" in run_page and "重训已关闭。" in policy_page
    assert staff_api.get(f"/api/v1/training-runs/{run.pk}/", HTTP_ACCEPT_LANGUAGE=language).json()["error"] == "训练进程停止发送心跳"


@pytest.mark.parametrize("language", ["en", "zh-hans"])
def test_a_lost_heartbeats_reason_reads_in_the_language_of_the_page(staff_client, settings, language):
    stale = timezone.now() - timedelta(seconds=settings.CSP_HEARTBEAT_TIMEOUT + 1)
    run = make_run(status=TrainingRun.Status.RUNNING, heartbeat_at=stale)
    assert _in_the_workers_language(services.training_runs_reconcile) == 1
    words = {"en": "stopped sending heartbeats", "zh-hans": "心跳"}
    other = "zh-hans" if language == "en" else "en"
    page = _page(staff_client, reverse("admin:training_trainingrun_change", args=[run.pk]), language)
    start = page.index('color:var(--error-fg)">')
    shown_error = page[start : page.index("</pre>", start)]
    assert words[language] in shown_error and words[other] not in shown_error


@pytest.mark.parametrize(("language", "words"), [("en", "Run `manage.py prepare_base_model`"), ("zh-hans", "如需使用内置模型")])
def test_a_refused_scheduled_runs_reason_reads_in_the_pages_language_too(staff_client, settings, tmp_path, language, words):
    QAPair.objects.create(instruction="用户问：能退货吗？", output="您好！支持7天无理由退货。", status="approved")
    RetrainingPolicy.objects.filter(pk=RetrainingPolicy.load().pk).update(enabled=True, min_new_pairs=1)
    settings.CSP_BASE_MODEL = tmp_path / "no-model-here"  # the refusal: no base model
    _in_the_workers_language(retraining.retraining_check)
    page = _page(staff_client, reverse("admin:training_retrainingpolicy_change", args=[RetrainingPolicy.load().pk]), language)
    other = "如需使用内置模型" if language == "en" else "Run `manage.py prepare_base_model`"
    assert words in page and other not in page

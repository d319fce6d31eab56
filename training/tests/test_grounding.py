"""A run's grounded side as staff see it: the snapshot carries the alternates RAFT asks, the
version page shows its calibrated thresholds with the precision they gave, and the run page the
answers per mode."""

import json
from pathlib import Path

import pytest
from django.urls import reverse

from knowledge.models import QAPair
from llm.calibration import calibrate, confident_report, pick_report
from llm.evaluation import answer_as_served, evaluate_served
from llm.grounding import Thresholds
from llm.retrieval import Hit
from llm.finetune import raft
from llm.finetune.config import CONFIG_FILE
from training import grounding, services
from training.models import AdapterVersion
from training.snapshots import read_records

pytestmark = [pytest.mark.django_db, pytest.mark.services]

RETURNS = "您好！支持7天无理由退货。"


@pytest.fixture(autouse=True)
def _isolated(training_env):
    pass


@pytest.fixture
def run():
    for n in range(6):
        QAPair.objects.create(instruction=f"用户问：第{n}号问题？", output=f"您好！答案是{n}天。", status="approved", split="train")
    QAPair.objects.create(
        instruction="用户问：能退货吗？", output=RETURNS, status="approved", split="train", alternates=["不想要了能退吗"]
    )
    QAPair.objects.create(instruction="用户问：验证问题？", output="您好！答案是9天。", status="approved", split="dev")
    run = services.training_run_start(enqueue=False)
    run.status = "succeeded"
    run.save()
    return run


def test_the_snapshot_keeps_the_alternates_that_raft_asks_and_the_index_entries_carry_them(run):
    train = read_records(run.snapshot, "train")
    returns = next(r for r in train if r["output"] == RETURNS)
    assert returns["alternates"] == ["不想要了能退吗"]
    assert all("alternates" not in r for r in train if r is not returns)  # no key where a pair has none
    assert grounding.record_entry(returns).alternates == ("不想要了能退吗",)


def test_the_out_of_scope_questions_are_read_from_the_setting(settings, tmp_path):
    assert len(grounding.out_of_scope_questions()) >= 30
    path = tmp_path / "oos.json"
    path.write_text(json.dumps([{"question": "卖车吗？"}, "能用比特币吗？"], ensure_ascii=False))
    settings.CSP_OUT_OF_SCOPE_DATA = path
    assert grounding.out_of_scope_questions() == ["卖车吗？", "能用比特币吗？"]
    settings.CSP_OUT_OF_SCOPE_DATA = Path(tmp_path / "missing.json")
    assert grounding.out_of_scope_questions() == []


def _calibration_file(tmp_path, pairs, out_of_scope=("卖车吗",)):
    path = tmp_path / "calibration.json"
    data = {"paraphrases": [{"question": f"请问{n}", "pair": pair} for n, pair in enumerate(pairs)], "out_of_scope": list(out_of_scope)}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


class _Index:
    """Scores each question by a table (what a retriever would have given), top-1 only."""

    def __init__(self, scores):
        self.scores = scores

    def search(self, question, k):
        score, answer = self.scores[question]
        return [Hit(pair_id=1, rank=1, score=score, fused=0.0, question=question, answer=answer)]


def test_a_calibration_set_that_asks_the_runs_pairs_fits_the_thresholds_and_leaves_dev_and_out_of_scope_unused(settings, tmp_path):
    train = [{"instruction": f"用户问：第{n}号问题？", "input": "", "output": f"答案{n}"} for n in range(12)]
    named = [r["instruction"] for r in train] + ["用户问：别家的问题？"]  # one names no training pair: skipped
    settings.CSP_CALIBRATION_DATA = _calibration_file(tmp_path, named)
    paraphrases, oos = grounding.calibration_set(train)
    assert paraphrases == [(f"请问{n}", f"答案{n}") for n in range(12)] and oos == ["卖车吗"]

    scores = {f"请问{n}": (0.9 + n / 1000, f"答案{n}") for n in range(12)} | {"卖车吗": (0.5, "答案0")}
    calibrated = grounding.calibrate(_Index(scores), train, dev_records=[{"instruction": "用户问：验证？", "output": "x"}])
    assert calibrated.report["calibrated_on"] == "calibration_set"
    assert calibrated.report["dev_count"] == 12 and calibrated.report["out_of_scope_count"] == 1  # the dev record was not asked
    assert calibrated.thresholds.curated == 0.9


def test_without_a_calibration_set_for_these_pairs_the_run_calibrates_on_its_dev_split(settings, tmp_path):
    train = [{"instruction": f"用户问：第{n}号问题？", "input": "", "output": f"答案{n}"} for n in range(12)]
    settings.CSP_CALIBRATION_DATA = _calibration_file(tmp_path, [r["instruction"] for r in train[:9]])  # 9 < 10
    assert grounding.calibration_set(train) is None
    settings.CSP_CALIBRATION_DATA = tmp_path / "missing.json"
    assert grounding.calibration_set(train) is None

    settings.CSP_OUT_OF_SCOPE_DATA = tmp_path / "oos.json"
    settings.CSP_OUT_OF_SCOPE_DATA.write_text(json.dumps(["卖车吗"], ensure_ascii=False), encoding="utf-8")
    calibrated = grounding.calibrate(
        _Index({"验证？": (0.8, "答案1"), "卖车吗": (0.5, "答案0")}), train, dev_records=[{"instruction": "用户问：验证？", "output": "答案1"}]
    )
    assert calibrated.report["calibrated_on"] == "dev_split" and calibrated.report["dev_count"] == 1


@pytest.mark.parametrize(
    "content",
    ['{"paraphrases": [{"question": "运费？"}]}', '{"paraphrases": [{"question": 3, "pair": "x"}]}', "[1, 2]", "not json"],
)
def test_a_malformed_calibration_set_is_refused_naming_the_file(settings, tmp_path, content):
    settings.CSP_CALIBRATION_DATA = tmp_path / "calibration.json"
    settings.CSP_CALIBRATION_DATA.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="calibration.json is not a calibration set"):
        grounding.calibration_set([{"instruction": "用户问：运费？", "output": "8元"}])


def test_the_sample_datas_calibration_set_asks_its_training_pairs():
    from django.conf import settings as django_settings

    train = json.loads((django_settings.BASE_DIR / "data" / "train.json").read_text(encoding="utf-8"))
    paraphrases, oos = grounding.calibration_set(train)
    assert len(paraphrases) >= 50 and len(oos) >= 30


def _served_results(thresholds):
    hits = (Hit(pair_id=1, rank=1, score=0.85, fused=0.0, question="能退货吗？", answer=RETURNS),)
    dev = [
        answer_as_served("能退吗", hits, thresholds, can_ground=True, generate=lambda prompt: "支持7天无理由退货。"),
        answer_as_served("能退吗", hits, thresholds, can_ground=True, generate=lambda prompt: "支持30天无理由退货。"),
    ]
    results = evaluate_served(dev, [RETURNS, RETURNS])
    results["out_of_scope"] = evaluate_served([answer_as_served("卖车吗", (), thresholds, can_ground=True, generate=None)])
    results["thresholds"] = {"curated": thresholds.curated, "fallback": thresholds.fallback}
    return results


def test_the_version_page_shows_the_calibrated_thresholds_with_their_precision_and_the_run_page_each_mode(run, staff_client):
    calibrated = calibrate([(0.97, True), (0.92, True), (0.9, False)], [0.3, 0.4, 0.5, 0.6, 0.62, 0.7, 0.71, 0.72, 0.73, 0.95])
    assert calibrated.thresholds == Thresholds(curated=0.92, fallback=0.815)  # midway from 0.73 to the dev 0.9
    results = _served_results(calibrated.thresholds)
    version = services.adapter_version_create(run=run, adapter_dir=_adapter_folder(run), metrics={"eval": results}, calibration=calibrated)
    run.eval_results = results
    run.save()
    assert (version.curated_threshold, version.fallback_threshold) == (0.92, 0.815)

    page = staff_client.get(reverse("admin:training_adapterversion_change", args=[version.pk]), HTTP_ACCEPT_LANGUAGE="en")
    text = page.content.decode()
    assert "calibrated thresholds" in text.lower() and "0.920" in text and "0.815" in text
    assert "Top-1 precision 1.000 on the paraphrases at or above it" in text
    assert "Calibrated on 3 dev pairs and 10 out-of-scope questions" in text and "fitted to" in text
    assert "Out-of-scope questions below it: 0.90" in text
    assert "Trained on bare questions (before grounding)" in text  # its folder records no grounding
    record = _adapter_record(version)
    record.write_text(json.dumps({**json.loads(record.read_text() or "{}"), **raft.grounding_record(3)}))
    text = staff_client.get(reverse("admin:training_adapterversion_change", args=[version.pk]), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Answers from the top 3 retrieved pairs in its prompt (references-v1)." in text and "names which of them" in text

    text = staff_client.get(reverse("admin:training_trainingrun_change", args=[run.pk]), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Answered as the chat would, per mode" in text and "out-of-scope questions" in text
    assert "grounded (generated)" in text and "invented_number_share" in text
    # the second answer said 30 days: the fact guard replaced it (0.85 is below the correction bar 0.8675)
    assert results["guarded"] == 1 and results["modes"]["grounded"]["count"] == 1 and results["modes"]["fallback"]["count"] == 1


def test_the_version_page_shows_the_pick_bar_or_that_picks_decide_nothing(run, staff_client):
    calibrated = calibrate([(0.97, True), (0.92, True)], [0.5])
    calibrated.report.update(pick_report([(0.9, False), (0.6, True)]))  # the surest pick was wrong: no bar
    version = services.adapter_version_create(run=run, adapter_dir=_adapter_folder(run), metrics={}, calibration=calibrated)
    text = staff_client.get(reverse("admin:training_adapterversion_change", args=[version.pk]), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "right for 1 of 2 calibration questions" in text and "its picks decide nothing" in text
    version.calibration = {**version.calibration, **pick_report([(0.9, True), (0.6, False)])}
    version.save()
    text = staff_client.get(reverse("admin:training_adapterversion_change", args=[version.pk]), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "0.900" in text and "decides the answer (0.50 of them)" in text


def test_the_version_page_shows_the_confidence_bar_or_that_none_held(run, staff_client):
    calibrated = calibrate([(0.97, True), (0.92, True)], [0.5])
    calibrated.report.update(confident_report([(1.05, True), (0.99, True), (0.95, False)]))
    version = services.adapter_version_create(run=run, adapter_dir=_adapter_folder(run), metrics={}, calibration=calibrated)
    text = staff_client.get(reverse("admin:training_adapterversion_change", args=[version.pk]), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "0.990" in text and "the top pair was right for 2; a match at least this confident" in text and ": 2 of them" in text
    version.calibration = {**version.calibration, **confident_report([(1.05, False), (0.99, True)])}
    version.save()
    text = staff_client.get(reverse("admin:training_adapterversion_change", args=[version.pk]), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "no confidence gave 99% precision, so none of them is curated by it" in text


def test_a_version_trained_before_calibration_says_so(run, staff_client):
    version = AdapterVersion.objects.create(name="v1", run=run, base_model=run.base_model, path="/nowhere", metrics={})
    text = staff_client.get(reverse("admin:training_adapterversion_change", args=[version.pk]), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Not calibrated (trained before calibration)" in text


def _adapter_folder(run):
    folder = services.run_dir(run.pk) / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"0")
    return folder


def _adapter_record(version):
    path = Path(version.path) / CONFIG_FILE
    if not path.exists():
        path.write_text("{}")
    return path

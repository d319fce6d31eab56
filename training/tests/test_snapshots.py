import json
from pathlib import Path

import pytest

from knowledge.models import QAPair
from training.models import DatasetSnapshot
from training.snapshots import assigned_split, read_records, snapshot_create

pytestmark = [pytest.mark.django_db, pytest.mark.services]


@pytest.fixture(autouse=True)
def _data_dir(settings, tmp_path):
    settings.DATA_DIR = tmp_path


def _pair(question, answer, **extra):
    return QAPair.objects.create(instruction=question, output=answer, status=extra.pop("status", "approved"), **extra)


def _sample(n=30):
    return [_pair(f"用户问：第{i}个问题是什么？", f"您好！第{i}个答案：{i * 7}天内处理。") for i in range(n)]


def test_same_approved_set_gives_the_same_hash_and_folder():
    _sample()
    first = snapshot_create()
    second = snapshot_create()
    assert first.pk == second.pk and first.sha256 == second.sha256
    assert (Path(first.path) / "manifest.json").exists()


def test_changing_an_answer_changes_the_hash():
    pairs = _sample()
    first = snapshot_create()
    pairs[0].output = "新的答案：3天。"
    pairs[0].save()
    assert snapshot_create().sha256 != first.sha256


def test_only_approved_pairs_are_frozen():
    pairs = _sample(5)
    secret = _pair("内部问题", "CANARY-7731 未审核答案", status="draft")
    snapshot = snapshot_create()
    frozen = read_records(snapshot, "train") + read_records(snapshot, "dev")
    assert {r["id"] for r in frozen} == {p.pk for p in pairs}
    assert "CANARY-7731" not in (Path(snapshot.path) / "train.jsonl").read_text()
    assert secret.pk not in snapshot.manifest["train_pair_ids"] + snapshot.manifest["dev_pair_ids"]


def test_a_canary_in_unapproved_pairs_reaches_no_snapshot_file_or_row():
    canary = "CANARY-UNAPPROVED-4417"
    pairs = _sample(12)
    _pair("用户问：草稿里的问题？", f"草稿答案 {canary}", status="draft", split="train")
    _pair(f"用户问：{canary} 是什么？", "归档的答案", status="archived", split="dev")
    _pair("用户问：带输入的草稿？", "答案", input=canary, status="draft")
    first = snapshot_create()
    # A pair that was approved and frozen, then archived: the next snapshot leaves it out.
    pairs[0].output = f"改过的答案 {canary}"
    pairs[0].save()
    QAPair.objects.filter(pk=pairs[0].pk).update(status="archived")
    second = snapshot_create()

    snapshots = list(DatasetSnapshot.objects.values())
    files = [f for s in snapshots for f in Path(s["path"]).iterdir()]
    holding = [f.name for f in files if canary in f.read_text(encoding="utf-8")]
    print(f"{len(snapshots)} snapshots, {len(files)} files; holding the canary: {holding or 'none'}")
    assert len(snapshots) == 2 and len(files) == 6 and not holding
    assert canary not in json.dumps(snapshots, ensure_ascii=False, default=str)
    assert pairs[0].pk in first.manifest["train_pair_ids"] + first.manifest["dev_pair_ids"]
    assert pairs[0].pk not in second.manifest["train_pair_ids"] + second.manifest["dev_pair_ids"]
    assert second.train_count + second.dev_count == 11


def test_explicit_split_wins_and_auto_split_is_deterministic():
    pairs = _sample(40)
    dev_pair = _pair("用户问：明确放在验证集的问题", "答案：5天。", split="dev")
    train_pair = _pair("用户问：明确放在训练集的问题", "答案：6天。", split="train")
    snapshot = snapshot_create()
    assert dev_pair.pk in snapshot.manifest["dev_pair_ids"]
    assert train_pair.pk in snapshot.manifest["train_pair_ids"]
    autos = [assigned_split(p) for p in pairs]
    assert autos == [assigned_split(QAPair.objects.get(pk=p.pk)) for p in pairs]
    assert 0 < autos.count("dev") < len(autos) // 2


def test_snapshot_files_are_in_the_seed_format():
    _sample(3)
    snapshot = snapshot_create()
    line = json.loads((Path(snapshot.path) / "train.jsonl").read_text().splitlines()[0])
    assert {"instruction", "input", "output"} <= set(line)


def test_legacy_conflict_in_the_database_blocks_the_snapshot_checks():
    _sample(20)
    _pair("用户问：如何退货？", "7天无理由退货。", split="train")
    other = _pair("退货怎么办", "30天无理由退货。", split="train")
    assert snapshot_create().checks["ok"]
    # update() bypasses save(), as rows written by an older version or by hand would.
    QAPair.objects.filter(pk=other.pk).update(instruction="如何退货?")
    report = snapshot_create().checks
    assert not report["ok"] and [f["code"] for f in report["errors"]] == ["conflict"]

"""Freezing the approved Q&A pairs into a dataset snapshot.

A snapshot is a folder with train.jsonl, dev.jsonl (the seed's format, plus id, category and,
where a pair has them, its alternate questions) and manifest.json. Its SHA-256 covers the two data
files only, so the same approved set always gives the same hash and the same folder, whenever it
is taken.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from django.conf import settings

from knowledge.models import QAPair, normalise_question
from training.datachecks import check_dataset
from training.models import DatasetSnapshot

# Pairs whose split is "auto" go to dev when their question hash falls in this tenth.
AUTO_DEV_BUCKETS = 1
BUCKETS = 10


def assigned_split(pair):
    """Explicit split wins; "auto" is decided by the question hash, so it never changes."""
    if pair.split != QAPair.Split.AUTO:
        return pair.split
    return "dev" if int(pair.question_hash[:8], 16) % BUCKETS < AUTO_DEV_BUCKETS else "train"


def _record(pair):
    record = {
        "id": pair.pk,
        "instruction": pair.instruction,
        "input": pair.input,
        "output": pair.output,
        "category": pair.category.name if pair.category_id else "",
    }
    # Alternate questions are trained on (RAFT asks them too); written only where a pair has some,
    # so that a set without any keeps the hash it had before alternates existed.
    alternates = [a for a in getattr(pair, "alternates", None) or [] if a and a.strip()]
    if alternates:
        record["alternates"] = alternates
    return record


def _jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()


def snapshot_root():
    return Path(settings.DATA_DIR) / "snapshots"


def freeze_approved_pairs():
    """Return (train_records, dev_records) of the approved pairs, in a stable order."""
    pairs = QAPair.objects.filter(status=QAPair.Status.APPROVED).select_related("category").order_by("id")
    train, dev = [], []
    for pair in pairs:
        (dev if assigned_split(pair) == "dev" else train).append(_record(pair))
    return train, dev


def snapshot_create(*, max_length=512, epochs=3, batch_size=4, grad_accum=1, count_tokens=None):
    """Freeze the approved pairs; reuse the snapshot row when the same set was frozen before.

    count_tokens, when given, maps a record to its training-text length in tokens (for the
    "will be truncated" check).
    """
    train, dev = freeze_approved_pairs()
    train_bytes, dev_bytes = _jsonl(train), _jsonl(dev)
    digest = hashlib.sha256(b"train\0" + train_bytes + b"dev\0" + dev_bytes).hexdigest()

    check_records = lambda records: [  # noqa: E731
        {**r, "question": normalise_question(r["instruction"], r["input"]), "tokens": count_tokens(r) if count_tokens else None}
        for r in records
    ]
    checks = check_dataset(
        check_records(train), check_records(dev), max_length=max_length, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum
    ).as_dict()

    folder = snapshot_root() / digest[:16]
    manifest = {
        "sha256": digest,
        "train_count": len(train),
        "dev_count": len(dev),
        "train_pair_ids": [r["id"] for r in train],
        "dev_pair_ids": [r["id"] for r in dev],
        "files": {
            "train.jsonl": hashlib.sha256(train_bytes).hexdigest(),
            "dev.jsonl": hashlib.sha256(dev_bytes).hexdigest(),
        },
    }
    if not (folder / "manifest.json").exists():
        _write_atomically(folder, {"train.jsonl": train_bytes, "dev.jsonl": dev_bytes, "manifest.json": _manifest_bytes(manifest)})
    snapshot = DatasetSnapshot.objects.filter(sha256=digest).first()
    if snapshot is None:
        snapshot = DatasetSnapshot.objects.create(
            sha256=digest, path=str(folder), train_count=len(train), dev_count=len(dev), manifest=manifest, checks=checks
        )
    elif snapshot.checks != checks:
        snapshot.checks = checks
        snapshot.save(update_fields=["checks"])
    return snapshot


def _manifest_bytes(manifest):
    return (json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()


def _write_atomically(folder, files):
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "manifest.json").exists():
                raise
            # Another process froze the same set first; its files are identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_records(snapshot, split):
    path = Path(snapshot.path) / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

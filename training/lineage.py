"""Lineage: from an answer to the rows that trained its version, and from a pair to its versions.

    answer.adapter_version → version.run → run.snapshot → snapshot_rows(snapshot)
    versions_trained_on(pair) → the adapter versions whose snapshot holds the pair

A snapshot's rows are read from its frozen train.jsonl / dev.jsonl, so they are the pairs exactly
as they were trained, whatever was edited since; each row says whether the pair still reads the
same today ("same"), was edited ("changed") or deleted ("deleted").
"""

from knowledge.models import QAPair
from training.models import AdapterVersion, DatasetSnapshot
from training.snapshots import read_records

SAME, CHANGED, DELETED = "same", "changed", "deleted"


def snapshot_rows(snapshot):
    """[{split, id, instruction, input, output, category, now}] in the snapshot's order.

    Raises OSError when the snapshot's files are gone (the folder was removed by hand).
    """
    rows = [dict(record, split=split) for split in ("train", "dev") for record in read_records(snapshot, split)]
    current = {
        pair["id"]: pair
        for pair in QAPair.objects.filter(pk__in=[row["id"] for row in rows]).values("id", "instruction", "input", "output")
    }
    for row in rows:
        pair = current.get(row["id"])
        if pair is None:
            row["now"] = DELETED
        else:
            same = all(pair[key] == row[key] for key in ("instruction", "input", "output"))
            row["now"] = SAME if same else CHANGED
    return rows


def snapshots_with(pair_id):
    """The snapshots whose manifest lists the pair (train or dev). Snapshots are few: one per
    distinct approved set, so this reads them rather than relying on JSON lookups SQLite lacks."""
    return [
        snapshot
        for snapshot in DatasetSnapshot.objects.only("id", "manifest")
        if pair_id in snapshot.manifest.get("train_pair_ids", ()) or pair_id in snapshot.manifest.get("dev_pair_ids", ())
    ]


def versions_trained_on(pair):
    """Adapter versions trained on a snapshot that held the pair, newest first."""
    snapshots = [snapshot.pk for snapshot in snapshots_with(pair.pk)]
    return AdapterVersion.objects.filter(run__snapshot__in=snapshots).select_related("run").order_by("-created_at")

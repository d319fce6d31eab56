"""Factories for the training app's rows (STYLE.md rule 15): plain functions, saved rows.

The rows a training run writes, made by hand for tests that need a version to exist without
training one (`serving` in chat/tests/conftest.py points one at the session's trained adapter).
"""

from training.models import AdapterVersion, BaseModel, DatasetSnapshot, TrainingRun


def make_base_model(name="tiny", path="/models/tiny", **fields):
    """`path` is unique: pass the model's real folder (or a test's own) when a test makes two."""
    return BaseModel.objects.create(name=name, path=str(path), **fields)


def make_snapshot(**fields):
    return DatasetSnapshot.objects.create(**{"sha256": "0" * 64, "path": "/x", "train_count": 6, "dev_count": 0, **fields})


def make_run(*, base_model=None, snapshot=None, status=TrainingRun.Status.SUCCEEDED, **fields):
    """A run of `base_model` on `snapshot` (new rows where not given); succeeded unless told."""
    return TrainingRun.objects.create(
        base_model=base_model or make_base_model(), snapshot=snapshot or make_snapshot(), status=status, **fields
    )


def make_adapter_version(name="v1", *, path, run=None, beside=None, **fields):
    """A version at `path`, with a run of its own (one run makes one version).

    beside: another version whose base model and snapshot the new one's run shares, as a second
    training of the same data does.
    """
    if run is None:
        run = make_run(base_model=beside.base_model, snapshot=beside.run.snapshot) if beside else make_run()
    return AdapterVersion.objects.create(name=name, run=run, base_model=run.base_model, path=str(path), **fields)

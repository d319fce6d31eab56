"""Progress bars of `train --wait`, `prepare_base_model` and `export_gguf_adapters` on a terminal,
and the same commands' output unchanged elsewhere (captured, piped) or with `-v 0`."""

import io
import json
import shutil

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import OutputWrapper
from django.utils import translation

from knowledge.models import QAPair
from tests.support.terminal import Terminal, looks_like_a_bar
from training.management.commands import prepare_base_model
from training.management.commands.train import RunBars
from training.models import AdapterVersion, BaseModel, DatasetSnapshot, TrainingRun


@pytest.fixture(autouse=True)
def _english():
    """The bars' labels as written in the code (the site's language is Chinese)."""
    with translation.override("en"):
        yield


def _run(**values):
    return TrainingRun(**{"step": 0, "total_steps": 0, "loss": None, "eta_seconds": None, "log": "", **values})


def test_run_bars_show_the_steps_then_each_question_set_as_the_run_records_them():
    terminal = Terminal()
    bars = RunBars(OutputWrapper(terminal), 1)

    bars.show(_run())  # loading the model: no total yet, no bar
    assert terminal.getvalue() == ""
    bars.show(_run(step=7, total_steps=20, loss=1.23456, eta_seconds=75, log="[10:00:00] training on 4 pairs\n"))
    assert "7/20" in terminal.getvalue() and "loss=1.2346" in terminal.getvalue() and "ETA=01:15" in terminal.getvalue()

    log = "[10:00:00] trained 20 steps in 9 s\n[10:00:05] answered 10/23 dev questions as served\n"
    bars.show(_run(step=20, total_steps=20, loss=0.5, eta_seconds=0, log=log))
    steps_line, answers = terminal.getvalue().rsplit("\n", 1)
    assert steps_line.endswith("20/20 [00:00, loss=0.5000, ETA=00:00]")  # the training bar, finished
    assert "Answering dev questions:  43%|" in answers and "10/23" in answers

    log += "[10:00:09] answered 10/12 out-of-scope questions as served\n"
    bars.show(_run(step=20, total_steps=20, loss=0.5, log=log))
    log += "[10:00:10] llama.cpp LoRA written: adapter.gguf (0.1 MB)\n"
    bars.show(_run(step=20, total_steps=20, loss=0.5, log=log))
    bars.close()

    lines = terminal.getvalue().split("\n")
    assert "23/23" in lines[1]  # the log went on to the next set: the dev set was all answered
    assert "Answering out-of-scope questions: 100%|" in lines[2] and "12/12" in lines[2]
    assert lines[3] == ""


def _approved_pairs(train, dev):
    records = json.loads(settings.CSP_SAMPLE_DATA[0].read_text(encoding="utf-8"))[: train + dev]
    for index, record in enumerate(records):
        QAPair.objects.create(
            instruction=record["instruction"], output=record["output"], status="approved",
            split="train" if index < train else "dev",
        )


@pytest.fixture
def quick_run(training_env, settings):
    """One epoch on 4 pairs, 10 dev and 10 out-of-scope questions answered in 8 tokens each."""
    settings.CSP_TRAINING_DEVICE = "cpu"
    settings.CSP_HEARTBEAT_SECONDS = 3600
    settings.CSP_EVAL_MAX_PAIRS = 10
    settings.CSP_EVAL_MAX_NEW_TOKENS = 8
    _approved_pairs(train=4, dev=10)


@pytest.mark.django_db(transaction=True)  # the bars' thread reads the run through its own connection
def test_train_wait_on_a_terminal_shows_the_steps_and_the_answers_of_each_question_set(quick_run):
    terminal = Terminal()

    call_command("train", "--wait", "--epochs", "3", stdout=terminal)

    run = TrainingRun.objects.get()
    text = terminal.getvalue()
    assert text.startswith(f"Training run #{run.pk} queued on snapshot ")
    assert text.endswith(f"Run #{run.pk} succeeded: adapter version v1.\n")
    steps = [line for line in text.split("\n") if line.startswith("\rTraining:")]
    assert len(steps) == 1 and steps[0].rsplit("\r", 1)[1].startswith("Training: 100%|")
    assert run.total_steps == 3 and "| 3/3 [" in steps[0] and "loss=" in steps[0] and "ETA=" in steps[0]
    # The last set answered is finished when the bars close; the dev set has its bar if a poll saw it.
    assert "\rAnswering out-of-scope questions: 100%|" in text and "10/10" in text.split("out-of-scope")[-1]


@pytest.mark.django_db
@pytest.mark.parametrize(("stream", "verbosity"), [(io.StringIO, 1), (Terminal, 0)])
def test_train_wait_without_a_terminal_or_with_v0_prints_its_two_lines_only(quick_run, stream, verbosity):
    out = stream()

    call_command("train", "--wait", "--epochs", "1", verbosity=verbosity, stdout=out)

    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.SUCCEEDED and "answered 10/10 dev questions as served" in run.log
    assert out.getvalue() == (
        f"Training run #{run.pk} queued on snapshot {run.snapshot.sha256[:12]} (4 train / 10 dev pairs).\n"
        f"Run #{run.pk} succeeded: adapter version v1.\n"
    )


def _fake_prepare(checkpoint, out, screens):
    """prepare_gemma as the command sees it: its steps reported in order (what out shows after
    each one is kept in screens), then the checkpoint."""

    def prepare(target, *, progress, install):
        for step in ("check", "install", "assemble", "load", "save"):
            progress(step, f"{step} message")
            screens.append(out.getvalue())
        progress("done", "prepared")
        return checkpoint

    return prepare


def test_prepare_base_model_on_a_terminal_shows_the_step_it_is_at_below_the_step_lines(tiny_model, tmp_path, monkeypatch):
    terminal, screens = Terminal(), []
    monkeypatch.setattr(prepare_base_model, "prepare_gemma", _fake_prepare(tiny_model, terminal, screens))

    call_command("prepare_base_model", "--target", str(tmp_path / "gemma"), stdout=terminal)

    during_load = screens[3].rsplit("load message\n", 1)[1]
    assert "Preparing:  60%|" in during_load and "3/5" in during_load and "step=load" in during_load
    text = terminal.getvalue()
    for step in ("check", "install", "assemble", "load", "save", "done"):
        assert f"] {step}: " in text
    assert f"\rPrepared: {tiny_model} (" in text  # the bar's line blanked out, the summary in its place
    assert "Qwen2ForCausalLM" in text.rsplit("\r", 1)[1]


@pytest.mark.parametrize(("stream", "verbosity"), [(io.StringIO, 1), (Terminal, 0)])
def test_prepare_base_model_without_a_terminal_or_with_v0_draws_no_bar(tiny_model, tmp_path, monkeypatch, stream, verbosity):
    out = stream()
    monkeypatch.setattr(prepare_base_model, "prepare_gemma", _fake_prepare(tiny_model, out, []))

    call_command("prepare_base_model", "--target", str(tmp_path / "gemma"), verbosity=verbosity, stdout=out)

    text = out.getvalue()
    assert not looks_like_a_bar(text)
    assert text.count("message\n") == (5 if verbosity else 0)
    assert f"Prepared: {tiny_model} (" in text


@pytest.fixture
def versions(db, tmp_path, tiny_model, trained_adapter):
    """Three adapter versions of the tiny model, none with its adapter.gguf yet."""
    base = BaseModel.objects.create(name="tiny", path=str(tiny_model))
    snapshot = DatasetSnapshot.objects.create(sha256="0" * 64, path="/x", train_count=4, dev_count=0)
    for name in ("v1", "v2", "v3"):
        run = TrainingRun.objects.create(base_model=base, snapshot=snapshot, status="succeeded")
        folder = shutil.copytree(trained_adapter, tmp_path / name, ignore=shutil.ignore_patterns("adapter.gguf"))
        AdapterVersion.objects.create(name=name, run=run, base_model=base, path=str(folder))


def test_export_gguf_adapters_on_a_terminal_counts_the_versions_below_their_lines(versions, tmp_path):
    terminal = Terminal()

    call_command("export_gguf_adapters", stdout=terminal)

    text = terminal.getvalue()
    for name in ("v1", "v2", "v3"):
        assert f"\r{name}: wrote {tmp_path / name / 'adapter.gguf'} (" in text  # at the start of a cleared line
    assert "Adapters:  67%|" in text and "2/3" in text
    assert text.endswith("\n") and "3/3" in text.rsplit("\n", 2)[-2]


@pytest.mark.parametrize(("stream", "verbosity"), [(io.StringIO, 1), (Terminal, 0)])
def test_export_gguf_adapters_without_a_terminal_or_with_v0_prints_one_line_per_version(versions, tmp_path, stream, verbosity):
    out = stream()

    call_command("export_gguf_adapters", verbosity=verbosity, stdout=out)

    lines = out.getvalue().split("\n")
    wrote = [f"{name}: wrote {tmp_path / name / 'adapter.gguf'}" for name in ("v1", "v2", "v3")]
    assert [line.split(" (")[0] for line in lines[:-1]] == wrote
    assert lines[-1] == ""

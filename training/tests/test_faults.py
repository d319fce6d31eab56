"""Training and storage faults (issue #6, scenarios 19-22; issue #16: the q2 cluster's Ctrl-C and the
schedule pile-up), each printing its figure.

Run them with `pytest training/tests/test_faults.py -s` to see the figures.
"""

import collections
import errno
import os
import random
import signal
import time
import traceback
import urllib.request

import psutil
import pytest
from django.conf import settings
from django.db import connections
from django.utils import timezone
from django_q.models import Schedule, Task

from csplatform.management.commands.serve import STOP_GRACE_SECONDS, STOP_SIGNALS
from training import services
from llm.finetune.checkpoints import list_checkpoints, save_adapter
from llm.finetune.config import FinetuneConfig
from llm.modeling import add_lora, load_adapter, load_base
from llm import gguf as gguf_export
from training.models import AdapterVersion, TrainingRun
from training.snapshots import snapshot_create, snapshot_root
from training.tasks import run_training
from training.tests.test_training_run import _sample_pairs
from tests.support.livetest import start_serve


@pytest.fixture(autouse=True)
def _isolated(training_env, settings):
    settings.CSP_TRAINING_DEVICE = "cpu"
    settings.CSP_EVAL_MAX_PAIRS = 0  # these tests are about the run's life and files, not its answers


def wait_for(condition, timeout, interval=0.2):
    """Poll condition() until it is true or timeout seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def leftovers(folder):
    """Temp files and folders that a write in progress leaves: dot-names, anywhere below folder."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


# --- 19 -----------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_run_longer_than_the_brokers_retry_is_trained_exactly_once(qcluster):
    _sample_pairs()
    retry = 1
    # 12 pairs one at a time for 12 epochs: 144 steps, several times the retry on this machine
    # (the tiny model trains ~50 ms a step on a quiet core: 24 steps once took only 1.2 s).
    run = services.training_run_start(hyperparameters={"epochs": 12, "batch_size": 1})
    # Two workers: the redelivered copy runs at once, beside the first, the worst case.
    cluster = qcluster(CSP_QCLUSTER_RETRY=str(retry), CSP_QCLUSTER_WORKERS="2", CSP_TRAINING_TIMEOUT="300")
    assert wait_for(lambda: not TrainingRun.objects.get(pk=run.pk).is_active, 240), cluster.log_tail()
    time.sleep(retry + 2)  # time for one more redelivery, were the task still unacknowledged
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error or cluster.log_tail()
    seconds = (run.finished_at - run.started_at).total_seconds()
    assert seconds > 2 * retry
    deliveries = cluster.log.read_text().count(f"processing training-run-{run.pk} ")
    if "orm" in settings.Q_CLUSTER:
        assert deliveries >= 2, cluster.log_tail()  # q2 did hand the run out again...
    else:
        # The Redis broker of the scale-out settings keeps no message receipts, so `retry` never
        # redelivers there (django-q2's docs, "Brokers"): the one delivery must still train once.
        assert deliveries == 1, cluster.log_tail()
    assert run.log.count("training on ") == 1  # ...and it trained once
    assert list(AdapterVersion.objects.values_list("run_id", flat=True)) == [run.pk]
    assert sorted(p.name for p in services.adapters_root().iterdir()) == ["v1"]
    print(f"run of {seconds:.0f} s with retry {retry} s: delivered {deliveries}x, trained 1x, 1 version")


# --- 20 -----------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_sigterm_interrupts_the_run_at_a_checkpoint_and_resuming_loses_at_most_one_interval(qcluster, settings, staff_api):
    _sample_pairs()
    interval = settings.CSP_CHECKPOINT_EVERY = 5
    # 12 pairs one at a time for 3 epochs: 36 steps.
    run = services.training_run_start(hyperparameters={"epochs": 3, "batch_size": 1})
    cluster = qcluster(CSP_CHECKPOINT_EVERY=str(interval))
    signal_step = random.randint(interval + 1, 3 * interval)
    assert wait_for(lambda: TrainingRun.objects.get(pk=run.pk).step >= signal_step, 120), cluster.log_tail()
    signalled_at = TrainingRun.objects.get(pk=run.pk).step
    cluster.signal(signal.SIGTERM)  # every process of the cluster, as `systemctl stop` does

    # The worker checkpoints, marks the run, then dies of the signal it had put off.
    exited = wait_for(lambda: not cluster.children_alive(), 60)
    run.refresh_from_db()
    assert exited, f"run {run.status}; processes left:\n{cluster.processes()}\n{cluster.log_tail()}"
    assert run.status == TrainingRun.Status.INTERRUPTED, run.error or cluster.log_tail()
    assert f"interrupted at step {run.step} of 36" in run.log and not run.error
    interrupted_at = run.step
    assert [step for step, _ in list_checkpoints(services.run_dir(run.pk))][-1] == interrupted_at >= signalled_at
    assert not AdapterVersion.objects.exists()

    response = staff_api.post(f"/api/v1/training-runs/{run.pk}/resume/")  # staff resume it as a failed one
    assert response.status_code == 200 and response.json()["status"] == "queued", response.content
    assert run_training(run.pk) == "v1"
    run.refresh_from_db()
    resumed_from = int(run.log.split("resumed from the checkpoint at step ")[1].split()[0])
    assert signalled_at - interval <= resumed_from
    assert run.status == TrainingRun.Status.SUCCEEDED and [p[0] for p in run.loss_history] == list(range(1, 37))
    print(
        f"SIGTERM at step {signalled_at}: interrupted at step {interrupted_at} with a checkpoint, resumed from step "
        f"{resumed_from} (lost {interrupted_at - resumed_from} steps; checkpoint interval {interval})"
    )


# --- 21 -----------------------------------------------------------------------------------------


def _lora_marker(path):
    """The value every lora_B weight of a saved adapter holds (the tests write one per save)."""
    from safetensors.torch import load_file

    values = {float(t.flatten()[0]) for name, t in load_file(path / "adapter_model.safetensors").items() if "lora_B" in name}
    assert len(values) == 1
    return values.pop()


def _save_in_child(model, config, run, marker, tiny_model):
    """Fork a process that saves an adapter as a finished run does: the adapter written aside and
    renamed, its GGUF LoRA, then the version folder and row. Returns the child's pid."""
    connections.close_all()  # the child opens its own database connection
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        import torch

        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(marker)
        work = services.run_dir(run.pk)
        work.mkdir(parents=True, exist_ok=True)
        save_adapter(model, config, {"marker": marker}, work)
        gguf_export.write_lora_gguf(work / "adapter", base_dir=tiny_model)
        services.adapter_version_create(run=run, adapter_dir=work / "adapter", metrics={"marker": marker})
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _check_versions():
    """Every recorded version folder is complete and holds its own weights; the only folder
    without a row is the one the next save will replace."""
    import gguf

    root = services.adapters_root()
    assert not leftovers(root)
    for version in AdapterVersion.objects.all():
        path = root / version.name
        assert _lora_marker(path) == version.metrics["marker"], f"{version.name} holds another save's weights"
        assert len(gguf.GGUFReader(next(path.glob("*.gguf"))).tensors) > 0
    unrecorded = {p.name for p in root.iterdir()} - set(AdapterVersion.objects.values_list("name", flat=True))
    assert unrecorded <= {services.next_version_name()}


def _active_loads(tiny_model):
    """Whether the active version loads with peft, as the transformers engine loads it, with its own weights."""
    active = AdapterVersion.objects.get(is_active=True)
    try:
        model, _tokenizer = load_adapter(tiny_model, active.path)
    except (OSError, ValueError, RuntimeError):
        return False
    weights = {name: param for name, param in model.named_parameters() if "lora_B" in name}
    return bool(weights) and all(bool((w == active.metrics["marker"]).all()) for w in weights.values())


def _new_run(snapshot, base):
    return TrainingRun.objects.create(base_model=base, snapshot=snapshot, status=TrainingRun.Status.FAILED)


@pytest.mark.django_db(transaction=True)
def test_kill_during_adapter_save_at_50_random_points_leaves_the_active_adapter_loadable(tiny_model, training_env):
    _sample_pairs()
    base, snapshot = services.base_model_current(), snapshot_create()
    config = FinetuneConfig(device="cpu")
    model, _tokenizer = load_base(tiny_model, config)
    model = add_lora(model, config)
    # Warm up here what a save imports on first use, or every forked child would import it again.
    (training_env / "warm-up").mkdir()
    save_adapter(model, config, {}, training_env / "warm-up")
    gguf_export.write_lora_gguf(training_env / "warm-up" / "adapter", base_dir=tiny_model)

    # Two complete saves (v1 is the active one) measure how long a save takes.
    durations = []
    for marker in (1.0, 2.0):
        started = time.monotonic()
        _pid, status = os.waitpid(_save_in_child(model, config, _new_run(snapshot, base), marker, tiny_model), 0)
        durations.append(time.monotonic() - started)
        assert os.waitstatus_to_exitcode(status) == 0
    save_seconds = min(durations)

    rng = random.Random(21)
    loadable, stages = 0, collections.Counter()
    for attempt in range(50):
        run = _new_run(snapshot, base)
        pid = _save_in_child(model, config, run, float(attempt + 3), tiny_model)
        time.sleep(rng.uniform(0, save_seconds))
        os.kill(pid, signal.SIGKILL)
        _pid, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) == 0
        stages[_stage_reached(run)] += 1
        _check_versions()
        loadable += _active_loads(tiny_model)
    assert loadable == 50
    assert AdapterVersion.objects.get(is_active=True).name == "v1"
    assert stages["after the save"] <= 35  # most kills landed before the save had finished
    print(
        f"kill during save: active adapter loads {loadable}/50; kills {_stages_text(stages)} "
        f"(a save takes {save_seconds * 1000:.0f} ms); {AdapterVersion.objects.count()} versions, all intact"
    )


def _stage_reached(run):
    """How far a killed save got, read from what it left on disk."""
    adapter = services.run_dir(run.pk) / "adapter"
    if AdapterVersion.objects.filter(run=run).exists():
        return "after the save"
    if not adapter.is_dir():
        return "writing the adapter"
    if not list(adapter.glob("*.gguf")):
        return "writing the GGUF"
    return "recording the version"


def _stages_text(stages):
    order = ["writing the adapter", "writing the GGUF", "recording the version", "after the save"]
    return ", ".join(f"{stages[name]} {'while ' * (name != order[-1])}{name}" for name in order)


@pytest.mark.django_db(transaction=True)
def test_a_version_folder_left_by_a_killed_save_is_replaced_not_nested_into(tiny_model):
    _sample_pairs()
    base, snapshot = services.base_model_current(), snapshot_create()
    config = FinetuneConfig(device="cpu")
    model = add_lora(load_base(tiny_model, config)[0], config)
    orphan_run, run = _new_run(snapshot, base), _new_run(snapshot, base)
    for each in (orphan_run, run):
        services.run_dir(each.pk).mkdir(parents=True)
    # A save killed between its rename and its commit: a complete v1 folder that no row names.
    for param in (p for n, p in model.named_parameters() if "lora_B" in n):
        param.data.fill_(7.0)
    save_adapter(model, config, {}, services.run_dir(orphan_run.pk))
    services.adapters_root().mkdir(parents=True)
    os.rename(services.run_dir(orphan_run.pk) / "adapter", services.adapters_root() / "v1")

    for param in (p for n, p in model.named_parameters() if "lora_B" in n):
        param.data.fill_(3.0)
    save_adapter(model, config, {}, services.run_dir(run.pk))
    version = services.adapter_version_create(run=run, adapter_dir=services.run_dir(run.pk) / "adapter", metrics={})
    assert version.name == "v1" and _lora_marker(services.adapters_root() / "v1") == 3.0
    assert not (services.adapters_root() / "v1" / "adapter").exists()


# --- 22 -----------------------------------------------------------------------------------------


def _disk_full_while_writing(monkeypatch, where):
    """peft writes adapter weights with safetensors: under a path containing `where`, write half
    the file, then fail as a full disk does."""
    import peft.peft_model

    real_save = peft.peft_model.safe_save_file
    failures = []

    def save(tensors, filename, *args, **kwargs):
        if where in str(filename):
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 4096)
            failures.append(filename)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    return failures


@pytest.mark.django_db
@pytest.mark.parametrize("where", ["/.adapter-", "/.tmp-step-"], ids=["adapter", "checkpoint"])
def test_a_full_disk_while_saving_fails_the_run_with_a_readable_reason_and_no_temp_files(monkeypatch, settings, where):
    _sample_pairs()
    settings.CSP_CHECKPOINT_EVERY = 4
    run = services.training_run_start(hyperparameters={"epochs": 3}, enqueue=False)  # 12 steps
    failures = _disk_full_while_writing(monkeypatch, where)

    assert run_training(run.pk) == "failed"
    run.refresh_from_db()
    assert failures and run.status == TrainingRun.Status.FAILED
    reason = run.error.splitlines()[0]
    assert reason.startswith("The disk is full") and "resume" in reason and "No space left on device" in run.error
    work = services.run_dir(run.pk)
    assert not leftovers(work) and not AdapterVersion.objects.exists()
    assert not services.adapters_root().exists() or not any(services.adapters_root().iterdir())

    # Space freed: the run resumes from what it had saved and ends with its version.
    monkeypatch.undo()
    checkpoints = [step for step, _ in list_checkpoints(work)]
    assert services.training_run_resume(run=run) == bool(checkpoints)
    if checkpoints:
        assert run_training(run.pk) == "v1"
    what = "adapter" if "adapter" in where else "checkpoint"
    print(f"disk full while writing the {what}: run failed ({reason[:60]}...), 0 temp files left")


@pytest.mark.django_db
def test_a_full_disk_while_freezing_the_pairs_refuses_the_start_and_leaves_no_temp_files(monkeypatch):
    from pathlib import Path

    _sample_pairs()
    real_write = Path.write_bytes

    def write_bytes(path, data):
        if snapshot_root() in path.parents:
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(services.TrainingRefused) as refused:
        services.training_run_start(enqueue=False)
    assert refused.value.code == "storage" and "No space left on device" in str(refused.value)
    assert not TrainingRun.objects.exists() and not list(snapshot_root().iterdir())
    print(f"disk full while freezing the pairs: start refused ({str(refused.value)[:60]}...), 0 temp files left")


@pytest.mark.django_db
def test_a_full_disk_during_the_gguf_export_keeps_the_version_and_leaves_no_partial_file(monkeypatch):
    import gguf

    _sample_pairs()
    run = services.training_run_start(hyperparameters={"epochs": 1}, enqueue=False)

    def write_tensors_to_file(writer, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_tensors_to_file)
    assert run_training(run.pk) == "v1"
    run.refresh_from_db()
    assert "GGUF export failed" in run.log and "No space left on device" in run.log
    version_dir = services.adapters_root() / AdapterVersion.objects.get().name
    assert (version_dir / "adapter_model.safetensors").is_file() and not list(version_dir.glob("*.gguf"))
    assert not leftovers(services.adapters_root())
    print("disk full during the GGUF export: version kept without its llama.cpp file, 0 partial files left")


# --- issue 16, item 6: the q2 cluster's Ctrl-C and the reconcile pile-up ------------------------


def _cluster_workers_started(serve_pid):
    """Whether serve's q2 cluster runs its sentinel's processes (workers, monitor, pusher)."""
    for child in psutil.Process(serve_pid).children():
        if "qcluster" in " ".join(child.cmdline()):
            return any(len(sentinel.children()) >= 3 for sentinel in child.children())
    return False


@pytest.mark.live
def test_ctrl_c_on_serve_stops_its_idle_q2_cluster_within_the_grace(tmp_path):
    serve, port = start_serve(tmp_path)
    try:

        def up():
            try:
                web = urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2).status == 200
            except OSError:
                return False
            return web and _cluster_workers_started(serve.pid)

        assert wait_for(up, 90, interval=0.5)
    finally:
        started = time.monotonic()
        serve.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = serve.communicate(timeout=60)
    seconds = time.monotonic() - started
    assert "did not stop within" not in output and serve.returncode == 0, output[-3000:]
    assert seconds < STOP_GRACE_SECONDS, output[-3000:]
    print(f"Ctrl-C on serve: daphne and the idle q2 cluster stopped in {seconds:.1f} s (grace {STOP_GRACE_SECONDS} s)")


@pytest.mark.django_db(transaction=True)
def test_the_signal_serve_stops_the_cluster_with_interrupts_a_run_at_a_checkpoint_within_the_grace(qcluster):
    _sample_pairs()
    run = services.training_run_start(hyperparameters={"epochs": 100, "batch_size": 1})  # 1200 steps
    cluster = qcluster()
    assert wait_for(lambda: TrainingRun.objects.get(pk=run.pk).step >= 3, 120), cluster.log_tail()
    started = time.monotonic()
    cluster.signal(STOP_SIGNALS["qcluster"])  # what serve sends the cluster's process group on Ctrl-C
    exited = wait_for(lambda: cluster.process.poll() is not None and not cluster.children_alive(), STOP_GRACE_SECONDS, 0.1)
    seconds = time.monotonic() - started
    run.refresh_from_db()
    assert exited, f"run {run.status} at step {run.step}; processes left:\n{cluster.processes()}\n{cluster.log_tail()}"
    assert cluster.process.returncode == 0
    assert run.status == TrainingRun.Status.INTERRUPTED and f"interrupted at step {run.step} of 1200" in run.log
    assert [step for step, _ in list_checkpoints(services.run_dir(run.pk))][-1] == run.step
    print(f"SIGINT to a training cluster: run interrupted at step {run.step} with a checkpoint, all processes gone in {seconds:.1f} s")


RECONCILE = "training.tasks.reconcile_training_runs"


@pytest.mark.django_db(transaction=True)
def test_schedule_ticks_queue_no_second_reconcile_while_the_one_worker_trains(qcluster):
    # As migration 0002 makes it (a transactional test before this one may have flushed it).
    Schedule.objects.update_or_create(
        name="Reconcile training runs", defaults={"func": RECONCILE, "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1}
    )
    Schedule.objects.filter(func=RECONCILE).update(next_run=timezone.now(), task=None)
    _sample_pairs(train=40)
    run = services.training_run_start(hyperparameters={"epochs": 100, "batch_size": 1})  # 4000 steps: minutes
    cluster = qcluster()  # one worker, as deployed

    def reconcile():
        return Schedule.objects.get(func=RECONCILE)

    # The sentinel's first tick (30 s after it starts) queues a reconcile behind the run.
    assert wait_for(lambda: reconcile().task, 120, interval=0.5), cluster.log_tail()
    first, due_again = reconcile().task, reconcile().next_run
    assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.RUNNING, cluster.log_tail()
    assert not Task.objects.filter(id=first).exists()

    # A one-off schedule due when the reconcile is due again marks the tick that would queue a second.
    marker = Schedule.objects.create(
        name="tick marker", func="django.utils.timezone.now", schedule_type=Schedule.ONCE, repeats=-1, next_run=due_again
    )
    assert wait_for(lambda: not Schedule.objects.filter(pk=marker.pk).exists(), 150, interval=0.5), cluster.log_tail()
    assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.RUNNING, cluster.log_tail()
    assert reconcile().task == first, "a second reconcile was queued behind the run"

    # Once the worker is free, the reconcile that waited runs (it was held, not lost).
    services.training_run_cancel(run=run)
    assert wait_for(lambda: Task.objects.filter(id=first, success=True).exists(), 90, interval=0.5), cluster.log_tail()
    print("scheduler tick while the one worker trained: 1 reconcile queued (was one more a tick), run once the worker was free")

"""django-q2 tasks of the training pipeline.

`run_training(run_id)` is enqueued by services.training_run_start. It claims the run (so a
redelivered task never trains twice), sends heartbeats from a side thread while the pure
fine-tuning module works, reports progress to the run row, evaluates the adapter on the dev
pairs and records an adapter version. With CSP_RAFT it trains grounded prompts built over the
snapshot's training pairs (training.grounding), calibrates the version's mode thresholds and
evaluates it as the chat would answer, per mode. A SIGTERM while it trains ends the run interrupted at a
checkpoint (see Termination). `reconcile_training_runs` is scheduled every minute.
"""

import errno
import logging
import os
import shutil
import signal
import threading
import time
import traceback

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone
from django.utils.translation import gettext as _

from csplatform.stored_text import shown, stored
from training import grounding, retraining, services
from training.priority import Yielding
from llm.finetune.loop import TrainingCancelled, TrainingInterrupted, train_model
from llm.finetune.raft import read_grounding
from llm.grounding import TRAINED_FALLBACK
from llm.modeling import load_adapter
from llm.prompting import read_prompt_format
from llm import gguf as gguf_export
from llm.calibration import pick_min_prob
from training.models import TrainingRun
from training.snapshots import read_records

log = logging.getLogger(__name__)
LOG_LIMIT = 20000


class Heartbeat(threading.Thread):
    """Writes heartbeat_at every CSP_HEARTBEAT_SECONDS while the run trains (even mid-step), and
    holds the schedules whose last task waits behind this run (services.queued_schedules_hold)."""

    def __init__(self, run_id):
        super().__init__(daemon=True, name=f"heartbeat-{run_id}")
        self.run_id = run_id
        self.stopped = threading.Event()

    def run(self):
        try:
            while not self.stopped.wait(settings.CSP_HEARTBEAT_SECONDS):
                try:
                    TrainingRun.objects.filter(pk=self.run_id, status=TrainingRun.Status.RUNNING).update(
                        heartbeat_at=timezone.now()
                    )
                    services.queued_schedules_hold()
                except DatabaseError:
                    # A busy database (SQLite locked by the training thread's write) skips one beat;
                    # the reconciler's limit is several beats, so only a dead worker looks dead.
                    log.warning("heartbeat of training run %s skipped: the database is busy", self.run_id, exc_info=True)
        finally:
            connection.close()

    def stop(self):
        self.stopped.set()
        self.join(timeout=settings.CSP_HEARTBEAT_SECONDS + 5)


class ProgressReporter:
    """on_progress / should_stop callbacks for llm.finetune.loop.train, writing to the run row."""

    def __init__(self, run):
        self.run = run
        self.last_cancel_check = 0.0

    def on_progress(self, info):
        run = self.run
        run.step, run.total_steps = info["step"], info["total_steps"]
        run.loss = info["loss"]
        run.eta_seconds = int(info["eta_s"])
        # A resumed run repeats the steps after its checkpoint: those points are replaced.
        run.loss_history = [p for p in run.loss_history if p[0] < info["step"]] + [[info["step"], round(info["loss"], 5)]]
        fields = ["step", "total_steps", "loss", "eta_seconds", "loss_history", "heartbeat_at"]
        if "dev_loss" in info:
            run.dev_loss_history = [p for p in run.dev_loss_history if p[0] < info["step"]] + [
                [info["step"], round(info["dev_loss"], 5)]
            ]
            fields.append("dev_loss_history")
            self.log(f"epoch {info['epoch']}: dev loss {info['dev_loss']:.4f}")
        run.heartbeat_at = timezone.now()
        run.save(update_fields=fields)

    def should_stop(self):
        now = time.monotonic()
        if now - self.last_cancel_check < 1.0:
            return False
        self.last_cancel_check = now
        return TrainingRun.objects.filter(pk=self.run.pk, cancel_requested=True).exists()

    def log(self, line):
        stamp = timezone.now().strftime("%H:%M:%S")
        self.run.log = (self.run.log + f"[{stamp}] {line}\n")[-LOG_LIMIT:]
        self.run.save(update_fields=["log"])


class Termination:
    """SIGTERM or SIGINT during a run (a deploy, `systemctl stop`, a host shutdown, Ctrl-C on
    `manage.py serve`, which stops the cluster with SIGINT) is noted, not obeyed at once.

    django-q2 leaves a busy worker with the default SIGTERM action: it would die mid-step and
    lose everything since the last checkpoint. Instead the training loop saves a checkpoint at
    the step it reached and the run ends interrupted; then the signal is sent again under the
    handler that was there before, so the worker still stops as asked (q2's workers ignore SIGINT:
    such a worker then takes the stop pill of its sentinel, which the same SIGINT stopped). (A
    SIGTERM to the q2 parent process alone reaches no worker: q2 then waits for the run to
    finish.) Handlers can only be set from the main thread; elsewhere nothing changes.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None  # the first signal noted
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.note) for signum in self.SIGNALS}
        return self

    def note(self, signum, frame):
        # only a flag: a handler runs between any two bytecodes of the loop
        self.received = self.received or signum

    def __exit__(self, *exc_info):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if self.previous and self.received:
            os.kill(os.getpid(), self.received)
        return False


def run_training(run_id):
    claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now()
    )
    if not claimed:
        log.info("training run %s is not queued any more; not running it", run_id)
        return "skipped"
    with Termination() as termination, Yielding(settings.CSP_TRAINING_NICE):
        return _train(run_id, termination)


def _train(run_id, termination):
    run = TrainingRun.objects.select_related("snapshot", "base_model").get(pk=run_id)
    reporter = ProgressReporter(run)
    heartbeat = Heartbeat(run_id)
    heartbeat.start()
    work = services.run_dir(run_id)
    try:
        config = services.finetune_config(run)
        train_records = read_records(run.snapshot, "train")
        dev_records = read_records(run.snapshot, "dev")
        reporter.log(f"training on {len(train_records)} pairs, evaluating on {len(dev_records)}; base {run.base_model.path}")
        # The training pairs only: a dev pair must never retrieve itself.
        index = grounding.train_index(run.snapshot, train_records)
        fit_train, fit_dev, grounded = grounding.fit_records(index, train_records, dev_records, config)
        if grounded:
            reporter.log(
                f"RAFT: {len(fit_train)} examples from {len(train_records)} pairs, each with the {grounded['k']} pairs retrieved for it"
                f" ({sum(r['output'] == TRAINED_FALLBACK for r in fit_train)} without the right one)"
            )
        model, tokenizer, metrics = train_model(
            config,
            run.base_model.path,
            fit_train,
            fit_dev,
            work,
            on_progress=reporter.on_progress,
            should_stop=reporter.should_stop,
            should_interrupt=lambda: termination.received,
            grounding=grounded,
        )
        if metrics.get("resumed_from_step"):
            reporter.log(f"resumed from the checkpoint at step {metrics['resumed_from_step']}")
        reporter.log(f"trained {metrics['steps']} steps in {metrics['seconds']:.0f} s ({metrics['tokens_per_s']:.0f} tokens/s)")
        calibrated = grounding.calibrate(index, train_records, dev_records)
        thresholds = calibrated.thresholds
        pick_bar = grounding.calibrate_pick(model, tokenizer, config, index, calibrated, train_records, dev_records, grounding=grounded)
        if "pick_min_prob" in calibrated.report:
            report = calibrated.report
            reporter.log(
                f"pick bar calibrated on {report['pick_count']} picks ({report['pick_right']} right): "
                + ("picks decide nothing (no bar gives 99% precision)" if report["pick_min_prob"] is None else f"{report['pick_min_prob']:.3f}")
            )
        reporter.log(
            f"thresholds calibrated: curated {thresholds.curated:.3f} "
            f"(precision {_share(calibrated.report['curated_precision'])}), fallback {thresholds.fallback:.3f} "
            f"(out-of-scope below it {_share(calibrated.report['out_of_scope_fallback_share'])})"
            + (
                f", confidence {thresholds.confident:.3f} ({calibrated.report['confident_curated']} of "
                f"{calibrated.report['confident_count']} questions between them curated)"
                if thresholds.confident is not None and "confident_count" in calibrated.report
                else ""
            )
        )
        results = evaluate_adapter(run, model, tokenizer, config, dev_records, reporter, index, thresholds, grounded, pick_bar)
        del model
        metrics["eval"] = results
        export_gguf(run, work / "adapter", reporter)
        version = services.adapter_version_create(
            run=run, adapter_dir=work / "adapter", metrics=metrics, calibration=calibrated
        )
        run.eval_results = results
        run.status = TrainingRun.Status.SUCCEEDED
        run.finished_at = timezone.now()
        run.eta_seconds = 0
        run.save(update_fields=["eval_results", "status", "finished_at", "eta_seconds"])
        reporter.log(f"adapter version {version.name} saved{' and activated' if version.is_active else ''}")
        if run.trigger == TrainingRun.Trigger.SCHEDULE:
            decision = retraining.scheduled_activation(
                run, version, results, lambda active: evaluate_version(active, config, dev_records, reporter, index, thresholds)
            )
            reporter.log(shown(decision, "en"))  # the run log is English throughout
        outcome = version.name
    except TrainingCancelled as exc:
        _finish(run, TrainingRun.Status.CANCELLED, str(exc))
        outcome = "cancelled"
    except TrainingInterrupted as exc:
        _finish(run, TrainingRun.Status.INTERRUPTED, str(exc))
        return "interrupted"  # its checkpoints stay: staff resume it
    except Exception as exc:  # the run must end failed with its traceback, whatever broke
        _finish(run, TrainingRun.Status.FAILED, failure_reason(exc))
        log.exception("training run %s failed", run_id)
        # Its checkpoints stay, so that staff can resume it once the cause is fixed.
        return "failed"
    finally:
        heartbeat.stop()
    # Succeeded or cancelled: checkpoints and half-written files go (the adapter was moved out).
    shutil.rmtree(work, ignore_errors=True)
    return outcome


def export_gguf(run, adapter_dir, reporter):
    """Write the adapter's llama.cpp LoRA beside it, before the folder becomes a version.

    A version without it still serves through transformers, so a failure is logged, not raised.
    """
    try:
        path = gguf_export.write_lora_gguf(adapter_dir, base_dir=run.base_model.path)
    except Exception as exc:  # whatever broke the export, the trained adapter must still be kept
        log.warning("GGUF export of training run %s failed", run.pk, exc_info=True)
        reporter.log(f"GGUF export failed, this version has no llama.cpp LoRA file: {type(exc).__name__}: {exc}")
        return None
    reporter.log(f"llama.cpp LoRA written: {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def failure_reason(exc):
    """A failed run's error: first what staff can act on, then the traceback. Called in the except
    block; its translated part is stored in every language (staff read it in their page's)."""
    reason = f"{type(exc).__name__}: {exc}"
    trace = traceback.format_exc()
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return stored(
            lambda: _("The disk is full: no space left where the run writes (%(dir)s). Free space there, then resume the run.")
            % {"dir": settings.DATA_DIR}
            + f"\n{reason}\n\n{trace}"
        )
    return f"{reason}\n\n{trace}"


def _finish(run, status, message):
    run.status = status
    run.error = message if status == TrainingRun.Status.FAILED else ""
    run.finished_at = timezone.now()
    first_line = shown(message, "en").splitlines()[0] if message else ""  # the run log is English throughout
    run.log = (run.log + f"[{timezone.now():%H:%M:%S}] {status}: {first_line}\n")[-LOG_LIMIT:]
    run.save(update_fields=["status", "error", "finished_at", "log"])


def evaluate_adapter(run, model, tokenizer, config, dev_records, reporter, index, thresholds, grounded, pick_bar):
    """The dev pairs (at most CSP_EVAL_MAX_PAIRS) and the out-of-scope questions answered as the chat
    would (training.grounding.evaluate_served, picks held to `pick_bar`), scored against the
    references, per mode."""
    results = grounding.evaluate_served(
        model, tokenizer, config, index, thresholds, dev_records, grounding=grounded, log=reporter.log, min_prob=pick_bar,
    )
    if results and run.dev_loss_history:
        results["dev_loss"] = run.dev_loss_history[-1][1]
    return results


def evaluate_version(version, config, dev_records, reporter, index, thresholds):
    """Another version's metrics on these dev pairs, with this run's index and thresholds (the
    scheduled-retraining comparison: only the adapters differ)."""
    reporter.log(f"evaluating the active version {version.name} on the same dev pairs")
    model, tokenizer = load_adapter(version.base_model.path, version.path, config)
    # Asked in the format it learnt: a version trained before formats were recorded is Gemma's even
    # where the base checkpoint has a chat template; one trained before RAFT is never asked grounded.
    results = grounding.evaluate_served(
        model, tokenizer, config, index, thresholds, dev_records,
        grounding=read_grounding(version.path), prompt_format=read_prompt_format(version.path), log=reporter.log,
        min_prob=pick_min_prob(version.calibration, settings.CSP_RERANK_MIN_PROB),  # its own pick bar
    )
    del model
    return results


def _share(value):
    return "—" if value is None else f"{value:.0%}"


def scheduled_retraining():
    """The django-q2 schedule "Scheduled retraining" (see training.retraining)."""
    return retraining.retraining_check()


def reconcile_training_runs():
    return services.training_runs_reconcile()

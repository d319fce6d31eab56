"""Scheduled retraining: "collect feedback, add new dialogue data, retrain periodically", as a feature.

The django-q2 schedule "Scheduled retraining" calls `retraining_check()` (through
training.tasks.scheduled_retraining). When the policy is on and at least `min_new_pairs` approved
pairs are not in the last snapshot, it starts a run (trigger "schedule") with the hyper-parameters
of the last successful run. When that run has trained and been evaluated, `scheduled_activation()`
evaluates the ACTIVE version on the same dev pairs (and out-of-scope questions, with the same index
and thresholds) and activates the new one only when it is not worse on any metric, more answers
with an invented number included (policy "auto"), or leaves it to staff ("manual"). The reason is written on
the run (`activation_decision`) and on the policy (`last_decision`), where staff see it, in every
language (csplatform.stored_text): this runs in the server's language, staff read it in their page's.
"""

import logging

from django.utils import timezone
from django.utils.translation import gettext as _

from csplatform.stored_text import stored
from knowledge.models import QAPair
from training import services
from training.models import AdapterVersion, DatasetSnapshot, RetrainingPolicy, TrainingRun

log = logging.getLogger(__name__)

METRIC_NAMES = {
    "key_fact_recall": "key-fact recall",
    "rouge_l_char": "ROUGE-L (char)",
    "rouge_l_word": "ROUGE-L (word)",
    "exact_match": "exact match",
    "bleu4": "BLEU-4",
    "invented_number_share": "answers with an invented number",
}


def new_approved_pairs():
    """Approved pairs that are not in the newest snapshot (all of them when there is none)."""
    approved = QAPair.objects.filter(status=QAPair.Status.APPROVED)
    last = DatasetSnapshot.objects.order_by("-created_at", "-id").first()
    if last is None:
        return approved.count()
    frozen = set(last.manifest.get("train_pair_ids", ())) | set(last.manifest.get("dev_pair_ids", ()))
    return sum(1 for pk in approved.values_list("pk", flat=True) if pk not in frozen)


def _record(policy, decision):
    policy.last_checked_at = timezone.now()
    policy.last_decision = decision
    policy.save(update_fields=["last_checked_at", "last_decision"])
    log.info("scheduled retraining: %s", decision)
    return decision


def retraining_check():
    """Start a scheduled run when the policy says so; returns the decision, in words."""
    policy = RetrainingPolicy.load()
    if not policy.enabled:
        return _record(policy, stored(lambda: _("Retraining is off.")))
    if TrainingRun.objects.filter(status__in=TrainingRun.ACTIVE_STATUSES).exists():
        return _record(policy, stored(lambda: _("A training run is queued or running; checked again next time.")))
    count = new_approved_pairs()
    if count < policy.min_new_pairs:
        return _record(
            policy,
            stored(
                lambda: _("%(count)s new approved pairs since the last snapshot; %(needed)s are needed.")
                % {"count": count, "needed": policy.min_new_pairs}
            ),
        )
    last = TrainingRun.objects.filter(status=TrainingRun.Status.SUCCEEDED).order_by("-finished_at", "-id").first()
    try:
        run = services.training_run_start(
            hyperparameters=last.hyperparameters if last else None, trigger=TrainingRun.Trigger.SCHEDULE
        )
    except services.TrainingRefused as exc:
        # The refusal renders its reason in whichever language stored() asks for.
        return _record(
            policy, stored(lambda: _("%(count)s new approved pairs, but the run was refused: %(reason)s") % {"count": count, "reason": exc})
        )
    return _record(
        policy, stored(lambda: _("%(count)s new approved pairs: started training run #%(run)s.") % {"count": count, "run": run.pk})
    )


def _numbers(new, old):
    shown = [name for name in METRIC_NAMES if new.get(name) is not None and old.get(name) is not None]
    return "; ".join(f"{METRIC_NAMES[name]} {new[name]:.3f} vs {old[name]:.3f}" for name in shown)


def scheduled_activation(run, version, results, evaluate_active):
    """Decide whether a scheduled run's version goes live; `evaluate_active(active_version)` returns
    the active version's metrics on this run's dev pairs. Returns the decision, in words."""
    policy = RetrainingPolicy.load()
    active = AdapterVersion.objects.filter(is_active=True).first()
    if active is None or active.pk == version.pk:
        decision = stored(lambda: _("%(new)s is the first version: it serves already.") % {"new": version.name})
    elif active.base_model_id != version.base_model_id:
        decision = stored(
            lambda: _("The active version %(old)s is on another base model; activation is left to staff.") % {"old": active.name}
        )
    elif not any(name in results for name in METRIC_NAMES):
        decision = stored(
            lambda: _("There are no dev pairs to compare %(new)s with %(old)s on; activation is left to staff.")
            % {"new": version.name, "old": active.name}
        )
    else:
        baseline = evaluate_active(active)
        worse = services.compare_metrics({k: v for k, v in results.items() if k != "dev_loss"}, baseline)
        numbers = _numbers(results, baseline)
        if worse:
            decision = stored(lambda: _("Kept %(old)s: %(new)s is worse on %(worse)s (%(numbers)s).") % {
                "old": active.name, "new": version.name, "worse": ", ".join(METRIC_NAMES[w] for w in worse), "numbers": numbers,
            })
        elif policy.activation == RetrainingPolicy.Activation.MANUAL:
            decision = stored(lambda: _("%(new)s is not worse than %(old)s (%(numbers)s); activation is left to staff.") % {
                "new": version.name, "old": active.name, "numbers": numbers,
            })
        else:
            # Our comparison (both on this run's dev pairs) is the gate: force past the stored-metrics one.
            services.adapter_version_activate(version=version, force=True)
            decision = stored(lambda: _("Activated %(new)s: not worse than %(old)s on the dev pairs (%(numbers)s).") % {
                "new": version.name, "old": active.name, "numbers": numbers,
            })
    run.activation_decision = decision
    run.save(update_fields=["activation_decision"])
    _record(policy, decision)
    return decision

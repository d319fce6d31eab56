"""Canary rollout: a new adapter version answers a share of the new conversations beside the
active one, until staff promote it (it becomes the active version) or stop it.

    canary_start(version=v5, percent=10)   # 10% of new conversations go to v5
    canary_promote()                       # v5 is activated; the canary ends
    canary_stop()                          # the canary ends; v5 answers no new conversation

The rollout lives on the versions' rows (`is_canary`, `canary_percent`), as the active version
does, so every web process and inference worker reads the same one. Which conversations go to the
canary is chat's (chat.canary): the choice is made once, when a conversation starts, and the
conversation stays on its version whatever happens to the rollout afterwards. Any activation (a
promote, a rollback, staff activating another version) ends the canary (services._make_active).
"""

from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from training import services
from training.models import AdapterVersion


class CanaryRefused(Exception):
    pass


def current_canary():
    """The version in canary, or None."""
    return AdapterVersion.objects.filter(is_canary=True).first()


def canary_start(*, version, percent):
    """Send `percent` (1-100) of the new conversations to `version`, beside the active version;
    replaces a canary already running. Raises CanaryRefused."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
        raise CanaryRefused(_("The canary's share must be a whole number from 1 to 100 (per cent)."))
    if version.is_active:
        raise CanaryRefused(_("%(v)s is the active version: a canary is another version tried beside it.") % {"v": version.name})
    if not AdapterVersion.objects.filter(is_active=True).exists():
        raise CanaryRefused(_("No version is active yet: activate one; a canary is tried beside it."))
    with transaction.atomic():
        _end()
        version.is_canary = True
        version.canary_percent = percent
        version.canary_started_at = timezone.now()
        version.save(update_fields=["is_canary", "canary_percent", "canary_started_at"])
    return version


def canary_promote():
    """Activate the canary (the activation ends the canary). Returns (version, metrics it is worse
    on), or None without a canary; raises services.ActivationRefused (CSP_EVAL_GATE=strict)."""
    canary = current_canary()
    if canary is None:
        return None
    worse = services.adapter_version_activate(version=canary)
    canary.refresh_from_db()
    return canary, worse


def canary_stop():
    """End the canary: new conversations all go to the active version. Returns the version that
    was the canary, or None."""
    canary = current_canary()
    if canary is not None:
        _end()
    return canary


def _end():
    AdapterVersion.objects.filter(is_canary=True).update(is_canary=False)

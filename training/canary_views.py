"""The canary rollout in the admin (training.canary): the version list's action starts one (a page
asks for the share), and one click promotes or stops it, from the version list or the analytics
page (chat), which posts here with `next` to come back to."""

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _

from training import canary, services
from training.models import AdapterVersion

DEFAULT_PERCENT = 10


def changelist_context(request):
    """The version list's canary panel (AdapterVersionAdmin.add_changelist_context)."""
    return {"canary": canary.current_canary(), "may_change_canary": request.user.has_perm("training.change_adapterversion")}


def start(model_admin, request, queryset):
    """The action: asks for the share, then starts the canary (None: back to the list)."""
    if queryset.count() != 1:
        model_admin.message_user(request, _("Select exactly one version to try as the canary."), messages.ERROR)
        return None
    version = queryset.get()
    error = None
    if "start_canary" in request.POST:
        raw = request.POST.get("percent", "").strip()
        try:
            canary.canary_start(version=version, percent=int(raw) if raw.isdecimal() else -1)
        except canary.CanaryRefused as exc:
            error = str(exc)
        else:
            model_admin.message_user(
                request,
                _("%(v)s now answers %(p)s%% of the new conversations; the conversations keep the version they started with.")
                % {"v": version.name, "p": version.canary_percent},
                messages.SUCCESS,
            )
            return None
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": AdapterVersion._meta,
        "title": _("Try %(v)s on a share of new conversations") % {"v": version.name},
        "version": version,
        "active": AdapterVersion.objects.filter(is_active=True).first(),
        "percent": request.POST.get("percent", DEFAULT_PERCENT),
        "error": error,
        "action_checkbox_name": "_selected_action",
    }
    return TemplateResponse(request, "admin/training/adapterversion/canary_start.html", context)


def _back(request):
    target = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return HttpResponseRedirect(target)
    return HttpResponseRedirect(reverse("admin:training_adapterversion_changelist"))


def _checked(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    if not request.user.has_perm("training.change_adapterversion"):
        raise PermissionDenied
    return None


def promote(model_admin, request):
    """POST: activate the canary, which ends it."""
    refused = _checked(request)
    if refused is not None:
        return refused
    try:
        promoted = canary.canary_promote()
    except services.ActivationRefused as exc:
        model_admin.message_user(request, str(exc), messages.ERROR)
        return _back(request)
    if promoted is None:
        model_admin.message_user(request, _("No canary is running."), messages.WARNING)
        return _back(request)
    version, worse = promoted
    if worse:  # as the activate action warns
        model_admin.message_user(
            request, _("%(v)s is active, but it is worse than the previous version on: %(m)s.") % {"v": version.name, "m": ", ".join(worse)},
            messages.WARNING,
        )
    else:
        model_admin.message_user(
            request, _("%(v)s is now active for every new conversation; the canary has ended.") % {"v": version.name}, messages.SUCCESS
        )
    return _back(request)


def stop(model_admin, request):
    """POST: end the canary; new conversations all go to the active version."""
    refused = _checked(request)
    if refused is not None:
        return refused
    stopped = canary.canary_stop()
    if stopped is None:
        model_admin.message_user(request, _("No canary is running."), messages.WARNING)
    else:
        model_admin.message_user(
            request, _("The canary %(v)s is stopped: new conversations all go to the active version.") % {"v": stopped.name}, messages.SUCCESS
        )
    return _back(request)

"""Admin login brute-force protection: failed logins are counted per client address and per
username in the cache (Redis in scale-out mode, so every web process shares the count); past
CSP_LOGIN_MAX_FAILURES failures within CSP_LOGIN_WINDOW_SECONDS the login form refuses to even
check the password until the window has passed. A successful login clears the client's count.
"""

import time

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _

PREFIX = "csp-login-fail"


def trusted_client(forwarded, peer):
    """The client's address: behind a trusted proxy (CSP_BEHIND_PROXY) the first entry of its
    X-Forwarded-For header `forwarded`, else the connection's `peer`. HTTP and websockets share it."""
    if settings.CSP_BEHIND_PROXY and forwarded:
        return forwarded.split(",")[0].strip()
    return peer


def client_address(request):
    if request is None:
        return "unknown"
    return trusted_client(request.META.get("HTTP_X_FORWARDED_FOR", ""), request.META.get("REMOTE_ADDR", "unknown"))


def _keys(request, username):
    return [f"{PREFIX}:ip:{client_address(request)}", f"{PREFIX}:user:{(username or '').strip().lower()[:150]}"]


def _failures(key):
    """(count, window start) of failures recorded under key."""
    return cache.get(key) or (0, time.time())


def seconds_blocked(request, username):
    """0 when a login may be tried now, else the seconds until it may."""
    window = settings.CSP_LOGIN_WINDOW_SECONDS
    now = time.time()
    waits = [
        int(start + window - now) + 1
        for count, start in (_failures(key) for key in _keys(request, username))
        if count >= settings.CSP_LOGIN_MAX_FAILURES and now - start < window
    ]
    return max(waits, default=0)


def record_failure(request, username):
    window = settings.CSP_LOGIN_WINDOW_SECONDS
    now = time.time()
    for key in _keys(request, username):
        count, start = _failures(key)
        if now - start >= window:
            count, start = 0, now
        cache.set(key, (count + 1, start), timeout=window)


def clear(request, username):
    cache.delete_many(_keys(request, username))


class ThrottledAdminAuthenticationForm(AdminAuthenticationForm):
    error_messages = {
        **AdminAuthenticationForm.error_messages,
        "throttled": _("Too many failed logins. Try again in %(seconds)s seconds."),
    }

    def clean(self):
        username = self.cleaned_data.get("username")
        wait = seconds_blocked(self.request, username)
        if wait:
            raise ValidationError(self.error_messages["throttled"], code="throttled", params={"seconds": wait})
        try:
            cleaned = super().clean()
        except ValidationError:
            record_failure(self.request, username)
            raise
        clear(self.request, username)
        return cleaned

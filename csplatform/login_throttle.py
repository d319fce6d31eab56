"""Admin login brute-force protection: failed logins are counted in the cache (Redis in scale-out
mode, so every web process shares the count) per (username, client address) pair, per address and
per username. Past its limit within CSP_LOGIN_WINDOW_SECONDS a count locks the login form, which
then refuses to even check the password until the window has passed:

- the pair at CSP_LOGIN_MAX_FAILURES (5): someone guessing one account from one address;
- the address at CSP_LOGIN_MAX_FAILURES_PER_ADDRESS (25), whatever the username: someone trying
  many accounts. Locking the address at the pair's limit also locked out the real admin logging in
  from that address (an office or NAT shared with the attacker, issue #16);
- the username at CSP_LOGIN_MAX_FAILURES_PER_USERNAME (25), whatever the address: someone guessing
  one account from many addresses.

A successful login clears its pair's count only: it says nothing of the other failures from that
address or on that name, which expire with their window.
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


def _pair_key(request, username):
    return f"{PREFIX}:pair:{client_address(request)}:{_name(username)}"


def _name(username):
    return (username or "").strip().lower()[:150]


def _limits(request, username):
    """{cache key: failures that lock it} of the three counts a login attempt adds to."""
    return {
        _pair_key(request, username): settings.CSP_LOGIN_MAX_FAILURES,
        f"{PREFIX}:ip:{client_address(request)}": settings.CSP_LOGIN_MAX_FAILURES_PER_ADDRESS,
        f"{PREFIX}:user:{_name(username)}": settings.CSP_LOGIN_MAX_FAILURES_PER_USERNAME,
    }


def _failures(key):
    """(count, window start) of failures recorded under key."""
    return cache.get(key) or (0, time.time())


def seconds_blocked(request, username):
    """0 when a login may be tried now, else the seconds until it may."""
    window = settings.CSP_LOGIN_WINDOW_SECONDS
    now = time.time()
    waits = [0]
    for key, limit in _limits(request, username).items():
        count, start = _failures(key)
        if count >= limit and now - start < window:
            waits.append(int(start + window - now) + 1)
    return max(waits)


def record_failure(request, username):
    window = settings.CSP_LOGIN_WINDOW_SECONDS
    now = time.time()
    for key in _limits(request, username):
        count, start = _failures(key)
        if now - start >= window:
            count, start = 0, now
        cache.set(key, (count + 1, start), timeout=window)


def clear(request, username):
    cache.delete(_pair_key(request, username))


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

"""Admin login brute force is rate-limited per (username, client address) pair, and at higher
limits per address and per username."""

import pytest

pytestmark = [pytest.mark.django_db, pytest.mark.services]
LOGIN = "/admin/login/"


def _try(client, username, password, address="10.0.0.1"):
    return client.post(LOGIN, {"username": username, "password": password, "next": "/admin/"}, REMOTE_ADDR=address)


def _code(page):
    return page.context["form"].errors.as_data()["__all__"][0].code


def test_repeated_failures_lock_the_login_even_for_the_right_password(client, staff_user, settings):
    settings.CSP_LOGIN_MAX_FAILURES = 3
    for _ in range(3):
        page = _try(client, "staff", "wrong-password")
        assert page.status_code == 200 and _code(page) == "invalid_login"
    locked = _try(client, "staff", "staff-pass-123")
    assert locked.status_code == 200  # the form again, not a redirect into the admin
    assert _code(locked) == "throttled"
    assert "_auth_user_id" not in client.session


def test_the_lock_follows_the_username_across_addresses_and_the_address_across_usernames(client, staff_user, settings):
    settings.CSP_LOGIN_MAX_FAILURES = 2
    # The wider locks at their lowest setting, the pair's limit (by default five times higher).
    settings.CSP_LOGIN_MAX_FAILURES_PER_ADDRESS = settings.CSP_LOGIN_MAX_FAILURES_PER_USERNAME = 2
    _try(client, "staff", "wrong", "10.0.0.1")
    _try(client, "staff", "wrong", "10.0.0.2")
    assert _code(_try(client, "staff", "staff-pass-123", "10.0.0.3")) == "throttled"
    _try(client, "alice", "wrong", "10.0.0.9")
    _try(client, "bob", "wrong", "10.0.0.9")
    assert _code(_try(client, "carol", "x", "10.0.0.9")) == "throttled"


def test_a_success_clears_the_count_and_the_window_expires(client, staff_user, settings, monkeypatch):
    settings.CSP_LOGIN_MAX_FAILURES = 2
    _try(client, "staff", "wrong")
    assert _try(client, "staff", "staff-pass-123").status_code == 302  # one failure: still allowed
    client.logout()
    _try(client, "staff", "wrong")
    assert _try(client, "staff", "staff-pass-123").status_code == 302  # the success cleared it
    client.logout()
    for _ in range(2):
        _try(client, "staff", "wrong")
    import time

    later = time.time() + settings.CSP_LOGIN_WINDOW_SECONDS + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert _try(client, "staff", "staff-pass-123").status_code == 302


def test_an_attacker_failing_as_admin_locks_staff_out_of_that_address_only_at_the_higher_limit(client, staff_user, settings):
    settings.CSP_LOGIN_MAX_FAILURES, settings.CSP_LOGIN_MAX_FAILURES_PER_ADDRESS = 2, 6
    for _ in range(2):
        _try(client, "admin", "guess", "10.0.0.1")

    assert _code(_try(client, "admin", "guess", "10.0.0.1")) == "throttled"  # the pair's lock
    assert _try(client, "staff", "staff-pass-123", "10.0.0.1").status_code == 302  # not the address's yet
    client.logout()
    for username in ("root", "root", "administrator", "administrator"):  # the address's failures 3 to 6
        _try(client, username, "guess", "10.0.0.1")
    assert _code(_try(client, "staff", "staff-pass-123", "10.0.0.1")) == "throttled"
    assert _try(client, "staff", "staff-pass-123", "10.0.0.2").status_code == 302

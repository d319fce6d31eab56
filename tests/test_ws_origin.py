"""The websocket Origin check compares scheme, host and port (issue #16 item 6), through the real
ASGI application as daphne calls it: Host and Origin headers as a browser sends them."""

import asyncio

import pytest
from channels.testing import WebsocketCommunicator

from csplatform.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def _accepted(origin, host=None, *, scheme="ws", extra=()):
    async def scenario():
        headers = [(b"origin", origin.encode())] if origin is not None else []
        if host is not None:
            headers.append((b"host", host.encode()))
        communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[*headers, *extra])
        communicator.scope["scheme"] = scheme
        connected, _ = await communicator.connect(timeout=5)
        await communicator.disconnect()  # ends the application either way, as a server would
        return connected

    return asyncio.run(scenario())


def test_the_chat_page_on_make_runs_address_opens_its_socket():
    assert _accepted("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert _accepted("http://localhost:8000", "localhost:8000")
    assert _accepted("http://[::1]:8000", "[::1]:8000")


def test_a_page_on_another_port_of_the_same_host_is_refused():
    assert not _accepted("http://127.0.0.1:9000", "127.0.0.1:8000")
    assert not _accepted("http://localhost", "localhost:8000")  # port 80 is another port too
    assert not _accepted("http://localhost:8001")  # no Host: the default port is the only one


def test_a_page_on_another_scheme_of_the_same_host_and_port_is_refused():
    assert not _accepted("https://127.0.0.1:8000", "127.0.0.1:8000")
    assert not _accepted("http://localhost:443", "localhost:443", scheme="wss")
    assert _accepted("https://localhost:443", "localhost:443", scheme="wss")


def test_a_rebound_dns_name_is_refused_though_host_and_origin_agree():
    assert not _accepted("http://attacker.example:8000", "attacker.example:8000")


def test_null_and_malformed_origins_are_refused():
    for origin in ("null", "file://", "localhost:8000", "ftp://localhost", "http://localhost:8000/", "http://", ""):
        assert not _accepted(origin, "localhost:8000"), origin
    assert not _accepted(None, "localhost:8000")


def test_csrf_trusted_origins_are_accepted_on_their_exact_scheme_and_port(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://cs.example.com", "https://*.shop.example"]
    # Behind a proxy that gives daphne its own address as Host, the trusted list is what matches.
    assert _accepted("https://cs.example.com", "127.0.0.1:8001")
    assert _accepted("https://cs.example.com:443", "127.0.0.1:8001")
    assert _accepted("https://eu.shop.example", "127.0.0.1:8001")
    assert not _accepted("http://cs.example.com", "127.0.0.1:8001")
    assert not _accepted("https://cs.example.com:8443", "127.0.0.1:8001")
    assert not _accepted("https://cs.example.com.evil.example", "127.0.0.1:8001")


def test_behind_a_tls_proxy_the_forwarded_scheme_is_the_pages_own(settings):
    settings.ALLOWED_HOSTS = ["cs.example.com"]
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    forwarded = [(b"x-forwarded-proto", b"https")]
    assert _accepted("https://cs.example.com", "cs.example.com", extra=forwarded)
    assert not _accepted("http://cs.example.com", "cs.example.com", extra=forwarded)
    assert not _accepted("https://cs.example.com", "cs.example.com")  # the proxy did not say https

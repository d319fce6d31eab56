"""ASGI entry point: HTTP (Django, plus static files) and websockets (Channels).

Run with `daphne csplatform.asgi:application`; `make run` does this for you.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "csplatform.settings")
# Django must be set up before anything imports models (the consumers do).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import WebsocketDenier  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.http.request import is_same_domain, split_domain_port, validate_host  # noqa: E402

from chat.routing import websocket_urlpatterns  # noqa: E402

DEFAULT_PORTS = {"http": "80", "https": "443"}


def _origin(scheme, netloc):
    """(scheme, host, port) with the scheme's default port filled in; None if it is no web origin."""
    host, port = split_domain_port(netloc)
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return scheme, host, port or DEFAULT_PORTS[scheme]


class SameOriginValidator:
    """Accepts a websocket whose Origin is the page's own origin (scheme, host and port) or one of
    CSRF_TRUSTED_ORIGINS; denies every other before the consumer runs (HTTP 403).

    channels' AllowedHostsOriginValidator compares the host only, so a page on any port or scheme
    of an allowed host (another local service on 127.0.0.1:9000, plain http beside https) could
    open a customer's chat with their cookie. The page's own origin is the request's scheme (wss,
    or https through SECURE_PROXY_SSL_HEADER behind a TLS proxy) with its Host header, and only
    when that host is in ALLOWED_HOSTS (a rebound DNS name is not). A client that sends no Host
    (no browser does; channels' test communicator) is taken to be on its scheme's default port.
    Settings are read per connection, so tests can override them.
    """

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if self.allows(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)

    @staticmethod
    def allows(scope):
        headers = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name.lower(), value.decode("latin-1"))
        # split_domain_port, like Django's request.get_host(), takes the origin as a netloc.
        scheme, sep, netloc = headers.get(b"origin", "").strip().lower().partition("://")
        origin = _origin(scheme, netloc) if sep and "/" not in netloc else None
        if origin is None:  # absent, "null" (a sandboxed page or file://) or not http(s)
            return False
        for trusted in settings.CSRF_TRUSTED_ORIGINS:
            trusted_scheme, _sep, trusted_netloc = trusted.lower().partition("://")
            if trusted_netloc.startswith("*."):  # Django's subdomain wildcard, as the CSRF check reads it
                wildcard = _origin(trusted_scheme, trusted_netloc[1:])
                if wildcard and origin[::2] == wildcard[::2] and is_same_domain(origin[1], wildcard[1]):
                    return True
            elif origin == _origin(trusted_scheme, trusted_netloc):
                return True
        own_scheme = "https" if _is_secure(scope, headers) else "http"
        own_netloc = headers.get(b"host", origin[1])
        own = _origin(own_scheme, own_netloc)
        allowed_hosts = settings.ALLOWED_HOSTS
        if settings.DEBUG and not allowed_hosts:
            allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]  # what Django allows then
        return own is not None and origin == own and validate_host(own[1], allowed_hosts)


def _is_secure(scope, headers):
    if scope.get("scheme") == "wss":
        return True
    if settings.SECURE_PROXY_SSL_HEADER:
        name, expected = settings.SECURE_PROXY_SSL_HEADER  # e.g. ("HTTP_X_FORWARDED_PROTO", "https")
        header = name.removeprefix("HTTP_").replace("_", "-").lower().encode()
        return headers.get(header, "").split(",")[0].strip() == expected
    return False


application = ProtocolTypeRouter(
    {
        # One process serves pages, admin assets and the API; a reverse proxy in front may
        # serve STATIC_ROOT itself (docs/deployment.md).
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

"""The chat widget's page (/widget/): the chat page, compact, inside the frame that
static/csp/widget.js draws on other sites (docs/widget.md).

Only the platform itself and the origins of CSP_WIDGET_ORIGINS may frame it: the page sends
`Content-Security-Policy: frame-ancestors 'self' <origins>` instead of X-Frame-Options, which every
other page keeps at DENY. The frame is the platform's own origin, so its websocket passes the
strict Origin check and its session cookie and storage are the platform's.

widget.js passes the embedding page's options in the query string: `origin` (the page's origin,
the only one the frame posts messages to, and only if it may frame the page), `title`, `greeting`,
`color` and `lang`.

Embedded on another site, the frame gets no session cookie (it is SameSite=Lax), so the widget has
an identity of its own: a random widget key, which owns the conversations the frame starts, given
to the frame signed (the widget token, config.widgetToken). The frame keeps the token in the
platform's localStorage (partitioned by the embedding site) and presents it: in its socket's query
string (`token`, read by chat.consumers) and in the frame's address (`?token=`) when it reloads to
show a conversation's history. Only this page and the chat socket read it; the chat page at `/`
and the admin keep to the session.

A token holds for CSP_WIDGET_TOKEN_DAYS from its signing. Each load of this page with one that still
holds gives the frame a fresh token for the same key, so a visitor who comes back within that many
days keeps the conversation however long they stay; one that has expired (or was forged) is
treated as no token: a new key, a new, empty conversation, and the socket refuses it at connect.
"""

import re
import secrets

from django.conf import settings
from django.core import signing
from django.shortcuts import render
from django.utils import translation
from django.views.decorators.clickjacking import xframe_options_exempt
from django.views.decorators.http import require_safe

from chat.views import chat_config

COLOR = re.compile(r"#(?:[0-9a-fA-F]{3}){1,2}")
# Longer options are cut: they are shown in a small panel, not stored.
TITLE_MAX_CHARS = 80
GREETING_MAX_CHARS = 500
# The widget keys' salt (tokens signed for anything else never verify here) and prefix: a widget
# key is stored as its conversations' session_key, where it can never equal a Django session key.
TOKEN_SALT = "chat.widget.token"
KEY_PREFIX = "widget-"


def widget_token(key):
    """A token for a widget key, signed now (signing.dumps stamps the time it signs)."""
    return signing.dumps(key, salt=TOKEN_SALT)


def new_widget_token():
    """A token standing for a new widget identity: a random key, signed."""
    return widget_token(KEY_PREFIX + secrets.token_hex(16))


def widget_key(token):
    """The widget key a token stands for, or None for a token that is not one this platform signed,
    or was signed more than CSP_WIDGET_TOKEN_DAYS ago."""
    try:
        key = signing.loads(token, salt=TOKEN_SALT, max_age=settings.CSP_WIDGET_TOKEN_DAYS * 86400) if token else None
    except (signing.BadSignature, ValueError):
        # BadSignature: forged, or expired (SignatureExpired is one). ValueError: signed without a
        # timestamp (signing.Signer), which loads(max_age=...) cannot date: as good as expired.
        return None
    return key if isinstance(key, str) and key.startswith(KEY_PREFIX) else None


def frame_ancestors():
    """The Content-Security-Policy that lets the platform and CSP_WIDGET_ORIGINS frame the widget."""
    return " ".join(["frame-ancestors", "'self'", *settings.CSP_WIDGET_ORIGINS])


def parent_origin(request):
    """The embedding page's origin as widget.js names it, if that origin may frame the widget;
    else None (the frame then posts no messages at all)."""
    origin = request.GET.get("origin", "").lower()
    own = f"{request.scheme}://{request.get_host()}".lower()
    return origin if origin == own or origin in settings.CSP_WIDGET_ORIGINS else None


@xframe_options_exempt
@require_safe
def widget_page(request):
    language = request.GET.get("lang", "")
    if language in dict(settings.LANGUAGES):
        translation.activate(language)  # LocaleMiddleware sends Content-Language from this
        request.LANGUAGE_CODE = language
    token = request.GET.get("token", "")
    key = widget_key(token)
    # With a valid token the history shown is its widget's; without one, the session's (the
    # platform's own pages, or a widget on the same site before it had a token).
    config = chat_config(request, owner_key=key)
    # Sliding renewal: a token that holds comes back re-signed for the same key, its days counted
    # afresh; an expired or forged one is replaced by a new identity, never an error page.
    config["widgetToken"] = widget_token(key) if key else new_widget_token()
    config["parentOrigin"] = parent_origin(request)
    config["wsPath"] += f"?lang={translation.get_language()}"  # server-made texts in the page's language
    color = request.GET.get("color", "")
    context = {
        "chat_config": config,
        "max_chars": settings.CSP_CHAT_MAX_MESSAGE_CHARS,
        "widget_title": request.GET.get("title", "").strip()[:TITLE_MAX_CHARS],
        "widget_greeting": request.GET.get("greeting", "").strip()[:GREETING_MAX_CHARS],
        "widget_color": color if COLOR.fullmatch(color) else "",
    }
    response = render(request, "chat/widget.html", context)
    response["Content-Security-Policy"] = frame_ancestors()
    return response
